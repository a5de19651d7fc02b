"""What several commands share: opening an engine from --bundle / --model."""

from __future__ import annotations

from pathlib import Path

from kvcli.bundle import Bundle, default_bundle, load_bundle
from kvcli.engine import Engine
from kvcli.errors import KvcliError
from kvcli.runtime import ContextSettings


def open_engine(*, bundle: Path | None, model: Path | None, mode: str,
                settings: ContextSettings) -> Engine:
    """An engine for ``mode``: --model alone serves base/truncate; otherwise a bundle."""
    if model is not None:
        if bundle is not None:
            raise KvcliError("give either --bundle or --model, not both")
        if mode in ("kvp", "aux"):
            raise KvcliError(f"mode {mode} needs an auxiliary and a predictor: use --bundle "
                             "(or leave both out for the embedded default)")
        return Engine(model, settings=settings)
    b = resolve_bundle(bundle)
    return notice_aux_load(Engine.from_bundle(b, settings=settings))


def notice_aux_load(engine: Engine) -> Engine:
    """One dim line on stderr when a prefix auxiliary falls back to the eval-callback view
    because this llama-cpp-python lacks kvcli's patch (it would load as ``partial``)."""
    from kvcli import ui
    from kvcli.runtime import prefix_view_supported

    if engine.aux_load == "view" and not prefix_view_supported() and not engine.needs_view:
        ui.err.print("[dim]note: llama-cpp-python is not built with kvcli's patch; the auxiliary "
                     "runs as a view of the base through the eval callback (python tools/install.py "
                     "builds the patch)[/dim]", soft_wrap=True)
    return engine


def resolve_bundle(bundle: Path | None) -> Bundle:
    """The bundle at ``bundle``, or the embedded default's (built with a progress bar)."""
    if bundle is not None:
        return load_bundle(bundle)
    from kvcli import ui

    with ui.progress_reporter() as report:
        return default_bundle(progress=report)
