"""What several commands share: opening an engine from --bundle / --model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvcli import keys
from kvcli.engine.bundle import Bundle
from kvcli.engine.engine import Engine, kvp_from_tokens
from kvcli.errors import KvcliError
from kvcli.llama.runtime import ContextSettings

if TYPE_CHECKING:  # the bundles stage loads eval: only for commands that make bundles
    from kvcli.bundles.make import MadeBundle


def open_engine(*, bundle: Path | None, model: Path | None, mode: str, settings: ContextSettings) -> Engine:
    """An engine for ``mode``: --model alone serves base/truncate; otherwise a bundle."""
    if model is not None:
        if bundle is not None:
            raise KvcliError("give either --bundle or --model, not both")
        if mode in ("kvp", "select", "aux"):
            raise KvcliError(
                f"mode {mode} needs an auxiliary and a predictor: use --bundle "
                "(or leave both out for the embedded default)"
            )
        return Engine(model, settings=settings)
    b = resolve_bundle(bundle)
    if mode == "kvp":
        warn_if_checked_worse(b)
    return notice_aux_load(Engine.from_bundle(b, settings=settings))


def warn_if_checked_worse(bundle: Bundle) -> None:
    """One line on stderr when the bundle's own check (kvcli.eval.self_check) found kvp worse
    than a cheaper fallback."""
    from kvcli.cli import ui
    from kvcli.engine.bundle import check_warning

    warning = check_warning(bundle)
    if warning:
        ui.err.print(
            f"[yellow]warning (this bundle's own check): {warning}[/yellow]",
            soft_wrap=True,
            markup=True,
            highlight=False,
        )


def notice_aux_load(engine: Engine) -> Engine:
    """One dim line on stderr when a prefix auxiliary falls back to the eval-callback view
    because this llama-cpp-python lacks kvcli's patch (it would load as ``partial``)."""
    from kvcli.cli import ui
    from kvcli.llama.library import prefix_view_supported

    if engine.aux_load == "view" and not prefix_view_supported() and not engine.needs_view:
        ui.err.print(
            "[dim]note: llama-cpp-python is not built with kvcli's patch; the auxiliary "
            "runs as a view of the base through the eval callback (python tools/install.py "
            "builds the patch)[/dim]",
            soft_wrap=True,
        )
    return engine


def resolve_bundle(bundle: Path | None) -> Bundle:
    """The bundle at ``bundle``, or the embedded default's (made with a progress bar, and
    where kvp pays on this machine measured once, one line on stderr)."""
    from kvcli.api.local_model import resolve_bundle as resolve
    from kvcli.cli import ui

    with ui.progress_reporter() as report:
        b, measured = resolve(bundle, report)
    if measured is not None:
        show_measured(measured)
    return b


def break_even_line(entry: dict) -> str:
    ratios = ", ".join(f"{n}: {r:.2f}x" for n, r in entry[keys.BREAK_EVEN_TTFT_RATIO].items())
    pays, min_tokens = entry[keys.BREAK_EVEN_PAYS_RATIO], entry[keys.BREAK_EVEN_MIN_TOKENS]
    where = (
        f"kvp pays (<= {pays}x the base's TTFT) from {min_tokens} prompt tokens"
        if min_tokens is not None
        else f"kvp never reaches {pays}x the base's TTFT on the lengths measured"
    )
    below = kvp_from_tokens(entry)
    return (
        f"{where}; prompts under {below} tokens are prefilled by the base (kvp's TTFT / the base's: {ratios})"
    )


def spans_line(entry: dict) -> str:
    if entry[keys.SPANS_CHOOSER] == keys.CHOOSER_TAIL:
        return (
            f"spans: chosen by base layers {entry[keys.SPANS_LAYERS]}' attention from the tail "
            f"(each found the asked value in {entry['found']} of {entry['prompts']} held-out "
            "prompts)"
        )
    return f"spans: none ({entry['reason']})"


def show_measured(made: MadeBundle, *, echo: bool = True) -> None:
    """What ``kvcli.bundles.make`` measured, on stderr: the span chooser, the break-even and
    the self-check's table; with ``echo`` the check's verdict line on stdout."""
    import typer

    from kvcli.cli import ui
    from kvcli.eval.self_check import summary_line

    if made.spans is not None:
        ui.err.print(spans_line(made.spans), highlight=False)
    if made.break_even is not None:
        ui.err.print(break_even_line(made.break_even), highlight=False, soft_wrap=True)
    if made.check is None:
        return
    rows = [
        [kind, method, f"{r[method]['kl']:.3f}", f"{r[method]['top1']:.2f}", f"{r[method]['ttft_ratio']:.2f}"]
        for kind, r in made.check["kinds"].items()
        for method in ("kvp", "truncate", "aux")
    ]
    ui.err.print(
        ui.table(
            f"self-check at {made.check_tokens} tokens (n = {made.check['n']} per kind)",
            ["text", "method", "KL", "top-1", "TTFT / base"],
            rows,
        )
    )
    if echo:
        typer.echo(summary_line(made.check))
