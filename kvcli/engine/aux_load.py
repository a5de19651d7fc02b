"""How a prefix auxiliary (the base's layers 0..k-1) is run:

- "partial": the base's file loaded again as a k-layer model (needs kvcli's patches/, built by
  tools/install.py); its weights share the base's pages;
- "view": a second context on the base's own model whose graph the eval callback stops after
  layer k-1 (stock llama.cpp; docs/design.md, the auxiliary as a view);
- "file": the cut auxiliary file, a second copy of the shared weights.
"""

from __future__ import annotations

from kvcli.choices import Choice
from kvcli.errors import IncompatibleError
from kvcli.llama.runtime import llama_cpp_version, prefix_view_supported


class AuxLoad(Choice):
    """How a prefix auxiliary is run (the module's docstring)."""

    AUTO = "auto"
    PARTIAL = "partial"
    VIEW = "view"
    FILE = "file"


AUX_LOADS = AuxLoad.values()


def choose_aux_load(requested: str, prefix: int, *, needs_view: bool = False, partial_ok: bool = True) -> str:
    """The load to use for a requested one; ``prefix`` is k for a prefix auxiliary, else 0;
    ``needs_view``: the predictor reads a tensor only the view computes at every position;
    ``partial_ok``: False for a base file llama.cpp cannot load as k layers
    (model_info.has_per_layer_arrays)."""
    if requested == "file" or (requested == "auto" and not prefix):
        return "file"
    if not prefix:
        raise IncompatibleError(
            f"--aux-load {requested} needs a prefix auxiliary cut from this base"
            " (and a predictor); this bundle's auxiliary is not one"
        )
    if requested == "partial" and not prefix_view_supported():
        raise IncompatibleError(
            f"--aux-load partial needs llama-cpp-python built with kvcli's patches "
            f"(python tools/install.py); this one is {llama_cpp_version()}"
        )
    if requested == "partial" and not partial_ok:
        raise IncompatibleError(
            "--aux-load partial cannot load this base as its first layers: "
            "its file stores per-layer metadata arrays (use view)"
        )
    if requested == "auto":
        return "partial" if prefix_view_supported() and partial_ok and not needs_view else "view"
    return requested
