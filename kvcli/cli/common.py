"""What several commands share: opening an engine from --bundle / --model."""

from __future__ import annotations

from pathlib import Path

from kvcli.engine.bundle import Bundle, default_bundle, load_bundle
from kvcli.engine.engine import Engine, kvp_from_tokens
from kvcli.errors import KvcliError
from kvcli.llama.runtime import ContextSettings


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
    """The bundle at ``bundle``, or the embedded default's (built with a progress bar, and
    where kvp pays on this machine measured once)."""
    if bundle is not None:
        return load_bundle(bundle)
    from kvcli.cli import ui

    with ui.progress_reporter() as report:
        b = default_bundle(progress=report)
    if "break_even" not in b.manifest:
        b = measure_break_even(b)
    return b


def measure_break_even(b: Bundle) -> Bundle:
    """Where kvp starts to pay for this bundle on this machine (kvcli.eval.break_even), stored
    in its manifest; one line on stderr."""
    from kvcli.cli import ui
    from kvcli.engine.bundle import record_in_manifest
    from kvcli.eval import break_even

    with ui.progress_reporter() as report, Engine.from_bundle(b) as engine:
        entry = break_even.measure_break_even(engine, progress=lambda i, n: report("kvp's break-even", i, n))
    ui.err.print(break_even_line(entry), highlight=False, soft_wrap=True)
    return record_in_manifest(b, break_even=entry)


def break_even_line(entry: dict) -> str:
    ratios = ", ".join(f"{n}: {r:.2f}x" for n, r in entry["ttft_ratio"].items())
    where = (
        f"kvp pays (<= {entry['pays_ratio']}x the base's TTFT) from {entry['min_tokens']} prompt tokens"
        if entry["min_tokens"] is not None
        else f"kvp never reaches {entry['pays_ratio']}x the base's TTFT on the lengths measured"
    )
    below = kvp_from_tokens(entry)
    return (
        f"{where}; prompts under {below} tokens are prefilled by the base (kvp's TTFT / the base's: {ratios})"
    )


def measure_spans(b: Bundle) -> Bundle:
    """For a base without sliding-window layers: which of its layers chooses kvp's spans
    from the tail (kvcli.engine.tail_choice), stored in the manifest; one line on stderr."""
    from kvcli.cli import ui
    from kvcli.engine.bundle import record_in_manifest
    from kvcli.eval.span_layers import measure_layer
    from kvcli.models.model_info import read_model_info

    if read_model_info(b.base, "base model").n_swa:
        return b
    with ui.progress_reporter() as report:
        entry = measure_layer(b, progress=lambda i, n: report("spans", i, n))
    if entry["chooser"] == "tail":
        ui.err.print(
            f"spans: chosen by base layers {entry['layers']}' attention from the tail "
            f"(each found the asked value in {entry['found']} of {entry['prompts']} held-out "
            "prompts)",
            highlight=False,
        )
    else:
        ui.err.print(f"spans: none ({entry['reason']})", highlight=False)
    return record_in_manifest(b, spans=entry)


def run_self_check(b: Bundle, n_tokens: int, *, echo: bool = True) -> dict:
    """Where kvp pays (``measure_break_even``) and the bundle's check of itself at that length
    or ``n_tokens`` (kvcli.eval.self_check), stored in its manifest; prints the table on
    stderr and (``echo``) the verdict line on stdout; returns the check."""
    import typer

    from kvcli.cli import ui
    from kvcli.engine.bundle import record_in_manifest
    from kvcli.eval.self_check import check_engine, summary_line

    b = measure_break_even(b)
    # judged where kvp is used: at the break-even's length if that is longer
    # (where kvp never paid on the lengths measured, at n_tokens: past them is unmeasured)
    n_tokens = max(n_tokens, b.manifest["break_even"]["min_tokens"] or 0)
    with ui.progress_reporter() as report, Engine.from_bundle(b) as engine:
        result = check_engine(engine, n_tokens=n_tokens, progress=lambda i, n: report("check", i, n))
    record_in_manifest(b, check=result)
    rows = [
        [kind, method, f"{r[method]['kl']:.3f}", f"{r[method]['top1']:.2f}", f"{r[method]['ttft_ratio']:.2f}"]
        for kind, r in result["kinds"].items()
        for method in ("kvp", "truncate", "aux")
    ]
    ui.err.print(
        ui.table(
            f"self-check at {n_tokens} tokens (n = {result['n']} per kind)",
            ["text", "method", "KL", "top-1", "TTFT / base"],
            rows,
        )
    )
    if echo:
        typer.echo(summary_line(result))
    return result
