"""Truncation and token selection at kvp's TTFT: the one way bench-ttft, eval and the
self-check match the count of prompt tokens a method keeps (M) to a measured TTFT.

Prefill time is not proportional to length (the one LM-head row, fixed costs; selection's
auxiliary prefill), so M is not the ratio of TTFTs times N: it is read off a line fit to the
method's own measured TTFTs, each measurement after a warm-up at its shape (a new batch
shape allocates)."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import numpy as np

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.timings import Timings
from kvcli.llama.runtime import Context

MIN_KEEP = 16
REPEATS = 2
FIT_REPEATS = 3


class TimedPrefill(NamedTuple):
    context: Context
    logits: np.ndarray
    first: int  # the first token, greedy
    ms: float  # to the first token's choice
    timings: Timings  # the prefill's own breakdown


def timed_prefill(engine: Engine, tokens: list[int], **settings) -> TimedPrefill:
    """One prefill (``settings``: Engine.prefill's), timed to the first token's choice: the
    one way bench-ttft, eval, the self-check and the break-even time a prefill."""
    start = time.perf_counter()
    prefill = engine.prefill(tokens, **settings)
    first = int(np.argmax(prefill.logits))
    ms = (time.perf_counter() - start) * 1e3
    return TimedPrefill(prefill.context, prefill.logits, first, ms, prefill.timings)


def median_ttft(engine: Engine, tokens: list[int], repeats: int = REPEATS, **settings) -> float:
    timed_prefill(engine, tokens, **settings)  # warm-up
    return statistics.median(timed_prefill(engine, tokens, **settings).ms for _ in range(repeats))


def matched_count(
    engine: Engine,
    tokens: list[int],
    target_ms: float,
    *,
    mode: str = "truncate",
    base_ms: float | None = None,
    repeats: int = FIT_REPEATS,
    minimum: int = MIN_KEEP,
    **settings,
) -> int:
    """M such that ``mode`` (truncate: the last M of ``tokens``; select: M tokens the
    auxiliary ranks highest) takes ``target_ms``. A prefill's time is close to a line in M
    with a fixed part (selection's: the auxiliary's prefill), and one measurement on a
    2-core laptop is off by 10-20%: the mode's median TTFT is measured at half, one and
    twice a first guess in proportion (N * target / base, ``base_ms`` else measured), a line
    fit through them by least squares, M read off it, measured there too, and read off the
    line through all four."""
    n = len(tokens) - 1

    def clamp(x: float) -> int:
        return max(minimum, min(n, round(x)))

    base_ms = base_ms or median_ttft(engine, tokens, repeats, mode="base")
    guess = clamp(n * target_ms / base_ms)
    points = {m: 0.0 for m in (clamp(guess / 2), guess, clamp(guess * 2))}
    keep = guess
    for _ in range(2):
        for m in [m for m, t in points.items() if not t]:
            points[m] = median_ttft(engine, tokens, repeats, mode=mode, keep=m, **settings)
        if len(points) < 2:
            return keep
        slope, intercept = np.polyfit(list(points), list(points.values()), 1)
        keep = clamp((target_ms - intercept) / slope) if slope > 0 else guess
        points.setdefault(keep, 0.0)
    return keep


def matched_keep(engine: Engine, tokens: list[int], kvp: KvpSettings) -> int:
    """M for kvp's median TTFT with settings ``kvp``, both measured on ``tokens``."""
    return matched_count(engine, tokens, median_ttft(engine, tokens, mode="kvp", kvp=kvp))
