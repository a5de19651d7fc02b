"""PNG charts (matplotlib, an optional dependency: pip install 'kvcli[plot]')."""

from __future__ import annotations

from pathlib import Path

from kvcli.errors import KvcliError
from kvcli.eval.stats import method_label


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise KvcliError("plots need matplotlib: pip install 'kvcli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def eval_pareto(rows: list[dict], path: Path) -> Path:
    """One panel per family and length: accuracy with its 95% interval (or top-1 agreement
    where a task has no answer) against TTFT / base, a point per method."""
    plt = _pyplot()
    groups = sorted({(r["task"], r["n_prompt"]) for r in rows})
    n_cols = min(5, len(groups))
    n_rows = -(-len(groups) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.6 * n_rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (task, n_prompt) in zip(axes.flat, groups):
        for r in (r for r in rows if (r["task"], r["n_prompt"]) == (task, n_prompt)):
            label = method_label(r)
            y = r["accuracy"] if r["accuracy"] is not None else r["top1_agreement"]
            lo, hi = r.get("ci95") or (y, y)
            ax.errorbar(r["ttft_ratio"], y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3, label=label)
        metric = (
            "accuracy"
            if any(r["accuracy"] is not None for r in rows if r["task"] == task)
            else "top-1 agreement"
        )
        ax.set(
            title=f"{task} @ {n_prompt}",
            xlabel="TTFT / base",
            ylabel=metric,
            xlim=(0, 1.05),
            ylim=(-0.05, 1.05),
        )
        ax.grid(alpha=0.3)
    axes.flat[len(groups) - 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BREAKDOWN_PARTS = ("aux_prefill_ms", "state_get_ms", "predict_ms", "state_set_ms", "base_decode_ms")


def bench_ttft(rows: list[dict], path: Path) -> Path:
    """Left: TTFT (mean, std as error bars) against N per mode. Right: kvp's breakdown."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))

    def key(r):
        return r["mode"], r.get("aux_load") or "", r["tail"]

    for mode, load, tail in sorted({key(r) for r in rows}):
        mine = sorted((r for r in rows if key(r) == (mode, load, tail)), key=lambda r: r["n_prompt"])
        left.errorbar(
            [r["n_prompt"] for r in mine],
            [r["ttft_ms_mean"] for r in mine],
            yerr=[r["ttft_ms_std"] for r in mine],
            marker="o",
            capsize=3,
            label=mode + (f" ({load})" if load else "") + (f" tail {tail}" if tail else ""),
        )
    left.set(xlabel="prompt tokens N", ylabel="TTFT (ms)", title="time to first token")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    kvp = sorted(
        (r for r in rows if r["mode"] == "kvp" and not r["tail"] and r.get("aux_load") != "file"),
        key=lambda r: r["n_prompt"],
    )
    if kvp:
        x = [str(r["n_prompt"]) for r in kvp]
        bottom = [0.0] * len(kvp)
        for part in BREAKDOWN_PARTS:
            values = [r["breakdown_ms"][part] for r in kvp]
            right.bar(x, values, bottom=bottom, label=part.removesuffix("_ms").replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        right.set(xlabel="prompt tokens N", ylabel="ms", title="kvp breakdown (tail 0)")
        right.legend(fontsize=8)
    else:
        right.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
