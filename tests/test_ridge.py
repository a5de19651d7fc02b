import numpy as np

from kvcli.predict.ridge import RidgeStats, fit_ridge, squared_error


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


def test_features_that_mislead_on_heldout_rows_fall_back_to_the_mean():
    # the fit rows' relation is reversed on the held-out rows: any weight does worse there
    # than the targets' mean, so the group is written as its mean (alpha inf)
    rng = np.random.default_rng(3)
    fit, held = RidgeStats(3, 2), RidgeStats(3, 2)
    for stats, sign in ((fit, 1.0), (held, -1.0)):
        x = rng.normal(size=(400, 3))
        y = np.stack([sign * x[:, 0] + 5.0, x[:, 1] + 0.1 * rng.normal(size=400)], axis=1)
        stats.add(x, y)
    result = fit_ridge(fit, held, [slice(0, 1), slice(1, 2)])
    assert result.alphas[0] == np.inf and result.alphas[1] < np.inf
    assert not result.weight[:, 0].any() and abs(result.bias[0] - 5.0) < 0.2
    assert np.abs(result.weight[1, 1] - 1.0) < 0.05
