"""Facts about llama.cpp's sequence state that kvcli rests on, checked on real contexts."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.errors import StateFormatError
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import read_model_info
from kvcli.state.codec import parse_seq_state, write_seq_state
from kvcli.state.layout import layers_by_index


def decoded(path, n_tokens, **settings):
    model = Model(path)
    ctx = Context(model, ContextSettings(n_ctx=512, **settings))
    ctx.decode(random_prompt(n_tokens, model.n_vocab, model.bos, low=3))
    return model, ctx


@pytest.mark.parametrize("flash_attn,type_kv", [(False, "f16"), (True, "f16"), (False, "f32")])
def test_real_state_round_trips_byte_for_byte(tiny_llama, flash_attn, type_kv):
    model, ctx = decoded(tiny_llama, 40, flash_attn=flash_attn, type_k=type_kv, type_v=type_kv)
    raw = ctx.get_state(0)
    state = parse_seq_state(raw, n_blobs=1)
    assert write_seq_state(state) == raw
    stream = state.blobs[0].streams[0]
    assert stream.v_trans == (not flash_attn)  # flash attention stores V untransposed
    assert stream.layers[0].k.dtype == (np.float16 if type_kv == "f16" else np.float32)
    ctx.close(), model.close()


def test_iswa_state_has_two_blobs_with_different_cells(tiny_gemma3):
    info = read_model_info(tiny_gemma3)
    model, ctx = decoded(tiny_gemma3, 40)
    for seq_id, n_swa_cells in ((0, info.n_swa), (-1, 40)):
        raw = ctx.get_state(seq_id)
        state = parse_seq_state(raw, n_blobs=2)
        assert write_seq_state(state) == raw
        full, swa = (b.streams[0] for b in state.blobs)
        assert full.n_cells == 40 and swa.n_cells == n_swa_cells  # seq -1: every cell
        assert len(full.layers) + len(swa.layers) == info.n_layer
    layers = layers_by_index(parse_seq_state(ctx.get_state(-1)), info)
    assert sorted(layers) == list(range(info.n_layer))
    ctx.close(), model.close()


def test_quantized_key_cache_is_refused_with_its_name(tiny_llama):
    model, ctx = decoded(tiny_llama, 8, type_k="q8_0")
    with pytest.raises(StateFormatError, match="q8_0"):
        parse_seq_state(ctx.get_state(0))
    ctx.close(), model.close()


def test_set_state_refuses_a_mismatched_layout(tiny_llama):
    from kvcli.errors import ContextError

    model, ctx = decoded(tiny_llama, 8, flash_attn=True)  # v_trans 0
    raw = ctx.get_state(0)
    other = Context(model, ContextSettings(n_ctx=512, flash_attn=False))  # v_trans 1
    with pytest.raises(ContextError, match="refused"):
        other.set_state(raw)
    other.close(), ctx.close(), model.close()


def test_embedded_model_decodes_through_kvcli_loader(gemma_path):
    """The default source build segfaults here in AMX kernels unless the loader avoids them."""
    model = Model(gemma_path)
    ctx = Context(model, ContextSettings(n_ctx=1024))
    tokens = model.tokenize("Monday, Tuesday, Wednesday,")
    ctx.decode(tokens, logits_last=True)
    logits = ctx.last_logits()
    assert logits.shape == (model.n_vocab,) and np.isfinite(logits).all()
    assert model.detokenize([int(np.argmax(logits))]).strip() == "Thursday"
    ctx.close(), model.close()


def _positions_of_seq0(ctx, info) -> list[np.ndarray]:
    state = parse_seq_state(ctx.get_state(0))
    return [s.positions for b in state.blobs for s in b.streams]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3", "gemma_path"])
def test_recompute_in_place_and_append_keep_the_base_logits(fixture, request):
    """Ranges recomputed in place (scratch sequences sharing seq 0's cells) and cells
    appended through a scratch sequence leave seq 0 holding each position once, and the base
    then continues as if it had decoded the prompt in one go: exact cells in, exact out, up to
    the rounding that decoding the same prompt in other batches gives (llama.cpp's sums run
    in another order; measured here, and the in-place result held to twice it)."""
    path = request.getfixturevalue(fixture)
    info = read_model_info(path)
    model = Model(path)
    tokens = random_prompt(300, model.n_vocab, model.bos, low=3)
    n_pred = 280
    plain = Context(model, ContextSettings(n_ctx=512))
    plain.decode(tokens, logits_last=True)
    want = plain.last_logits()
    plain.clear()
    for a, b in ((0, 5), (5, 21), (21, 280), (280, 300)):  # the batches the recompute below makes
        plain.decode(tokens[a:b], start=a, logits_last=b == 300)
    rounding = np.abs(plain.last_logits() - want).max()

    ctx = Context(model, ContextSettings(n_ctx=512), scratch_seqs=3, scratch_cells=40)
    ctx.decode(tokens[:n_pred])
    ctx.recompute(tokens, [(5, 21), (50, 66), (200, 230)])  # 3 ranges: two batches of 2 + 1
    for positions in _positions_of_seq0(ctx, info):
        assert len(positions) == len(set(positions.tolist()))
    assert max(len(p) for p in _positions_of_seq0(ctx, info)) == n_pred
    ctx.decode(tokens[n_pred:], start=n_pred, logits_last=True)
    assert np.abs(ctx.last_logits() - want).max() <= 2 * rounding + 1e-4
    assert np.argmax(ctx.last_logits()) == np.argmax(want)

    plain.clear()
    plain.decode(tokens[:n_pred])
    state = parse_seq_state(plain.get_state(0))
    tail_cells = layers_by_index(state, info)
    later = [p[p >= 100] for p in (s.positions for b in state.blobs for s in b.streams)]
    from kvcli.state.layout import CacheLayout

    layout = CacheLayout.probe(state, info)
    keep = {il: (c.k[c.positions >= 100], c.v[c.positions >= 100]) for il, c in tail_cells.items()}
    ctx.clear()
    ctx.decode(tokens[:100])
    ctx.append_state(write_seq_state(layout.build_state(later, keep)), n_past=n_pred)
    ctx.decode(tokens[n_pred:], start=n_pred, logits_last=True)
    assert np.abs(ctx.last_logits() - want).max() <= 2 * rounding + 1e-4
    assert np.argmax(ctx.last_logits()) == np.argmax(want)
    for c in (ctx, plain):
        c.close()
    model.close()
