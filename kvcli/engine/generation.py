"""The token loop after a prefill: what ``kvcli generate`` runs (chat's turns stream and stop
on Ctrl-C in kvcli.engine.conversation)."""

from __future__ import annotations

import time

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.sampling import Sampler
from kvcli.engine.timings import Generation


def generate(
    engine: Engine,
    tokens: list[int],
    *,
    mode: str = "kvp",
    n_predict: int = 64,
    kvp: KvpSettings | None = None,
    keep: int | None = None,
    select_by: str = "auto",
    sampler: Sampler | None = None,
    on_token=None,
) -> Generation:
    """``engine`` prefills ``tokens`` by ``mode`` (kvp: by ``kvp``, KvpSettings() if None; by
    the base below the bundle's break-even, ``Engine.kvp_pays``), then its context generates
    up to ``n_predict`` tokens (stops at end of generation or a full context)."""
    sampler = sampler or Sampler()
    kvp = kvp or KvpSettings()
    by = "base" if mode == "kvp" and not engine.kvp_pays(len(tokens)) else mode
    start = time.perf_counter()
    prefill = engine.prefill(tokens, mode=by, kvp=kvp, keep=keep, select_by=select_by)
    ctx = prefill.context
    token = sampler.sample(prefill.logits)
    ttft_ms = (time.perf_counter() - start) * 1e3
    out: list[int] = []
    gen_start = time.perf_counter()
    while True:
        if ctx.model.is_eog(token):
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) >= n_predict or ctx.n_past + 1 > ctx.n_ctx:
            break
        ctx.decode([token], logits_last=True)
        token = sampler.sample(ctx.last_logits())
    return Generation(
        mode=mode,
        n_prompt=len(tokens),
        ttft_ms=ttft_ms,
        timings=prefill.timings,
        tokens=out,
        text=ctx.model.detokenize(out),
        gen_ms=(time.perf_counter() - gen_start) * 1e3,
        first_logits=prefill.logits,
        tail=kvp.tail,
        spans=kvp.spans,
        recomputed=list(prefill.recomputed),
        selected=None if prefill.selected is None else len(prefill.selected),
        prefilled_by=by,
    )
