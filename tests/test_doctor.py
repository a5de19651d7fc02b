"""kvcli doctor's checks on real llama.cpp: exact where nothing is predicted."""

import dataclasses

import pytest

from kvcli.eval.doctor import check_prompt, check_rope, run_doctor
from kvcli.llama.runtime import Context, ContextSettings, Model
from kvcli.models.model_info import read_model_info
from kvcli.state.rope import RopeParams


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3", "tiny_qwen2"])
def test_doctor_passes_on_tiny_models(fixture, request):
    results = run_doctor(request.getfixturevalue(fixture), n_prompts=5)
    assert [r.ok for r in results] == [True, True, True], results
    assert results[1].value == 0.0


def test_doctor_on_embedded_model_is_exact_over_20_prompts_past_the_window(gemma_path):
    results = run_doctor(gemma_path, n_prompts=20)
    assert all(r.ok for r in results), results
    assert "20 prompts of 600 tokens" in results[1].detail and results[1].value == 0.0


def test_rope_check_catches_a_wrong_frequency_base(tiny_gemma3):
    info = read_model_info(tiny_gemma3)
    swapped = tuple(dataclasses.replace(p, freq_base=1e6 if p.freq_base != 1e6 else 1e4) for p in info.rope)
    wrong = dataclasses.replace(info, rope=swapped)
    model = Model(tiny_gemma3)
    ctx = Context(model, ContextSettings(n_ctx=256))
    tokens = check_prompt(model, info, 100)
    assert check_rope(ctx, info, tokens).ok
    assert not check_rope(ctx, wrong, tokens).ok
    ctx.close(), model.close()


def test_rope_params_come_from_the_gguf(gemma_path):
    info = read_model_info(gemma_path)
    assert info.rope[5] == RopeParams(head_dim=256, n_rot=256, freq_base=1e6, neox=True)
    assert info.rope[0].freq_base == 10000.0  # sliding layers: llama.cpp's default
    assert [il for il in range(18) if not info.is_swa[il]] == [5, 11, 17]
