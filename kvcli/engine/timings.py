"""What a prefill and a generation measured: TTFT's breakdown, the generated tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timings:
    aux_prefill_ms: float = 0.0
    state_get_ms: float = 0.0
    predict_ms: float = 0.0
    state_set_ms: float = 0.0
    recompute_ms: float = 0.0
    base_decode_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


@dataclass
class Generation:
    mode: str
    n_prompt: int
    ttft_ms: float
    timings: Timings
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    gen_ms: float = 0.0
    first_logits: np.ndarray | None = None
    tail: int = 0
    spans: int = 0
    recomputed: list[tuple[int, int]] = field(default_factory=list)
    selected: int | None = None  # select: the positions the base prefilled
    prefilled_by: str = ""  # the mode that prefilled: kvp's prompts under its break-even, the base
    finish_reason: str = ""  # generation.Reply's


class Clock:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms
