"""Fit a predictor from the real caches of the base and the auxiliary over calibration text.

Per calibration prompt both models prefill it; their states are read (seq -1, every cell)
and parsed; the auxiliary's un-roped feature keys and values are the inputs, the base's
un-roped keys and values of every predicted layer the targets. Rows go into ridge sufficient
statistics (one prompt in five held out, for choosing the penalty); position 0 (BOS) is left
out, since it is copied exactly at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvcli import keys
from kvcli.capture import TensorCapture, hidden_feature_width, hidden_tensor_names
from kvcli.corpus import token_chunks
from kvcli.errors import IncompatibleError, KvcliError
from kvcli.kv_layout import layers_by_index
from kvcli.model_info import ModelInfo, read_model_info
from kvcli.predictor import Predictor, build_features
from kvcli.ridge import RidgeStats, fit_ridge
from kvcli.rope import unrotate
from kvcli.runtime import Context, ContextSettings, Model
from kvcli.state_codec import parse_seq_state

HELDOUT_EVERY = 5


@dataclass(frozen=True)
class CalibrationPlan:
    copied_layers: list[int]
    predicted_layers: list[int]
    feature_layers: list[int]
    hidden: bool  # also the auxiliary's captured hidden tensors (capture.py)

    @property
    def feature_kinds(self) -> tuple[str, ...]:
        return (keys.FEATURE_AUX_K, keys.FEATURE_AUX_V) + (keys.HIDDEN_FEATURES if self.hidden else ())


def default_plan(base: ModelInfo, aux: ModelInfo, *, n_feature_layers: int = 1,
                 hidden: bool = True, prefix: bool = True) -> CalibrationPlan:
    """A prefix auxiliary's layers are copied; the rest of the base is predicted from the
    auxiliary's last ``n_feature_layers`` layers' K and V and, with ``hidden`` (and at least
    two auxiliary layers), its captured hidden tensors."""
    copied = list(range(aux.n_layer)) if prefix else []
    predicted = [il for il in range(base.n_layer) if il not in copied]
    n_feat = max(1, min(n_feature_layers, aux.n_layer))
    return CalibrationPlan(copied, predicted, list(range(aux.n_layer - n_feat, aux.n_layer)),
                           hidden=hidden and aux.n_layer >= 2)


def _unroped_kv(layers, info: ModelInfo, which: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for il in which:
        cells = layers[il]
        out[il] = (unrotate(cells.k, cells.positions, info.rope[il]), np.asarray(cells.v, np.float32))
    return out


@dataclass
class CalibrationData:
    """Ridge statistics of one calibration run, ready to fit (possibly several ways)."""

    base: ModelInfo
    aux: ModelInfo
    plan: CalibrationPlan
    fit: RidgeStats
    heldout: RidgeStats
    source: str

    @property
    def widths(self) -> list[tuple[int, int]]:
        return [(self.base.n_embd_k(il), self.base.n_embd_v(il)) for il in self.plan.predicted_layers]


def collect(base_path, aux_path, *, n_tokens: int = 20480, chunk_tokens: int = 512,
            n_feature_layers: int = 1, hidden: bool = True, settings: ContextSettings | None = None,
            progress: Callable[[int, int], None] | None = None) -> CalibrationData:
    """Prefill >= ``n_tokens`` tokens of the offline corpus through both models."""
    base_info = read_model_info(base_path, "base model")
    aux_info = read_model_info(aux_path, "auxiliary")
    if base_info.tokenizer_digest != aux_info.tokenizer_digest:
        raise IncompatibleError("the auxiliary's tokenizer differs from the base's")
    plan = default_plan(base_info, aux_info, n_feature_layers=n_feature_layers, hidden=hidden)
    for il in plan.copied_layers:
        if (base_info.n_embd_k(il), base_info.is_swa[il]) != (aux_info.n_embd_k(il), aux_info.is_swa[il]):
            raise IncompatibleError(f"auxiliary layer {il} is not a copy of base layer {il}")
    settings = settings or ContextSettings()
    settings = ContextSettings(**{**settings.__dict__, "n_ctx": chunk_tokens})
    n_chunks = -(-n_tokens // (chunk_tokens - 1))
    n_features = sum(aux_info.n_embd_k(il) + aux_info.n_embd_v(il) for il in plan.feature_layers)
    capture = TensorCapture(hidden_tensor_names(aux_info.n_layer)) if plan.hidden else None
    if plan.hidden:
        n_features += hidden_feature_width(aux_info)
    n_targets = sum(base_info.n_embd_k(il) + base_info.n_embd_v(il) for il in plan.predicted_layers)
    fit, heldout = RidgeStats(n_features, n_targets), RidgeStats(n_features, n_targets)

    models, contexts = [], []
    try:
        for path, what, cap in ((base_info.path, "base model", None),
                                (aux_info.path, "auxiliary", capture)):
            models.append(Model(path, what=what))
            contexts.append(Context(models[-1], settings, capture=cap))
        base_ctx, aux_ctx = contexts
        model = models[0]
        chunks = list(token_chunks("calibration", lambda s: model.tokenize(s, add_special=False),
                                   chunk_tokens=chunk_tokens, n_chunks=n_chunks, bos=model.bos))
        if len(chunks) < n_chunks:
            raise KvcliError(f"the calibration corpus gave {len(chunks)} prompts of "
                             f"{chunk_tokens} tokens, {n_chunks} needed")
        for i, (_, tokens) in enumerate(chunks):
            x, y = _chunk_rows(base_ctx, aux_ctx, tokens, base_info, aux_info, plan)
            (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else fit).add(x, y)
            if progress:
                progress(i + 1, len(chunks))
    finally:
        for ctx in contexts:
            ctx.close()
        for m in models:
            m.close()
    return CalibrationData(base_info, aux_info, plan, fit, heldout,
                           f"python-stdlib-sources:{len(chunks)}x{chunk_tokens}")


def fit_predictor(data: CalibrationData) -> Predictor:
    """Ridge per predicted layer, keys and values apart, penalties chosen on held-out rows."""
    at, groups = 0, []
    for kw, vw in data.widths:
        groups += [slice(at, at + kw), slice(at + kw, at + kw + vw)]
        at += kw + vw
    result = fit_ridge(data.fit, data.heldout, groups)
    return Predictor(
        base_fingerprint=data.base.fingerprint, aux_fingerprint=data.aux.fingerprint,
        base_n_layer=data.base.n_layer, aux_n_layer=data.aux.n_layer,
        copied_layers=data.plan.copied_layers, predicted_layers=data.plan.predicted_layers,
        feature_layers=data.plan.feature_layers, feature_kinds=data.plan.feature_kinds,
        k_widths=[k for k, _ in data.widths], v_widths=[v for _, v in data.widths],
        weight=result.weight, bias=result.bias, alphas=result.alphas,
        heldout_rel_error=result.heldout_rel_error,
        calibration_tokens=data.fit.n_rows + data.heldout.n_rows, calibration_source=data.source,
    )


def calibrate(base_path, aux_path, *, progress: Callable[[int, int], None] | None = None,
              **collect_options) -> Predictor:
    """Collect calibration statistics and fit a predictor (see ``collect``, ``fit_predictor``)."""
    return fit_predictor(collect(base_path, aux_path, progress=progress, **collect_options))


def _chunk_rows(base_ctx: Context, aux_ctx: Context, tokens: list[int], base_info: ModelInfo,
                aux_info: ModelInfo, plan: CalibrationPlan) -> tuple[np.ndarray, np.ndarray]:
    rows = {}
    for ctx, info, which in ((base_ctx, base_info, plan.predicted_layers),
                             (aux_ctx, aux_info, plan.feature_layers)):
        ctx.clear()
        if ctx.capture is not None:
            ctx.capture.clear()
        ctx.decode(tokens)
        layers = layers_by_index(parse_seq_state(ctx.get_state(-1)), info)
        rows[info is base_info] = _unroped_kv(layers, info, which)
    hidden = aux_ctx.capture.take(len(tokens)) if aux_ctx.capture is not None else []
    x = build_features(rows[False], plan.feature_layers, hidden)[1:]
    y = np.concatenate([np.concatenate(rows[True][il], axis=1) for il in plan.predicted_layers],
                       axis=1)[1:]
    return x, y

