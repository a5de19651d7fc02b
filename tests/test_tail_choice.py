"""kvcli.engine.tail_choice: spans where the tail's attention peaks, on real llama.cpp attention."""

import numpy as np
import pytest
from conftest import random_prompt
from test_engine import SETTINGS, copy_everything_predictor, split_reference

from kvcli.engine.engine import Engine
from kvcli.engine.generation import generate
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.recompute import DEFAULT_SPANS_TAIL
from kvcli.engine.span_choice import SINK_POSITIONS, SPAN_MAX
from kvcli.engine.tail_choice import (
    RECENT_POSITIONS,
    combined_scores,
    position_scores,
)
from kvcli.errors import IncompatibleError
from kvcli.eval.span_layers import best_layers, needle_prompts
from kvcli.models.aux_cut import cut_auxiliary
from kvcli.models.model_info import read_model_info


def test_position_scores_read_heads_then_queries_and_leave_out_sinks_and_recent():
    n_head, n_query, n_kv, n_pred = 3, 2, 128, 100
    rows = np.zeros((n_head * 5, n_kv), np.float32)  # 5 query rows per head; the last 2 count
    rows[1 * 5 + 4, 40] = 0.9  # head 1, the last query row
    rows[2 * 5 + 0, 60] = 0.99  # head 2, an earlier query row: not the tail's
    rows[0 * 5 + 3, 3] = 1.0  # a sink
    rows[0 * 5 + 3, n_pred - 2] = 1.0  # just before the tail
    rows[0 * 5 + 3, n_pred + 5] = 1.0  # past n_pred
    scores = position_scores(rows, n_head, n_query, n_pred)
    assert scores.shape == (n_pred,) and int(np.argmax(scores)) == 40 and scores[60] == 0
    assert not scores[:SINK_POSITIONS].any() and not scores[n_pred - RECENT_POSITIONS :].any()


def test_best_layers_count_hits_then_margins_and_never_take_a_layer_that_missed():
    hits = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0]])
    margins = np.array([[0.5, 0.9, 0.1], [0.1, 0.9, 0.2], [0.5, 0.9, 0.0]])
    assert best_layers(hits, margins, n=3) == [0, 2]  # 2 hits each; 0 has the larger margin


def test_combined_scores_weigh_each_layers_peak_alike():
    sharp, flat = np.array([0.0, 0.9, 0.0]), np.array([0.0, 0.0, 0.05])
    assert int(np.argmax(sharp + flat + flat)) == 1  # raw weights: the sharp layer decides
    assert int(np.argmax(combined_scores({3: sharp, 7: flat, 9: flat}))) == 2  # two layers of three


def test_needle_prompts_state_the_value_once_before_the_question(tiny_llama):
    from kvcli.llama.runtime import Model

    model = Model(tiny_llama)
    try:
        prompts = needle_prompts(lambda s: model.tokenize(s, add_special=False), n=3, n_tokens=300)
    finally:
        model.close()
    for prompt, value in prompts:
        assert prompt.count(value) == 1 and prompt.index(value) < prompt.index("Question:")


def test_spans_from_the_tail_over_the_true_cache_are_exact(tiny_llama, tmp_path, monkeypatch):
    """Every layer copied (the true cache) and spans chosen by a layer's attention from the
    tail: the base's own logits (to the rounding of other batch shapes), spans away from
    the sinks and the last positions."""
    n_layer = read_model_info(tiny_llama).n_layer
    aux = cut_auxiliary(tiny_llama, tmp_path / "aux.gguf", list(range(n_layer)))
    with Engine(tiny_llama, aux_path=aux, settings=SETTINGS, tail_focus_layers=[n_layer - 1]) as eng:
        eng.predictor = copy_everything_predictor(tiny_llama, aux)
        eng.base_layout()
        assert eng.spans_supported and eng.kvp_settings() == KvpSettings(tail=DEFAULT_SPANS_TAIL, spans=2)
        tokens = random_prompt(150, eng.model.n_vocab, eng.model.bos, low=3)
        gen = generate(eng, tokens, mode="kvp", kvp=KvpSettings(tail=10, spans=2), n_predict=1)
        n_pred = len(tokens) - 11
        assert 1 <= len(gen.recomputed) <= 2 and gen.timings.recompute_ms > 0  # adjacent ones joined
        for a, b in gen.recomputed:  # sentences around peaks away from the sinks and the tail's end
            assert 1 <= a < b <= n_pred and b - a <= 2 * SPAN_MAX and b > SINK_POSITIONS
        want = split_reference(eng.base, tokens, n_pred)
        np.testing.assert_allclose(gen.first_logits, want, rtol=0, atol=1e-4)


def test_tail_focus_is_refused_on_sliding_window_models(tiny_gemma3):
    with pytest.raises(IncompatibleError, match="sliding-window"):
        Engine(tiny_gemma3, settings=SETTINGS, tail_focus_layers=[1])


def test_sink_positions_are_the_massive_residuals_after_the_first():
    from types import SimpleNamespace

    from kvcli.engine.recompute import MAX_SINKS, SINK_RATIO, residual_sinks, sink_positions
    from kvcli.keys import FEATURE_AUX_RESIDUAL

    rng = np.random.default_rng(0)
    residual = rng.normal(size=(300, 64)).astype(np.float32)
    residual[0] *= 200  # position 0: the first cell, exact anyway
    residual[[3, 9]] *= 30  # a chat template's first newlines, as on Qwen2.5
    residual[40] *= SINK_RATIO * 0.8  # large, not massive
    assert sink_positions(residual) == [0, 3, 9]
    predictor = SimpleNamespace(hidden_kinds=[FEATURE_AUX_RESIDUAL])
    assert residual_sinks(predictor, [residual]) == [3, 9]  # position 0: the exact first cell
    assert residual_sinks(predictor, [residual], first=50) == [50, 53, 59]  # a chat turn's rows
    residual[100 : 100 + 2 * MAX_SINKS] *= 30
    assert len(sink_positions(residual)) == MAX_SINKS


def test_merge_ranges_joins_overlapping_and_touching():
    from kvcli.engine.recompute import merge_ranges

    assert merge_ranges([(10, 26), (40, 56)], [(3, 4), (25, 27), (56, 57)]) == [(3, 4), (10, 27), (40, 57)]
    assert merge_ranges([], []) == []
    assert merge_ranges([(2, 3), (8, 9), (13, 14), (40, 41)], gap=16) == [(2, 14), (40, 41)]


def test_sink_ranges_join_the_sinks_and_the_opening():
    from types import SimpleNamespace

    from kvcli.engine.recompute import SINK_GAP, sink_ranges
    from kvcli.keys import FEATURE_AUX_RESIDUAL

    rng = np.random.default_rng(1)
    residual = rng.normal(size=(300, 64)).astype(np.float32)
    residual[[3, 9, 32 + SINK_GAP - 1, 120]] *= 30
    predictor = SimpleNamespace(hidden_kinds=[FEATURE_AUX_RESIDUAL])
    assert sink_ranges(predictor, [residual], 300) == [(3, 10), (47, 48), (120, 121)]
    # the opening joins the sinks within SINK_GAP of it
    assert sink_ranges(predictor, [residual], 300, opening=32) == [(1, 48), (120, 121)]
    assert sink_ranges(predictor, [residual], 20, opening=32) == [(1, 20)]  # predicted positions only
    assert sink_ranges(predictor, [residual], 300, lo=20, opening=32) == [(20, 48), (120, 121)]
    # a later chat turn (rows from position 200): its opening is the conversation's, already there
    assert sink_ranges(predictor, [residual[:100]], 300, first=200, lo=200, opening=32) == [
        (203, 210),
        (247, 248),
    ]
    residual[32 + SINK_GAP - 1] /= 30
    residual[32 + SINK_GAP + 1] *= 30  # further than SINK_GAP past the opening's end: apart
    assert sink_ranges(predictor, [residual], 300, opening=32) == [(1, 32), (49, 50), (120, 121)]


def test_a_prefix_auxiliary_scores_the_tail_as_the_base_would(tiny_llama, tmp_path, monkeypatch):
    """Tail-focus layers inside a prefix auxiliary: its own decode of the tail gives the
    spans the base's pass over the predicted cache gives (those layers' cells are the
    auxiliary's own), one decode of the base fewer."""
    from kvcli.bundles.build import build_bundle

    # the spans alone (the opening would join the first of them on this short prompt)
    monkeypatch.setattr("kvcli.engine.kvp_prefill.OPENING", 0)
    bundle = build_bundle(tiny_llama, tmp_path / "b", n_aux_layers=2, n_tokens=600)
    tokens = None
    chosen = {}
    for via_aux in (True, False):
        with Engine.from_bundle(bundle, settings=SETTINGS, tail_focus_layers=[1, 0]) as eng:
            assert eng.aux_focus_layers == [1, 0]
            if via_aux:
                eng.spans.from_tail = lambda *a, **k: pytest.fail("the base's pass ran")
            else:
                eng.aux_focus_layers = []
            tokens = tokens or random_prompt(150, eng.model.n_vocab, eng.model.bos, low=3)
            chosen[via_aux] = eng.prefill(tokens, mode="kvp", kvp=KvpSettings(tail=10, spans=2)).recomputed
    assert chosen[True] == chosen[False] and len(chosen[True]) >= 2, chosen
