"""Statistics a reader can trust: Wilson score intervals for accuracies over n prompts, and a
per-method summary over task families (mean retention, the worst family), and the frontier:
per TTFT budget, the method that keeps the most.

Wilson rather than the normal approximation: at n = 10-20 and accuracies near 0 or 1 (most
of kvcli's cells) the normal interval collapses to a point or leaves [0, 1]."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

Z95 = 1.959964  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% (by default) Wilson score interval of ``successes`` out of ``n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def method_label(row: dict) -> str:
    """'kvp tail 24 spans 2', 'select by keys', 'truncate', 'base': the method and its
    settings, not its keep (truncation's and selection's keep is matched per length and family)."""
    return (
        row["method"]
        + (f" tail {row['tail']}" if row.get("tail") else "")
        + (f" spans {row['spans']}" if row.get("spans") else "")
        + (f" by {row['select_by']}" if row.get("select_by") else "")
    )


def summarize_methods(rows: list[dict]) -> list[dict]:
    """Per method (and prompt length): mean retention over the families with an accuracy,
    each capped at 1 (a method that beats the base on one family must not hide a loss on
    another), the worst family and its retention, the TTFT / base range."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[method_label(r), r["n_prompt"]].append(r)
    out = []
    for (label, n_prompt), group in groups.items():
        scored = [r for r in group if r.get("retention") is not None]
        worst = min(scored, key=lambda r: r["retention"]) if scored else None
        ratios = [r["ttft_ratio"] for r in group]
        out.append(
            {
                "method": label,
                "n_prompt": n_prompt,
                "families": len(scored),
                "mean_retention": round(sum(min(1.0, r["retention"]) for r in scored) / len(scored), 4)
                if scored
                else None,
                "worst_family": worst["task"] if worst else None,
                "worst_retention": round(worst["retention"], 4) if worst else None,
                "ttft_ratio_min": round(min(ratios), 4),
                "ttft_ratio_median": round(statistics.median(ratios), 4),
                "ttft_ratio_max": round(max(ratios), 4),
            }
        )
    return out


def frontier(summary: list[dict]) -> list[dict]:
    """Per prompt length, the methods no other beats at once on mean retention and on median
    TTFT / base (``summarize_methods``' entries), cheapest first: for a TTFT budget, the best
    method is the last entry within it. A tie on retention goes to the faster method."""
    out = []
    for n_prompt in sorted({s["n_prompt"] for s in summary}):
        scored = [s for s in summary if s["n_prompt"] == n_prompt and s["mean_retention"] is not None]
        best = -1.0
        for s in sorted(scored, key=lambda s: (s["ttft_ratio_median"], -s["mean_retention"])):
            if s["mean_retention"] > best:
                out.append(s)
                best = s["mean_retention"]
    return out
