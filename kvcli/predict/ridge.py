"""Closed-form ridge regression from sufficient statistics, in pure numpy.

Calibration streams (features, targets) pairs through ``RidgeStats`` (float64 sums, so the
rows never have to be kept). ``fit_ridge`` solves each output group (one base layer's K, or
its V) with the penalty that gives the lowest error on held-out statistics, then refits on
all of the data with that penalty. The penalty is relative: lambda = alpha * mean(diag(Cov)).
The safe fallback is a candidate too: the targets' mean alone (alpha = inf, no weights), so a
group whose features do not help on held-out rows is written as its mean, never worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass
class RidgeStats:
    """Sums over rows of x~ x~^T, x~ y^T and y^2 with x~ = [x, 1] (the bias column)."""

    n_features: int
    n_targets: int
    xx: np.ndarray = field(init=False)
    xy: np.ndarray = field(init=False)
    yy: np.ndarray = field(init=False)

    def __post_init__(self):
        self.xx = np.zeros((self.n_features + 1, self.n_features + 1))
        self.xy = np.zeros((self.n_features + 1, self.n_targets))
        self.yy = np.zeros(self.n_targets)

    @property
    def n_rows(self) -> int:
        return round(self.xx[-1, -1])

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x1 = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
        y = np.asarray(y, np.float64)
        self.xx += x1.T @ x1
        self.xy += x1.T @ y
        self.yy += np.einsum("ij,ij->j", y, y)

    def merged(self, other: RidgeStats) -> RidgeStats:
        out = RidgeStats(self.n_features, self.n_targets)
        out.xx, out.xy, out.yy = self.xx + other.xx, self.xy + other.xy, self.yy + other.yy
        return out


def _solve(stats: RidgeStats, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (F, T) and bias (T,) minimising ||y - xW - b||^2 + lam ||W||^2 (bias free);
    alpha = inf: no weights, the targets' mean."""
    n = stats.xx[-1, -1]
    mx = stats.xx[:-1, -1] / n
    my = stats.xy[-1] / n
    if math.isinf(alpha):
        return np.zeros((len(mx), len(my))), my
    cov = stats.xx[:-1, :-1] - n * np.outer(mx, mx)
    cross = stats.xy[:-1] - n * np.outer(mx, my)
    lam = alpha * max(np.trace(cov) / len(cov), 1e-12)
    w = np.linalg.solve(cov + lam * np.eye(len(cov)), cross)
    return w, my - mx @ w


def squared_error(stats: RidgeStats, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-target sum of squared residuals of (w, b) over the rows ``stats`` summarises."""
    wb = np.vstack([w, b[None, :]])
    return np.einsum("ft,ft->t", wb, stats.xx @ wb) - 2 * np.einsum("ft,ft->t", wb, stats.xy) + stats.yy


@dataclass
class RidgeFit:
    weight: np.ndarray  # (F, T) float32
    bias: np.ndarray  # (T,) float32
    alphas: list[float]  # chosen per group (inf: the mean, the safe fallback)
    heldout_rel_error: list[float]  # per group: ||y - y_hat|| / ||y|| on held-out rows


def fit_ridge(
    fit: RidgeStats, heldout: RidgeStats, groups: list[slice], alphas: tuple[float, ...] = DEFAULT_ALPHAS
) -> RidgeFit:
    """Choose alpha per target group on ``heldout`` among ``alphas`` and the mean alone, then
    refit on fit + heldout."""
    alphas = (*alphas, math.inf)
    errors = []
    for alpha in alphas:
        w, b = _solve(fit, alpha)
        errors.append(squared_error(heldout, w, b))
    errors = np.array(errors)  # (n_alphas, T)
    chosen, rel = [], []
    for g in groups:
        per_alpha = errors[:, g].sum(axis=1)
        best = int(np.argmin(per_alpha))
        chosen.append(alphas[best])
        rel.append(float(np.sqrt(max(per_alpha[best], 0.0) / max(heldout.yy[g].sum(), 1e-30))))
    everything = fit.merged(heldout)
    weight = np.empty((fit.n_features, fit.n_targets), np.float32)
    bias = np.empty(fit.n_targets, np.float32)
    for alpha in sorted(set(chosen)):
        w, b = _solve(everything, alpha)
        for g, a in zip(groups, chosen):
            if a == alpha:
                weight[:, g], bias[g] = w[:, g], b[g]
    return RidgeFit(weight=weight, bias=bias, alphas=chosen, heldout_rel_error=rel)
