"""Cutting an auxiliary from the base: prefix layers give the base's first layers exactly."""

import numpy as np
import pytest
from conftest import random_prompt

from kvcli.errors import KvcliError
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.aux_cut import cut_auxiliary, parse_layers
from kvcli.models.model_info import read_model_info
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import layers_by_index


def cache_layers(path, tokens):
    model = Model(path)
    ctx = Context(model, ContextSettings(n_ctx=256))
    ctx.decode(tokens)
    layers = layers_by_index(parse_seq_state(ctx.get_state(-1)), read_model_info(path))
    ctx.close(), model.close()
    return layers


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_prefix_aux_cache_equals_base_first_layers(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    aux = cut_auxiliary(base, tmp_path / "aux.gguf", [0, 1])
    info = read_model_info(aux)
    assert info.n_layer == 2 and info.tokenizer_digest == read_model_info(base).tokenizer_digest
    tokens = random_prompt(60, 300, 1, low=3)
    want, got = cache_layers(base, tokens), cache_layers(aux, tokens)
    for il in (0, 1):
        np.testing.assert_array_equal(got[il].k, want[il].k)
        np.testing.assert_array_equal(got[il].v, want[il].v)


def test_strided_cut_keeps_each_layer_attention_type(tiny_gemma3, tmp_path):
    base = read_model_info(tiny_gemma3)
    aux = read_model_info(cut_auxiliary(tiny_gemma3, tmp_path / "aux.gguf", [1, 3]))
    assert aux.is_swa == (base.is_swa[1], base.is_swa[3]) == (True, False)
    assert [r.freq_base for r in aux.rope] == [base.rope[1].freq_base, base.rope[3].freq_base]
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temp file left


def test_layer_specs():
    assert parse_layers("0-4", 18) == [0, 1, 2, 3, 4]
    assert parse_layers("0,4,8", 18) == [0, 4, 8]
    with pytest.raises(KvcliError, match="0..17"):
        parse_layers("0,18", 18)


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_llama"])
def test_prefix_view_info_is_the_cut_files_info(fixture, request, tmp_path):
    """A bundle's file-less prefix auxiliary is described from the base alone: exactly what
    reading its cut file gives, fingerprint included (the predictor is checked against it)."""
    from dataclasses import asdict

    from kvcli.models.model_info import prefix_view_info

    base = request.getfixturevalue(fixture)
    n_layer = read_model_info(base).n_layer
    for k in range(1, n_layer):
        cut = asdict(read_model_info(cut_auxiliary(base, tmp_path / f"p{k}.gguf", list(range(k)))))
        view = asdict(prefix_view_info(base, k))
        assert {f for f in cut if cut[f] != view[f]} == {"path", "file_size"}
    with pytest.raises(KvcliError, match=f"1..{n_layer - 1} layers"):
        prefix_view_info(base, n_layer)
