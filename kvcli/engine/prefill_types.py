"""What a prefill takes and gives: kvp's settings, made once (from the CLI's options or the
bundle's defaults, ``Engine.kvp_settings``) and passed whole from the command down to the
span chooser; and the result, ``Prefill``, for the caller to read what was done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvcli.engine.span_choice import SPAN_MAX
from kvcli.engine.timings import Timings

if TYPE_CHECKING:
    from kvcli.llama.runtime import Context

Ranges = tuple[tuple[int, int], ...]  # [a, b) position ranges, in order


def _ranges(ranges) -> Ranges:
    return tuple(tuple(r) for r in ranges)


@dataclass(frozen=True)
class KvpSettings:
    """How kvp prefills (kvcli.engine.kvp_prefill).

    ``tail``: the last ``tail`` + 1 prompt tokens are the base's own. ``spans``: sentences of
    at most ``span_max`` tokens the base recomputes, chosen where the question attends
    (kvcli.engine.recompute), or instead the given ``recompute`` ranges [a, b)
    (1 <= a < b <= N - 1 - tail, in order). ``start``: the base context already holds
    tokens[:start] and keeps them (a conversation; mode base too); ``aux_start``: the
    auxiliary's context holds tokens[:aux_start] (<= start); ``earlier``: ranges before
    ``start`` still predicted, among which spans chosen from the tail are looked for too.
    ``capture_tail``: the base's attention capture is armed for the tail's decode."""

    tail: int = 0
    spans: int = 0
    span_max: int = SPAN_MAX
    recompute: Ranges | None = None
    start: int = 0
    aux_start: int = 0
    earlier: Ranges = ()
    capture_tail: bool = False

    def __post_init__(self):
        # given as lists too; held as tuples, so that a setting cannot change under a caller
        if self.recompute is not None:
            object.__setattr__(self, "recompute", _ranges(self.recompute))
        object.__setattr__(self, "earlier", _ranges(self.earlier))

    def recorded(self) -> dict[str, int]:
        """The setting as manifests and JSON record it: its tail and spans."""
        return {"tail": self.tail, "spans": self.spans}


@dataclass(frozen=True)
class Prefill:
    """One prefill's result: the ``context`` that continues (the base's; the auxiliary's in
    mode aux), the last ``logits`` and the ``timings``. kvp: the positions ``predicted``
    (their base cells written from the prediction; position 0's is the base's own, see
    predict.apply.FirstCell) and the ranges ``recomputed`` by the base over them (spans,
    sinks, the opening). select: the positions ``selected`` for the base to prefill."""

    context: Context
    logits: np.ndarray
    timings: Timings
    predicted: Ranges = ()
    recomputed: Ranges = ()
    selected: np.ndarray | None = None
