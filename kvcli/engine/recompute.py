"""kvp's recomputed spans: the base decodes, over the predicted cache, the sentences the
question looks for, and their exact K and V replace the predicted ones.

A predicted cache loses facts stated once, far back (docs/design.md). The spans are chosen by
the question's queries (the tail's) in base layer k, the first after a k-layer prefix
auxiliary (kvcli.engine.span_choice), over that layer's predicted keys, or by the base's own
attention from the tail (kvcli.engine.tail_choice); each is decoded by the base over the
predicted cells before it, in place (kvcli.engine.kvp_prefill), and the base then decodes the
tail itself.
"""

from __future__ import annotations

import numpy as np

from kvcli import keys
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.span_choice import (
    SINK_POSITIONS,
    QueryProjector,
    question_scores,
    sentence_ends,
    sentence_spans,
    spans_supported,
)
from kvcli.errors import IncompatibleError, KvcliError
from kvcli.predict.apply import PredictorInputs, predict_base_kv

# spans recomputed by default: two, as one chosen span missed what two held on kvcli eval
# (a scratch run, 1,024 tokens, seed 1, n = 10, sentence spans, tail 40: passkey 5/10 with
# one, 10/10 with two; uuid 8/10 and 9/10; multiquery 0/10 and 2/10; the other 7 families the
# same or within one);
# chosen from the tail, as its layers disagree by kind of prompt (Qwen 1.5B prefix 7, 6
# prompts each, scratch run over dumped attention: layers 2,5,6 combined put the pass key in
# the first span 2/6, in one of two 5/6, and the asked record among look-alikes 6/6 with
# either)
DEFAULT_SPANS = 2
# with spans, the base also decodes the question itself: 40 tokens, as a question is longer
# than 24 ("\nWhat is the special magic uuid for velvet-canyon mentioned in the provided
# text? The special magic uuid for velvet-canyon mentioned in the provided text is" is 33
# Gemma tokens; cut at 24, the base answered uuid 0/10 with one span, at 40 8/10)
DEFAULT_SPANS_TAIL = 40
SINK_GAP = 16  # attention sinks less than this apart are recomputed as one range
# With chosen spans, the prompt's opening (positions 1..OPENING-1: a chat template's head, the
# instruction a prompt usually starts with) is recomputed too: the question's attention
# anchors there as on a sink. Gemma 3 270M, uuid at ~4,000 tokens, 30 prompts over seeds 0-5
# (on seeds 0-2 the chooser found the UUID's sentence in all 15; the base 30/30): with the
# residual's sinks alone (positions 1-11) 22 answered; with the opening to 32, 28; with it and
# one span, 26. Opening to 24: 13/15 (seeds 3-5, 32: 14); to 64: 13/15 (seeds 0-2, 32: 14;
# a third span instead of the opening: 12). At 2048 (seeds 16-20) 23/25 -> 25/25 (the base
# 25/25); 8 other families at 2048 (48 prompts) 40 -> 39 (the base 36). Its cost, 31-39
# more tokens recomputed (the chooser's spans go elsewhere): at 2048 (uuid and
# records_between, 4 prompts run twice, with and without it in one run) the recompute's
# median 199 -> 248 ms; at ~4,000 (2 prompts run twice) 210-243 -> 257-310 ms.
OPENING = 32
# The predicted sliding-window cells written: the last SPAN_CONTEXT before each span and the
# last TAIL_CONTEXT before the base's own tail, not the whole window, which the predict step
# would otherwise spend most of its time on. A span's recomputed cells are only as good as
# the context its sliding-window layers see: on Gemma 3 270M at 2048 tokens (uuid, 25
# prompts over 5 seeds, the base 25/25) 64 / 128 / 256 / 512 cells before each span gave
# 17 / 19 / 21 / 22 answers, for about 11 ms more at 256 and 57 ms at 512 (predict + write +
# recompute, medians of 6 prompts run twice). Before the tail 128 stays: 32 / 64 / 128 / 256 gave
# 10 / 16 / 21 / 22 (with 256 before each span; 256 within the noise, for more cells), and
# 512 gave 12 (with 64 before each span).
SPAN_CONTEXT = 256
TAIL_CONTEXT = 128


class SpanRecompute:
    """The spans of one engine (kvcli.engine.engine.Engine): whether it can choose them, and the
    choice (kvcli.engine.kvp_prefill recomputes them)."""

    def __init__(self, engine):
        self.engine = engine
        self._projector: QueryProjector | None = None
        self._ends: dict[int, bool] = {}  # token -> whether it ends a sentence

    def sentence_ends(self, tokens: list[int]) -> np.ndarray:
        """span_choice.sentence_ends of the tokens' texts, each token looked up once."""
        model, ends = self.engine.model, self._ends
        for t in set(tokens) - ends.keys():
            ends[t] = bool(sentence_ends([model.token_bytes(t).decode("utf-8", "replace")])[0])
        return np.fromiter((ends[t] for t in tokens), dtype=bool, count=len(tokens))

    @property
    def supported(self) -> bool:
        if self.engine.predictor is not None and self.engine.tail_focus_layers:
            return True  # chosen from the tail (kvcli.engine.tail_choice)
        return self.by_keys

    @property
    def by_keys(self) -> bool:
        """Whether base layer k's attention over predicted keys can rank positions here
        (kvcli.engine.span_choice)."""
        try:
            self.check()
        except IncompatibleError:
            return False
        return True

    def from_tail(
        self,
        tokens: list[int],
        n_pred: int,
        kvp: KvpSettings,
        candidates: list[tuple[int, int]],
        sinks: list[tuple[int, int]],
    ) -> list[tuple[int, int]]:
        """kvcli.engine.tail_choice: with every predicted cell in the base's context (the ``sinks``
        recomputed), the base decodes the tail once, its attention in the engine's tail-focus
        layers captured, then forgets it; ``kvp``'s spans where their combined scores peak
        among the ``candidates`` ranges (predicted positions) are returned."""
        from kvcli.engine.tail_choice import combined_scores

        eng = self.engine
        base = eng.base
        capture = base.capture
        capture.clear()
        capture.armed = True
        try:
            base.decode(tokens[n_pred:], start=n_pred)
        finally:
            capture.armed = False
        scores = combined_scores(eng.base_attention(eng.tail_focus_layers, len(tokens) - n_pred, n_pred))
        capture.clear()
        base.truncate(n_pred)
        return self.pick(scores, tokens, n_pred, kvp, candidates, sinks)

    def aux_tail_scores(self, tokens: list[int], n_pred: int) -> np.ndarray | None:
        """kvcli.engine.tail_choice's scores from the auxiliary's own decode of the tail, where the
        tail-focus layers are a prefix auxiliary's (the same attention as the base's pass
        would have: those layers' cells are copied) and its cells are in position order;
        None otherwise. The auxiliary must hold tokens[:n_pred]; it then holds them all."""
        from kvcli.engine.tail_choice import combined_scores

        eng = self.engine
        aux = eng.aux
        if not eng.aux_focus_layers or not aux.cells_in_order or aux.n_past != n_pred:
            return None
        aux.capture.clear()
        aux.capture.extra_armed = True
        try:
            aux.decode(tokens[n_pred:], start=n_pred)
        finally:
            aux.capture.extra_armed = False
        scores = combined_scores(
            eng.base_attention(eng.aux_focus_layers, len(tokens) - n_pred, n_pred, ctx=aux)
        )
        aux.capture.clear()
        return scores

    def pick(
        self,
        scores: np.ndarray,
        tokens: list[int],
        n_pred: int,
        kvp: KvpSettings,
        candidates: list[tuple[int, int]],
        sinks: list[tuple[int, int]],
    ) -> list[tuple[int, int]]:
        """``kvp.spans`` sentences (span_choice.sentence_spans, ``kvp.span_max`` tokens at
        most) where ``scores`` peak among the ``candidates`` ranges, away from the ``sinks``."""
        allowed = np.zeros(n_pred, dtype=bool)
        for a, b in candidates:
            allowed[a:b] = True
        for a, b in sinks:
            allowed[a:b] = False
        return sentence_spans(
            scores[:n_pred],
            kvp.spans,
            self.sentence_ends(tokens[:n_pred]),
            lo=max(1, candidates[0][0]) if candidates else 1,
            hi=n_pred,
            max_width=kvp.span_max,
            allowed=allowed,
        )

    def check(self) -> None:
        eng = self.engine
        if eng.predictor is None:
            raise IncompatibleError("choosing spans needs a predictor (use a bundle)")
        if not (eng.predictor.uses_hidden and spans_supported(eng.predictor.hidden_kinds)):
            raise IncompatibleError(
                "choosing spans needs a predictor fit on the auxiliary's hidden "
                "state (kvcli's default recipe)"
            )
        if eng._prefix_of_base() == 0:
            raise IncompatibleError("choosing spans needs a prefix auxiliary cut from this base")
        if self._projector is None:
            self._projector = QueryProjector.for_base(eng.base_info, eng.aux_info.n_layer)

    def layer_scores(
        self, n_aux: int, n_pred: int, inputs: PredictorInputs, start: int = 0
    ) -> tuple[np.ndarray, dict]:
        """Per position < n_pred, the attention the question (positions n_pred..n_aux-1, the
        tail) gives it in base layer k, over that layer's predicted keys of positions
        start..n_pred-1 (0 before ``start``): its queries computed from the captured rows
        (``inputs.hidden``), scored by span_choice.question_scores. Also returns layer k's
        predicted rows (a full-attention layer: every one of those positions), not to
        predict them twice."""
        self.check()
        proj, kinds = self._projector, list(self.engine.predictor.hidden_kinds)
        layer = proj.layer
        full = [np.arange(start, n_pred, dtype=np.int32)] * len(self.engine.base_info.cache_layer_groups)
        known = predict_base_kv(inputs, full, only=[layer])
        positions = np.arange(min(n_pred, n_aux - 1), n_aux)  # at least the last token
        rows = positions - inputs.hidden_start
        hidden = inputs.hidden
        residual = proj.residual(
            hidden[kinds.index(keys.FEATURE_AUX_RESIDUAL)][rows],
            hidden[kinds.index(keys.FEATURE_AUX_ATTN)][rows],
        )
        scores = np.zeros(n_pred, dtype=np.float32)
        scores[start:] = question_scores(proj.queries(residual, positions), known[layer][0])
        scores[:SINK_POSITIONS] = 0.0  # the first tokens draw attention whatever the question
        return scores, known

    def choose(
        self,
        tokens: list[int],
        n_pred: int,
        kvp: KvpSettings,
        inputs: PredictorInputs,
        sinks: list[tuple[int, int]],
    ) -> tuple[list[tuple[int, int]], dict]:
        """``kvp``'s spans in max(1, start)..n_pred-1 where ``layer_scores`` of the question
        tokens[n_pred:] peak, away from the ``sinks`` (position 0, BOS, draws attention from
        every query and is never chosen), and layer k's predicted rows."""
        scores, known = self.layer_scores(len(tokens), n_pred, inputs, kvp.start)
        lo = max(1, kvp.start)
        return self.pick(scores, tokens, n_pred, kvp, [(lo, n_pred)], sinks), known


# A position whose residual (the auxiliary's captured ``l_out-(k-2)``) is this many times the
# prompt's median norm is an attention sink with massive activations: its predicted K and V
# are garbage (Qwen2.5-Coder 1.5B prefix 7, a chat-templated prompt: the first newlines,
# "You" and "." at positions 2-13 had residual norms 29-37x the median and predicted K/V
# 9-12x their own norm off; on the 0.5B as auxiliary the same positions stood at 3.3-3.5x).
# Elsewhere the largest ratio seen was 2.5 (Gemma 3 270M, a conversation) and 1.7 (Qwen).
SINK_RATIO = 3.0
MAX_SINKS = 16


def sink_positions(residual: np.ndarray) -> list[int]:
    """Rows whose residual norm is SINK_RATIO times the median or more (the first
    MAX_SINKS)."""
    norms = np.linalg.norm(residual.astype(np.float32), axis=1)
    if len(norms) < 2:
        return []
    ratio = norms / max(float(np.median(norms)), 1e-12)
    return [int(p) for p in np.flatnonzero(ratio >= SINK_RATIO)[:MAX_SINKS]]


def residual_sinks(predictor, hidden: list[np.ndarray], first: int = 0) -> list[int]:
    """``sink_positions`` of the captured residual rows (row 0 is position ``first``), as
    positions >= 1: position 0 is the first cell, always exact (predict_state.FirstCell);
    none without the residual feature."""
    kinds = list(predictor.hidden_kinds)
    if keys.FEATURE_AUX_RESIDUAL not in kinds:
        return []
    return [
        first + p for p in sink_positions(hidden[kinds.index(keys.FEATURE_AUX_RESIDUAL)]) if first + p >= 1
    ]


def sink_ranges(
    predictor, hidden: list[np.ndarray], n_pred: int, first: int = 0, lo: int = 1, opening: int = 0
) -> list[tuple[int, int]]:
    """The sinks among positions lo..n_pred-1 as ranges the base recomputes, those less than
    SINK_GAP apart joined (a chat template's sinks come in clusters: positions 2, 3, 8,
    10, 13 -> one range [2, 14)), and the positions before ``opening`` (OPENING where spans
    are chosen); ``first``: the position of ``hidden``'s row 0."""
    sinks = [(p, p + 1) for p in residual_sinks(predictor, hidden, first) if lo <= p < n_pred]
    head = [(lo, min(opening, n_pred))] if lo < min(opening, n_pred) else []
    return merge_ranges(sinks, head, gap=SINK_GAP)


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


def checked_ranges(ranges, n_pred: int, lo: int = 1) -> list[tuple[int, int]]:
    out, end = [], lo
    for a, b in ranges:
        a, b = int(a), int(b)
        if not (end <= a < b <= n_pred):
            raise KvcliError(
                f"recomputed ranges must be ordered, disjoint and within {lo}..{n_pred}: got {list(ranges)}"
            )
        out.append((a, b))
        end = b
    return out
