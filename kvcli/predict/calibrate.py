"""Fit a predictor by ridge from the real caches of the base and the auxiliary over
calibration text (kvcli.predict.calibration_run): rows go into ridge sufficient statistics,
one set per auxiliary source layer (one prompt in five held out, for choosing the penalty).
Position 0 is left out, since it is copied exactly at run time (predict_state.FirstCell).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.llama.capture import hidden_feature_width
from kvcli.llama.runtime import ContextSettings
from kvcli.models.model_info import ModelInfo
from kvcli.predict.calibration_run import DEFAULT_CHUNK, DEFAULT_TOKENS, CalibrationRun, read_pair
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.exact_layer import ComputedError
from kvcli.predict.plan import CalibrationPlan, make_plan
from kvcli.predict.predictor import Predictor
from kvcli.predict.ridge import DEFAULT_ALPHAS, RidgeStats, fit_ridge


@dataclass
class CalibrationData:
    """Ridge statistics of one calibration run, per source layer, ready to fit."""

    base: ModelInfo
    aux: ModelInfo
    plan: CalibrationPlan
    fit: dict[int, RidgeStats]
    heldout: dict[int, RidgeStats]
    source: str
    computed: ComputedError  # the layers given by the base's own weights, not fitted


def collect(
    base_path,
    aux_path,
    *,
    n_tokens: int = DEFAULT_TOKENS,
    chunk_tokens: int = DEFAULT_CHUNK,
    layer_map: list[int] | None = None,
    hidden: bool | tuple[str, ...] = True,
    corpus: Path | None = None,
    text: CalibrationText = CalibrationText.MIXED,
    settings: ContextSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationData:
    """Prefill >= ``n_tokens`` tokens of calibration text through both models: the user's
    ``corpus``, else the standard library's ``text`` (predict/corpus.py)."""
    base_info, aux_info = read_pair(base_path, aux_path)
    plan = make_plan(base_info, aux_info, layer_map=layer_map, hidden=hidden)
    extra = hidden_feature_width(aux_info, plan.hidden)
    fit, heldout = {}, {}
    for src in plan.sources:
        n_in = aux_info.n_embd_k(src) + aux_info.n_embd_v(src) + extra
        n_out = sum(base_info.n_embd_k(il) + base_info.n_embd_v(il) for il in plan.layers_of(src))
        fit[src], heldout[src] = RidgeStats(n_in, n_out), RidgeStats(n_in, n_out)
    computed = ComputedError(plan, base_info, aux_info, {src: stats.n_features for src, stats in fit.items()})
    run = CalibrationRun(
        base_info,
        aux_info,
        plan,
        n_tokens=n_tokens,
        chunk_tokens=chunk_tokens,
        corpus=corpus,
        text=text,
        settings=settings,
    )
    for prompt in run.prompts(progress):
        part = heldout if prompt.heldout else fit
        for src in plan.sources:
            x = prompt.features[src][1:]  # position 0 is copied exactly at run time
            y = np.concatenate(
                [np.concatenate(prompt.base_kv[il], axis=1) for il in plan.layers_of(src)], axis=1
            )[1:]
            part[src].add(x, y)
            if prompt.heldout:
                computed.add(src, x, y)
    return CalibrationData(base_info, aux_info, plan, fit, heldout, run.source, computed)


def fit_predictor(data: CalibrationData, alphas: tuple[float, ...] = DEFAULT_ALPHAS) -> Predictor:
    """Ridge per predicted layer, keys and values apart, penalties chosen on held-out rows."""
    weights, biases, k_widths = {}, {}, {}
    chosen, errors = {}, {}
    for src in data.plan.sources:
        layers = data.plan.layers_of(src)
        at, groups = 0, []
        for il in layers:
            kw, vw = data.base.n_embd_k(il), data.base.n_embd_v(il)
            groups += [slice(at, at + kw), slice(at + kw, at + kw + vw)]
            at += kw + vw
        result = fit_ridge(data.fit[src], data.heldout[src], groups, alphas=alphas)
        for j, il in enumerate(layers):
            cols = slice(groups[2 * j].start, groups[2 * j + 1].stop)
            weights[il] = np.ascontiguousarray(result.weight[:, cols], np.float32)
            biases[il] = np.ascontiguousarray(result.bias[cols], np.float32)
            k_widths[il] = data.base.n_embd_k(il)
            chosen[il] = result.alphas[2 * j : 2 * j + 2]
            errors[il] = result.heldout_rel_error[2 * j : 2 * j + 2]
    for il, (w, b) in data.computed.computed.items():
        weights[il], biases[il], chosen[il] = w, b, [0.0, 0.0]
        errors[il] = data.computed.relative(il)
    predicted = data.plan.predicted_layers
    n_rows = sum(s.n_rows for s in (*data.fit.values(), *data.heldout.values())) // max(len(data.fit), 1)
    return Predictor(
        base_fingerprint=data.base.fingerprint,
        aux_fingerprint=data.aux.fingerprint,
        base_n_layer=data.base.n_layer,
        aux_n_layer=data.aux.n_layer,
        copied_layers=data.plan.copied_layers,
        layer_map=data.plan.layer_map,
        weights=weights,
        biases=biases,
        k_widths=k_widths,
        alphas=[a for il in predicted for a in chosen[il]],
        heldout_rel_error=[e for il in predicted for e in errors[il]],
        calibration_tokens=n_rows,
        calibration_source=data.source,
        feature_kinds=data.plan.feature_kinds,
    )


def calibrate(
    base_path,
    aux_path,
    *,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    progress: Callable[[int, int], None] | None = None,
    **collect_options,
) -> Predictor:
    """Collect calibration statistics and fit a predictor (see ``collect``, ``fit_predictor``)."""
    return fit_predictor(collect(base_path, aux_path, progress=progress, **collect_options), alphas)
