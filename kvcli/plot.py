"""PNG charts (matplotlib, an optional dependency: pip install 'kvcli[plot]')."""

from __future__ import annotations

from pathlib import Path

from kvcli.errors import KvcliError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise KvcliError("plots need matplotlib: pip install 'kvcli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def eval_pareto(rows: list[dict], path: Path) -> Path:
    """Accuracy (or top-1 agreement where a task has no answer) against TTFT / base."""
    plt = _pyplot()
    groups = sorted({(r["task"], r["n_prompt"]) for r in rows})
    n_cols = min(5, len(groups))
    n_rows = -(-len(groups) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.6 * n_rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (task, n_prompt) in zip(axes.flat, groups):
        for r in (r for r in rows if (r["task"], r["n_prompt"]) == (task, n_prompt)):
            label = r["method"] + (f" tail {r['tail']}" if r["tail"] else "")
            y = r["accuracy"] if r["accuracy"] is not None else r["top1_agreement"]
            ax.scatter(r["ttft_ratio"], y, label=label, s=40)
        metric = "accuracy" if any(r["accuracy"] is not None for r in rows if r["task"] == task) \
            else "top-1 agreement"
        ax.set(title=f"{task} @ {n_prompt}", xlabel="TTFT / base", ylabel=metric,
               xlim=(0, 1.05), ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    axes.flat[len(groups) - 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
