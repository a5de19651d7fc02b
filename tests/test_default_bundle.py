"""The default bundle: the predictor the package ships for the embedded model, else a fit."""

from kvcli.bundles import default as default_mod
from kvcli.bundles.default import default_bundle, shipped_predictor, shipped_predictor_fits
from kvcli.engine.bundle import DEFAULT_AUX_LAYERS


def test_the_shipped_predictor_is_for_the_embedded_model(gemma_path):
    """A stale file (made for another build of the embedded model, or another prefix) would
    make every default run calibrate on the user's machine."""
    shipped = shipped_predictor()
    assert shipped is not None, "kvcli/data lacks the default's predictor"
    assert shipped_predictor_fits(gemma_path, shipped)


def test_default_bundle_uses_the_shipped_predictor_without_calibrating(gemma_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(default_mod, "shipped_predictor", lambda: gemma_bundle.predictor)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated although a fitting predictor ships")

    monkeypatch.setattr(default_mod, "make_bundle", no_calibration)
    b = default_bundle()
    assert b.predictor.resolve() == gemma_bundle.predictor.resolve()
    assert b.aux_prefix == DEFAULT_AUX_LAYERS and str(b.folder).startswith(str(tmp_path))
    assert default_bundle().folder == b.folder  # reused


def test_a_predictor_for_other_models_is_not_used(gemma_path, tiny_gemma3, tmp_path):
    from kvcli.bundles.build import build_bundle

    other = build_bundle(tiny_gemma3, tmp_path / "b", n_aux_layers=2, n_tokens=600)
    assert not shipped_predictor_fits(gemma_path, other.predictor)
    assert not shipped_predictor_fits(gemma_path, None)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    assert not shipped_predictor_fits(gemma_path, tmp_path / "junk.gguf")


def test_without_a_fitting_predictor_the_default_is_made_and_checked(gemma_path, monkeypatch, tmp_path):
    """The fallback goes through make_bundle, as kvcli convert bundle does: a bundle that
    measured and checked itself, not a bare calibration."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(default_mod, "shipped_predictor", lambda: None)
    calls = []

    class Made:
        bundle = "made"

    def recording_make_bundle(base, folder, **options):
        calls.append((base, folder, options))
        return Made()

    monkeypatch.setattr(default_mod, "make_bundle", recording_make_bundle)
    assert default_bundle() == "made"
    ((base, folder, options),) = calls
    assert base == gemma_path and str(folder).startswith(str(tmp_path))
    assert options["n_aux_layers"] == DEFAULT_AUX_LAYERS and options.get("check", True)
