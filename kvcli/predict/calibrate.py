"""Fit a predictor from the real caches of the base and the auxiliary over calibration text.

Per calibration prompt both models prefill it; their states are read (seq -1, every cell)
and parsed; each predicted base layer's targets are its un-roped keys and its values, its
inputs the un-roped keys and values of the auxiliary layer the layer map names (plus the
captured hidden tensors). Rows go into ridge sufficient statistics, one set per auxiliary
source layer (one prompt in five held out, for choosing the penalty). The prompts start as
the model's own do (with BOS only where it adds one); position 0 is left out, since it is
copied exactly at run time (predict_state.FirstCell).

Which layers are copied: an auxiliary cut by kvcli records its base layers and the base's
fingerprint; its leading layers 0..j that are the base's layers 0..j hold the base's exact
cache, and the first calibration prompt checks that bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.choices import parse_list
from kvcli.errors import IncompatibleError, KvcliError
from kvcli.llama.capture import TensorCapture, hidden_feature_width, hidden_features, hidden_tensor_names
from kvcli.llama.chat_template import apply_chat_template, chat_template_for
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import ModelInfo, read_model_info
from kvcli.predict.corpus import CalibrationText, named_chunks
from kvcli.predict.exact_layer import ComputedError
from kvcli.predict.predictor import Predictor, build_features
from kvcli.predict.ridge import DEFAULT_ALPHAS, RidgeStats, fit_ridge
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import layers_by_index
from kvcli.state.rope import unrotate

HELDOUT_EVERY = 5
DEFAULT_TOKENS = 20480
DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class CalibrationPlan:
    copied_layers: list[int]
    layer_map: list[int]  # per base layer: its auxiliary source layer
    hidden: tuple[str, ...]  # kinds of the auxiliary's captured hidden tensors (llama/capture.py)

    @property
    def predicted_layers(self) -> list[int]:
        return [il for il in range(len(self.layer_map)) if il not in self.copied_layers]

    @property
    def sources(self) -> list[int]:
        return sorted({self.layer_map[il] for il in self.predicted_layers})

    def layers_of(self, source: int) -> list[int]:
        return [il for il in self.predicted_layers if self.layer_map[il] == source]

    @property
    def feature_kinds(self) -> tuple[str, ...]:
        return (keys.FEATURE_AUX_K, keys.FEATURE_AUX_V, *self.hidden)

    def is_prefix(self, aux: ModelInfo) -> bool:
        """The auxiliary is the base's layers 0..k-1: it runs as a view of the base."""
        return self.copied_layers == list(range(aux.n_layer))


def copied_layers(base: ModelInfo, aux: ModelInfo) -> list[int]:
    """The auxiliary's leading layers that are the base's own (a kvcli cut of this base)."""
    if aux.source_fingerprint != base.fingerprint or not aux.source_layers:
        return []
    out = []
    for i, src in enumerate(aux.source_layers):
        if src != i:
            break
        out.append(i)
    return out


def default_layer_map(base: ModelInfo, aux: ModelInfo) -> list[int]:
    """A cut of this base: each base layer from the last auxiliary layer cut from at or
    before it. Another model (KVP-C): base layer l from aux layer round(l (La-1) / (Lb-1))."""
    if aux.source_fingerprint == base.fingerprint and aux.source_layers:
        return [
            max(i for i, src in enumerate(aux.source_layers) if src <= il or i == 0)
            for il in range(base.n_layer)
        ]
    if base.n_layer == 1:
        return [0]
    return [round(il * (aux.n_layer - 1) / (base.n_layer - 1)) for il in range(base.n_layer)]


def parse_layer_map(spec: str, base: ModelInfo, aux: ModelInfo) -> list[int]:
    """'0,0,1,1,...' (one auxiliary layer per base layer) -> checked list."""
    out = parse_list(spec, "--layer-map", int)
    if len(out) != base.n_layer:
        raise KvcliError(f"the layer map has {len(out)} entries; the base has {base.n_layer} layers")
    if not all(0 <= x < aux.n_layer for x in out):
        raise KvcliError(f"the layer map names auxiliary layers outside 0..{aux.n_layer - 1}")
    return out


def make_plan(
    base: ModelInfo,
    aux: ModelInfo,
    *,
    layer_map: list[int] | None = None,
    hidden: bool | tuple[str, ...] = True,
) -> CalibrationPlan:
    """``hidden``: True for the default hidden features, False for none, or their kinds."""
    copied = copied_layers(base, aux)
    layer_map = list(layer_map or default_layer_map(base, aux))
    for il in copied:
        layer_map[il] = il
    kinds = keys.HIDDEN_FEATURES if hidden is True else tuple(hidden or ())
    if set(kinds) - set(keys.HIDDEN_KINDS):
        raise KvcliError(f"unknown hidden feature kinds {sorted(set(kinds) - set(keys.HIDDEN_KINDS))}")
    if aux.n_layer < 2:
        kinds = ()
    plan = CalibrationPlan(copied, layer_map, hidden=kinds)
    view_only = [kind for kind in plan.hidden if kind in keys.VIEW_ONLY_KINDS]
    if view_only and not plan.is_prefix(aux):
        raise KvcliError(
            "the auxiliary's last-layer output is a feature only for a prefix "
            "auxiliary of this base (it runs as a view of the base)"
        )
    if len(view_only) > 1:
        raise KvcliError("the last layer's output is a feature once: raw or normed, not both")
    return plan


def _unroped_kv(layers, info: ModelInfo, which) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for il in which:
        cells = layers[il]
        out[il] = (unrotate(cells.k, cells.positions, info.rope[il]), np.asarray(cells.v, np.float32))
    return out


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
    base_info = read_model_info(base_path, "base model")
    aux_info = read_model_info(aux_path, "auxiliary")
    if base_info.tokenizer_digest != aux_info.tokenizer_digest:
        raise IncompatibleError(
            f"the auxiliary's tokenizer differs from the base's "
            f"({aux_info.path.name} vs {base_info.path.name})"
        )
    if chunk_tokens < 16 or n_tokens < chunk_tokens:
        raise KvcliError(
            f"calibration needs at least one prompt of >= 16 tokens "
            f"(--tokens {n_tokens}, chunk {chunk_tokens})"
        )
    plan = make_plan(base_info, aux_info, layer_map=layer_map, hidden=hidden)
    settings = settings or ContextSettings()
    settings = ContextSettings(**{**settings.__dict__, "n_ctx": chunk_tokens})
    n_chunks = max(-(-n_tokens // (chunk_tokens - 1)), HELDOUT_EVERY)  # >= 1 held-out prompt
    view = plan.is_prefix(aux_info)
    names = hidden_tensor_names(aux_info.n_layer, plan.hidden) if plan.hidden else []
    capture = (
        TensorCapture(names, stop_after=f"l_out-{aux_info.n_layer - 1}")
        if view
        else TensorCapture(names)
        if names
        else None
    )
    extra = hidden_feature_width(aux_info, plan.hidden)
    fit, heldout = {}, {}
    for src in plan.sources:
        n_in = aux_info.n_embd_k(src) + aux_info.n_embd_v(src) + extra
        n_out = sum(base_info.n_embd_k(il) + base_info.n_embd_v(il) for il in plan.layers_of(src))
        fit[src], heldout[src] = RidgeStats(n_in, n_out), RidgeStats(n_in, n_out)
    computed = ComputedError(plan, base_info, aux_info, {src: stats.n_features for src, stats in fit.items()})

    models, contexts = [], []
    try:
        models.append(Model(base_info.path, what="base model"))
        contexts.append(Context(models[0], settings))
        if not view:
            models.append(Model(aux_info.path, what="auxiliary"))
        # a prefix auxiliary runs as a view of the base (engine/engine.py): the same K, V, hidden rows
        contexts.append(Context(models[-1], settings, capture=capture))
        base_ctx, aux_ctx = contexts
        model = models[0]

        def tokenize(text: str) -> list[int]:
            return model.tokenize(text, add_special=False)

        render = None
        if text == CalibrationText.MIXED:
            template = chat_template_for(model, base_info.arch)

            def render(messages: list[dict]) -> str:
                return apply_chat_template(template, messages, add_assistant=False)

        chunks, source = named_chunks(
            corpus,
            tokenize,
            chunk_tokens=chunk_tokens,
            n_chunks=n_chunks,
            bos=model.prompt_bos,
            render=render,
        )
        if len(chunks) < n_chunks:
            raise KvcliError(
                f"the calibration corpus gave {len(chunks)} prompts of "
                f"{chunk_tokens} tokens, {n_chunks} needed (give more text or "
                "fewer --tokens)"
            )
        for i, (_, tokens) in enumerate(chunks):
            rows = _chunk_rows(
                base_ctx,
                aux_ctx,
                tokens,
                base_info,
                base_info if view else aux_info,
                plan,
                check_copies=i == 0,
            )
            held = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
            part = heldout if held else fit
            for src, (x, y) in rows.items():
                part[src].add(x, y)
                if held:
                    computed.add(src, x, y)
            if progress:
                progress(i + 1, len(chunks))
    finally:
        for ctx in contexts:
            ctx.close()
        for m in models:
            m.close()
    return CalibrationData(base_info, aux_info, plan, fit, heldout, source, computed)


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


def _chunk_rows(
    base_ctx: Context,
    aux_ctx: Context,
    tokens: list[int],
    base_info: ModelInfo,
    aux_info: ModelInfo,
    plan: CalibrationPlan,
    check_copies: bool = False,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per source layer: (features, targets) rows of this prompt, BOS row dropped.

    ``aux_info`` describes the auxiliary context's state (the base's, for a view)."""
    states = {}
    for is_base, ctx, info in ((True, base_ctx, base_info), (False, aux_ctx, aux_info)):
        ctx.clear()
        if ctx.capture is not None:
            ctx.capture.clear()
        ctx.decode(tokens)
        states[is_base] = layers_by_index(parse_seq_state(ctx.get_state(-1)), info)
    if check_copies:
        for il in plan.copied_layers:
            if not np.array_equal(states[True][il].k, states[False][il].k):
                raise IncompatibleError(
                    f"auxiliary layer {il} claims to be base layer {il} but "
                    "its cache differs; was it cut from another base?"
                )
    hidden = hidden_features(plan.hidden, aux_ctx.capture.take(len(tokens))) if aux_ctx.capture else []
    aux_kv = _unroped_kv(states[False], aux_info, plan.sources)
    base_kv = _unroped_kv(states[True], base_info, plan.predicted_layers)
    out = {}
    for src in plan.sources:
        x = build_features(aux_kv, src, hidden)[1:]
        y = np.concatenate([np.concatenate(base_kv[il], axis=1) for il in plan.layers_of(src)], axis=1)[1:]
        out[src] = (x, y)
    return out
