import numpy as np

from kvcli.ridge import RidgeStats, fit_ridge, squared_error


def test_recovers_a_linear_map_and_reports_heldout_error():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(6, 4))
    b_true = rng.normal(size=4)
    fit, held = RidgeStats(6, 4), RidgeStats(6, 4)
    for stats, n in ((fit, 2000), (held, 500)):
        x = rng.normal(size=(n, 6))
        stats.add(x, x @ w_true + b_true + 0.01 * rng.normal(size=(n, 4)))
    result = fit_ridge(fit, held, [slice(0, 2), slice(2, 4)])
    np.testing.assert_allclose(result.weight, w_true, atol=5e-3)
    np.testing.assert_allclose(result.bias, b_true, atol=5e-3)
    assert result.alphas[0] <= 1e-2  # little noise: the smallest penalties win
    assert all(e < 0.01 for e in result.heldout_rel_error)


def test_squared_error_from_statistics_equals_direct_residuals():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(50, 2))
    w, b = rng.normal(size=(3, 2)), rng.normal(size=2)
    stats = RidgeStats(3, 2)
    stats.add(x, y)
    np.testing.assert_allclose(squared_error(stats, w, b), ((y - x @ w - b) ** 2).sum(axis=0))


def test_heavy_noise_chooses_a_larger_penalty():
    rng = np.random.default_rng(2)
    fit, held = RidgeStats(40, 1), RidgeStats(40, 1)
    for stats, n in ((fit, 60), (held, 200)):
        x = rng.normal(size=(n, 40))
        stats.add(x, x[:, :1] * 0.1 + rng.normal(size=(n, 1)))
    assert fit_ridge(fit, held, [slice(0, 1)]).alphas[0] >= 0.1

