"""kvp's prefill: the auxiliary prefills, the base's cells are predicted and added to the
base's context, the chosen spans and attention sinks are recomputed by the base in place,
and the base decodes the tail itself. One path for ``generate`` (an empty context) and
``chat`` (a context holding the conversation's earlier positions).

The base's cache is worked on in place: predicted cells are added to seq 0 through a
scratch sequence (a state write replaces a whole sequence), and each recomputed range is
decoded in a scratch sequence that shares seq 0's cells before it, its new cells then put in
place of the predicted ones (``runtime.Context.recompute``): no state is read back, and
every range of a batch is decoded in one pass over the weights.
"""

from __future__ import annotations

import numpy as np

from kvcli.engine.aux_load import take_captured
from kvcli.engine.prefill_types import KvpSettings, Prefill
from kvcli.engine.recompute import (
    OPENING,
    SPAN_CONTEXT,
    TAIL_CONTEXT,
    checked_ranges,
    merge_ranges,
    sink_ranges,
)
from kvcli.engine.timings import Clock, Timings
from kvcli.errors import KvcliError
from kvcli.predict.apply import (
    PredictorInputs,
    needed_positions,
    predicted_state_bytes,
    span_group_positions,
)
from kvcli.state.codec import parse_seq_state, write_seq_state
from kvcli.state.layout import layers_by_index

APPEND_CHUNK = 1024  # predicted positions written into the base's context at a time


def kvp_prefill(engine, tokens: list[int], kvp: KvpSettings, t: Timings) -> Prefill:
    """Prefill ``tokens`` into ``engine.base`` by kvp (``t``: its timings, filled here).

    From ``kvp.start``, the base context holding tokens[:start] already (its own or earlier
    predicted cells) and keeping them, the auxiliary's tokens[:aux_start]. ``kvp.spans``
    chosen (``_chooser``) among the new predicted positions and, from the tail, the
    ``earlier`` predicted ranges too; or the given ``recompute`` ranges. The last ``tail`` + 1
    tokens are the base's."""
    start, aux_start = kvp.start, kvp.aux_start
    if engine.predictor is None:
        raise KvcliError("mode kvp needs a predictor (use a bundle)")
    if not 0 <= aux_start <= start < len(tokens):
        raise KvcliError(f"kvp from position {start} (auxiliary {aux_start}) of {len(tokens)} tokens")
    base = engine.base
    n_pred = max(start, len(tokens) - 1 - max(0, kvp.tail))
    chooser = _chooser(engine, kvp)
    from_tail = chooser == "tail"
    earlier = [(a, min(b, start)) for a, b in kvp.earlier if a < start]
    if n_pred == start and not (from_tail and earlier):  # nothing to predict or choose
        if start == 0:
            return Prefill(base, engine.plain_prefill(base, tokens, t), t)
        base.truncate(start)
        return Prefill(base, _decode_tail(base, tokens, start, t, Clock(), kvp.capture_tail), t)
    if chooser == "keys":
        engine.spans.check()
    clock = Clock()
    if start == 0:
        engine.first_cell(tokens[0])  # a new first token costs a decode (counted in TTFT)
        base.clear()
    else:
        base.truncate(start)
        if from_tail and not base.cells_in_order:
            _put_cells_in_order(engine)
    sinks, chosen, scores = [], [], None
    if n_pred > start:
        sinks, chosen, scores = _predict_into_base(engine, tokens, n_pred, kvp, t, clock)
    if from_tail:
        candidates = merge_ranges(earlier, [(max(1, start), n_pred)] if n_pred > start else [])
        if scores is not None:  # from the auxiliary's own pass: one batch recomputes all
            chosen = engine.spans.pick(scores, tokens, n_pred, kvp, candidates, sinks)
            base.recompute(tokens, merge_ranges(chosen, sinks))
        else:  # the base's pass over the predicted cache, its sinks recomputed first
            base.recompute(tokens, sinks)
            chosen = engine.spans.from_tail(tokens, n_pred, kvp, candidates, sinks)
            base.recompute(tokens, chosen)
    else:
        base.recompute(tokens, merge_ranges(chosen, sinks))
    recomputed = merge_ranges(chosen, sinks)
    if recomputed or from_tail:
        t.recompute_ms = clock.lap()
    logits = _decode_tail(base, tokens, n_pred, t, clock, kvp.capture_tail)
    predicted = ((start, n_pred),) if n_pred > start else ()
    return Prefill(base, logits, t, predicted=predicted, recomputed=tuple(recomputed))


def _chooser(engine, kvp: KvpSettings) -> str:
    """Who chooses kvp's spans: "" (no spans, or the given ranges), "tail" (the engine's
    tail-focus layers, kvcli.engine.tail_choice) or "keys" (base layer k over predicted keys,
    kvcli.engine.span_choice)."""
    if kvp.spans <= 0 or kvp.recompute is not None:
        return ""
    return "tail" if engine.tail_focus_layers else "keys"


def _predict_into_base(engine, tokens: list[int], n_pred: int, kvp: KvpSettings, t: Timings, clock: Clock):
    """The auxiliary decodes tokens[aux_start:n_pred] (and the tail too where kvcli.engine.span_choice
    chooses the spans from its last row), the base cells of positions start..n_pred-1 are
    predicted and added to the base's. Returns the attention sinks (with the positions before
    OPENING where spans are chosen: recompute.sink_ranges) and the chosen spans
    among those positions (or the given ``recompute`` ranges), for the base to recompute,
    and for spans chosen from the tail the tail-focus scores where the auxiliary can give them
    (``SpanRecompute.aux_tail_scores``), else None."""
    start, aux_start = kvp.start, kvp.aux_start
    chooser = _chooser(engine, kvp)
    aux, base, info = engine.aux, engine.base, engine.base_info
    if aux_start:
        aux.truncate(aux_start)
    else:
        aux.clear()
    if aux.capture is not None:
        aux.capture.clear()
    n_aux = len(tokens) if chooser == "keys" else n_pred
    aux.decode(tokens[aux_start:n_aux], start=aux_start)
    t.aux_prefill_ms = clock.lap()
    hidden, raw_kv = take_captured(aux, engine.predictor, engine.aux_info, n_aux - aux_start)
    scores = engine.spans.aux_tail_scores(tokens, n_pred) if chooser == "tail" else None
    t.aux_prefill_ms += clock.lap()
    inputs = predictor_inputs(engine, tokens, hidden, raw_kv, t, clock, start, aux_start)
    opening = OPENING if chooser else 0
    sinks = sink_ranges(engine.predictor, hidden, n_pred, first=aux_start, lo=max(1, start), opening=opening)
    chosen, known = checked_ranges(kvp.recompute or [], n_pred, lo=max(1, start)), {}
    if chooser == "keys":
        chosen, known = engine.spans.choose(tokens, n_pred, kvp, inputs, sinks)
    starts = [a for a, _ in merge_ranges(chosen, sinks)]
    positions = (
        span_group_positions(info, n_pred, starts, SPAN_CONTEXT, TAIL_CONTEXT)
        if starts
        else needed_positions(info, n_pred, first_query=n_pred)
    )
    positions = [p[p >= start] for p in positions]
    # in chunks of positions: the state bytes of one chunk at a time are alive, not the whole
    # prompt's (at 4096 tokens on the Qwen 1.5B, 235 MB for all 28 layers)
    for a in range(start, n_pred, APPEND_CHUNK):
        b = min(a + APPEND_CHUNK, n_pred)
        part = [p[(p >= a) & (p < b)] for p in positions]
        if not any(len(p) for p in part):
            continue
        part_known = {
            il: (k[a - start : b - start], v[a - start : b - start]) for il, (k, v) in known.items()
        }  # layer k's rows: positions start..
        data = predicted_state_bytes(engine.base_layout(), inputs, part, known=part_known)
        t.predict_ms += clock.lap()
        base.append_state(data, n_past=b)
        t.state_set_ms += clock.lap()
    base.n_past = n_pred
    return sinks, chosen, scores


def predictor_inputs(
    engine, tokens: list[int], hidden, raw_kv, t: Timings, clock: Clock, start: int = 0, aux_start: int = 0
) -> PredictorInputs:
    """What the predictor reads once the auxiliary has decoded the prompt and its captured
    rows are taken (``hidden``, ``raw_kv``): its state where the predictor copies layers or
    reads keys from it (read here, timed as ``state_get_ms``)."""
    needs_state = engine.predictor.copied_layers or not engine.predictor.raw_keys
    raw = engine.aux.get_state(-1) if needs_state else None
    t.state_get_ms = clock.lap()
    return PredictorInputs(
        aux_layers=layers_by_index(parse_seq_state(raw), engine.aux_state_info) if needs_state else {},
        aux=engine.aux_info,
        base=engine.base_info,
        predictor=engine.predictor,
        first_cell=engine.first_cell(tokens[0]) if start == 0 else None,
        key_norms=engine.key_norms,
        hidden=hidden,
        hidden_start=aux_start,
        raw_kv=raw_kv,
    )


def _decode_tail(base, tokens: list[int], at: int, t: Timings, clock: Clock, armed: bool) -> np.ndarray:
    """The base decodes tokens[at:] itself; its capture armed for it with ``armed``."""
    if armed:
        base.capture.armed = True
    try:
        base.decode(tokens[at:], start=at, logits_last=True)
    finally:
        if armed:
            base.capture.armed = False
    logits = base.last_logits()
    t.base_decode_ms = clock.lap()
    return logits


def _put_cells_in_order(engine) -> None:
    """Rewrite seq 0 with its cells in position order: the tail's captured attention reads
    cache cells as positions (kvcli.engine.tail_choice), and ranges recomputed in place leave cells
    out of order (their new cells are placed wherever the cache has room)."""
    base, info = engine.base, engine.base_info
    state = parse_seq_state(base.get_state(0))
    layers = layers_by_index(state, info)
    group_positions, kv = [], {}
    for group in info.cache_layer_groups:
        cells = layers[group[0]]
        order = np.argsort(cells.positions, kind="stable")
        group_positions.append(cells.positions[order])
        kv.update({il: (layers[il].k[order], layers[il].v[order]) for il in group})
    n_past = base.n_past
    base.clear()
    base.set_state(write_seq_state(engine.base_layout().build_state(group_positions, kv)), 0, n_past=n_past)
    base.cells_in_order = True  # written into an empty cache: cell i holds the i-th position
