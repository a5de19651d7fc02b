"""Choosing recomputed spans: the query projection checked against llama.cpp's own, the
scoring and the choice in numpy."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.engine.span_choice import (
    SPAN_MIN,
    QueryProjector,
    question_scores,
    sentence_ends,
    sentence_spans,
)
from kvcli.errors import IncompatibleError
from kvcli.llama.capture import TensorCapture
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import read_model_info


@pytest.mark.parametrize("fixture,layer", [("tiny_gemma3", 3), ("tiny_llama", 2), ("tiny_qwen2", 2)])
def test_queries_match_llama_cpp(fixture, layer, request):
    """From layer k-2's output and layer k-1's attention output (what a k-layer prefix
    auxiliary captures), the numpy finish of layer k-1 and layer k's query projection give
    llama.cpp's ``Qcur-k`` (after the query norm and RoPE)."""
    path = request.getfixturevalue(fixture)
    info = read_model_info(path)
    names = [f"l_out-{layer - 2}", f"kqv_out-{layer - 1}", f"Qcur-{layer}"]
    model = Model(path)
    ctx = Context(model, ContextSettings(n_ctx=128), capture=TensorCapture(names))
    try:
        tokens = random_prompt(40, model.n_vocab, model.bos, low=3)
        ctx.decode(tokens)
        n_head, d = info.n_head[layer], info.head_dim_k
        # llama.cpp names several tensors "Qcur-k" (the projection, its reshape, the roped
        # query); one ubatch: the roped one is the last
        captured = ctx.capture._rows
        want = captured[names[2]][-1]
        into, attention = (np.concatenate(captured[n]) for n in names[:2])
        proj = QueryProjector.for_base(info, layer)
        rows = np.arange(1, len(tokens))
        got = proj.queries(proj.residual(into[rows], attention[rows]), rows)
        want = want.reshape(-1, n_head, d)[rows]
        assert np.abs(want).max() > 0.1
        # ggml computes GELU from an f16 table
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    finally:
        ctx.close()
        model.close()


def test_a_sliding_window_layer_cannot_choose(tiny_gemma3):
    with pytest.raises(IncompatibleError, match="sliding-window"):
        QueryProjector.for_base(read_model_info(tiny_gemma3), 2)


def test_question_scores_are_the_mean_over_heads_of_each_heads_best_query_row():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(3, 4, 8)).astype(np.float32), rng.normal(size=(50, 2 * 8)).astype(np.float32)
    got = question_scores(q, k)
    weights = np.zeros((4, 3, 50))
    for h in range(4):  # query head h reads KV head h // 2
        s = q[:, h] @ k.reshape(50, 2, 8)[:, h // 2].T / np.sqrt(8)
        w = np.exp(s - s.max(1, keepdims=True))
        weights[h] = w / w.sum(1, keepdims=True)
    np.testing.assert_allclose(got, weights.max(axis=1).mean(axis=0), rtol=1e-5)
    # one head's sharp look at a position counts a quarter of all four heads looking at it
    assert not np.allclose(got, weights.max(axis=(0, 1)))
    assert not np.allclose(got, weights.mean(axis=0).max(axis=0))  # the order matters


def _text(sentences: list[list[str]]) -> tuple[list[str], list[int]]:
    """Token texts of the sentences (each ends with "."), and each sentence's first index."""
    texts, starts = [], []
    for words in sentences:
        starts.append(len(texts))
        texts += [*words, "."]
    return texts, starts


def test_sentence_ends_see_stops_and_line_breaks_inside_tokens():
    assert sentence_ends(["The", " key", " is", " 42", ".", " Next", ":\n", "?", "!", " a;b"]).tolist() == [
        False, False, False, False, True, False, True, True, True, True,
    ]  # fmt: skip


def test_a_span_is_the_sentence_around_the_peak_whole_value_included():
    texts, starts = _text([["w"] * 20, ["The", " key", " is"] + ["7b", "6f"] * 15, ["w"] * 20])
    ends = sentence_ends(texts)
    scores = np.zeros(len(texts))
    scores[starts[1] + 1] = 1.0  # " key"
    ((a, b),) = sentence_spans(scores, 1, ends, lo=1, hi=len(texts))
    assert (a, b) == (starts[1], starts[2])  # from "The" through the value and its "."


def test_a_short_sentence_takes_the_one_before_and_spans_stay_apart_and_in_range():
    texts, starts = _text(
        [["w"] * 12, ["The", " key", " is", " 7"], ["Keep", " it"], ["7", " is", " the", " key"], ["w"] * 30]
    )
    ends = sentence_ends(texts)
    scores = np.zeros(len(texts))
    scores[starts[3] + 3] = 1.0  # the second statement's " key"
    scores[starts[4] + 10] = 0.5
    spans = sentence_spans(scores, 2, ends, lo=1, hi=len(texts) - 5)
    first = spans[0]
    assert first[0] <= starts[1] and first[1] == starts[4] and first[1] - first[0] >= SPAN_MIN
    assert len(spans) == 2 and first[1] <= spans[1][0] and spans[1][1] <= len(texts) - 5
    assert all(b - a <= 64 for a, b in spans)
    assert sentence_spans(np.zeros(len(texts)), 2, ends, lo=1, hi=len(texts)) == []
    # a sentence longer than the cap is cut at it
    long_texts, _ = _text([["w"] * 200])
    peak = np.eye(1, 201, 100)[0]
    ((a, b),) = sentence_spans(peak, 1, sentence_ends(long_texts), lo=1, hi=201, max_width=32)
    assert b - a == 32 and a <= 100 < b
    # ... and never into a position left out (another turn's cells, a sink)
    allowed = np.ones(201, dtype=bool)
    allowed[[95, 104]] = False
    ((a, b),) = sentence_spans(peak, 1, sentence_ends(long_texts), lo=1, hi=201, allowed=allowed)
    assert (a, b) == (96, 104)
