"""kvcli eval's run: every task family at every length for every method (kvcli.eval.quality),
with the summaries per method and the frontier (kvcli.eval.stats); returns what the command
prints and writes."""

from __future__ import annotations

from kvcli.engine.bundle import Progress
from kvcli.engine.engine import Engine
from kvcli.eval.quality import evaluate_task
from kvcli.eval.stats import frontier, method_label, summarize_methods


def judge(
    engine: Engine,
    tasks: list[str],
    lengths: list[int],
    *,
    n: int,
    tails: list[int],
    spans: list[int] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """``{"settings", "rows", "summary", "frontier"}`` for ``engine``'s bundle. ``spans``:
    None for none and the bundle's default number where the bundle can choose spans.
    ``progress`` follows each family at each length and, as "all", the whole run."""
    default = engine.kvp_settings().recorded()
    if spans is None:
        spans = [0, default["spans"]] if engine.spans_supported else [0]
    report = progress or (lambda stage, i, of: None)
    total, done = len(lengths) * len(tasks) * n, [0]
    report("all", 0, total)  # the whole run's ETA above each family's

    def tick(stage: str, i: int, of: int) -> None:
        report(stage, i, of)
        done[0] += 1
        report("all", done[0], total)

    rows = []
    for length in lengths:
        for task in tasks:
            stage = f"{task} @ {length}"
            rows += evaluate_task(
                engine,
                task,
                length,
                n=n,
                tails=tails,
                spans=spans,
                seed=seed,
                progress=lambda i, of, s=stage: tick(s, i, of),
            )
    summary = summarize_methods(rows)
    for entry in summary:  # the setting generate and chat use without options
        entry["default"] = entry["method"] == method_label({"method": "kvp", **default})
    return {
        "settings": {**engine.settings.__dict__, "n": n, "seed": seed, "kvp_default": default},
        "rows": rows,
        "summary": summary,
        "frontier": frontier(summary),
    }
