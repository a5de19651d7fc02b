"""The KV predictor: per predicted base layer, a linear map (with bias) from auxiliary features.

Features per position: the un-roped keys and the values of the auxiliary layer that the
layer map names for this base layer (the inputs of the paper's predictor, apple/corenet
kv_prediction.py), then optionally the auxiliary's captured hidden tensors. Targets: the
base layer's keys after its key norm but before RoPE (as llama.cpp caches them, less RoPE),
then its values. Copied layers (a prefix auxiliary's own layers) are not predicted.

Stored as a GGUF written with gguf-py: ``general.type = kvcli-predictor``, the fingerprints
of the base and auxiliary it was fit for, the layer map and the feature kinds (keys.py), and
one weight matrix per predicted layer in F32, F16, Q8_0 or Q4_0 (dequantized once at load).

A factored predictor (kvcli.predict.factor) first maps a source layer's features through one shared
basis (n_features x rank, stored F32), and its factored layers' matrices read those rank
columns: the basis product is paid once per position, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.atomic import write_atomically
from kvcli.choices import Choice
from kvcli.errors import IncompatibleError, ModelFileError
from kvcli.models.model_info import ModelInfo, check_gguf_file


class StorageType(Choice):
    """How a predictor's matrices are stored (gguf-py's quants; dequantized once at load)."""

    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


STORAGE_TYPES = StorageType.values()


def _ggml_type(storage: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[storage]


def storage_block(storage: str) -> int:
    """How many features one quantization block of ``storage`` spans (1: unquantized)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[_ggml_type(storage)][0]


@dataclass
class Predictor:
    base_fingerprint: str
    aux_fingerprint: str
    base_n_layer: int
    aux_n_layer: int
    copied_layers: list[int]
    layer_map: list[int]  # per base layer: the auxiliary layer feeding it (copied: its twin)
    weights: dict[int, np.ndarray]  # predicted layer -> (n_features, k_width + v_width) f32
    biases: dict[int, np.ndarray]  # predicted layer -> (k_width + v_width,) f32
    k_widths: dict[int, int]
    alphas: list[float] = field(default_factory=list)  # per predicted layer: K then V
    heldout_rel_error: list[float] = field(default_factory=list)
    calibration_tokens: int = 0
    calibration_source: str = ""
    feature_kinds: tuple[str, ...] = (keys.FEATURE_AUX_K, keys.FEATURE_AUX_V)
    storage_type: str = "f32"
    # KEY_SPACE_PRE_ROPE: predicted keys are as llama.cpp caches them, less RoPE;
    # KEY_SPACE_PRE_NORM: the base layer's key norm is applied to them, then RoPE (corenet)
    key_space: str = keys.KEY_SPACE_PRE_ROPE
    origin: str = ""  # where the matrices came from, if not kvcli's own fit (e.g. corenet)
    bases: dict[int, np.ndarray] = field(default_factory=dict)  # source -> (n_features, rank)
    factored_layers: list[int] = field(default_factory=list)  # weights read the basis' columns

    @property
    def exact_first_cell(self) -> bool:
        """kvcli's own fits replace the predicted cell of position 0 by the base's true one
        (predict_state.FirstCell); an imported predictor (corenet) runs as its authors ran
        it, predicting that cell too."""
        return not self.origin

    @property
    def raw_keys(self) -> bool:
        """Whether the features are the auxiliary's keys straight out of its QKV projection
        (captured from the graph: llama.cpp caches them normed and roped)."""
        return keys.FEATURE_AUX_K_RAW in self.feature_kinds

    @property
    def predicted_layers(self) -> list[int]:
        return sorted(self.weights)

    @property
    def feature_layers(self) -> list[int]:
        """The auxiliary layers whose K and V feed some predicted layer."""
        return sorted({self.layer_map[il] for il in self.predicted_layers})

    @property
    def hidden_kinds(self) -> tuple[str, ...]:
        """The auxiliary's captured hidden tensors among the features, in their order."""
        return tuple(kind for kind in self.feature_kinds if kind in keys.HIDDEN_KINDS)

    @property
    def uses_hidden(self) -> bool:
        return bool(self.hidden_kinds)

    def n_features(self, layer: int) -> int:
        """The width of the features layer ``layer`` reads (a factored layer: the rank)."""
        return self.weights[layer].shape[0]

    def sources_with_basis(self, layers) -> list[int]:
        """The source layers whose basis columns some of ``layers`` read."""
        return sorted({self.layer_map[il] for il in layers if il in self.factored_layers})

    def check_models(self, base: ModelInfo, aux: ModelInfo) -> None:
        if base.fingerprint != self.base_fingerprint or aux.fingerprint != self.aux_fingerprint:
            raise IncompatibleError(
                f"the predictor was fit for base {self.base_fingerprint} and auxiliary "
                f"{self.aux_fingerprint}, not base {base.fingerprint} ({base.path.name}) and "
                f"auxiliary {aux.fingerprint} ({aux.path.name}); calibrate one for these models"
            )
        from kvcli.llama.capture import hidden_feature_width

        hidden = hidden_feature_width(aux, self.hidden_kinds)
        for il in self.predicted_layers:
            src = self.layer_map[il]
            want_in = aux.n_embd_k(src) + aux.n_embd_v(src) + hidden
            if il in self.factored_layers:
                basis = self.bases.get(src)
                if basis is None or basis.shape[0] != want_in:
                    raise IncompatibleError(
                        f"predictor layer {il} is factored but its source "
                        f"{src} has no basis of {want_in} features"
                    )
                want_in = basis.shape[1]
            want_out = base.n_embd_k(il) + base.n_embd_v(il)
            if self.weights[il].shape != (want_in, want_out) or self.k_widths[il] != base.n_embd_k(il):
                raise IncompatibleError(
                    f"predictor layer {il} has shape {self.weights[il].shape}, "
                    f"the models need ({want_in}, {want_out})"
                )

    def predict_layer(
        self, features: np.ndarray, layer: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pre-RoPE keys and values of one predicted base layer at feature ``rows``, float32.

        ``features``: the rows of this layer's source (``build_features``; for a factored
        layer, times its source's basis)."""
        if rows is not None and len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # a view, not an 18 MB gather at 2048
        x = features if rows is None else features[rows]
        y = x @ self.weights[layer]
        y += self.biases[layer]
        kw = self.k_widths[layer]
        return y[:, :kw], y[:, kw:]


def build_features(
    aux_kv: dict[int, tuple[np.ndarray, np.ndarray]], source: int, hidden: list[np.ndarray] = ()
) -> np.ndarray:
    """The un-roped K and the V of auxiliary layer ``source``, then the captured hidden
    tensors (same rows): (positions, n_features) float32."""
    k, v = aux_kv[source]
    return np.concatenate([np.asarray(p, np.float32) for p in [k, v, *hidden]], axis=1)


def save_predictor(pred: Predictor, path: str | Path, storage_type: str | None = None) -> Path:
    """Write ``pred`` as a GGUF, its matrices stored as ``storage_type`` (default: its own)."""
    import gguf
    import gguf.quants

    storage = storage_type or pred.storage_type
    if storage not in STORAGE_TYPES:
        raise ModelFileError(f"unknown predictor type {storage!r} (one of {', '.join(STORAGE_TYPES)})")
    qtype = _ggml_type(storage)
    block = storage_block(storage)
    tensors = []
    for il in pred.predicted_layers:
        w = np.ascontiguousarray(pred.weights[il].T, np.float32)  # (n_targets, n_features)
        if w.shape[1] % block:
            raise ModelFileError(
                f"predictor type {storage} needs a feature count divisible by "
                f"{block}; layer {il} has {w.shape[1]} (use f16 or f32)"
            )
        tensors.append((keys.weight_name(il), gguf.quants.quantize(w, qtype)))
        tensors.append((keys.bias_name(il), np.ascontiguousarray(pred.biases[il], np.float32)))
    for src, basis in sorted(pred.bases.items()):  # kept F32: its columns span large ranges
        tensors.append((keys.basis_name(src), np.ascontiguousarray(basis.T, np.float32)))

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, "kvcli")
        w.add_type(keys.PREDICTOR_TYPE)
        w.add_uint32(keys.VERSION, keys.FORMAT_VERSION)
        w.add_string(keys.BASE_FINGERPRINT, pred.base_fingerprint)
        w.add_string(keys.AUX_FINGERPRINT, pred.aux_fingerprint)
        w.add_uint32(keys.BASE_N_LAYER, pred.base_n_layer)
        w.add_uint32(keys.AUX_N_LAYER, pred.aux_n_layer)
        w.add_array(keys.COPIED_LAYERS, [int(x) for x in pred.copied_layers] or [-1])
        w.add_array(keys.LAYER_MAP, [int(x) for x in pred.layer_map])
        w.add_array(keys.FEATURE_KINDS, list(pred.feature_kinds))
        w.add_string(keys.KEY_SPACE, pred.key_space)
        w.add_string(keys.ORIGIN, pred.origin)
        w.add_array(keys.K_WIDTHS, [int(pred.k_widths[il]) for il in pred.predicted_layers] or [0])
        w.add_array(keys.ALPHAS, [float(x) for x in pred.alphas] or [0.0])
        w.add_array(keys.HELDOUT_REL_ERROR, [float(x) for x in pred.heldout_rel_error] or [0.0])
        w.add_uint64(keys.CALIBRATION_TOKENS, int(pred.calibration_tokens))
        w.add_string(keys.CALIBRATION_SOURCE, pred.calibration_source)
        w.add_string(keys.STORAGE_TYPE, storage)
        if pred.factored_layers:
            w.add_array(keys.FACTORED_LAYERS, [int(x) for x in pred.factored_layers])
        for name, data in tensors:
            w.add_tensor(name, data, raw_dtype=qtype if name.endswith(".weight") else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return write_atomically(Path(path), write)


def load_predictor(path: str | Path) -> Predictor:
    """Read a predictor file; any damage is a one-line ModelFileError."""
    from kvcli.models.gguf_header import read_header

    path = check_gguf_file(path, "predictor")
    header = read_header(path)  # validates the header and every tensor's extent
    if header.get("general.type") != keys.PREDICTOR_TYPE:
        raise ModelFileError(
            f"not a kvcli predictor file (general.type is {header.get('general.type')!r}): {path}"
        )
    if header.get(keys.VERSION) != keys.FORMAT_VERSION:
        raise ModelFileError(
            f"predictor format version {header.get(keys.VERSION)} is not "
            f"{keys.FORMAT_VERSION}; recalibrate: {path}"
        )
    try:
        return _parse(path)
    except ModelFileError:
        raise
    except Exception as exc:  # untrusted bytes: any failure to parse is a damaged file
        raise ModelFileError(f"predictor file is corrupt ({type(exc).__name__}: {exc}): {path}") from None


def _parse(path: Path) -> Predictor:
    import gguf
    import gguf.quants

    r = gguf.GGUFReader(path)

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    base_n, aux_n = int(get(keys.BASE_N_LAYER)), int(get(keys.AUX_N_LAYER))
    copied = [int(x) for x in get(keys.COPIED_LAYERS) if int(x) >= 0]
    layer_map = [int(x) for x in get(keys.LAYER_MAP)]
    if len(layer_map) != base_n or not all(0 <= x < aux_n for x in layer_map):
        raise ModelFileError(
            f"predictor layer map does not fit {base_n} base and {aux_n} auxiliary layers: {path}"
        )
    predicted = [il for il in range(base_n) if il not in copied]
    k_widths = [int(x) for x in get(keys.K_WIDTHS)][: len(predicted)]
    tensors = {t.name: t for t in r.tensors}
    weights, biases = {}, {}
    for i, il in enumerate(predicted):
        wt, bt = tensors.get(keys.weight_name(il)), tensors.get(keys.bias_name(il))
        if wt is None or bt is None:
            raise ModelFileError(f"predictor file lacks the matrices of layer {il}: {path}")
        with np.errstate(all="ignore"):
            w = gguf.quants.dequantize(wt.data, wt.tensor_type).astype(np.float32, copy=False)
        weights[il] = np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
        biases[il] = np.array(bt.data, np.float32).reshape(-1)
        if biases[il].shape != (weights[il].shape[1],) or not 0 < k_widths[i] < len(biases[il]):
            raise ModelFileError(f"predictor layer {il}'s matrices disagree in shape: {path}")
        if not (np.isfinite(weights[il]).all() and np.isfinite(biases[il]).all()):
            raise ModelFileError(f"predictor layer {il} holds NaN or infinite values: {path}")
    factored = [int(x) for x in get(keys.FACTORED_LAYERS, [])]
    bases = {}
    for src in sorted({layer_map[il] for il in factored if il in weights}):
        t = tensors.get(keys.basis_name(src))
        if t is None:
            raise ModelFileError(f"predictor file lacks the basis of source layer {src}: {path}")
        basis = np.array(t.data, np.float32).reshape(-1, int(t.shape[0]))
        bases[src] = np.ascontiguousarray(basis.T)
        if not np.isfinite(bases[src]).all():
            raise ModelFileError(f"predictor basis {src} holds NaN or infinite values: {path}")
    for il in factored:
        if il not in weights or weights[il].shape[0] != bases[layer_map[il]].shape[1]:
            raise ModelFileError(f"predictor layer {il} does not fit its basis: {path}")
    storage = str(get(keys.STORAGE_TYPE, "f32"))
    key_space = str(get(keys.KEY_SPACE, keys.KEY_SPACE_PRE_ROPE))
    if key_space not in keys.KEY_SPACES:
        raise ModelFileError(f"predictor key space {key_space!r} is not one kvcli knows: {path}")
    return Predictor(
        base_fingerprint=str(get(keys.BASE_FINGERPRINT)),
        aux_fingerprint=str(get(keys.AUX_FINGERPRINT)),
        base_n_layer=base_n,
        aux_n_layer=aux_n,
        copied_layers=copied,
        layer_map=layer_map,
        weights=weights,
        biases=biases,
        k_widths=dict(zip(predicted, k_widths, strict=True)),
        alphas=[float(x) for x in get(keys.ALPHAS, [])],
        heldout_rel_error=[float(x) for x in get(keys.HELDOUT_REL_ERROR, [])],
        calibration_tokens=int(get(keys.CALIBRATION_TOKENS, 0)),
        calibration_source=str(get(keys.CALIBRATION_SOURCE, "")),
        feature_kinds=tuple(str(x) for x in get(keys.FEATURE_KINDS)),
        storage_type=storage if storage in STORAGE_TYPES else "f32",
        key_space=key_space,
        origin=str(get(keys.ORIGIN, "")),
        bases=bases,
        factored_layers=factored,
    )
