"""Truncation at kvp's TTFT: the one way bench-ttft, eval and the self-check match the count
of prompt tokens truncation keeps (M) to a measured TTFT.

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


def truncation_keep(
    engine: Engine,
    tokens: list[int],
    target_ms: float,
    *,
    base_ms: float | None = None,
    rounds: int = ROUNDS,
    repeats: int = REPEATS,
) -> int:
    """M such that truncation to the last M of ``tokens`` takes ``target_ms``: from
    N * target / base (``base_ms``, else all of the prompt), corrected ``rounds`` times by
    truncation's measured median TTFT."""
    n = len(tokens) - 1

    def clamp(x: float) -> int:
        return max(MIN_KEEP, min(n, round(x)))

    keep = clamp(n * target_ms / base_ms) if base_ms else n
    for _ in range(rounds):
        measured = median_ttft(engine, tokens, repeats, mode="truncate", keep=keep)
        keep = clamp(keep * target_ms / measured)
    return keep


def matched_keep(engine: Engine, tokens: list[int], **kvp) -> int:
    """M for kvp's median TTFT with settings ``kvp`` (tail, spans), both measured on ``tokens``."""
    return truncation_keep(engine, tokens, median_ttft(engine, tokens, mode="kvp", **kvp))
