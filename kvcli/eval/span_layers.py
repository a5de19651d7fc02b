"""Which base layers choose kvp's spans from the tail (kvcli.engine.tail_choice), measured per
bundle when it is built: on needle prompts of kvcli's own, in held-out prose, with several
records of one shape and one asked for by name, the layers whose attention peak holds the
asked value most often; the best N_LAYERS are stored in the manifest's ``spans``."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from kvcli import keys
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.recompute import DEFAULT_SPANS_TAIL
from kvcli.engine.span_choice import sentence_spans
from kvcli.engine.tail_choice import N_LAYERS
from kvcli.eval.tasks import prose

MEASURE_PROMPTS = 8

MEASURE_TOKENS = 1024

PLACES = [
    "the archive",
    "the workshop",
    "the north gate",
    "the old mill",
    "the harbour office",
    "the east wing",
    "the boiler room",
    "the chapel",
    "the west tower",
    "the granary",
]


def needle_prompts(
    tokenize: Callable[[str], list[int]],
    n: int = MEASURE_PROMPTS,
    n_tokens: int = MEASURE_TOKENS,
    seed: int = 11,
    n_records: int = 4,
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
        question = f"\n\nQuestion: what is the access number of {names[asked]}? Answer: the access number is"
        out.append(("".join(pieces) + text[at:] + question, values[asked]))
    return out


def best_layers(hits: np.ndarray, margins: np.ndarray, n: int = N_LAYERS) -> list[int]:
    """The ``n`` layers whose attention peak fell in the asked value most often (ties: the
    larger mean margin of the value's score over the best elsewhere), best first.
    ``hits``, ``margins``: (prompts, layers)."""
    order = np.lexsort((-margins.mean(axis=0), -hits.sum(axis=0)))
    return [int(il) for il in order[:n] if hits[:, il].any()]


def measure_layer(
    bundle, *, tail: int = DEFAULT_SPANS_TAIL, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Which base layer's attention from the tail finds a stated value over this bundle's
    predicted cache: per layer, in how many of MEASURE_PROMPTS needle prompts the top span
    (``sentence_spans``) holds the value. Returns the manifest's ``spans`` entry: chooser
    ``tail`` and the layer, or chooser ``none`` and why."""
    from kvcli.engine.engine import Engine

    with Engine.from_bundle(
        bundle, attention_layers=list(range(_n_layer(bundle))), tail_focus_layers=()
    ) as eng:
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
            eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=tail, capture_tail=True))
            scores = eng.base_attention(layers, tail + 1, n_pred)
            capture.clear()
            lo, hi = max(0, at - 2), min(n_pred, at + n_value + 2)
            ends = eng.spans.sentence_ends(tokens[:n_pred])
            for j, il in enumerate(layers):
                s = scores[il]
                ((a, b),) = sentence_spans(s, 1, ends, 1, n_pred) or [(0, 0)]
                hits[i, j] = a <= at and at + n_value <= b
                outside = np.concatenate([s[:lo], s[hi:]])
                margins[i, j] = s[lo:hi].max() - (outside.max() if len(outside) else 0.0)
            if progress:
                progress(i + 1, len(prompts))
    chosen = best_layers(hits, margins)
    per_layer = [int(h) for h in hits.sum(axis=0)]
    if not chosen:
        return {
            keys.SPANS_CHOOSER: keys.CHOOSER_NONE,
            "hits_per_layer": per_layer,
            "prompts": len(prompts),
            "reason": "no layer's attention from the tail found the asked value",
        }
    return {
        keys.SPANS_CHOOSER: keys.CHOOSER_TAIL,
        keys.SPANS_LAYERS: chosen,
        "found": [per_layer[il] for il in chosen],
        "prompts": len(prompts),
        "hits_per_layer": per_layer,
    }


def _n_layer(bundle) -> int:
    from kvcli.models.model_info import read_model_info

    return read_model_info(bundle.base, "base model").n_layer
