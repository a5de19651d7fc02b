"""kvcli convert refine: the base's captured queries reproduce llama.cpp's own attention, and
the refined bundle is written, loads and runs."""

import json

import numpy as np
import pytest
from conftest import random_prompt
from test_cli import assert_one_line_error
from test_convert import convert, ok

from kvcli.engine.bundle import load_bundle
from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.llama.runtime import ContextSettings
from kvcli.models.aux_cut import cut_auxiliary, prefix_layers
from kvcli.models.model_info import key_norm_weights, read_model_info
from kvcli.predict.attention_fit import Sample, attention_loss, layer_attention
from kvcli.predict.calibration_run import CalibrationRun
from kvcli.predict.plan import make_plan
from kvcli.predict.predictor import load_predictor
from kvcli.predict.refine import BaseQueries


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gemma3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("refine") / "bundle"
    ok(convert("bundle", "--base", tiny_gemma3, "-o", folder, "--tokens", "600", "--no-check"))
    return folder


@pytest.mark.parametrize("model", ["tiny_gemma3", "tiny_qwen2"])
def test_captured_queries_give_llama_cpps_attention_output(model, request, tmp_path):
    """The loss's attention (the base's queries before RoPE, rotated here; the cache's keys
    un-roped and rotated back; 1/sqrt(head_dim)) is llama.cpp's: its kqv_out over the true
    cache. Gemma 3's queries are captured; Qwen 2's computed from its attention norm."""
    path = request.getfixturevalue(model)
    base = read_model_info(path)
    aux = read_model_info(cut_auxiliary(path, tmp_path / "aux.gguf", prefix_layers(2)))
    plan = make_plan(base, aux)
    layers = plan.predicted_layers[:2]  # Gemma 3: one sliding-window layer and a global one
    queries = BaseQueries(base, layers)
    names = [*queries.names.values(), *(f"kqv_out-{il}" for il in layers)]
    run = CalibrationRun(base, aux, plan, n_tokens=200, chunk_tokens=100, base_tensors=tuple(names))
    prompt = next(iter(run.prompts()))
    n = len(prompt.tokens)
    norms = key_norm_weights(base)
    for il in layers:
        attention = layer_attention(base, il, norms)
        k, v = prompt.base_kv[il]
        q = queries.of(prompt.base_rows, il, n).astype(np.float32)
        # all cells "predicted" as exactly the true ones: the loss's attention on the true cache
        kw = attention.k_width
        features = np.concatenate([k, v], axis=1).astype(np.float32)
        eye = np.eye(features.shape[1], dtype=np.float32)
        rows = np.arange(1, n)
        smp = Sample(features, k, v, q)
        assert (
            attention_loss(smp, eye, np.zeros(len(eye), np.float32), attention, rows, rows * 0 + n)[0] < 1e-6
        )
        # and that attention is llama.cpp's own output, head by head
        ours = _attention(q, k, v, attention)
        theirs = prompt.base_rows[f"kqv_out-{il}"].reshape(n, base.n_head[il], -1)
        assert kw == k.shape[1]
        np.testing.assert_allclose(ours, theirs, atol=2e-2 * np.abs(theirs).max())
        assert np.abs(ours[5:] - theirs[:-5]).max() > 0.1 * np.abs(theirs).max()  # not trivially alike


def _attention(q, k, v, attention):
    from kvcli.predict.attention_fit import masks
    from kvcli.state.rope import rotate

    n, n_head, hd = q.shape
    pos = np.arange(n)
    qr = rotate(q.reshape(n, -1), pos, attention.rope).reshape(n, -1, n_head // (k.shape[1] // hd), hd)
    kr = rotate(k, pos, attention.rope).reshape(n, -1, hd)
    hidden, _ = masks(n, pos, pos, attention.window)
    logits = np.einsum("tkgd,skd->kgts", qr, kr) * attention.scale
    logits[..., hidden] = -np.inf
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.einsum("kgts,skd->tkgd", a, v.reshape(n, -1, v.shape[1] // (k.shape[1] // hd)))
    return out.reshape(n, n_head, -1)


def test_refine_writes_a_bundle_that_runs(tiny_bundle, tmp_path):
    out = tmp_path / "refined"
    res = ok(
        convert("refine", "--bundle", tiny_bundle, "-o", out, "--steps", "6", "--tokens", "600", "--json")
    )
    report = json.loads(res.stdout)
    before = load_predictor(load_bundle(tiny_bundle).predictor)
    after = load_predictor(load_bundle(out).predictor)
    assert [r["layer"] for r in report["layers"]] == before.predicted_layers
    changed = [
        il for il in before.predicted_layers if not np.array_equal(before.weights[il], after.weights[il])
    ]
    for r in report["layers"]:
        assert r["after"] <= r["before"]
        assert (r["layer"] in changed) == (r["after"] < r["before"])  # kept only what did better
    assert load_bundle(out).manifest["refined"]["steps"] == 6
    with Engine.from_bundle(load_bundle(out), settings=ContextSettings(n_ctx=256)) as eng:
        tokens = random_prompt(120, eng.model.n_vocab, eng.model.bos, low=3)
        logits = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=4)).logits
        assert np.isfinite(logits).all()


def test_refine_runs_on_qwen2_and_refuses_zero_steps(tiny_qwen2, tiny_bundle, tmp_path):
    qwen = tmp_path / "qwen"
    ok(convert("bundle", "--base", tiny_qwen2, "-o", qwen, "--tokens", "600", "--no-check"))
    res = ok(
        convert("refine", "--bundle", qwen, "-o", tmp_path / "a", "--steps", "2", "--tokens", "600", "--json")
    )
    assert json.loads(res.stdout)["layers"] and load_bundle(tmp_path / "a").manifest["refined"]["steps"] == 2
    res = convert("refine", "--bundle", tiny_bundle, "-o", tmp_path / "b", "--steps", "0")
    assert_one_line_error(res, "--steps must be at least 1")
    assert not (tmp_path / "b").exists()


def test_training_on_captured_rows_lowers_their_error(tiny_bundle, tmp_path):
    """On real captured rows the gradient goes downhill (judged on the rows trained on: the
    tiny random model's four prompts do not generalise, which is what the held-out check is for)."""
    from kvcli.engine.bundle import check_compatible
    from kvcli.predict.attention_fit import train_layer
    from kvcli.predict.refine import collect_samples, trainable_layers

    b = load_bundle(tiny_bundle)
    base, _, pred = check_compatible(b.base, b.aux_source, b.predictor)
    aux = read_model_info(cut_auxiliary(b.base, tmp_path / "aux.gguf", prefix_layers(b.aux_source)))
    layers = trainable_layers(pred)
    train, _, n_tokens, _ = collect_samples(base, aux, pred, layers, n_tokens=600)
    assert n_tokens >= 600 and all(len(train[il]) == 4 for il in layers)
    il = layers[0]
    attention = layer_attention(base, il, key_norm_weights(base))
    fit = train_layer(train[il], train[il], pred.weights[il], pred.biases[il], attention, steps=10, lr=1e-2)
    assert fit.after < 0.95 * fit.before
