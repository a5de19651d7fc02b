"""Prompt-prefix reuse, as llama-server's ``cache_prompt``: the cells the base context already
holds for the start of a new prompt stay exactly as they are, and only the rest is prefilled.

One path for every caller that keeps a context between prompts (``kvcli chat``'s turns, the
Python API, ``kvcli serve``): the tokens the base holds are compared with the new prompt; the
longest common prefix stays; the rest goes through the engine's prefill from there — by kvp
where the rest is at least the bundle's measured break-even (``Engine.kvp_pays``), by the base
where it is shorter. With kvp the auxiliary, whose own context is kept in step, decodes the
new tokens but the tail; their base cells are predicted and added, the spans the question
looks for (among every position still predicted, this prompt's or an earlier one's) and the
attention sinks are recomputed, and the base decodes the tail itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings, Prefill
from kvcli.engine.recompute import merge_ranges


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


@dataclass(frozen=True)
class CachedPrefill:
    """A prefill over a kept prefix: the engine's result and how the prompt was covered."""

    prefill: Prefill
    n_reused: int  # prompt tokens whose cells the context already held
    n_new: int  # prompt tokens prefilled now
    n_predicted: int  # of those, positions whose base cells were predicted (not recomputed)

    @property
    def prefilled_by(self) -> str:
        return "kvp" if self.prefill.predicted else "base"


class PromptCache:
    """What the engine's base (and auxiliary) contexts hold, by position, across prompts."""

    def __init__(self, engine: Engine, kvp: KvpSettings | None = None):
        self.engine = engine
        self.kvp = kvp or KvpSettings()
        self.base_tokens: list[int] = []  # what the base context holds, by position
        self.aux_tokens: list[int] = []  # what the auxiliary context holds
        self.predicted_spans: list[tuple[int, int]] = []  # [a, b) whose base cells are predicted

    def reset(self) -> None:
        self.base_tokens, self.aux_tokens, self.predicted_spans = [], [], []
        self.engine.base.clear()
        if self.engine.aux is not None:
            self.engine.aux.clear()

    def held(self, tokens: list[int]) -> None:
        """After generating: the base context holds ``tokens`` (the prompt and the reply)
        up to its ``n_past``."""
        self.base_tokens = list(tokens[: self.engine.base.n_past])

    def prefill(self, tokens: list[int], mode: str = "kvp") -> CachedPrefill:
        """Prefill ``tokens`` (mode kvp or base), keeping the prefix the context holds."""
        eng = self.engine
        p0 = min(common_prefix(self.base_tokens, tokens), len(tokens) - 1)
        self.base_tokens = tokens[:p0]
        self.predicted_spans = [(a, min(b, p0)) for a, b in self.predicted_spans if a < p0]
        n_pred = len(tokens) - 1 - max(0, self.kvp.tail)
        short = not eng.kvp_pays(len(tokens) - p0)  # under the bundle's break-even
        if mode != "kvp" or short or (n_pred <= p0 and not (self.kvp.spans and self.predicted_spans)):
            prefill = eng.prefill(tokens, mode="base", kvp=KvpSettings(start=p0))
            self.base_tokens = list(tokens)
            return CachedPrefill(prefill, p0, len(tokens) - p0, 0)
        # the auxiliary decodes from no later than p0: an interrupted reply can leave it
        # holding positions the base does not (the features must cover p0..n_pred-1)
        a0 = min(common_prefix(self.aux_tokens, tokens[:n_pred]), p0)
        if n_pred > p0:
            self.aux_tokens = tokens[:a0]
        turn = replace(self.kvp, start=p0, aux_start=a0, earlier=self.predicted_spans)
        prefill = eng.prefill(tokens, mode="kvp", kvp=turn)
        if n_pred > p0:
            self.aux_tokens = tokens[: eng.aux.n_past]
        self.base_tokens = list(tokens)
        exact = prefill.recomputed
        # position 0's cell is the base's own (predict.apply.FirstCell), never predicted
        predicted = merge_ranges(self.predicted_spans, [(max(1, a), b) for a, b in prefill.predicted])
        self.predicted_spans = minus(predicted, exact)
        n_predicted = sum(b - a for a, b in minus(prefill.predicted, exact))
        return CachedPrefill(prefill, p0, len(tokens) - p0, n_predicted)


def minus(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The positions of ``ranges`` outside ``holes``, as ordered ranges."""
    out = []
    for a, b in ranges:
        for h0, h1 in holes:
            if h0 < b and a < h1:
                if a < h0:
                    out.append((a, h0))
                a = max(a, h1)
        if a < b:
            out.append((a, b))
    return out
