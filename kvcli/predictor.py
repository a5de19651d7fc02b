"""The KV predictor: per predicted base layer, a linear map (with bias) from auxiliary features.

Features per position: the un-roped keys and the values of the auxiliary's feature layers,
concatenated (the inputs of the paper's predictor, apple/corenet kv_prediction.py). Targets:
the base layer's keys after its key norm but before RoPE (as llama.cpp caches them, less
RoPE), then its values. Copied layers (a prefix auxiliary's own layers) are not predicted.

Stored as a GGUF written with gguf-py: ``general.type = kvcli-predictor``, the fingerprints
of the base and auxiliary it was fit for, the layer map and the feature kinds (keys.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.aux_cut import write_atomically
from kvcli.errors import IncompatibleError, ModelFileError
from kvcli.model_info import ModelInfo, check_gguf_file


@dataclass
class Predictor:
    base_fingerprint: str
    aux_fingerprint: str
    base_n_layer: int
    aux_n_layer: int
    copied_layers: list[int]
    predicted_layers: list[int]
    feature_layers: list[int]
    k_widths: list[int]
    v_widths: list[int]
    weight: np.ndarray  # (n_features, n_targets) float32
    bias: np.ndarray  # (n_targets,) float32
    alphas: list[float]
    heldout_rel_error: list[float]
    calibration_tokens: int = 0
    calibration_source: str = ""
    feature_kinds: tuple[str, ...] = (keys.FEATURE_AUX_K, keys.FEATURE_AUX_V)

    @property
    def uses_hidden(self) -> bool:
        """Whether the features include the auxiliary's captured hidden tensors."""
        return all(kind in self.feature_kinds for kind in keys.HIDDEN_FEATURES)

    def target_slices(self) -> list[tuple[slice, slice]]:
        """Per predicted layer: the columns of its keys and of its values."""
        out, at = [], 0
        for kw, vw in zip(self.k_widths, self.v_widths):
            out.append((slice(at, at + kw), slice(at + kw, at + kw + vw)))
            at += kw + vw
        return out

    def check_models(self, base: ModelInfo, aux: ModelInfo) -> None:
        if base.fingerprint != self.base_fingerprint or aux.fingerprint != self.aux_fingerprint:
            raise IncompatibleError(
                f"the predictor was fit for base {self.base_fingerprint} and auxiliary "
                f"{self.aux_fingerprint}, not base {base.fingerprint} ({base.path.name}) and "
                f"auxiliary {aux.fingerprint} ({aux.path.name}); calibrate one for these models"
            )

    def predict_layer(self, features: np.ndarray, layer: int, rows: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Pre-RoPE keys and values of one predicted base layer at feature ``rows``, float32."""
        i = self.predicted_layers.index(layer)
        ks, vs = self.target_slices()[i]
        x = features if rows is None else features[rows]
        y = x @ self.weight[:, ks.start : vs.stop]
        y += self.bias[ks.start : vs.stop]
        return y[:, : ks.stop - ks.start], y[:, ks.stop - ks.start :]

    def predict(self, features: np.ndarray, layer_rows: dict[int, np.ndarray] | None = None
                ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``predict_layer`` for every predicted layer (``layer_rows``: default all rows)."""
        return {il: self.predict_layer(features, il, None if layer_rows is None else layer_rows[il])
                for il in self.predicted_layers}


def build_features(aux_kv: dict[int, tuple[np.ndarray, np.ndarray]], feature_layers: list[int],
                   hidden: list[np.ndarray] = ()) -> np.ndarray:
    """Concatenate the un-roped K and the V of each feature layer, then the captured hidden
    tensors (same rows): (positions, n_features)."""
    parts = []
    for layer in feature_layers:
        k, v = aux_kv[layer]
        parts += [k, v]
    parts += list(hidden)
    return np.concatenate([np.asarray(p, np.float32) for p in parts], axis=1)


def save_predictor(pred: Predictor, path: str | Path) -> Path:
    import gguf

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, "kvcli")
        w.add_type(keys.PREDICTOR_TYPE)
        w.add_uint32(keys.VERSION, keys.FORMAT_VERSION)
        w.add_string(keys.BASE_FINGERPRINT, pred.base_fingerprint)
        w.add_string(keys.AUX_FINGERPRINT, pred.aux_fingerprint)
        w.add_uint32(keys.BASE_N_LAYER, pred.base_n_layer)
        w.add_uint32(keys.AUX_N_LAYER, pred.aux_n_layer)
        w.add_array(keys.COPIED_LAYERS, [int(x) for x in pred.copied_layers] or [-1])
        w.add_array(keys.PREDICTED_LAYERS, [int(x) for x in pred.predicted_layers])
        w.add_array(keys.FEATURE_LAYERS, [int(x) for x in pred.feature_layers])
        w.add_array(keys.FEATURE_KINDS, list(pred.feature_kinds))
        w.add_string(keys.KEY_SPACE, keys.KEY_SPACE_PRE_ROPE)
        w.add_array(keys.K_WIDTHS, [int(x) for x in pred.k_widths])
        w.add_array(keys.V_WIDTHS, [int(x) for x in pred.v_widths])
        w.add_array(keys.ALPHAS, [float(x) for x in pred.alphas])
        w.add_array(keys.HELDOUT_REL_ERROR, [float(x) for x in pred.heldout_rel_error])
        w.add_uint64(keys.CALIBRATION_TOKENS, int(pred.calibration_tokens))
        w.add_string(keys.CALIBRATION_SOURCE, pred.calibration_source)
        w.add_tensor(keys.WEIGHT, np.ascontiguousarray(pred.weight, np.float32))
        w.add_tensor(keys.BIAS, np.ascontiguousarray(pred.bias, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return write_atomically(Path(path), write)


def load_predictor(path: str | Path) -> Predictor:
    import gguf

    path = check_gguf_file(path, "predictor")
    try:
        r = gguf.GGUFReader(path)
    except Exception as exc:
        raise ModelFileError(f"predictor file is corrupt or truncated ({exc}): {path}") from None

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    if get("general.type") != keys.PREDICTOR_TYPE:
        raise ModelFileError(f"not a kvcli predictor file (general.type is "
                             f"{get('general.type')!r}): {path}")
    if get(keys.VERSION) != keys.FORMAT_VERSION:
        raise ModelFileError(f"predictor format version {get(keys.VERSION)} is not "
                             f"{keys.FORMAT_VERSION}; recalibrate: {path}")
    tensors = {t.name: t for t in r.tensors}
    if keys.WEIGHT not in tensors or keys.BIAS not in tensors:
        raise ModelFileError(f"predictor file lacks its matrices: {path}")
    copied = [int(x) for x in get(keys.COPIED_LAYERS) if int(x) >= 0]
    pred = Predictor(
        base_fingerprint=get(keys.BASE_FINGERPRINT), aux_fingerprint=get(keys.AUX_FINGERPRINT),
        base_n_layer=int(get(keys.BASE_N_LAYER)), aux_n_layer=int(get(keys.AUX_N_LAYER)),
        copied_layers=copied,
        predicted_layers=[int(x) for x in get(keys.PREDICTED_LAYERS)],
        feature_layers=[int(x) for x in get(keys.FEATURE_LAYERS)],
        k_widths=[int(x) for x in get(keys.K_WIDTHS)], v_widths=[int(x) for x in get(keys.V_WIDTHS)],
        weight=np.array(tensors[keys.WEIGHT].data, np.float32),
        bias=np.array(tensors[keys.BIAS].data, np.float32).reshape(-1),
        alphas=[float(x) for x in get(keys.ALPHAS, [])],
        heldout_rel_error=[float(x) for x in get(keys.HELDOUT_REL_ERROR, [])],
        calibration_tokens=int(get(keys.CALIBRATION_TOKENS, 0)),
        calibration_source=str(get(keys.CALIBRATION_SOURCE, "")),
        feature_kinds=tuple(get(keys.FEATURE_KINDS)),
    )
    n_targets = sum(pred.k_widths) + sum(pred.v_widths)
    if pred.weight.shape[1] != n_targets or pred.bias.shape != (n_targets,):
        raise ModelFileError(f"predictor matrices do not match its layer widths: {path}")
    return pred
