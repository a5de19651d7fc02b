"""kvp's recomputed spans: the base decodes, over the predicted cache, the few prompt tokens
the question looks for, and their exact K and V replace the predicted ones.

A predicted cache loses facts stated once, far back (docs/design.md). The spans are chosen by
the last prompt token's query in base layer k, the first after a k-layer prefix auxiliary
(kvcli.focus), over that layer's predicted keys; each is decoded by the base over the
predicted cells before it, then the state before the tail is written and the base decodes
the tail itself (kvcli.engine).
"""

from __future__ import annotations

import numpy as np

from kvcli import keys
from kvcli.errors import IncompatibleError, KvcliError
from kvcli.focus import QueryProjector, attention_peaks, choose_spans, spans_supported
from kvcli.kv_layout import CacheLayout, layers_by_index
from kvcli.predict_state import (
    SpanRows,
    needed_positions,
    predict_base_kv,
    span_group_positions,
    state_bytes,
)
from kvcli.state_codec import parse_seq_state

# tokens per recomputed span: a stated fact and its words around it. 16 rather than 24: the
# same answers on kvcli eval at 1024 tokens (pass key, several keys, register, code; n = 10,
# shipped predictor: 1.0 / 1.0 / 0.8 / 1.0 with either), 0.005-0.008x less TTFT (README)
SPAN_WIDTH = 16
DEFAULT_SPANS = 1
# spans chosen from the tail (kvcli.tail_focus): two, as its layers disagree by kind of
# prompt (Qwen 1.5B prefix 7, 6 prompts each, scratch run over dumped attention: layers
# 2,5,6 combined put the pass key in the first span 2/6, in one of two 5/6, and the asked
# record among look-alikes 6/6 with either)
DEFAULT_TAIL_SPANS = 2
DEFAULT_SPANS_TAIL = 24  # with spans, the base also decodes the question itself
# Spans are chosen by the last prompt token's query alone, the best chooser measured
# (passkey, multikey, document at 1024 and 2048 tokens, n = 10 each): the top span held the
# fact in 60/60 prompts; by the largest weight any of the 4 tokens before it gives, in
# 58/60; of the 16 before it, 52/60.
# The predicted sliding-window cells written: the last SPAN_CONTEXT before each span and the
# last TAIL_CONTEXT before the base's own tail, not the whole window, which the predict step
# would otherwise spend most of its time on. Measured (1024 tokens, 2 spans, tail 24,
# n = 10): passkey/multikey/document 1.0/1.0/0.9 with the whole window, 0.9/1.0/0.9 with these.
SPAN_CONTEXT = 64
TAIL_CONTEXT = 128


class SpanRecompute:
    """The spans of one engine (kvcli.engine.Engine): whether it can choose them, the
    choice, and the base's decode of them."""

    def __init__(self, engine):
        self.engine = engine
        self._projector: QueryProjector | None = None

    @property
    def supported(self) -> bool:
        if self.engine.predictor is not None and self.engine.tail_focus_layers:
            return True  # chosen from the tail (kvcli.tail_focus)
        try:
            self.check()
        except IncompatibleError:
            return False
        return True

    def from_tail(self, tokens: list[int], n_pred: int, spans: int, span_width: int,
                  layout: CacheLayout, common: dict, t, clock, sinks: list[tuple[int, int]]
                  ) -> tuple[bytearray, list[tuple[int, int]]]:
        """kvcli.tail_focus: every layer's rows predicted and the ``sinks`` recomputed; the
        base decodes the tail over them once, its attention in the engine's tail-focus layers
        captured; the spans where their combined scores peak are recomputed. Returns the
        state bytes of positions < n_pred and the spans; the choice counts as recompute time."""
        from kvcli.tail_focus import combined_scores, peak_spans

        eng = self.engine
        positions = needed_positions(eng.base_info, n_pred, first_query=n_pred)
        rows = SpanRows(eng.base_info, positions, predict_base_kv(group_positions=positions, **common),
                        exact=self.exact_layers())
        t.predict_ms = clock.lap()
        eng.base.set_state(self.run(tokens, n_pred, sinks, rows, layout), 0, n_past=n_pred)
        capture = eng.base.capture
        capture.clear()
        capture.armed = True
        try:
            eng.base.decode(tokens[n_pred:], start=n_pred)
        finally:
            capture.armed = False
        scores = combined_scores(eng.base_attention(eng.tail_focus_layers, len(tokens) - n_pred, n_pred))
        capture.clear()
        chosen = peak_spans(scores, spans, span_width, n_pred)
        data = self.run(tokens, n_pred, chosen, rows, layout)
        t.recompute_ms = clock.lap()
        return data, chosen

    def check(self) -> None:
        eng = self.engine
        if eng.predictor is None:
            raise IncompatibleError("choosing spans needs a predictor (use a bundle)")
        if not (eng.predictor.uses_hidden and spans_supported(eng.predictor.hidden_kinds)):
            raise IncompatibleError("choosing spans needs a predictor fit on the auxiliary's hidden "
                                    "state (kvcli's default recipe)")
        if eng._prefix_of_base() == 0:
            raise IncompatibleError("choosing spans needs a prefix auxiliary cut from this base")
        if self._projector is None:
            self._projector = QueryProjector.for_base(eng.base_info, eng.aux_info.n_layer)

    def choose(self, hidden, n_aux: int, n_pred: int, spans: int, span_width: int,
               common: dict) -> tuple[list[tuple[int, int]], dict]:
        """``spans_for`` the last prompt token (row n_aux - 1 of ``hidden``) over base layer
        k's predicted keys; also returns layer k's predicted rows (every position: it is a
        full-attention layer), not to predict them twice."""
        self.check()
        layer = self._projector.layer
        full = [np.arange(n_pred, dtype=np.int32)] * len(self.engine.base_info.cache_layer_groups)
        known = predict_base_kv(group_positions=full, only=[layer], **common)
        return self.spans_for(hidden, [n_aux - 1], [n_aux - 1], known[layer][0], n_pred, spans,
                              span_width), known

    def spans_for(self, hidden: list[np.ndarray], rows: list[int], positions: list[int],
                  keys_k: np.ndarray, n_pred: int, spans: int, span_width: int = SPAN_WIDTH
                  ) -> list[tuple[int, int]]:
        """The spans in 1..n_pred-1 that the tokens at ``positions`` (rows ``rows`` of the
        captured ``hidden`` tensors) attend to most in base layer k: their queries computed
        from the captured rows (kvcli.focus), ``keys_k`` layer k's cached keys of positions
        0..n_pred-1, a position scored by the largest weight any query head gives it.
        Position 0 (BOS) draws attention from every query and is never chosen."""
        self.check()
        proj, kinds = self._projector, list(self.engine.predictor.hidden_kinds)
        residual = proj.residual(hidden[kinds.index(keys.FEATURE_AUX_RESIDUAL)][rows],
                                 hidden[kinds.index(keys.FEATURE_AUX_ATTN)][rows])
        scores = attention_peaks(proj.queries(residual, np.asarray(positions)), keys_k)
        return choose_spans(scores, spans, span_width, lo=1, hi=n_pred)

    def recompute(self, tokens: list[int], n_pred: int, ranges: list[tuple[int, int]],
                  layout: CacheLayout, common: dict, t, clock, known: dict | None = None
                  ) -> bytearray:
        """Predicts the cells the spans and the tail see (``known``: full-attention layers'
        rows already predicted for every position), then ``run``; fills ``t``'s predict and
        recompute times from ``clock``."""
        info = self.engine.base_info
        known = known or {}
        positions = span_group_positions(info, n_pred, [a for a, _ in ranges], SPAN_CONTEXT,
                                         TAIL_CONTEXT)
        rest = [il for il in range(info.n_layer) if il not in known]
        predicted = predict_base_kv(group_positions=positions, only=rest, **common) if rest else {}
        rows = SpanRows(info, positions, {**known, **predicted}, exact=self.exact_layers())
        t.predict_ms += clock.lap()
        data = self.run(tokens, n_pred, ranges, rows, layout)
        t.recompute_ms += clock.lap()
        return data

    def exact_layers(self) -> list[int]:
        """Layers whose rows kvp writes are already the base's own: a prefix auxiliary's."""
        return list(self.engine.predictor.copied_layers)

    def run(self, tokens: list[int], n_pred: int, ranges: list[tuple[int, int]],
            rows: SpanRows, layout: CacheLayout) -> bytearray:
        """The base decodes each range [a, b) over the cells of ``rows`` before a (predicted,
        and earlier ranges' exact rows), whose rows its own then replace; returns the state
        bytes of positions < n_pred."""
        base, info = self.engine.base, self.engine.base_info
        for a, b in ranges:
            base.set_state(state_bytes(layout, *rows.before(a)), 0, n_past=a)
            base.decode(tokens[a:b], start=a)
            rows.replace(layers_by_index(parse_seq_state(base.get_state(0)), info), a, b)
        return state_bytes(layout, *rows.before(n_pred))


# A position whose residual (the auxiliary's captured ``l_out-(k-2)``) is this many times the
# prompt's median norm is an attention sink with massive activations: its predicted K and V
# are garbage (Qwen2.5-Coder 1.5B prefix 7, a chat-templated prompt: the first newlines,
# "You" and "." at positions 2-13 had residual norms 29-37x the median and predicted K/V
# 9-12x their own norm off; on the 0.5B as auxiliary the same positions stood at 3.3-3.5x).
# Elsewhere the largest ratio seen was 2.5 (Gemma 3 270M, a conversation) and 1.7 (Qwen).
SINK_RATIO = 3.0
MAX_SINKS = 16


def sink_positions(residual: np.ndarray) -> list[int]:
    """Positions >= 1 whose residual norm is SINK_RATIO times the median or more (the first
    MAX_SINKS); position 0 is the first cell, always exact (predict_state.FirstCell)."""
    norms = np.linalg.norm(residual.astype(np.float32), axis=1)
    if len(norms) < 2:
        return []
    ratio = norms / max(float(np.median(norms)), 1e-12)
    return [int(p) for p in np.flatnonzero(ratio[1:] >= SINK_RATIO)[:MAX_SINKS] + 1]


def residual_sinks(predictor, hidden: list[np.ndarray]) -> list[int]:
    """``sink_positions`` of the captured residual rows (row 0 first); none without the
    residual feature."""
    kinds = list(predictor.hidden_kinds)
    if keys.FEATURE_AUX_RESIDUAL not in kinds:
        return []
    return sink_positions(hidden[kinds.index(keys.FEATURE_AUX_RESIDUAL)])


def sink_ranges(predictor, hidden: list[np.ndarray], n_pred: int) -> list[tuple[int, int]]:
    """The sinks among positions 1..n_pred-1 as ranges the base recomputes, those less than
    SPAN_WIDTH apart joined: each range costs a state write and a decode, and a chat
    template's sinks come in clusters (positions 2, 3, 8, 10, 13 -> one range [2, 14))."""
    return merge_ranges([(p, p + 1) for p in residual_sinks(predictor, hidden) if p < n_pred],
                        gap=SPAN_WIDTH)


def merge_ranges(*groups: list[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """The union of ranges [a, b), as ordered disjoint ranges (those within ``gap`` of each
    other joined)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for group in groups for r in group):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def checked_ranges(ranges, n_pred: int) -> list[tuple[int, int]]:
    out, end = [], 1
    for a, b in ranges:
        a, b = int(a), int(b)
        if not (end <= a < b <= n_pred):
            raise KvcliError(f"recomputed ranges must be ordered, disjoint and within 1..{n_pred}: "
                             f"got {list(ranges)}")
        out.append((a, b))
        end = b
    return out
