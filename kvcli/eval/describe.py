"""What a GGUF model, a kvcli predictor or a bundle is: plain dicts for tables and JSON."""

from __future__ import annotations

import math
from pathlib import Path

from kvcli import keys
from kvcli.errors import KvcliError, ModelFileError
from kvcli.models.gguf_header import read_header
from kvcli.models.model_info import check_gguf_file, read_model_info


def _compact(values) -> object:
    """A per-layer list whose entries are all equal, as that one value."""
    values = list(values)
    return values[0] if values and all(v == values[0] for v in values) else values


def _file_type_name(code) -> str | None:
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(code)).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError):
        return None


def describe_model(path: Path) -> dict:
    info = read_model_info(path)
    header = read_header(info.path)
    tokens = header.get("tokenizer.ggml.tokens")
    out = {
        "kind": "model",
        "path": str(info.path),
        "size_bytes": info.file_size,
        "arch": info.arch,
        "name": header.get("general.name"),
        "file_type": _file_type_name(header.get("general.file_type")),
        "n_layer": info.n_layer,
        "n_embd": info.n_embd,
        "n_head": _compact(info.n_head),
        "n_head_kv": _compact(info.n_head_kv),
        "head_dim_k": info.head_dim_k,
        "head_dim_v": info.head_dim_v,
        "context_length": info.context_length,
        "rope": {
            "layout": "neox" if info.rope[0].neox else "normal",
            "n_rot": info.rope[0].n_rot,
            "freq_base": _compact(sorted({r.freq_base for r in info.rope})),
        },
        "sliding_window": info.n_swa,
        "sliding_pattern": "".join("S" if s else "G" for s in info.is_swa) if info.n_swa else None,
        "n_vocab": len(tokens) if isinstance(tokens, list) else getattr(tokens, "count", None),
        "n_tensors": len(header.tensors),
        "fingerprint": info.fingerprint,
        "tokenizer_digest": info.tokenizer_digest,
    }
    if info.source_layers:
        out["cut_from"] = {
            "base_fingerprint": info.source_fingerprint,
            "base_layers": list(info.source_layers),
        }
    return out


def describe_prefix(base: Path, k: int) -> dict:
    """An auxiliary with no file: the base's own layers 0..k-1."""
    from kvcli.models.model_info import prefix_view_info

    info = prefix_view_info(base, k)
    return {
        "kind": "prefix of the base (no file)",
        "path": None,
        "size_bytes": 0,
        "arch": info.arch,
        "n_layer": k,
        "fingerprint": info.fingerprint,
        "cut_from": {"base_fingerprint": info.source_fingerprint, "base_layers": list(info.source_layers)},
    }


def describe_predictor(path: Path) -> dict:
    from kvcli.predict.predictor import load_predictor

    pred = load_predictor(path)
    predicted = pred.predicted_layers
    errors = pred.heldout_rel_error
    return {
        "kind": "predictor",
        "path": str(Path(path).resolve()),
        "size_bytes": Path(path).stat().st_size,
        "base_fingerprint": pred.base_fingerprint,
        "aux_fingerprint": pred.aux_fingerprint,
        "base_n_layer": pred.base_n_layer,
        "aux_n_layer": pred.aux_n_layer,
        "copied_layers": pred.copied_layers,
        "predicted_layers": predicted,
        "layer_map": pred.layer_map,
        "feature_kinds": list(pred.feature_kinds),
        "n_features": _compact(pred.n_features(il) for il in predicted) if predicted else 0,
        "factored_layers": pred.factored_layers,
        "basis_shape": {src: list(b.shape) for src, b in pred.bases.items()},
        "storage_type": pred.storage_type,
        "key_space": pred.key_space,
        "origin": pred.origin or None,
        "calibration_tokens": pred.calibration_tokens,
        "calibration_source": pred.calibration_source,
        "heldout_rel_error_k": [round(e, 4) for e in errors[0::2]],
        "heldout_rel_error_v": [round(e, 4) for e in errors[1::2]],
        # inf (the mean alone, predict/ridge.py's fallback) is "mean": JSON has no infinity
        "ridge_alphas": ["mean" if math.isinf(a) else float(f"{a:.3g}") for a in pred.alphas],
    }


def describe_bundle(folder: Path, verify: bool = False) -> dict:
    from kvcli.engine.bundle import check_compatible, load_bundle, verify_bundle

    b = load_bundle(folder)
    out = {
        "kind": "bundle",
        "path": str(Path(folder).resolve()),
        "kvcli": b.manifest.get(keys.MANIFEST_KVCLI),
        "base": describe_model(b.base),
        "aux": describe_model(b.aux) if b.aux else describe_prefix(b.base, b.aux_prefix),
        "predictor": describe_predictor(b.predictor),
        "origin": b.manifest.get(keys.MANIFEST_ORIGIN),
    }
    base, aux = out["base"], out["aux"]
    prefix = aux.get("cut_from", {})
    is_view = prefix.get("base_fingerprint") == base["fingerprint"] and prefix.get("base_layers") == list(
        range(aux["n_layer"])
    )
    # how kvcli runs the auxiliary with this llama-cpp-python build (engine.choose_aux_load)
    from kvcli.engine.aux_load import choose_aux_load
    from kvcli.llama.library import llama_cpp_version

    needs_view = any(kind in keys.VIEW_ONLY_KINDS for kind in out["predictor"]["feature_kinds"])
    from kvcli.models.model_info import has_per_layer_arrays, read_model_info

    base_info = read_model_info(b.base)
    out["aux_load"] = choose_aux_load(
        "auto",
        aux["n_layer"] if is_view else 0,
        needs_view=needs_view,
        partial_ok=not has_per_layer_arrays(base_info),
    )
    out["spans"] = _spans_note(
        base_info,
        aux["n_layer"] if is_view else 0,
        out["predictor"]["feature_kinds"],
        b.manifest.get(keys.MANIFEST_SPANS),
    )
    out["llama_cpp_python"] = llama_cpp_version()
    check = b.manifest.get(keys.MANIFEST_CHECK)
    if isinstance(check, dict) and "aux_ttft_ratio" in check:
        from kvcli.eval.self_check import summary_line

        out["check"] = summary_line(check)
        out["check_figures"] = check
    try:
        check_compatible(b.base, b.aux_source, b.predictor)
        out["compatible"], out["problem"] = True, None
    except KvcliError as exc:
        out["compatible"], out["problem"] = False, str(exc)
    if verify:
        out["sha256_ok"] = verify_bundle(b)
    else:
        out["sha256_ok"] = dict.fromkeys(b.file_roles)
    return out


def _spans_note(base, prefix: int, feature_kinds, measured: dict | None = None) -> str:
    """Whether kvp can choose spans with this bundle (kvcli.engine.recompute), and why not."""
    from kvcli.engine.span_choice import spans_supported

    if measured and measured.get(keys.SPANS_CHOOSER) == keys.CHOOSER_TAIL:
        return (
            f"yes: from the tail, in base layers {measured[keys.SPANS_LAYERS]} (each found the asked "
            f"value in {measured['found']} of {measured['prompts']} prompts)"
        )
    if not prefix:
        return "no: the auxiliary is not a prefix of the base"
    if not spans_supported(feature_kinds):
        return "no: the predictor does not read the auxiliary's hidden state"
    if prefix >= base.n_layer or (base.n_swa and base.is_swa[prefix]):
        return f"no: base layer {prefix}, the first after the auxiliary, is not a full-attention layer"
    return f"yes: chosen in base layer {prefix}"


def describe(path: str | Path, verify: bool = False) -> dict:
    path = Path(path)
    if path.is_dir():
        return describe_bundle(path, verify)
    check_gguf_file(path, "input")
    kind = read_header(path).get("general.type")
    if kind == keys.PREDICTOR_TYPE:
        return describe_predictor(path)
    if kind not in (None, "model"):
        raise ModelFileError(f"{path} is a GGUF of type {kind!r}, neither a model nor a predictor")
    return describe_model(path)
