"""Spans chosen by the question itself: the base decodes the prompt's last tokens over the
predicted cache once, and where some of its own layers' attention peaks is what it recomputes.
Where those layers are a prefix auxiliary's own (their cells are copied, not predicted), the
auxiliary's decode of the tail gives the same attention for a fraction of the cost
(``SpanRecompute.aux_tail_scores``).

The first chooser (kvcli.engine.span_choice) reads base layer k, the first after a prefix auxiliary, over
predicted keys. That needs a prefix and a layer that looks for facts: on Qwen2.5-Coder 1.5B
with a 7-layer prefix, layer 7's last-token attention ranked the pass key 57th-101st of
~1000 positions even over the base's true keys, so the span never held it. Deeper layers
do look: over the *predicted* cache, with the base decoding the 25 last tokens itself,
layer 22's attention ranked the pass key first or second (6 prompts, positions < 8 and the
16 before the tail left out: the first draw every layer's attention whatever the question,
an attention sink, and the last are what any next token looks at), while among look-alike
records the prefix's own layer 5 found the asked one where layer 22 did not. Which layers
are measured per model (kvcli.eval.span_layers) on prompts of kvcli's own, in held-out prose,
with several records of one shape and one asked for by name; the best N_LAYERS combined.

Needs llama.cpp's attention weights (``kq_soft_max-L``, present with flash attention off,
kvcli's default) and a model without sliding-window layers (the tail's layer sees every
predicted cell). Works for any auxiliary: a prefix of the base or another model (KVP-C).
"""

from __future__ import annotations

import numpy as np

from kvcli.engine.span_choice import SINK_POSITIONS

RECENT_POSITIONS = 16  # never chosen: the last before the tail (what every next token attends to)
N_LAYERS = 3  # layers combined: one layer's choice differs by kind of prompt


def attention_name(layer: int) -> str:
    return f"kq_soft_max-{layer}"


def position_scores(rows: np.ndarray, n_head: int, n_query: int, n_pred: int) -> np.ndarray:
    """Per position < n_pred, the largest weight any head of the last ``n_query`` query rows
    gives it, from a captured ``kq_soft_max`` tensor (rows: head-major, then query; columns:
    cache cells, which are positions here: a state written from position 0)."""
    weights = rows.reshape(n_head, -1, rows.shape[1])[:, -n_query:, :n_pred]
    scores = weights.max(axis=(0, 1)).astype(np.float64)
    scores[:SINK_POSITIONS] = 0.0
    scores[max(SINK_POSITIONS, n_pred - RECENT_POSITIONS) :] = 0.0
    return scores


def combined_scores(per_layer: dict[int, np.ndarray]) -> np.ndarray:
    """The layers' position scores, each scaled to its own maximum, summed: a layer's peak
    counts the same whatever its attention's sharpness."""
    return sum(s / s.max() if s.max() > 0 else s for s in per_layer.values())
