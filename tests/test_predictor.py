"""The predictor file: round trip, and refusal of a predictor fit for other models."""

import numpy as np
import pytest

from kvcli import keys
from kvcli.errors import IncompatibleError, ModelFileError
from kvcli.model_info import read_model_info
from kvcli.predictor import Predictor, load_predictor, save_predictor


def small_predictor(base_fp="b" * 16, aux_fp="a" * 16) -> Predictor:
    rng = np.random.default_rng(0)
    return Predictor(
        base_fingerprint=base_fp, aux_fingerprint=aux_fp, base_n_layer=4, aux_n_layer=2,
        copied_layers=[0, 1], predicted_layers=[2, 3], feature_layers=[1],
        k_widths=[16, 16], v_widths=[16, 16],
        weight=rng.normal(size=(32, 64)).astype(np.float32),
        bias=rng.normal(size=64).astype(np.float32),
        alphas=[0.1, 0.1, 1.0, 1.0], heldout_rel_error=[0.5, 0.6, 0.7, 0.8],
        calibration_tokens=123, calibration_source="test")


def test_round_trip(tmp_path):
    pred = small_predictor()
    loaded = load_predictor(save_predictor(pred, tmp_path / "p.gguf"))
    np.testing.assert_array_equal(loaded.weight, pred.weight)
    np.testing.assert_array_equal(loaded.bias, pred.bias)
    for field in ("base_fingerprint", "aux_fingerprint", "copied_layers", "predicted_layers",
                  "feature_layers", "k_widths", "v_widths", "calibration_tokens", "feature_kinds"):
        assert getattr(loaded, field) == getattr(pred, field), field
    assert loaded.alphas == pytest.approx(pred.alphas)


def test_predict_applies_weight_and_bias_per_layer():
    pred = small_predictor()
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    out = pred.predict(x, {2: np.arange(5), 3: np.array([3, 4])})
    full = x @ pred.weight + pred.bias
    np.testing.assert_allclose(out[2][0], full[:, 0:16], rtol=1e-5)
    np.testing.assert_allclose(out[3][1], full[3:, 48:64], rtol=1e-5)


def test_a_predictor_for_other_models_is_refused(tiny_llama, tiny_gemma3):
    base, aux = read_model_info(tiny_llama), read_model_info(tiny_gemma3)
    small_predictor(base.fingerprint, aux.fingerprint).check_models(base, aux)
    with pytest.raises(IncompatibleError, match="fit for base"):
        small_predictor(aux.fingerprint, base.fingerprint).check_models(base, aux)


def test_a_model_file_is_not_a_predictor(tiny_llama):
    with pytest.raises(ModelFileError, match=keys.PREDICTOR_TYPE.split("-")[0]):
        load_predictor(tiny_llama)
