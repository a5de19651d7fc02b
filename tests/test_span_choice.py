"""Choosing recomputed spans: the query projection checked against llama.cpp's own, the
scoring and the choice in numpy."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.engine.span_choice import QueryProjector, attention_peaks, choose_spans
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


def test_attention_peaks_is_the_largest_weight_any_head_gives():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(3, 4, 8)).astype(np.float32), rng.normal(size=(50, 2 * 8)).astype(np.float32)
    got = attention_peaks(q, k)
    want = np.zeros(50)
    for h in range(4):
        s = q[:, h] @ k.reshape(50, 2, 8)[:, h // 2].T / np.sqrt(8)
        w = np.exp(s - s.max(1, keepdims=True))
        want = np.maximum(want, (w / w.sum(1, keepdims=True)).max(0))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_choose_spans_takes_the_best_disjoint_windows_in_order():
    scores = np.zeros(200)
    scores[150:155] = 1.0
    scores[40:42] = 3.0
    scores[0] = 100.0  # outside [lo, hi): never chosen
    spans = choose_spans(scores, 2, 10, lo=1, hi=190)
    assert len(spans) == 2 and spans[0][0] <= 40 and spans[0][1] >= 42
    assert spans[1][0] <= 150 and spans[1][1] >= 155 and spans[0][1] <= spans[1][0]
    assert all(1 <= a < b <= 190 and b - a == 10 for a, b in spans)
    assert choose_spans(scores, 3, 10, lo=1, hi=5) == [(1, 5)]
    assert choose_spans(scores, 0, 10, lo=1, hi=190) == []
