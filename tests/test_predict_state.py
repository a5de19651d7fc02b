"""Pure numpy parts of the aux -> base state step."""

import numpy as np

from kvcli.model_info import ModelInfo
from kvcli.predict_state import needed_positions, rescale_to_key_norm
from kvcli.rope import RopeParams


def test_key_norm_rescale_restores_the_norm_scale_and_keeps_direction():
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 2.0, size=8)
    weight[3] = 0.0  # a dimension the norm's weight hides
    normed = rng.normal(size=(5, 2, 8))
    normed /= np.sqrt(np.mean(normed**2, axis=-1, keepdims=True))
    true_k = (normed * weight).reshape(5, 16)
    shrunk = 0.6 * true_k
    out = rescale_to_key_norm(shrunk.copy(), weight, 8)
    visible = weight != 0
    rms = np.sqrt(np.mean((out.reshape(5, 2, 8)[..., visible] / weight[visible]) ** 2, axis=-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-5)
    a, b = out.reshape(5, 2, 8), true_k.reshape(5, 2, 8)
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-6)


def info_with_window(n_swa, is_swa):
    rope = (RopeParams(head_dim=4, n_rot=4, freq_base=1e4),) * len(is_swa)
    return ModelInfo(path=None, arch="gemma3", n_layer=len(is_swa), n_embd=8,
                     n_head=(1,) * len(is_swa), n_head_kv=(1,) * len(is_swa), head_dim_k=4,
                     head_dim_v=4, n_swa=n_swa,
                     is_swa=tuple(is_swa), rope=rope, context_length=1024, rms_eps=1e-6,
                     fingerprint="x", tokenizer_digest="y")


def test_sliding_layers_need_only_the_window_of_the_first_query():
    info = info_with_window(16, [True, True, False])
    full, swa = needed_positions(info, n_cells=100, first_query=100)
    assert full.tolist() == list(range(100))
    assert swa.tolist() == list(range(85, 100))  # masked when 100 - p >= 16
    full, swa = needed_positions(info, n_cells=90, first_query=90 - 10 + 10)
    assert swa[0] == 75
    assert needed_positions(info, n_cells=10, first_query=10)[1].tolist() == list(range(10))


def test_span_positions_and_rows_written_back():
    """Sliding-window groups get only the cells before each span and before the tail;
    a span's rows replace the predicted ones, except in layers marked exact."""
    from types import SimpleNamespace

    from kvcli.kv_layout import LayerCells
    from kvcli.predict_state import SpanRows, span_group_positions

    info = SimpleNamespace(cache_layer_groups=[[0], [1]], n_swa=100, is_swa=[False, True])
    full, sliding = span_group_positions(info, 300, [50, 120], span_context=8, tail_context=20)
    assert np.array_equal(full, np.arange(300))
    assert np.array_equal(sliding, np.r_[42:50, 112:120, 280:300])
    kv = {0: (np.zeros((300, 2)), np.zeros((300, 2))), 1: (np.zeros((300, 2)), np.zeros((300, 2)))}
    rows = SpanRows(info, [full, sliding], kv, exact=[1])
    exact = {il: LayerCells(np.arange(50, 60), np.ones((10, 2)), np.ones((10, 2)), 1, 1) for il in (0, 1)}
    rows.replace(exact, 50, 60)
    assert rows.kv[0][0][50:60].min() == 1 and rows.kv[0][0].sum() == 20
    assert rows.kv[1][0].sum() == 0  # exact layer: kept
    positions, before = rows.before(120)
    assert np.array_equal(positions[0], np.arange(120))
    assert np.array_equal(positions[1], np.r_[42:50, 112:120])
    assert before[0][0].shape == (120, 2) and before[1][0].shape == (16, 2)
