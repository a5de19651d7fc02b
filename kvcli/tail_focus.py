"""Spans chosen by the question itself: the base decodes the prompt's last tokens over the
predicted cache once, and where one of its own layers' attention peaks is what it recomputes.

The first chooser (kvcli.focus) reads base layer k, the first after a prefix auxiliary, over
predicted keys. That needs a prefix and a layer that looks for facts: on Qwen2.5-Coder 1.5B
with a 7-layer prefix, layer 7's last-token attention ranked the pass key 57th-101st of
~1000 positions even over the base's true keys, so the span never held it. Deeper layers
do look: over the *predicted* cache, with the base decoding the 25 last tokens itself,
layer 22's attention ranked the pass key first or second (6 prompts, positions < 8 and the
16 before the tail left out: the first draw every layer's attention whatever the question,
an attention sink, and the last are what any next token looks at). Which layer is measured
per model (``measure_layer``) on needle prompts of kvcli's own, in held-out prose.

Needs llama.cpp's attention weights (``kq_soft_max-L``, present with flash attention off,
kvcli's default) and a model without sliding-window layers (the tail's layer sees every
predicted cell). Works for any auxiliary: a prefix of the base or another model (KVP-C).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from kvcli.tasks import prose

SINK_POSITIONS = 8  # positions never chosen: the first (attention sinks)
RECENT_POSITIONS = 16  # ... nor the last before the tail (what every next token attends to)
SPAN_LEAD = 4  # a span starts this many tokens before the peak: a value and its name before it
MEASURE_PROMPTS = 4
MEASURE_TOKENS = 1024


def attention_name(layer: int) -> str:
    return f"kq_soft_max-{layer}"


def position_scores(rows: np.ndarray, n_head: int, n_query: int, n_pred: int) -> np.ndarray:
    """Per position < n_pred, the largest weight any head of the last ``n_query`` query rows
    gives it, from a captured ``kq_soft_max`` tensor (rows: head-major, then query; columns:
    cache cells, which are positions here: a state written from position 0)."""
    weights = rows.reshape(n_head, -1, rows.shape[1])[:, -n_query:, :n_pred]
    scores = weights.max(axis=(0, 1)).astype(np.float64)
    scores[:SINK_POSITIONS] = 0.0
    scores[max(SINK_POSITIONS, n_pred - RECENT_POSITIONS):] = 0.0
    return scores


def peak_spans(scores: np.ndarray, n_spans: int, width: int, hi: int) -> list[tuple[int, int]]:
    """Up to ``n_spans`` disjoint spans of ``width`` around the highest scores (each starts
    SPAN_LEAD before its peak), within [1, hi), in position order."""
    scores, out = scores.copy(), []
    width = min(width, hi - 1)
    for _ in range(n_spans):
        peak = int(np.argmax(scores))
        if width < 1 or scores[peak] <= 0:
            break
        a = min(max(1, peak - SPAN_LEAD), hi - width)
        if any(a < b1 and b0 < a + width for b0, b1 in out):
            scores[peak] = 0.0
            continue
        out.append((a, a + width))
        scores[max(0, a - width) : a + 2 * width] = 0.0
    return sorted(out)


def needle_prompts(tokenize: Callable[[str], list[int]], n: int = MEASURE_PROMPTS,
                   n_tokens: int = MEASURE_TOKENS, seed: int = 11) -> list[tuple[str, str]]:
    """(prompt, value) pairs: held-out prose with one sentence stating a value stated at a
    random depth, and a question asking for it at the end (kvcli's own format, not the judge's)."""
    rng = random.Random(f"tail-focus:{seed}")
    out = []
    for _ in range(n):
        name = rng.choice(["the archive", "the workshop", "the north gate", "the old mill",
                           "the harbour office", "the east wing"])
        value = str(rng.randrange(10000, 99999))
        question = f"\n\nQuestion: what is the access number of {name}? Answer: the access number is"
        text = prose(rng, n_tokens - 60, tokenize).prompt
        cut = rng.randrange(len(text) // 8, len(text) * 5 // 8)
        cut = text.rfind(". ", 0, cut) + 2 if text.rfind(". ", 0, cut) > 0 else cut
        fact = f"The access number of {name} is {value}. "
        out.append((text[:cut] + fact + text[cut:] + question, value))
    return out


def best_layer(hits: np.ndarray, margins: np.ndarray) -> int:
    """The layer whose attention peak fell in the stated value most often (ties: the larger
    mean margin of the value's score over the best elsewhere). ``hits``, ``margins``: (prompts,
    layers)."""
    return int(np.lexsort((-margins.mean(axis=0), -hits.sum(axis=0)))[0])


def measure_layer(bundle, *, tail: int = 24, width: int = 16,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Which base layer's attention from the tail finds a stated value over this bundle's
    predicted cache: per layer, in how many of MEASURE_PROMPTS needle prompts the top span
    (``peak_spans``) holds the value. Returns the manifest's ``spans`` entry: chooser
    ``tail`` and the layer, or chooser ``none`` and why."""
    from kvcli.engine import Engine

    with Engine.from_bundle(bundle, attention_layers=list(range(_n_layer(bundle)))) as eng:
        layers = list(range(eng.base_info.n_layer))
        prompts = needle_prompts(eng.tokenize)
        hits = np.zeros((len(prompts), len(layers)))
        margins = np.zeros_like(hits)
        for i, (prompt, value) in enumerate(prompts):
            tokens = eng.tokenize(prompt)
            n_pred = len(tokens) - 1 - tail
            at = len(eng.tokenize(prompt[: prompt.index(value)]))
            n_value = len(eng.model.tokenize(value, add_special=False))
            eng.first_cell(tokens[0])  # its one-token decode must not be captured
            capture = eng.base.capture
            capture.clear()
            capture.armed = True
            try:
                eng.prefill(tokens, mode="kvp", tail=tail)
            finally:
                capture.armed = False
            scores = eng.base_attention(layers, tail + 1, n_pred)
            capture.clear()
            lo, hi = max(0, at - 2), min(n_pred, at + n_value + 2)
            for j, il in enumerate(layers):
                s = scores[il]
                (a, b), = peak_spans(s, 1, width, n_pred) or [(0, 0)]
                hits[i, j] = a <= at and at + n_value <= b
                outside = np.concatenate([s[:lo], s[hi:]])
                margins[i, j] = s[lo:hi].max() - (outside.max() if len(outside) else 0.0)
            if progress:
                progress(i + 1, len(prompts))
    layer = best_layer(hits, margins)
    found = int(hits[:, layer].sum())
    per_layer = [int(h) for h in hits.sum(axis=0)]
    if found == 0:
        return {"chooser": "none", "hits_per_layer": per_layer, "prompts": len(prompts),
                "reason": "no layer's attention from the tail found the stated value"}
    return {"chooser": "tail", "layer": layer, "found": found, "prompts": len(prompts),
            "hits_per_layer": per_layer}


def _n_layer(bundle) -> int:
    from kvcli.model_info import read_model_info

    return read_model_info(bundle.base, "base model").n_layer
