"""Factor a predictor through a shared low-rank basis: reduced-rank regression, pure numpy.

Every predicted layer of a source reads the same features, so W_l ~ A B_l with one basis A
(n_features x rank) costs n_features x rank per position once, then rank x targets per
layer, instead of n_features x targets per layer: at rank 512 the predict step's matrix work
halves on the default bundle (README). A is chosen to lose the least prediction, not the
least of the matrices: the top singular directions of C^1/2 [W_l / ||Y_l||], C the features'
covariance over calibration text, each layer's K and V weighted by the inverse norm of their
targets so that every group's relative error counts alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvcli.errors import KvcliError
from kvcli.predict.predictor import Predictor
from kvcli.predict.ridge import RidgeStats


def feature_moments(stats: RidgeStats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features ``stats`` summarises (float64)."""
    n = stats.xx[-1, -1]
    if n < 2:
        raise KvcliError("factoring needs calibration statistics of at least two rows")
    mean = stats.xx[:-1, -1] / n
    return mean, stats.xx[:-1, :-1] / n - np.outer(mean, mean)


def reduced_rank_basis(
    weights: list[np.ndarray], group_scales: list[np.ndarray], cov: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, P): the basis A (F, rank) whose span keeps most of the scaled predictions, and
    P (rank, F) = the map with W ~ A (P W) for every layer's W (F, T): A P is the projection
    onto A's span along the covariance's metric."""
    n_features = cov.shape[0]
    if not 0 < rank < n_features:
        raise KvcliError(f"the rank must be between 1 and {n_features - 1}, not {rank}")
    evals, evecs = np.linalg.eigh(cov)
    floor = max(float(evals.max()), 1e-30) * 1e-10
    evals = np.maximum(evals, floor)
    root = (evecs * np.sqrt(evals)) @ evecs.T
    inv_root = (evecs / np.sqrt(evals)) @ evecs.T
    scaled = np.concatenate([w * s for w, s in zip(weights, group_scales)], axis=1)
    u, _, _ = np.linalg.svd(root @ scaled, full_matrices=False)
    u = u[:, :rank]
    return inv_root @ u, u.T @ root


def target_scales(stats: RidgeStats, widths: list[int]) -> list[np.ndarray]:
    """Per column group (in order, ``widths`` wide): 1 / the root of its targets' sum of
    squares, as a row over its columns."""
    out, at = [], 0
    for w in widths:
        out.append(np.full(w, 1.0 / max(float(np.sqrt(stats.yy[at : at + w].sum())), 1e-30)))
        at += w
    return out


def factor_predictor(
    pred: Predictor, stats: dict[int, RidgeStats], rank: int, full_layers: list[int] = ()
) -> Predictor:
    """``pred`` with each source's layers (but ``full_layers``) reading a rank-``rank`` basis.

    ``stats[src]``: calibration statistics of that source's features against its layers'
    K and V targets in layer order (``kvcli.predict.calibrate.collect``). Biases absorb the features'
    mean: x W + b ~ x A P W + b + mean (W - A P W)."""
    if pred.factored_layers:
        raise KvcliError("this predictor is already factored")
    weights, biases = dict(pred.weights), dict(pred.biases)
    bases, factored = {}, []
    for src in pred.feature_layers:
        layers = [il for il in pred.predicted_layers if pred.layer_map[il] == src]
        chosen = [il for il in layers if il not in full_layers]
        if not chosen:
            continue
        if src not in stats:
            raise KvcliError(f"no calibration statistics for source layer {src}")
        mean, cov = feature_moments(stats[src])
        widths = [w for il in layers for w in (pred.k_widths[il], weights[il].shape[1] - pred.k_widths[il])]
        if stats[src].n_targets != sum(widths):
            raise KvcliError(
                f"the calibration statistics of source {src} have "
                f"{stats[src].n_targets} targets, its layers {sum(widths)}"
            )
        scales = target_scales(stats[src], widths)
        per_layer = [np.concatenate(scales[2 * j : 2 * j + 2]) for j in range(len(layers))]
        picked = [layers.index(il) for il in chosen]
        basis, project = reduced_rank_basis(
            [weights[il] for il in chosen], [per_layer[j] for j in picked], cov, rank
        )
        for il in chosen:
            w = weights[il].astype(np.float64)
            reduced = project @ w
            weights[il] = np.ascontiguousarray(reduced, np.float32)
            biases[il] = (biases[il] + mean @ (w - basis @ reduced)).astype(np.float32)
        bases[src] = np.ascontiguousarray(basis, np.float32)
        factored += chosen
    return dataclasses.replace(
        pred, weights=weights, biases=biases, bases=bases, factored_layers=sorted(factored)
    )


def heldout_errors(pred: Predictor, stats: dict[int, RidgeStats]) -> dict[int, tuple[float, float]]:
    """Per predicted layer: relative error of its K and of its V over the rows ``stats``
    summarise (a factored layer's weights taken through its basis)."""
    from kvcli.predict.ridge import squared_error

    out = {}
    for src, st in stats.items():
        at = 0
        for il in [il for il in pred.predicted_layers if pred.layer_map[il] == src]:
            w = pred.weights[il].astype(np.float64)
            if il in pred.factored_layers:
                w = pred.bases[src].astype(np.float64) @ w
            kw, width = pred.k_widths[il], w.shape[1]
            sl = slice(at, at + width)
            part = RidgeStats(st.n_features, width)
            part.xx, part.xy, part.yy = st.xx, st.xy[:, sl], st.yy[sl]
            err = squared_error(part, w, pred.biases[il].astype(np.float64))
            out[il] = tuple(
                float(np.sqrt(max(err[g].sum(), 0.0) / max(part.yy[g].sum(), 1e-30)))
                for g in (slice(0, kw), slice(kw, width))
            )
            at += width
    return out


def factor_calibrated(
    pred: Predictor, data, rank: int, full_layers: list[int] = ()
) -> tuple[Predictor, dict[int, dict[str, tuple[float, float]]]]:
    """``factor_predictor`` on calibration data (kvcli.predict.calibrate.collect's), with its
    held-out relative errors per layer before and after, recorded in the predictor too."""
    factored = factor_predictor(pred, data.fit, rank, full_layers)
    before, after = heldout_errors(pred, data.heldout), heldout_errors(factored, data.heldout)
    for il in data.computed.computed:  # their keys count after the run-time rescale, not in the stats
        before[il] = after[il] = data.computed.relative(il)
    factored = dataclasses.replace(
        factored,
        heldout_rel_error=[e for il in factored.predicted_layers for e in after[il]],
        calibration_source=f"{pred.calibration_source} + factored to rank {rank} on {data.source}",
    )
    return factored, {il: {"before": before[il], "after": after[il]} for il in before}
