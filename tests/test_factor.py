"""A predictor factored through a shared basis: the reduced-rank math (numpy), its file, and
kvp on real llama.cpp running it as the dense matrices it stands for."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import random_prompt
from test_cli import assert_one_line_error
from test_convert import convert, ok

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.errors import KvcliError, ModelFileError
from kvcli.llama.runtime import ContextSettings
from kvcli.predict.apply import basis_rows
from kvcli.predict.factor import factor_predictor, heldout_errors, reduced_rank_basis
from kvcli.predict.predictor import Predictor, load_predictor, save_predictor
from kvcli.predict.ridge import RidgeStats


def synthetic(n_features=32, rank_of_truth=6, n_rows=4000, seed=0, anisotropic=False):
    """Features and a two-layer predictor whose stacked matrices have rank ``rank_of_truth``;
    statistics of (features, targets) over ``n_rows`` rows, targets = the predictor's output."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.01, n_features) if anisotropic else np.ones(n_features)
    mix = np.linalg.qr(rng.normal(size=(n_features, n_features)))[0]
    x = (rng.normal(size=(n_rows, n_features)) * scales) @ mix + rng.normal(size=n_features)
    low = rng.normal(size=(n_features, rank_of_truth))
    weights = {il: (low @ rng.normal(size=(rank_of_truth, 16))).astype(np.float32) for il in (2, 3)}
    biases = {il: rng.normal(size=16).astype(np.float32) for il in (2, 3)}
    pred = Predictor(
        "b" * 16,
        "a" * 16,
        4,
        2,
        copied_layers=[0, 1],
        layer_map=[0, 1, 1, 1],
        weights=weights,
        biases=biases,
        k_widths={2: 8, 3: 8},
    )
    y = np.concatenate([x @ weights[il] + biases[il] for il in (2, 3)], axis=1)
    stats = RidgeStats(n_features, 32)
    stats.add(x, y)
    return pred, {1: stats}, x


def predict_all(pred, x):
    out = []
    for il in pred.predicted_layers:
        feats = x @ pred.bases[1] if il in pred.factored_layers else x
        out.append(np.concatenate(pred.predict_layer(feats.astype(np.float32), il), axis=1))
    return np.concatenate(out, axis=1)


def test_a_basis_of_the_matrices_own_rank_loses_nothing():
    pred, stats, x = synthetic()
    factored = factor_predictor(pred, stats, rank=6)
    assert factored.factored_layers == [2, 3] and factored.bases[1].shape == (32, 6)
    assert all(factored.weights[il].shape == (6, 16) for il in (2, 3))
    np.testing.assert_allclose(predict_all(factored, x), predict_all(pred, x), rtol=0, atol=2e-3)
    assert max(e for pair in heldout_errors(factored, stats).values() for e in pair) < 1e-3


def test_a_smaller_basis_loses_more_and_the_covariance_decides_what_to_keep():
    pred, stats, _ = synthetic(rank_of_truth=16, anisotropic=True)
    errors = []
    for rank in (12, 8, 4):
        factored = factor_predictor(pred, stats, rank=rank)
        errors.append(np.mean([e for pair in heldout_errors(factored, stats).values() for e in pair]))
    assert 0 < errors[0] < errors[1] < errors[2]
    # the plain SVD of the stacked matrices keeps their largest directions, not the ones
    # the features actually excite: with anisotropic features it loses more
    stacked = np.concatenate([pred.weights[2], pred.weights[3]], axis=1).astype(np.float64)
    u = np.linalg.svd(stacked, full_matrices=False)[0][:, :8]
    plain = dataclasses.replace(
        pred,
        bases={1: u.astype(np.float32)},
        factored_layers=[2, 3],
        weights={il: (u.T @ pred.weights[il]).astype(np.float32) for il in (2, 3)},
    )
    plain_error = np.mean([e for pair in heldout_errors(plain, stats).values() for e in pair])
    assert errors[1] < plain_error


def test_reduced_rank_basis_refuses_a_rank_outside_the_features():
    with pytest.raises(KvcliError, match="rank must be between 1 and 7"):
        reduced_rank_basis([np.ones((8, 2))], [np.ones(2)], np.eye(8), 8)


def test_kept_full_layers_are_untouched_and_refactoring_is_refused():
    pred, stats, _ = synthetic()
    factored = factor_predictor(pred, stats, rank=4, full_layers=[2])
    assert factored.factored_layers == [3]
    np.testing.assert_array_equal(factored.weights[2], pred.weights[2])
    with pytest.raises(KvcliError, match="already factored"):
        factor_predictor(factored, stats, rank=4)


def test_factored_file_round_trip_and_damage(tmp_path):
    pred, stats, x = synthetic()
    factored = factor_predictor(pred, stats, rank=6)
    loaded = load_predictor(save_predictor(factored, tmp_path / "p.gguf", "f16"))
    assert loaded.factored_layers == [2, 3] and loaded.storage_type == "f16"
    np.testing.assert_array_equal(loaded.bases[1], factored.bases[1])  # the basis stays F32
    want = predict_all(pred, x)
    np.testing.assert_allclose(predict_all(loaded, x), want, rtol=0, atol=1e-2 * np.abs(want).max())
    lying = dataclasses.replace(factored, bases={})  # says layers 2, 3 read a basis it lacks
    with pytest.raises(ModelFileError, match="lacks the basis of source layer 1"):
        load_predictor(save_predictor(lying, tmp_path / "lying.gguf"))


def test_basis_rows_reuse_the_product_that_covers_them():
    rng = np.random.default_rng(0)
    features, basis = rng.normal(size=(40, 8)), rng.normal(size=(8, 3))
    cache, built = {}, []

    def rows(x):
        return lambda: built.append(len(x)) or x

    whole = basis_rows(cache, 4, rows(features), 40, basis, first=10)  # positions 10..49
    np.testing.assert_allclose(whole, features @ basis)
    part = basis_rows(cache, 4, rows(features[5:20]), 15, basis, first=15)  # 15..29: inside
    assert np.shares_memory(part, whole) and built == [40]  # a view; no features built
    np.testing.assert_allclose(part, (features @ basis)[5:20])
    wider = basis_rows(cache, 4, rows(rng.normal(size=(50, 8))), 50, basis, first=0)  # 0..49: anew
    assert not np.shares_memory(wider, whole) and cache[("basis", 4)][1] is wider and built == [40, 50]


@pytest.fixture(scope="module")
def tiny_prefix_bundle(tiny_gemma3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("factor") / "bundle"
    ok(convert("bundle", "--base", tiny_gemma3, "-o", folder, "--tokens", "600", "--no-check"))
    return folder


def dense_twin(pred: Predictor) -> Predictor:
    """The unfactored predictor a factored one stands for: basis times matrices."""
    weights = {
        il: (pred.bases[pred.layer_map[il]] @ w if il in pred.factored_layers else w)
        for il, w in pred.weights.items()
    }
    return dataclasses.replace(pred, weights=weights, bases={}, factored_layers=[])


def test_factor_command_writes_a_bundle_kvp_runs_as_its_dense_twin(tiny_prefix_bundle, tmp_path):
    out = tmp_path / "factored"
    res = ok(
        convert(
            "factor", "--bundle", tiny_prefix_bundle, "-o", out, "--rank", "16", "--tokens", "600", "--json"
        )
    )
    report = json.loads(res.stdout)
    assert report["rank"] == 16 and report["factored_layers"]
    for e in report["heldout_rel_error"].values():
        assert 0 < e["before"][0] < 1 and 0 < e["after"][0] < 1.5
    from kvcli.engine.bundle import load_bundle

    bundle = load_bundle(out)
    pred = load_predictor(bundle.predictor)
    assert pred.factored_layers == report["factored_layers"]
    settings = ContextSettings(n_ctx=256)
    with Engine.from_bundle(bundle, settings=settings) as eng:
        tokens = random_prompt(120, eng.model.n_vocab, eng.model.bos, low=3)
        factored = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=4))
        factored_logits = factored.logits
        assert factored.timings.predict_ms > 0
        eng.predictor = dense_twin(pred)
        dense_logits = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=4)).logits
        np.testing.assert_allclose(
            factored_logits, dense_logits, rtol=0, atol=1e-3 * np.abs(dense_logits).max()
        )
        eng.predictor = load_predictor(load_bundle(tiny_prefix_bundle).predictor)
        unfactored_logits = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=4)).logits
        assert np.abs(unfactored_logits - factored_logits).max() > 1e-4  # the rank did cut


def test_factor_command_refusals(tiny_prefix_bundle, tmp_path):
    pred = load_predictor(next(tiny_prefix_bundle.glob("*predictor*.gguf")))
    n_features = pred.n_features(pred.predicted_layers[0])
    res = convert(
        "factor",
        "--bundle",
        tiny_prefix_bundle,
        "-o",
        tmp_path / "a",
        "--rank",
        str(n_features),
        "--tokens",
        "600",
    )
    assert_one_line_error(res, f"rank must be between 1 and {n_features - 1}")
    res = convert(
        "factor", "--bundle", tiny_prefix_bundle, "-o", tmp_path / "b", "--rank", "16", "--keep-full", "0"
    )
    assert_one_line_error(res, "layer 0 is not a predicted layer")
    res = convert(
        "factor",
        "--bundle",
        tiny_prefix_bundle,
        "-o",
        tmp_path / "c",
        "--rank",
        "20",
        "--predictor-type",
        "q8_0",
    )
    assert_one_line_error(res, "q8_0 needs a rank divisible by 32")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_already_factored_bundle_is_refused(tmp_path):
    from kvcli.bundles.default import default_bundle

    assert load_predictor(default_bundle().predictor).factored_layers  # the shipped one
    res = convert("factor", "-o", tmp_path / "again", "--rank", "256")
    assert_one_line_error(res, "already factored")
    assert not (tmp_path / "again").exists()
