import numpy as np
import pytest

from kvcli.state.rope import RopeParams, rotate, unrotate


def naive_rotate(keys, positions, p: RopeParams):
    """Rotation written pair by pair, as ggml_rope_ext computes it (no YaRN)."""
    out = keys.astype(np.float64).reshape(len(keys), -1, p.head_dim).copy()
    for c, pos in enumerate(positions):
        for i in range(p.n_rot // 2):
            theta = pos * p.freq_scale * p.freq_base ** (-2 * i / p.n_rot)
            a, b = (i, i + p.n_rot // 2) if p.neox else (2 * i, 2 * i + 1)
            x0, x1 = out[c, :, a].copy(), out[c, :, b].copy()
            out[c, :, a] = x0 * np.cos(theta) - x1 * np.sin(theta)
            out[c, :, b] = x0 * np.sin(theta) + x1 * np.cos(theta)
    return out.reshape(len(keys), -1)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n_rot", [16, 8])
def test_rotate_matches_pairwise_definition(neox, n_rot):
    rng = np.random.default_rng(0)
    p = RopeParams(head_dim=16, n_rot=n_rot, freq_base=10000.0, freq_scale=0.5, neox=neox)
    keys = rng.normal(size=(9, 2 * 16)).astype(np.float32)
    positions = np.arange(9) * 37
    np.testing.assert_allclose(rotate(keys, positions, p), naive_rotate(keys, positions, p), atol=2e-5)


def test_unrotate_inverts_rotate_and_layouts_differ():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(5, 64)).astype(np.float32)
    positions = np.array([0, 1, 100, 511, 4000])
    neox = RopeParams(head_dim=32, n_rot=32, freq_base=1e6, neox=True)
    normal = RopeParams(head_dim=32, n_rot=32, freq_base=1e6, neox=False)
    np.testing.assert_allclose(unrotate(rotate(keys, positions, neox), positions, neox), keys, atol=1e-4)
    assert not np.allclose(rotate(keys, positions, neox), rotate(keys, positions, normal))
    np.testing.assert_array_equal(rotate(keys[:1], [0], neox), keys[:1])  # position 0: identity
