"""The default bundle: the predictor the package ships for the embedded model, else a fit."""

from kvcli.engine import bundle as bundle_mod
from kvcli.engine.bundle import DEFAULT_AUX_LAYERS, default_bundle, shipped_predictor, shipped_predictor_fits


def test_the_shipped_predictor_is_for_the_embedded_model(gemma_path):
    """A stale file (made for another build of the embedded model, or another prefix) would
    make every default run calibrate on the user's machine."""
    shipped = shipped_predictor()
    assert shipped is not None, "kvcli/data lacks the default's predictor"
    assert shipped_predictor_fits(gemma_path, shipped)


def test_default_bundle_uses_the_shipped_predictor_without_calibrating(gemma_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bundle_mod, "shipped_predictor", lambda: gemma_bundle.predictor)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated although a fitting predictor ships")

    import kvcli.engine.build

    monkeypatch.setattr(kvcli.engine.build, "build_bundle", no_calibration)
    b = default_bundle()
    assert b.predictor.resolve() == gemma_bundle.predictor.resolve()
    assert b.aux_prefix == DEFAULT_AUX_LAYERS and str(b.folder).startswith(str(tmp_path))
    assert default_bundle().folder == b.folder  # reused


def test_a_predictor_for_other_models_is_not_used(gemma_path, tiny_gemma3, tmp_path):
    from kvcli.engine.build import build_bundle

    other = build_bundle(tiny_gemma3, tmp_path / "b", n_aux_layers=2, n_tokens=600)
    assert not shipped_predictor_fits(gemma_path, other.predictor)
    assert not shipped_predictor_fits(gemma_path, None)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    assert not shipped_predictor_fits(gemma_path, tmp_path / "junk.gguf")
