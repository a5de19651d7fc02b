"""One calibration run: the calibration prompts prefilled by the base and the auxiliary, each
prompt's rows handed out in turn (ridge statistics are one consumer, kvcli.predict.calibrate;
attention training another, kvcli.predict.refine).

Per prompt both models prefill it; their states are read (seq -1, every cell) and parsed;
each predicted base layer's targets are its un-roped keys and its values, its inputs the
un-roped keys and values of the auxiliary layer the layer map names (plus the captured
hidden tensors). The prompts start as the model's own do (with BOS only where it adds one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.errors import IncompatibleError, KvcliError
from kvcli.llama.capture import TensorCapture, hidden_features, hidden_tensor_names
from kvcli.llama.chat_template import apply_chat_template, chat_template_for
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import ModelInfo, read_model_info
from kvcli.predict.corpus import CalibrationText, named_chunks
from kvcli.predict.plan import CalibrationPlan
from kvcli.predict.predictor import build_features
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import layers_by_index
from kvcli.state.rope import unrotate

HELDOUT_PROMPT_EVERY = 5  # one calibration prompt in five is held out
DEFAULT_TOKENS = 20480
DEFAULT_CHUNK = 512


def read_pair(base_path, aux_path) -> tuple[ModelInfo, ModelInfo]:
    """The base's and the auxiliary's model info, their tokenizers checked alike."""
    base_info = read_model_info(base_path, "base model")
    aux_info = read_model_info(aux_path, "auxiliary")
    if base_info.tokenizer_digest != aux_info.tokenizer_digest:
        raise IncompatibleError(
            f"the auxiliary's tokenizer differs from the base's "
            f"({aux_info.path.name} vs {base_info.path.name})"
        )
    return base_info, aux_info


@dataclass
class CalibrationPrompt:
    """One calibration prompt through both models, every position (BOS row included)."""

    index: int
    heldout: bool  # one prompt in HELDOUT_PROMPT_EVERY: for choosing penalties and judging fits
    tokens: list[int]
    features: dict[int, np.ndarray]  # per source layer: build_features' rows
    base_kv: dict[int, tuple[np.ndarray, np.ndarray]]  # per predicted layer: un-roped K, V
    base_rows: dict[str, np.ndarray]  # the base's captured tensors (``base_tensors``), by name


@dataclass
class CalibrationRun:
    """The calibration prompts and the two contexts that prefill them: ``prompts`` yields
    each prompt's rows (ridge statistics are one consumer, attention training another)."""

    base: ModelInfo
    aux: ModelInfo
    plan: CalibrationPlan
    n_tokens: int = DEFAULT_TOKENS
    chunk_tokens: int = DEFAULT_CHUNK
    corpus: Path | None = None
    text: CalibrationText = CalibrationText.MIXED
    settings: ContextSettings | None = None
    base_tensors: tuple[str, ...] = ()  # graph tensors of the base to capture per prompt
    source: str = ""  # set by ``prompts``: where the text came from

    def prompts(self, progress: Callable[[int, int], None] | None = None):
        if self.chunk_tokens < 16 or self.n_tokens < self.chunk_tokens:
            raise KvcliError(
                f"calibration needs at least one prompt of >= 16 tokens "
                f"(--tokens {self.n_tokens}, chunk {self.chunk_tokens})"
            )
        plan, base_info, aux_info = self.plan, self.base, self.aux
        settings = self.settings or ContextSettings()
        settings = ContextSettings(**{**settings.__dict__, "n_ctx": self.chunk_tokens})
        n_chunks = max(
            -(-self.n_tokens // (self.chunk_tokens - 1)), HELDOUT_PROMPT_EVERY
        )  # >= 1 held-out prompt
        view = plan.is_prefix(aux_info)
        names = hidden_tensor_names(aux_info.n_layer, plan.hidden) if plan.hidden else []
        capture = (
            TensorCapture(names, stop_after=f"l_out-{aux_info.n_layer - 1}")
            if view
            else TensorCapture(names)
            if names
            else None
        )
        models, contexts = [], []
        try:
            models.append(Model(base_info.path, what="base model"))
            base_capture = TensorCapture(list(self.base_tensors)) if self.base_tensors else None
            contexts.append(Context(models[0], settings, capture=base_capture))
            if not view:
                models.append(Model(aux_info.path, what="auxiliary"))
            # a prefix auxiliary runs as a view of the base (engine/engine.py): the same K, V, hidden rows
            contexts.append(Context(models[-1], settings, capture=capture))
            base_ctx, aux_ctx = contexts
            model = models[0]

            def tokenize(text: str) -> list[int]:
                return model.tokenize(text, add_special=False)

            render = None
            if self.text == CalibrationText.MIXED:
                template = chat_template_for(model, base_info.arch)

                def render(messages: list[dict]) -> str:
                    return apply_chat_template(template, messages, add_assistant=False)

            chunks, self.source = named_chunks(
                self.corpus,
                tokenize,
                chunk_tokens=self.chunk_tokens,
                n_chunks=n_chunks,
                bos=model.prompt_bos,
                render=render,
            )
            if len(chunks) < n_chunks:
                raise KvcliError(
                    f"the calibration corpus gave {len(chunks)} prompts of "
                    f"{self.chunk_tokens} tokens, {n_chunks} needed (give more text or "
                    "fewer --tokens)"
                )
            for i, (_, tokens) in enumerate(chunks):
                features, base_kv = _prompt_rows(
                    base_ctx,
                    aux_ctx,
                    tokens,
                    base_info,
                    base_info if view else aux_info,
                    plan,
                    check_copies=i == 0,
                )
                base_rows = {}
                if base_capture is not None:
                    base_rows = {n: base_capture.rows(n) for n in self.base_tensors}
                    base_capture.clear()
                yield CalibrationPrompt(
                    i,
                    i % HELDOUT_PROMPT_EVERY == HELDOUT_PROMPT_EVERY - 1,
                    list(tokens),
                    features,
                    base_kv,
                    base_rows,
                )
                if progress:
                    progress(i + 1, len(chunks))
        finally:
            for ctx in contexts:
                ctx.close()
            for m in models:
                m.close()


def _unroped_kv(layers, info: ModelInfo, which) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for il in which:
        cells = layers[il]
        out[il] = (unrotate(cells.k, cells.positions, info.rope[il]), np.asarray(cells.v, np.float32))
    return out


def _prompt_rows(
    base_ctx: Context,
    aux_ctx: Context,
    tokens: list[int],
    base_info: ModelInfo,
    aux_info: ModelInfo,
    plan: CalibrationPlan,
    check_copies: bool = False,
) -> tuple[dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """This prompt's features per source layer and the base's un-roped K, V per predicted
    layer, every position. ``aux_info`` describes the auxiliary context's state (the
    base's, for a view)."""
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
    return {src: build_features(aux_kv, src, hidden) for src in plan.sources}, base_kv
