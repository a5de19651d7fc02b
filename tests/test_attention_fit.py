"""The attention-output fit (kvcli.predict.attention_fit): its loss, hand-written gradient and
training loop, on synthetic layers (pure numpy, no llama.cpp)."""

import numpy as np
import pytest

from kvcli.models.model_info import RopeParams
from kvcli.predict.attention_fit import (
    LayerAttention,
    Sample,
    attention_loss,
    masks,
    segment_cuts,
    train_layer,
)

HD, N_KV, N_HEAD, N, F = 8, 2, 4, 48, 10


def _layer(key_norm: bool, window: int = 0) -> LayerAttention:
    inv = np.random.default_rng(5).uniform(0.5, 2.0, HD).astype(np.float32) if key_norm else None
    if inv is not None:
        inv[3] = 0.0  # a dimension the key norm hides
    return LayerAttention(
        rope=RopeParams(head_dim=HD, n_rot=HD, freq_base=10000.0),
        head_dim=HD,
        k_width=N_KV * HD,
        n_head=N_HEAD,
        window=window,
        key_norm_inv=inv,
    )


def _sample(rng, true_w=None) -> Sample:
    x = rng.normal(size=(N, F)).astype(np.float32)
    kv = x @ true_w if true_w is not None else rng.normal(size=(N, 2 * N_KV * HD)).astype(np.float32)
    kw = N_KV * HD
    q = rng.normal(size=(N, N_HEAD, HD)).astype(np.float32)
    return Sample(features=x, k=kv[:, :kw], v=kv[:, kw:], q=q)


def test_masks_follow_a_kvp_prefill():
    rows = np.arange(16, 24)
    hidden, predicted = masks(24, rows, segment_cuts(rows, 8), window=0)
    assert not predicted[:, 0].any()  # the first cell is exact
    assert predicted[0, 1:16].all() and not predicted[0, 16:].any()  # before its segment: predicted
    assert hidden[0, 17:].all() and not hidden[0, :17].any()  # causal
    hidden, _ = masks(24, rows, segment_cuts(rows, 8), window=4)
    assert hidden[0, 12] and not hidden[0, 13]  # a sliding window of 4


@pytest.mark.parametrize("key_norm,window", [(False, 0), (True, 0), (True, 20)])
def test_gradient_matches_finite_differences(key_norm, window):
    rng = np.random.default_rng(0)
    layer = _layer(key_norm, window)
    smp = _sample(rng)
    w = (rng.normal(size=(F, 2 * N_KV * HD)) * 0.3).astype(np.float32)
    b = (rng.normal(size=2 * N_KV * HD) * 0.1).astype(np.float32)
    rows = np.arange(8, N)
    cuts = segment_cuts(rows, 8)
    _, gw, gb = attention_loss(smp, w, b, layer, rows, cuts)
    eps = 1e-2
    for i, j in [(0, 0), (3, 5), (7, N_KV * HD + 2), (9, 2 * N_KV * HD - 1), (5, HD + 3)]:
        up, down = w.copy(), w.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (
            attention_loss(smp, up, b, layer, rows, cuts, grad=False)[0]
            - attention_loss(smp, down, b, layer, rows, cuts, grad=False)[0]
        ) / (2 * eps)
        assert gw[i, j] == pytest.approx(numeric, rel=2e-2, abs=2e-4)
    for j in [1, N_KV * HD + 1]:
        up, down = b.copy(), b.copy()
        up[j] += eps
        down[j] -= eps
        numeric = (
            attention_loss(smp, w, up, layer, rows, cuts, grad=False)[0]
            - attention_loss(smp, w, down, layer, rows, cuts, grad=False)[0]
        ) / (2 * eps)
        assert gb[j] == pytest.approx(numeric, rel=2e-2, abs=2e-4)


def test_the_true_cache_has_no_loss_and_a_wrong_one_has():
    rng = np.random.default_rng(1)
    true_w = rng.normal(size=(F, 2 * N_KV * HD)).astype(np.float32)
    smp = _sample(rng, true_w)
    layer = _layer(key_norm=False)
    rows = np.arange(8, N)
    zero = np.zeros(2 * N_KV * HD, np.float32)
    loss, _, _ = attention_loss(smp, true_w, zero, layer, rows, segment_cuts(rows, 8), grad=False)
    assert loss < 1e-8
    loss, _, _ = attention_loss(smp, true_w * 0.5, zero, layer, rows, segment_cuts(rows, 8), grad=False)
    assert loss > 1e-3


def test_training_lowers_the_heldout_error_and_keeps_the_best():
    rng = np.random.default_rng(2)
    true_w = rng.normal(size=(F, 2 * N_KV * HD)).astype(np.float32)
    train = [_sample(rng, true_w) for _ in range(8)]
    held = [_sample(rng, true_w) for _ in range(3)]
    start = true_w + rng.normal(size=true_w.shape).astype(np.float32) * 0.5
    fit = train_layer(
        train, held, start, np.zeros(true_w.shape[1], np.float32), _layer(False), steps=60, lr=3e-2, segment=8
    )
    assert fit.after < 0.5 * fit.before
    # a learning rate that only makes things worse: the start is kept
    zero = np.zeros(true_w.shape[1], np.float32)
    bad = train_layer(train, held, true_w, zero, _layer(False), steps=4, lr=10.0, segment=8, check_every=2)
    assert bad.after == bad.before
    np.testing.assert_array_equal(bad.weight, true_w)
