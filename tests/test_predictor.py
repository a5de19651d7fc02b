"""The predictor file: round trip, and refusal of a predictor fit for other models."""

import numpy as np
import pytest

from kvcli import keys
from kvcli.errors import IncompatibleError, ModelFileError
from kvcli.models.model_info import read_model_info
from kvcli.predict.predictor import Predictor, load_predictor, save_predictor


def small_predictor(base_fp="b" * 16, aux_fp="a" * 16) -> Predictor:
    rng = np.random.default_rng(0)
    return Predictor(
        base_fingerprint=base_fp,
        aux_fingerprint=aux_fp,
        base_n_layer=4,
        aux_n_layer=2,
        copied_layers=[0, 1],
        layer_map=[0, 1, 1, 1],
        weights={il: rng.normal(size=(32, 32)).astype(np.float32) for il in (2, 3)},
        biases={il: rng.normal(size=32).astype(np.float32) for il in (2, 3)},
        k_widths={2: 16, 3: 16},
        alphas=[0.1, 0.1, 1.0, 1.0],
        heldout_rel_error=[0.5, 0.6, 0.7, 0.8],
        calibration_tokens=123,
        calibration_source="test",
    )


def test_round_trip(tmp_path):
    pred = small_predictor()
    loaded = load_predictor(save_predictor(pred, tmp_path / "p.gguf"))
    for il in (2, 3):
        np.testing.assert_array_equal(loaded.weights[il], pred.weights[il])
        np.testing.assert_array_equal(loaded.biases[il], pred.biases[il])
    for field in (
        "base_fingerprint",
        "aux_fingerprint",
        "copied_layers",
        "predicted_layers",
        "feature_layers",
        "layer_map",
        "k_widths",
        "calibration_tokens",
        "feature_kinds",
    ):
        assert getattr(loaded, field) == getattr(pred, field), field
    assert loaded.alphas == pytest.approx(pred.alphas)


@pytest.mark.parametrize(("storage", "max_rel_error"), [("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.2)])
def test_quantized_storage_dequantizes_at_load(tmp_path, storage, max_rel_error):
    pred = small_predictor()
    f32 = save_predictor(pred, tmp_path / "f32.gguf")
    small = save_predictor(pred, tmp_path / f"{storage}.gguf", storage)
    loaded = load_predictor(small)
    assert loaded.storage_type == storage and small.stat().st_size < f32.stat().st_size
    for il in (2, 3):
        assert loaded.weights[il].dtype == np.float32
        err = np.linalg.norm(loaded.weights[il] - pred.weights[il]) / np.linalg.norm(pred.weights[il])
        assert 0 < err < max_rel_error


def test_quantized_storage_needs_whole_blocks(tmp_path):
    pred = small_predictor()
    pred.weights = {il: w[:20] for il, w in pred.weights.items()}
    with pytest.raises(ModelFileError, match="divisible by 32"):
        save_predictor(pred, tmp_path / "p.gguf", "q8_0")
    assert not list(tmp_path.iterdir())


def test_predict_applies_weight_and_bias_per_layer():
    pred = small_predictor()
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    k, v = pred.predict_layer(x, 3, np.array([3, 4]))
    full = x @ pred.weights[3] + pred.biases[3]
    np.testing.assert_allclose(k, full[3:, :16], rtol=1e-5)
    np.testing.assert_allclose(v, full[3:, 16:], rtol=1e-5)


def test_gguf_dump_reads_a_predictor(tmp_path):
    import subprocess
    import sys

    path = save_predictor(small_predictor(), tmp_path / "p.gguf", "q8_0")
    out = subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_dump", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert keys.LAYER_MAP in out and keys.weight_name(3) in out and "Q8_0" in out


def test_a_predictor_for_other_models_is_refused(tiny_llama, tiny_gemma3):
    base, aux = read_model_info(tiny_llama), read_model_info(tiny_gemma3)
    with pytest.raises(IncompatibleError, match="fit for base"):
        small_predictor(aux.fingerprint, base.fingerprint).check_models(base, aux)


def test_a_model_file_is_not_a_predictor(tiny_llama):
    with pytest.raises(ModelFileError, match=keys.PREDICTOR_TYPE.split("-")[0]):
        load_predictor(tiny_llama)
