"""The one place that imports rich: consoles, progress bars and tables.

Data goes to stdout; diagnostics and progress go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# a pipe or file gets wide tables rather than rich's 80-column default
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_reporter() -> Iterator:
    """A ``(stage, done, total)`` callback that drives one rich progress bar per stage."""
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield report


@contextlib.contextmanager
def training_progress(total: int) -> Iterator:
    """A ``report(row)`` callback for training steps: one bar with the step's losses."""
    bars = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
        transient=False,
    )
    task = bars.add_task("train", total=total, info="")

    def report(row: dict) -> None:
        bars.update(
            task,
            completed=row["step"],
            info=(
                f"ce {row['ce']:.3f} (base {row['ce_base']:.3f})  L1 {row['kv_l1']:.2f}  "
                f"{row['tokens_per_s']:.0f} tok/s"
            ),
        )

    with bars:
        yield report


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    return t


def fmt(value: float | None, digits: int = 2) -> str:
    """A table's number: ``digits`` decimals, "-" where there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


# TTFT's breakdown (kvcli.engine.timings.Timings), in the order kvp runs its steps
BREAKDOWN = {
    "aux_prefill_ms": "aux prefill",
    "state_get_ms": "get",
    "predict_ms": "predict",
    "state_set_ms": "set",
    "recompute_ms": "spans",
    "base_decode_ms": "base",
}


def breakdown_text(parts: dict[str, float], *, labelled: bool = False) -> str:
    """kvp's breakdown in ms: "12/3/8/2/5/40" for a table's column (headed
    "aux/get/pred/set/spans/dec ms"), or labelled "aux prefill 12 + get 3 + ... ms"."""
    if labelled:
        return " + ".join(f"{label} {parts[k]:.0f}" for k, label in BREAKDOWN.items()) + " ms"
    return "/".join(f"{parts[k]:.0f}" for k in BREAKDOWN)
