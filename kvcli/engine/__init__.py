"""Prefill and generation: the auxiliary, the predicted cache, spans the base recomputes, bundles, chat."""
