"""The engine: prefill a prompt by one of four modes, then let the base generate.

- ``base``: the base decodes the whole prompt (the reference).
- ``kvp``: the auxiliary decodes t[0..N-2-W] without logits; its state is read (seq -1,
  every cell), the base's cells are predicted and added to the base context; the base
  decodes the last W+1 prompt tokens itself (W = ``tail``) and generates every later token.
  With ``spans`` S, the base first recomputes S short spans of the prompt over the predicted
  cache, in place, chosen where the question attends (kvcli.engine.recompute, kvcli.engine.tail_choice); the
  attention sinks too (kvcli.engine.kvp_prefill, one path for generate and chat).
- ``truncate``: the base decodes BOS + only the last M prompt tokens.
- ``select``: the auxiliary ranks the prompt's positions, the base decodes BOS, the top M
  in chunks and the last tokens at their own positions (kvcli.engine.token_select).
- ``aux``: the auxiliary alone prefills and generates.

TTFT is measured from having the prompt tokens to having the first sampled token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.choices import Choice
from kvcli.engine.aux_load import AuxLoad, aux_file, capture_names, choose_aux_load, open_aux_context
from kvcli.engine.kvp_prefill import kvp_prefill
from kvcli.engine.prefill_types import KvpSettings, Prefill
from kvcli.engine.recompute import DEFAULT_SPANS, DEFAULT_SPANS_TAIL, SpanRecompute
from kvcli.engine.timings import Clock, Timings
from kvcli.errors import ContextError, IncompatibleError, KvcliError
from kvcli.llama.capture import TensorCapture
from kvcli.llama.handles import Handles
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import has_per_layer_arrays, key_norm_weights, prefix_view_info, read_model_info
from kvcli.predict.apply import FirstCell
from kvcli.predict.predictor import load_predictor
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import CacheLayout, layers_by_index


class Mode(Choice):
    """How a prompt is prefilled: by the base, by kvp (the auxiliary and the predictor, with
    the base recomputing its tail and spans), truncated to its last tokens, the tokens the
    auxiliary selects, by the auxiliary alone (which then generates too)."""

    BASE = "base"
    KVP = "kvp"
    TRUNCATE = "truncate"
    SELECT = "select"
    AUX = "aux"


MODES = Mode.values()
# ranges kvp recomputes in one decode (each in a scratch sequence) and the cells they may
# take beside the prompt's: 2 spans of up to 64, the opening and a chat template's sinks fit in one batch
SCRATCH_SEQS = 8
SCRATCH_CELLS = 256


def kvp_from_tokens(break_even: dict | None) -> int:
    """The prompt length from which kvp prefills, by a bundle's measured break-even
    (kvcli.eval.break_even): its ``min_tokens``; past the longest length measured where kvp
    never paid there; 0 (always kvp) where nothing was measured."""
    if not break_even:
        return 0
    if isinstance(break_even.get(keys.BREAK_EVEN_MIN_TOKENS), int):
        return break_even[keys.BREAK_EVEN_MIN_TOKENS]
    measured = [int(n) for n in break_even.get(keys.BREAK_EVEN_TTFT_RATIO) or {}]
    return max(measured) + 1 if measured else 0


class Engine:
    """Owns the base (and, for kvp/aux, the auxiliary) models and contexts."""

    def __init__(
        self,
        base_path: str | Path,
        *,
        aux_path: str | Path | None = None,
        predictor_path: str | Path | None = None,
        settings: ContextSettings | None = None,
        key_norm_rescale: bool = True,
        aux_load: str = "auto",
        aux_prefix: int = 0,
        tail_focus_layers: list[int] = (),
        attention_layers: list[int] = (),
        kvp_min_tokens: int = 0,
    ):
        """``aux_load``: how a prefix auxiliary is loaded (AuxLoad; "auto": choose_aux_load).
        ``aux_prefix`` k instead of ``aux_path``: the auxiliary is the base's own layers
        0..k-1, with no file (one is cut into the cache only if a mode needs it).
        ``tail_focus_layers``: kvp's spans are chosen by these base layers' attention from the
        tail (kvcli.engine.tail_choice), not by kvcli.engine.span_choice. ``attention_layers``:
        base layers whose attention weights the base context can capture (``base_attention``).
        ``kvp_min_tokens``: prompts shorter than this are not worth kvp (``kvp_pays``)."""
        aux_load = AuxLoad.parse(aux_load, "auxiliary load")
        self.base_info = read_model_info(base_path, "base model")
        self.aux_path = Path(aux_path) if aux_path else None
        self.aux_info = (
            prefix_view_info(self.base_info.path, aux_prefix)
            if aux_prefix
            else read_model_info(aux_path, "auxiliary")
            if aux_path
            else None
        )
        self.predictor = None
        if self.aux_info is not None:
            if self.aux_info.tokenizer_digest != self.base_info.tokenizer_digest:
                raise IncompatibleError(
                    f"the auxiliary's tokenizer differs from the base's ({self.aux_info.path.name}"
                    f" vs {self.base_info.path.name}); an auxiliary must share the base's vocabulary"
                )
            if predictor_path:
                self.predictor = load_predictor(predictor_path)
                self.predictor.check_models(self.base_info, self.aux_info)
        self.settings = settings or ContextSettings()
        self.kvp_min_tokens = max(0, int(kvp_min_tokens))
        self.key_norms = (
            key_norm_weights(self.base_info)
            if key_norm_rescale
            or (self.predictor is not None and self.predictor.key_space == keys.KEY_SPACE_PRE_NORM)
            else None
        )
        self.handles = Handles(self.settings)
        prefix = self._prefix_of_base()
        self.needs_view = self.predictor is not None and any(
            kind in keys.VIEW_ONLY_KINDS for kind in self.predictor.hidden_kinds
        )
        partial_ok = not (prefix and has_per_layer_arrays(self.base_info))
        self.aux_load = (
            "none"
            if self.aux_info is None
            else choose_aux_load(aux_load, prefix, needs_view=self.needs_view, partial_ok=partial_ok)
        )
        self.view_layers = prefix if self.aux_load in ("view", "partial") else 0
        self.aux_state_info = self.base_info if self.aux_load == "view" else self.aux_info
        self._aux_alone: Context | None = None
        self.tail_focus_layers = list(tail_focus_layers)
        # a prefix auxiliary computes the base's own layers 0..k-1: where the tail-focus
        # layers are among them, its decode of the tail gives the same attention as the
        # base's pass over the predicted cache would (those layers' cells are copied)
        self.aux_focus_layers = (
            self.tail_focus_layers
            if prefix and self.tail_focus_layers and max(self.tail_focus_layers) < prefix
            else []
        )
        layers = sorted({*attention_layers, *tail_focus_layers})
        if layers and self.base_info.n_swa:
            raise IncompatibleError("spans chosen from the tail need a model without sliding-window layers")
        self._layout: CacheLayout | None = None
        self._first_cells: dict[int, FirstCell] = {}
        try:
            self._open_contexts(prefix, layers)
            self.spans = SpanRecompute(self)
            if self.predictor is not None:
                self.base_layout()  # once, outside any timed prefill
                self.first_cell(self.model.bos)
        except BaseException:
            # no caller gets an engine to close: free the models and contexts opened so far
            self.close()
            raise

    def _open_contexts(self, prefix: int, attention_layers: list[int]) -> None:
        """The base's context (capturing ``attention_layers``' attention) and the
        auxiliary's (aux_load.open_aux_context; None without one), in ``self.handles``."""
        from kvcli.engine.tail_choice import attention_name

        base_capture = (
            TensorCapture([attention_name(il) for il in attention_layers]) if attention_layers else None
        )
        if base_capture is not None:
            base_capture.armed = False
        # kvp works on the base's cache in place (kvcli.engine.kvp_prefill): scratch sequences
        # and cells for the ranges it recomputes
        scratch = (
            dict(scratch_seqs=SCRATCH_SEQS, scratch_cells=SCRATCH_CELLS) if self.aux_info is not None else {}
        )
        self.base = self.handles.open(self.base_info.path, "base model", base_capture, **scratch)
        if self.needs_view and self.aux_load != "view":
            raise IncompatibleError(
                "this predictor reads the auxiliary's last-layer output, "
                "which only a prefix auxiliary run as a view provides"
            )
        self.aux = open_aux_context(
            self.handles,
            self.aux_load,
            self.base,
            self.base_info,
            prefix=prefix,
            names=capture_names(self.predictor, self.aux_info),
            extra=[attention_name(il) for il in self.aux_focus_layers],
            aux_path=self._aux_file() if self.aux_load == "file" else None,
        )

    def _prefix_of_base(self) -> int:
        """k when the auxiliary is the base's layers 0..k-1 (a kvcli prefix cut) and a
        predictor is loaded: it can then run from the base's own weights (choose_aux_load)."""
        aux = self.aux_info
        if self.predictor is None or aux is None or aux.source_fingerprint != self.base_info.fingerprint:
            return 0
        k = aux.n_layer
        return k if aux.source_layers == tuple(range(k)) and k < self.base_info.n_layer else 0

    def _aux_alone_context(self) -> Context:
        """A context that runs the auxiliary alone to its LM head (mode aux): the cut file."""
        if self.aux_load != "view":
            return self.aux
        if self._aux_alone is None:
            self._aux_alone = self.handles.open(self._aux_file(), "auxiliary")
        return self._aux_alone

    def _aux_file(self) -> Path:
        """The auxiliary's file (aux_load.aux_file: a prefix's cut is made once), remembered."""
        self.aux_path = aux_file(self.aux_path, self.base_info, self.aux_info)
        return self.aux_path

    @classmethod
    def from_bundle(cls, bundle, *, with_aux: bool = True, with_predictor: bool = True, **kwargs) -> Engine:
        """An engine over a bundle.Bundle (``with_aux`` False: the base alone); spans are
        chosen as the bundle's manifest records (``spans``: ``tail_focus_layers``)."""
        with_aux = with_aux or with_predictor
        spans = bundle.manifest.get(keys.MANIFEST_SPANS) or {}
        if (
            with_predictor
            and spans.get(keys.SPANS_CHOOSER) == keys.CHOOSER_TAIL
            and isinstance(spans.get(keys.SPANS_LAYERS), list)
            and "tail_focus_layers" not in kwargs
        ):
            kwargs["tail_focus_layers"] = [int(il) for il in spans[keys.SPANS_LAYERS]]
        if with_predictor:
            kwargs.setdefault(
                "kvp_min_tokens", kvp_from_tokens(bundle.manifest.get(keys.MANIFEST_BREAK_EVEN))
            )
        return cls(
            bundle.base,
            aux_path=bundle.aux if with_aux else None,
            aux_prefix=bundle.aux_prefix if with_aux else 0,
            predictor_path=bundle.predictor if with_predictor else None,
            **kwargs,
        )

    def base_attention(
        self, layers: list[int], n_query: int, n_pred: int, ctx: Context | None = None
    ) -> dict[int, np.ndarray]:
        """Per layer, position scores (kvcli.engine.tail_choice) of the base's last decode (or the
        auxiliary's: ``ctx``, a prefix of the base), when it was run with its attention
        capture armed."""
        from kvcli.engine.tail_choice import attention_name, position_scores

        capture = (ctx or self.base).capture
        return {
            il: position_scores(capture.rows(attention_name(il)), self.base_info.n_head[il], n_query, n_pred)
            for il in layers
        }

    @property
    def model(self) -> Model:
        return self.base.model

    def close(self) -> None:
        self.handles.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    # -- prefill -------------------------------------------------------------------------

    def base_layout(self) -> CacheLayout:
        """Probe the base context's own state layout once."""
        if self._layout is None:
            self.first_cell(self.model.bos)
        return self._layout

    def first_cell(self, token: int) -> FirstCell:
        """The base's own cell at position 0 for ``token``, decoded once per token (one
        token's forward: the base context is cleared, so call it before a prefill)."""
        if token not in self._first_cells:
            self.base.clear()
            self.base.decode([token])
            state = parse_seq_state(self.base.get_state(0))
            layers = layers_by_index(state, self.base_info)
            if self._layout is None:
                self._layout = CacheLayout.probe(state, self.base_info)
            self._first_cells[token] = FirstCell(
                token,
                k={il: c.k[0].copy() for il, c in layers.items()},
                v={il: c.v[0].copy() for il, c in layers.items()},
            )
            self.base.clear()
        return self._first_cells[token]

    def _check_fits(self, n: int) -> None:
        if n > self.base.n_ctx:
            raise ContextError(
                f"the prompt has {n} tokens but the context holds {self.base.n_ctx};"
                " use a shorter prompt or a larger --ctx"
            )
        if n < 1:
            raise KvcliError("the prompt is empty")

    def prefill(
        self,
        tokens: list[int],
        *,
        mode: str = "kvp",
        kvp: KvpSettings | None = None,
        keep: int | None = None,
        select_by: str = "auto",
    ) -> Prefill:
        """Prefill by ``mode``: the context that continues, the last logits, the timings, and
        what kvp predicted and recomputed or what select kept.

        kvp: by ``kvp`` (KvpSettings(): tail 0, no spans); base too: from its ``start``.
        select: ``keep`` positions in all, ranked by ``select_by`` (kvcli.engine.token_select)."""
        kvp = kvp or KvpSettings()
        start = kvp.start
        mode = Mode.parse(mode, "mode")
        self._check_fits(len(tokens))
        t = Timings()
        if start and mode not in ("base", "kvp"):
            raise KvcliError(f"mode {mode} prefills from position 0 only")
        if mode == "base" and start:
            clock = Clock()
            self.base.truncate(start)
            self.base.decode(tokens[start:], start=start, logits_last=True)
            t.base_decode_ms = clock.lap()
            return Prefill(self.base, self.base.last_logits(), t)
        if mode == "base":
            return Prefill(self.base, self.plain_prefill(self.base, tokens, t), t)
        if mode == "truncate":
            from kvcli.engine.token_select import default_keep

            kept = list(tokens)
            keep = default_keep(len(tokens)) if keep is None else keep  # as select: a quarter
            if 0 < keep < len(tokens):
                kept = kept[-keep:]
                if tokens[0] == self.model.bos:
                    kept.insert(0, tokens[0])  # the model expects its BOS at position 0
            return Prefill(self.base, self.plain_prefill(self.base, kept, t), t)
        if self.aux is None:
            raise KvcliError(f"mode {mode} needs an auxiliary model (use a bundle)")
        if mode == "select":
            from kvcli.engine.token_select import select_prefill

            return select_prefill(self, tokens, keep, t, select_by)
        if mode == "aux":
            aux = self._aux_alone_context()
            clock = Clock()
            aux.clear()
            if aux.capture is not None:
                aux.capture.clear()
            aux.decode(tokens, logits_last=True)
            t.aux_prefill_ms = clock.lap()
            return Prefill(aux, aux.last_logits(), t)
        return kvp_prefill(self, tokens, kvp, t)

    def plain_prefill(self, ctx: Context, tokens: list[int], t: Timings) -> np.ndarray:
        """``ctx`` decodes ``tokens`` from position 0; returns the last logits."""
        clock = Clock()
        ctx.clear()
        ctx.decode(tokens, logits_last=True)
        logits = ctx.last_logits()
        t.base_decode_ms = clock.lap()
        return logits

    # -- recomputed spans ----------------------------------------------------------------

    @property
    def spans_supported(self) -> bool:
        """Whether kvp can choose spans here (``KvpSettings.spans``)."""
        return self.spans.supported

    def kvp_pays(self, n_new: int) -> bool:
        """Whether kvp is worth it for ``n_new`` tokens to prefill: at or past the bundle's
        measured break-even (kvcli.eval.break_even); always where none was measured."""
        return n_new >= self.kvp_min_tokens

    def kvp_settings(self, tail: int | None = None, spans: int | None = None) -> KvpSettings:
        """kvp's settings, the tail and spans not given filled in: DEFAULT_SPANS spans where
        they can be chosen, else none; tail DEFAULT_SPANS_TAIL with spans, else 0."""
        if spans is None:
            spans = DEFAULT_SPANS if self.predictor is not None and self.spans_supported else 0
        if tail is None:
            tail = DEFAULT_SPANS_TAIL if spans else 0
        return KvpSettings(tail=tail, spans=spans)
