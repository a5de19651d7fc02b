"""How a prefix auxiliary (the base's layers 0..k-1) is run:

- "partial": the base's file loaded again as a k-layer model (needs kvcli's patches/, built by
  tools/install.py); its weights share the base's pages;
- "view": a second context on the base's own model whose graph the eval callback stops after
  layer k-1 (stock llama.cpp; docs/design.md, the auxiliary as a view);
- "file": the cut auxiliary file, a second copy of the shared weights.

Also the auxiliary's context for an engine, the tensors it captures for the predictor, and
their rows read back after a prefill.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvcli.choices import Choice
from kvcli.errors import IncompatibleError, KvcliError
from kvcli.llama.capture import TensorCapture, hidden_features, hidden_tensor_names
from kvcli.llama.handles import Handles
from kvcli.llama.library import llama_cpp_version, prefix_view_supported
from kvcli.llama.runtime import Context
from kvcli.models.aux_cut import cut_auxiliary, prefix_layers
from kvcli.models.model_info import ModelInfo, read_model_info
from kvcli.predict.predictor import Predictor


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


def open_aux_context(
    handles: Handles,
    load: str,
    base: Context,
    base_info: ModelInfo,
    *,
    prefix: int,
    names: list[str],
    extra: list[str],
    aux_path: Path | None,
) -> Context | None:
    """The auxiliary's context, opened in ``handles``, for ``load`` (choose_aux_load: a
    ``prefix`` of k base layers, or the file ``aux_path``) beside the ``base`` context,
    capturing the predictor's ``names`` and the tail-focus attention ``extra``; None
    without an auxiliary."""
    if load == "partial":
        # the base's file loaded again as its first k layers: its pages are shared
        return handles.open(
            base_info.path,
            "base model (as a prefix view)",
            TensorCapture(names, extra=extra) if names or extra else None,
            prefix_layers=prefix,
            arch=base_info.arch,
        )
    elif load == "view":
        # the base's own model, stopped after layer k-1: no second copy of the weights
        return handles.context(
            base.model, TensorCapture(names, stop_after=f"l_out-{prefix - 1}", extra=extra)
        )
    elif load == "file":
        return handles.open(
            aux_path, "auxiliary", TensorCapture(names, extra=extra) if names or extra else None
        )
    return None


def aux_file(aux_path: Path | None, base_info: ModelInfo, aux_info: ModelInfo) -> Path:
    """The auxiliary's file: ``aux_path``, or for a prefix with none, its cut, made once
    into the cache."""
    if aux_path is not None:
        return aux_path
    from kvcli.engine.bundle import cache_dir

    k = aux_info.n_layer
    path = cache_dir() / "aux" / f"{base_info.fingerprint}-prefix{k}.gguf"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cut_auxiliary(base_info.path, path, prefix_layers(k))
        except OSError as exc:
            raise KvcliError(
                f"cannot write the auxiliary's cut into {path.parent}: {exc.strerror or exc}"
            ) from None
    if read_model_info(path, "auxiliary").fingerprint != aux_info.fingerprint:
        raise IncompatibleError(
            f"the cut auxiliary {path} is not the base's first {k} layers; delete it and run again"
        )
    return path


def capture_names(predictor: Predictor | None, aux_info: ModelInfo) -> list[str]:
    """The auxiliary's graph tensors the predictor reads: hidden tensors, then (for raw
    keys) each feature layer's fused QKV projection output (OpenELM's ``wqkv``: raw keys
    come only with an imported corenet predictor, whose auxiliary is an OpenELM)."""
    if predictor is None:
        return []
    names = hidden_tensor_names(aux_info.n_layer, predictor.hidden_kinds) if predictor.uses_hidden else []
    return names + ([f"wqkv-{src}" for src in predictor.feature_layers] if predictor.raw_keys else [])


def take_captured(
    aux: Context, predictor: Predictor, aux_info: ModelInfo, n_rows: int
) -> tuple[list[np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The rows the ``aux`` context captured for ``predictor``: (hidden tensors, raw K and V
    per feature layer)."""
    if aux.capture is None:
        return [], {}
    rows = aux.capture.take(n_rows)
    n_hidden = len(predictor.hidden_kinds)
    raw_kv = {}
    for src, qkv in zip(predictor.feature_layers if predictor.raw_keys else [], rows[n_hidden:]):
        q, kv = aux_info.n_head[src] * aux_info.head_dim_k, aux_info.n_embd_k(src)
        if qkv.shape[1] != q + kv + aux_info.n_embd_v(src):
            raise IncompatibleError(
                f"auxiliary layer {src}'s QKV projection has {qkv.shape[1]} "
                f"columns, not {q + kv + aux_info.n_embd_v(src)}"
            )
        raw_kv[src] = (qkv[:, q : q + kv], qkv[:, q + kv :])
    return hidden_features(predictor.hidden_kinds, rows[:n_hidden]), raw_kv
