"""Spans chosen by the question itself: the base decodes the prompt's last tokens over the
predicted cache once, and where some of its own layers' attention peaks is what it recomputes.
Where those layers are a prefix auxiliary's own (their cells are copied, not predicted), the
auxiliary's decode of the tail gives the same attention for a fraction of the cost
(``SpanRecompute.aux_tail_scores``).

The first chooser (kvcli.focus) reads base layer k, the first after a prefix auxiliary, over
predicted keys. That needs a prefix and a layer that looks for facts: on Qwen2.5-Coder 1.5B
with a 7-layer prefix, layer 7's last-token attention ranked the pass key 57th-101st of
~1000 positions even over the base's true keys, so the span never held it. Deeper layers
do look: over the *predicted* cache, with the base decoding the 25 last tokens itself,
layer 22's attention ranked the pass key first or second (6 prompts, positions < 8 and the
16 before the tail left out: the first draw every layer's attention whatever the question,
an attention sink, and the last are what any next token looks at), while among look-alike
records the prefix's own layer 5 found the asked one where layer 22 did not. Which layers
are measured per model (``measure_layer``) on prompts of kvcli's own, in held-out prose,
with several records of one shape and one asked for by name; the best N_LAYERS combined.

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
MEASURE_PROMPTS = 8
N_LAYERS = 3  # layers combined: one layer's choice differs by kind of prompt
MEASURE_TOKENS = 1024
PLACES = ["the archive", "the workshop", "the north gate", "the old mill", "the harbour office",
          "the east wing", "the boiler room", "the chapel", "the west tower", "the granary"]


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


def peak_spans(scores: np.ndarray, n_spans: int, width: int, hi: int, lo: int = 1
               ) -> list[tuple[int, int]]:
    """Up to ``n_spans`` disjoint spans of ``width`` around the highest scores (each starts
    SPAN_LEAD before its peak), within [lo, hi), in position order."""
    scores, out = scores.copy(), []
    width = min(width, hi - lo)
    for _ in range(n_spans):
        peak = int(np.argmax(scores))
        if width < 1 or scores[peak] <= 0:
            break
        a = min(max(lo, peak - SPAN_LEAD), hi - width)
        if any(a < b1 and b0 < a + width for b0, b1 in out):
            scores[peak] = 0.0
            continue
        out.append((a, a + width))
        scores[max(0, a - width) : a + 2 * width] = 0.0
    return sorted(out)


def needle_prompts(tokenize: Callable[[str], list[int]], n: int = MEASURE_PROMPTS,
                   n_tokens: int = MEASURE_TOKENS, seed: int = 11, n_records: int = 4
                   ) -> list[tuple[str, str]]:
    """(prompt, value) pairs: held-out prose with ``n_records`` sentences of the same shape
    (a place and its number) at random depths, and a question asking for one of them by name
    at the end: a layer that merely finds the salient sentences does not pass; one that
    matches the name does (kvcli's own format, not the judge's)."""
    rng = random.Random(f"tail-focus:{seed}")
    out = []
    for _ in range(n):
        text = prose(rng, n_tokens - 30 * n_records, tokenize).prompt
        names = rng.sample(PLACES, n_records)
        values = [str(rng.randrange(10000, 99999)) for _ in names]
        cuts = sorted(rng.sample(range(len(text) // 10, len(text) * 9 // 10), n_records))
        pieces, at = [], 0
        for cut, name, value in zip(cuts, names, values):
            cut = max(at, text.rfind(". ", at, cut) + 2) if text.rfind(". ", at, cut) > 0 else cut
            pieces += [text[at:cut], f"The access number of {name} is {value}. "]
            at = cut
        asked = rng.randrange(n_records)
        question = (f"\n\nQuestion: what is the access number of {names[asked]}? Answer: the "
                    "access number is")
        out.append(("".join(pieces) + text[at:] + question, values[asked]))
    return out


def best_layers(hits: np.ndarray, margins: np.ndarray, n: int = N_LAYERS) -> list[int]:
    """The ``n`` layers whose attention peak fell in the asked value most often (ties: the
    larger mean margin of the value's score over the best elsewhere), best first.
    ``hits``, ``margins``: (prompts, layers)."""
    order = np.lexsort((-margins.mean(axis=0), -hits.sum(axis=0)))
    return [int(il) for il in order[:n] if hits[:, il].any()]


def combined_scores(per_layer: dict[int, np.ndarray]) -> np.ndarray:
    """The layers' position scores, each scaled to its own maximum, summed: a layer's peak
    counts the same whatever its attention's sharpness."""
    return sum(s / s.max() if s.max() > 0 else s for s in per_layer.values())


def measure_layer(bundle, *, tail: int = 24, width: int = 16,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Which base layer's attention from the tail finds a stated value over this bundle's
    predicted cache: per layer, in how many of MEASURE_PROMPTS needle prompts the top span
    (``peak_spans``) holds the value. Returns the manifest's ``spans`` entry: chooser
    ``tail`` and the layer, or chooser ``none`` and why."""
    from kvcli.engine import Engine

    with Engine.from_bundle(bundle, attention_layers=list(range(_n_layer(bundle))),
                            tail_focus_layers=()) as eng:
        layers = list(range(eng.base_info.n_layer))
        prompts = needle_prompts(eng.tokenize)
        hits = np.zeros((len(prompts), len(layers)))
        margins = np.zeros_like(hits)
        for i, (prompt, value) in enumerate(prompts):
            tokens = eng.tokenize(prompt)
            n_pred = len(tokens) - 1 - tail
            at = len(eng.tokenize(prompt[: prompt.index(value)]))
            n_value = len(eng.model.tokenize(value, add_special=False))
            capture = eng.base.capture
            capture.clear()
            eng.prefill(tokens, mode="kvp", tail=tail, capture_tail=True)
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
    chosen = best_layers(hits, margins)
    per_layer = [int(h) for h in hits.sum(axis=0)]
    if not chosen:
        return {"chooser": "none", "hits_per_layer": per_layer, "prompts": len(prompts),
                "reason": "no layer's attention from the tail found the asked value"}
    return {"chooser": "tail", "layers": chosen, "found": [per_layer[il] for il in chosen],
            "prompts": len(prompts), "hits_per_layer": per_layer}


def _n_layer(bundle) -> int:
    from kvcli.model_info import read_model_info

    return read_model_info(bundle.base, "base model").n_layer
