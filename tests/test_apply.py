"""Pure numpy parts of the aux -> base state step."""

import numpy as np

from kvcli.models.model_info import ModelInfo
from kvcli.predict.apply import needed_positions, rescale_to_key_norm
from kvcli.state.rope import RopeParams


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
    return ModelInfo(
        path=None,
        arch="gemma3",
        n_layer=len(is_swa),
        n_embd=8,
        n_head=(1,) * len(is_swa),
        n_head_kv=(1,) * len(is_swa),
        head_dim_k=4,
        head_dim_v=4,
        n_swa=n_swa,
        is_swa=tuple(is_swa),
        rope=rope,
        context_length=1024,
        rms_eps=1e-6,
        fingerprint="x",
        tokenizer_digest="y",
    )


def test_sliding_layers_need_only_the_window_of_the_first_query():
    info = info_with_window(16, [True, True, False])
    full, swa = needed_positions(info, n_cells=100, first_query=100)
    assert full.tolist() == list(range(100))
    assert swa.tolist() == list(range(85, 100))  # masked when 100 - p >= 16
    full, swa = needed_positions(info, n_cells=90, first_query=90 - 10 + 10)
    assert swa[0] == 75
    assert needed_positions(info, n_cells=10, first_query=10)[1].tolist() == list(range(10))


def test_span_positions():
    """Sliding-window groups get only the cells before each span and before the tail."""
    from types import SimpleNamespace

    from kvcli.predict.apply import span_group_positions

    info = SimpleNamespace(cache_layer_groups=[[0], [1]], n_swa=100, is_swa=[False, True])
    full, sliding = span_group_positions(info, 300, [50, 120], span_context=8, tail_context=20)
    assert np.array_equal(full, np.arange(300))
    assert np.array_equal(sliding, np.r_[42:50, 112:120, 280:300])
