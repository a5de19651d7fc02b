"""Truncation and token selection at kvp's TTFT: the one way bench-ttft, eval and the
self-check match the count of prompt tokens a method keeps (M) to a measured TTFT.

Prefill time is not proportional to length (the one LM-head row, fixed costs), so M is not
the ratio of TTFTs times N: it starts there and is corrected from truncation's own measured
TTFT, each measurement after a warm-up at its shape (a new batch shape allocates)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from kvcli.engine.engine import Engine

MIN_KEEP = 16
ROUNDS = 2
REPEATS = 2


def timed_prefill(engine: Engine, tokens: list[int], **settings):
    """(context, logits, first token, ms) of one prefill; ms to the first token's choice."""
    start = time.perf_counter()
    ctx, logits, _ = engine.prefill(tokens, **settings)
    first = int(np.argmax(logits))
    return ctx, logits, first, (time.perf_counter() - start) * 1e3


def median_ttft(engine: Engine, tokens: list[int], repeats: int = REPEATS, **settings) -> float:
    timed_prefill(engine, tokens, **settings)  # warm-up
    return statistics.median(timed_prefill(engine, tokens, **settings)[3] for _ in range(repeats))


def matched_count(
    engine: Engine,
    tokens: list[int],
    target_ms: float,
    *,
    mode: str = "truncate",
    base_ms: float | None = None,
    rounds: int = ROUNDS,
    repeats: int = REPEATS,
    minimum: int = MIN_KEEP,
    **settings,
) -> int:
    """M such that ``mode`` (truncate: the last M of ``tokens``; select: M tokens the
    auxiliary ranks highest) takes ``target_ms``: from N * target / base (``base_ms``, else
    all of the prompt), then corrected ``rounds`` times from the mode's measured median
    TTFT: in proportion the first time, after that along the line through the last two
    measurements (select's TTFT has a fixed part, the auxiliary's prefill)."""
    n = len(tokens) - 1

    def clamp(x: float) -> int:
        return max(minimum, min(n, round(x)))

    keep, last = (clamp(n * target_ms / base_ms) if base_ms else n), None
    for _ in range(rounds):
        measured = median_ttft(engine, tokens, repeats, mode=mode, keep=keep, **settings)
        slope = (measured - last[1]) / (keep - last[0]) if last and keep != last[0] else 0.0
        last = (keep, measured)
        keep = clamp(keep + (target_ms - measured) / slope if slope > 0 else keep * target_ms / measured)
        if keep == last[0]:
            break
    return keep


def truncation_keep(engine: Engine, tokens: list[int], target_ms: float, **kwargs) -> int:
    """M such that truncation to the last M of ``tokens`` takes ``target_ms`` (matched_count)."""
    return matched_count(engine, tokens, target_ms, mode="truncate", **kwargs)


def matched_keep(engine: Engine, tokens: list[int], **kvp) -> int:
    """M for kvp's median TTFT with settings ``kvp`` (tail, spans), both measured on ``tokens``."""
    return truncation_keep(engine, tokens, median_ttft(engine, tokens, mode="kvp", **kvp))
