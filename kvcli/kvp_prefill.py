"""kvp's prefill: the auxiliary prefills, the base's cache is predicted (and the chosen
spans and attention sinks recomputed by the base), written into the base's context, and the
base decodes the tail itself (kvcli.engine runs it as mode ``kvp``)."""

from __future__ import annotations

import numpy as np

from kvcli.errors import KvcliError
from kvcli.kv_layout import layers_by_index
from kvcli.predict_state import needed_positions, predicted_state_bytes
from kvcli.spans import SPAN_WIDTH, checked_ranges, merge_ranges, sink_ranges
from kvcli.state_codec import parse_seq_state
from kvcli.timings import Clock, Timings


def kvp_prefill(engine, tokens: list[int], tail: int, t: Timings, spans: int = 0,
                span_width: int = SPAN_WIDTH, recompute: list[tuple[int, int]] | None = None
                ) -> np.ndarray:
    """Prefill ``tokens`` into ``engine.base`` by kvp; returns the last logits and fills ``t``.
    ``spans`` chosen (kvcli.tail_focus where the engine has tail-focus layers, else
    kvcli.focus) or the given ``recompute`` ranges; the last ``tail`` + 1 tokens are the base's."""
    if engine.predictor is None:
        raise KvcliError("mode kvp needs a predictor (use a bundle)")
    n_pred = len(tokens) - 1 - max(0, tail)
    if n_pred < 1:
        return engine.plain_prefill(engine.base, tokens, t)
    choose = spans > 0 and recompute is None
    from_tail = choose and bool(engine.tail_focus_layers)
    if choose and not from_tail:
        engine.spans.check()
    layout = engine.base_layout()
    clock = Clock()
    first_cell = engine.first_cell(tokens[0])  # counted in TTFT: a new first token costs a decode
    engine.aux.clear()
    if engine.aux.capture is not None:
        engine.aux.capture.clear()
    # choosing spans in layer k needs the auxiliary's rows of the prompt's last tokens
    n_aux = len(tokens) if choose and not from_tail else n_pred
    engine.aux.decode(tokens[:n_aux])
    t.aux_prefill_ms = clock.lap()
    hidden, raw_kv = engine.take_captured(n_aux)
    needs_state = engine.predictor.copied_layers or not engine.predictor.raw_keys
    raw = engine.aux.get_state(-1) if needs_state else None
    t.state_get_ms = clock.lap()
    aux_layers = layers_by_index(parse_seq_state(raw), engine.aux_state_info) if needs_state else {}
    common = dict(aux_layers=aux_layers, aux=engine.aux_info, base=engine.base_info,
                  predictor=engine.predictor, first_cell=first_cell,
                  key_norms=engine.key_norms, hidden=hidden, raw_kv=raw_kv, cache={})
    known = {}
    engine.last_recomputed = []
    sinks = sink_ranges(engine.predictor, hidden, n_pred)
    if from_tail:
        data, chosen = engine.spans.from_tail(tokens, n_pred, spans, span_width, layout, common, t,
                                            clock, sinks)
        engine.last_recomputed = merge_ranges(chosen, sinks)
    else:
        if choose:
            recompute, known = engine.spans.choose(hidden, n_aux, n_pred, spans, span_width, common)
        engine.last_recomputed = merge_ranges(checked_ranges(recompute or [], n_pred), sinks)
        if engine.last_recomputed:
            data = engine.spans.recompute(tokens, n_pred, engine.last_recomputed, layout, common, t,
                                        clock, known)
        else:
            group_positions = needed_positions(engine.base_info, n_pred, first_query=n_pred)
            data = predicted_state_bytes(layout, group_positions=group_positions, **common)
            t.predict_ms = clock.lap()
    engine.base.set_state(data, 0, n_past=n_pred)
    t.state_set_ms = clock.lap()
    engine.base.decode(tokens[n_pred:], start=n_pred, logits_last=True)
    logits = engine.base.last_logits()
    t.base_decode_ms = clock.lap()
    return logits
