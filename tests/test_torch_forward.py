"""The PyTorch forward (kvcli[train]) against llama.cpp on the same GGUF."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.engine.engine import Engine
from kvcli.llama.runtime import ContextSettings
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import layers_by_index

torch = pytest.importorskip("torch", reason="the PyTorch forward needs kvcli[train]")

from kvcli.train.torch_forward import TorchModel  # noqa: E402


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_llama", "tiny_qwen2"])
def test_forward_matches_llama_cpp(fixture, request):
    """On float32 weights llama.cpp multiplies in float32 too: logits and every layer's
    cache agree to float rounding and ggml's table GELU (on float16 inputs); for Gemma 3
    over a prompt longer than the sliding window, for Llama (normal RoPE) and Qwen 2 (QKV
    biases) as they are."""
    path = request.getfixturevalue(fixture)
    model = TorchModel(path)
    settings = ContextSettings(n_ctx=128, type_k="f32", type_v="f32")
    with Engine(path, settings=settings) as engine:
        tokens = random_prompt(70, engine.model.n_vocab, engine.model.bos, low=3)
        logits = engine.prefill(tokens, mode="base").logits
        cells = layers_by_index(parse_seq_state(engine.base.get_state(0)), engine.base_info)
    if fixture == "tiny_gemma3":
        assert model.info.n_swa and len(tokens) > 2 * model.info.n_swa
    with torch.no_grad():
        ours, caches = model.forward(tokens)
    scale = np.abs(logits).max()
    assert np.abs(ours[0].numpy() - logits).max() < 2e-3 * scale
    for il, (k, v) in enumerate(caches):
        rows = cells[il].positions  # a sliding layer keeps only its window
        np.testing.assert_allclose(k.reshape(len(tokens), -1).numpy()[rows], cells[il].k, atol=2e-3)
        np.testing.assert_allclose(v.reshape(len(tokens), -1).numpy()[rows], cells[il].v, atol=2e-3)


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_llama"])
def test_forward_over_a_past_cache_continues_the_full_forward(fixture, request):
    """The tail of a prompt run over the cache of its head (``past``, as kvp leaves it) gives
    the full forward's logits and cache rows; over a spoiled past cache it does not."""
    model = TorchModel(request.getfixturevalue(fixture))
    tokens = random_prompt(70, len(model.w["token_embd.weight"]), 1, low=3)
    with torch.no_grad():
        full, caches = model.forward(tokens, n_logits=6)
        past = {il: (k[:64], v[:64]) for il, (k, v) in enumerate(caches)}
        tail, tail_caches = model.forward(tokens[64:], n_logits=6, past=past)
        spoiled = {il: (k, -v) for il, (k, v) in past.items()}
        wrong, _ = model.forward(tokens[64:], n_logits=6, past=spoiled)
    torch.testing.assert_close(tail, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tail_caches[-1][1], caches[-1][1][64:], atol=1e-5, rtol=1e-5)
    assert (wrong - full).abs().max() > 1e-2 * full.abs().max()
