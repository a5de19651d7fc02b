"""The PyTorch forward of Gemma 3 (kvcli[train]) against llama.cpp on the same GGUF."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.engine import Engine
from kvcli.kv_layout import layers_by_index
from kvcli.runtime import ContextSettings
from kvcli.state_codec import parse_seq_state

torch = pytest.importorskip("torch", reason="the PyTorch forward needs kvcli[train]")

from kvcli.torch_forward import Gemma3  # noqa: E402


def test_gemma3_forward_matches_llama_cpp(tiny_gemma3):
    """On float32 weights llama.cpp multiplies in float32 too: logits and every layer's
    cache agree to float rounding and ggml's table GELU (on float16 inputs), over a prompt
    longer than the sliding window."""
    model = Gemma3(tiny_gemma3)
    settings = ContextSettings(n_ctx=128, type_k="f32", type_v="f32")
    with Engine(tiny_gemma3, settings=settings) as engine:
        tokens = random_prompt(70, engine.model.n_vocab, engine.model.bos, low=3)
        logits = engine.prefill(tokens, mode="base")[1]
        cells = layers_by_index(parse_seq_state(engine.base.get_state(0)), engine.base_info)
    assert model.info.n_swa and len(tokens) > 2 * model.info.n_swa
    with torch.no_grad():
        ours, caches = model.forward(tokens)
    scale = np.abs(logits).max()
    assert np.abs(ours[0].numpy() - logits).max() < 2e-3 * scale
    for il, (k, v) in enumerate(caches):
        rows = cells[il].positions  # a sliding layer keeps only its window
        np.testing.assert_allclose(k.reshape(len(tokens), -1).numpy()[rows], cells[il].k, atol=2e-3)
        np.testing.assert_allclose(v.reshape(len(tokens), -1).numpy()[rows], cells[il].v, atol=2e-3)
