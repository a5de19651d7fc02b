"""Token selection (mode select): the positions kept, a gapped decode at the tokens' own
positions on real llama.cpp, and the mode end to end on the embedded model."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.engine.engine import Engine
from kvcli.engine.token_select import CHUNK, SELECT_TAIL, kept_positions, selection_rankings
from kvcli.errors import ContextError, IncompatibleError
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import read_model_info
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import layers_by_index


def test_kept_positions_are_bos_the_best_chunks_and_the_tail():
    n, tail = 100, 10
    scores = np.zeros(n - tail)
    scores[42] = 5.0  # chunk [41, 49)
    scores[75] = 3.0  # chunk [73, 81)
    kept = kept_positions(scores, n, keep=1 + tail + 12, tail=tail, chunk=8)
    assert len(kept) == 23 and kept[0] == 0 and np.all(np.diff(kept) > 0)
    assert set(range(41, 49)) <= set(kept) and set(range(73, 77)) <= set(kept)  # the second cut
    assert set(range(90, 100)) <= set(kept) and 77 not in kept
    assert list(kept_positions(scores, n, keep=n, tail=tail)) == list(range(n))
    assert list(kept_positions(scores, n, keep=1 + tail, tail=tail)) == [0, *range(90, 100)]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_decode_at_keeps_each_token_at_its_own_position(fixture, request):
    """Layer 0's keys depend on a token and its position alone: after a gapped decode they
    are the full prefill's at the kept positions (RoPE at the tokens' own positions), and
    the cache holds those positions only."""
    path = request.getfixturevalue(fixture)
    info = read_model_info(path)
    model = Model(path)
    ctx = Context(model, ContextSettings(n_ctx=256), scratch_seqs=1, scratch_cells=16)
    try:
        assert ctx.gapped_positions_supported()  # kvcli's build (patches/0002)
        with pytest.raises(ContextError, match="increase"):
            ctx.decode_at([model.bos, model.bos], [3, 3])
        tokens = random_prompt(120, model.n_vocab, model.bos, low=10)
        ctx.decode(tokens, logits_last=True)
        full = layers_by_index(parse_seq_state(ctx.get_state(0)), info)[0]
        kept = np.array([0, 1, 2, *range(30, 50), *range(100, 120)])
        ctx.clear()
        ctx.decode_at([tokens[p] for p in kept], kept, logits_last=True)
        gapped = layers_by_index(parse_seq_state(ctx.get_state(0)), info)[0]
        # a sliding-window layer holds only its window's cells, of the full prefill as of this
        want = np.intersect1d(kept, full.positions) if info.n_swa else kept
        assert ctx.n_past == 120 and sorted(gapped.positions) == list(want) and len(want) >= 16
        at = {int(p): i for i, p in enumerate(full.positions)}
        order = np.argsort(gapped.positions)
        np.testing.assert_allclose(
            gapped.k[order].astype(np.float32),
            full.k[[at[int(p)] for p in want]].astype(np.float32),
            atol=2e-3,
        )
        ctx.decode([tokens[5]], logits_last=True)  # decoding goes on after the last position
        assert ctx.n_past == 121
    finally:
        ctx.close()
        model.close()


def test_select_on_the_embedded_model(gemma_bundle):
    with Engine.from_bundle(gemma_bundle, settings=ContextSettings(n_ctx=1024)) as eng:
        assert selection_rankings(eng) == ["keys"]  # Gemma's prefix is sliding-window only
        tokens = eng.tokenize("The pass key is 71432. " + "The grass is green. " * 120 + "The pass key is")
        keep = 1 + SELECT_TAIL + 4 * CHUNK
        result = eng.prefill(tokens, mode="select", keep=keep)
        kept = result.selected
        assert (
            len(kept) == keep
            and kept[0] == 0
            and list(kept[-SELECT_TAIL:]) == list(range(len(tokens) - SELECT_TAIL, len(tokens)))
        )
        assert result.timings.aux_prefill_ms > 0 and eng.base.n_past == len(tokens)
        key = eng.tokenize("The pass key is 71432.")[1:]
        at = next(i for i in range(len(tokens)) if tokens[i : i + len(key)] == key)
        # the ranking found the key: by the question's 32 rows (mostly filler here) the key's
        # digits rank among the best positions, though its chunk of 8 no longer ranks whole
        assert set(range(at + 4, at + len(key) - 1)) & set(kept)
        base_logits = eng.prefill(tokens, mode="base").logits
        all_kept = eng.prefill(tokens, mode="select", keep=len(tokens)).logits
        np.testing.assert_array_equal(all_kept, base_logits)  # keeping all is the base's prefill
        with pytest.raises(IncompatibleError, match="attention"):
            eng.prefill(tokens, mode="select", keep=keep, select_by="attention")


def test_bench_matches_selection_to_kvps_ttft(gemma_bundle):
    from kvcli.eval.ttft import bench_length, summarize

    with Engine.from_bundle(gemma_bundle, settings=ContextSettings(n_ctx=600)) as eng:
        runs, _ = bench_length(eng, 512, modes=["base", "kvp", "select"], kvp=[(24, 1)], repeats=1, warmup=1)
        rows = {r["mode"]: r for r in summarize(512, runs)}
    select = rows["select"]  # timed and scored beside the others (its speed: bench-ttft itself)
    assert select["repeats"] == 1 and select["ttft_ms_mean"] > 0 and select["kl_mean"] > 0
    assert select["first_token_agreement"] is not None and select["keep"] >= 1 + SELECT_TAIL + CHUNK
