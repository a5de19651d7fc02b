"""The llama.cpp models and contexts one owner opened, freed by it together.

Each native handle has one owner, in the manner of llama-cpp-python's ``_internals``: an
engine holds one ``Handles``, the helpers that open a context for it (kvcli.engine.aux_load)
open it there, and the engine's ``close`` frees every one. Freed in the reverse order of
opening, so a context goes before the model it runs on.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from kvcli.llama.capture import TensorCapture
from kvcli.llama.runtime import Context, ContextSettings, Model


class Handles:
    """Models and contexts opened with one owner's ``settings``; ``close()`` frees them all
    (safe to call twice)."""

    def __init__(self, settings: ContextSettings):
        self.settings = settings
        self._stack = ExitStack()

    def model(self, path: Path, what: str, *, prefix_layers: int = 0, arch: str = "") -> Model:
        """``path`` loaded (runtime.Model: ``prefix_layers`` of ``arch`` as a model of their own)."""
        model = Model(path, what=what, prefix_layers=prefix_layers, arch=arch)
        self._stack.callback(model.close)
        return model

    def context(self, model: Model, capture: TensorCapture | None = None, **scratch) -> Context:
        """A context on ``model`` (one of these handles' or another owner's that outlives them)."""
        ctx = Context(model, self.settings, capture=capture, **scratch)
        self._stack.callback(ctx.close)
        return ctx

    def open(
        self,
        path: Path,
        what: str,
        capture: TensorCapture | None = None,
        *,
        prefix_layers: int = 0,
        arch: str = "",
        **scratch,
    ) -> Context:
        """A context on the model ``path`` loaded for it."""
        return self.context(
            self.model(path, what, prefix_layers=prefix_layers, arch=arch), capture, **scratch
        )

    def close(self) -> None:
        self._stack.close()
