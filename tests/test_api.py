"""The Python API (kvcli.load, kvcli.api) on the embedded Gemma 3 270M: prefix reuse that
answers as a fresh prefill would, stop strings, streaming, sampling, errors."""

import numpy as np
import pytest

import kvcli
from kvcli.api import LocalModel
from kvcli.engine.engine import Engine
from kvcli.engine.sampling import Sampler
from kvcli.errors import ContextError, KvcliError
from kvcli.llama.runtime import ContextSettings

DOC = " ".join(
    f"Record {i}: the courier from Lisbon delivered parcel {1000 + 7 * i} on day {i % 28 + 1}."
    for i in range(40)
)
SETTINGS = ContextSettings(n_ctx=1024)


@pytest.fixture(scope="module")
def base_model(gemma_path):
    with kvcli.load(model=gemma_path, ctx=1024) as llm:
        yield llm


def test_load_gives_a_base_model_that_chats(base_model):
    out = base_model.chat([{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert out.usage.prompt_tokens > 5 and 1 <= out.usage.completion_tokens <= 4
    assert out.timings.prefilled_by == "base" and out.timings.ttft_ms > 0
    assert out.finish_reason in ("stop", "length") and out.text


def test_a_follow_up_reuses_the_prefix_and_answers_as_a_fresh_prefill(base_model, gemma_path):
    first = [{"role": "user", "content": DOC + "\nWhich parcel came on day 3?"}]
    a = base_model.chat(first, max_tokens=8)
    follow = [*first, {"role": "assistant", "content": a.text}, {"role": "user", "content": "And on day 9?"}]
    b = base_model.chat(follow, max_tokens=8)
    tokens = base_model.chat_tokens(follow)
    # most of the prompt was kept; only the new turn (and what the template re-renders) prefilled
    assert b.timings.prompt_reused > 0.8 * len(tokens) and b.timings.prompt_new < 0.2 * len(tokens)
    assert b.timings.prompt_reused + b.timings.prompt_new == len(tokens) == b.usage.prompt_tokens
    with Engine(gemma_path, settings=SETTINGS) as fresh:
        prefill = fresh.prefill(tokens, mode="base")
        ctx, token, greedy = prefill.context, int(np.argmax(prefill.logits)), []
        while len(greedy) < 8 and not ctx.model.is_eog(token):
            greedy.append(token)
            ctx.decode([token], logits_last=True)
            token = int(np.argmax(ctx.last_logits()))
    assert b.tokens == greedy


def test_stop_strings_end_the_reply_before_them(base_model):
    out = base_model.generate("1, 2, 3, 4, 5, 6,", max_tokens=24)
    assert " 8," in out.text  # the model counts on
    stopped = base_model.generate("1, 2, 3, 4, 5, 6,", max_tokens=24, stop=[" 8", "never"])
    assert stopped.finish_reason == "stop" and " 8" not in stopped.text
    assert out.text.startswith(stopped.text) and len(stopped.text) < len(out.text)
    # a stop string that spans several tokens is held back until it cannot match, never sent
    stream = base_model.generate("1, 2, 3, 4, 5, 6,", max_tokens=24, stop=["7, 8"], stream=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.completion.text == out.text[: out.text.index("7, 8")]


def test_streamed_pieces_make_the_reply(base_model):
    stream = base_model.generate("The capital of France is", max_tokens=12, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.completion.text
    whole = base_model.generate("The capital of France is", max_tokens=12)
    assert whole.text == stream.completion.text and whole.timings.prompt_reused > 0


def test_a_stream_left_early_is_interrupted_and_the_next_call_still_answers(base_model):
    stream = base_model.generate("Once upon a time", max_tokens=40, stream=True)
    for _ in zip(range(2), stream):
        pass
    stream.close()
    assert stream.completion.finish_reason == "interrupted" and stream.completion.usage.completion_tokens < 40
    again = base_model.generate("Once upon a time", max_tokens=4)
    assert again.usage.completion_tokens >= 1


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    drawn = {Sampler(temperature=1.0, top_p=0.5, seed=s).sample(logits) for s in range(30)}
    assert drawn == {0}
    drawn = {Sampler(temperature=1.0, top_p=0.85, seed=s).sample(logits) for s in range(60)}
    assert drawn == {0, 1}


def test_bad_calls_say_what_is_wrong(base_model, gemma_path):
    with pytest.raises(ContextError, match="context holds 1024"):
        base_model.generate("word " * 1500)
    with pytest.raises(KvcliError, match="role"):
        base_model.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(KvcliError, match="non-empty"):
        base_model.chat([])
    with pytest.raises(KvcliError, match="max_tokens"):
        base_model.generate("hi", max_tokens=0)
    with pytest.raises(KvcliError, match="needs an auxiliary"):
        kvcli.load(model=gemma_path, mode="kvp")
    after = base_model.generate("The capital of France is", max_tokens=3)  # still usable
    assert after.usage.completion_tokens >= 1


def test_kvp_predicts_a_long_document_and_keeps_it_for_the_follow_up(gemma_bundle):
    with LocalModel(Engine.from_bundle(gemma_bundle, settings=SETTINGS, kvp_min_tokens=64)) as llm:
        first = [{"role": "user", "content": DOC + "\nWhich parcel came on day 3?"}]
        a = llm.chat(first, max_tokens=6)
        assert a.timings.prefilled_by == "kvp" and a.timings.prompt_predicted > 300
        follow = [*first, {"role": "assistant", "content": a.text}, {"role": "user", "content": "And day 9?"}]
        b = llm.chat(follow, max_tokens=6)
        # the short new turn is under the break-even: the base prefills it over the kept cells
        assert b.timings.prefilled_by == "base" and b.timings.prompt_reused > 300
