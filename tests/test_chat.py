"""kvcli chat: incremental prediction across turns on real llama.cpp contexts."""

import numpy as np
import pytest

from kvcli.bundles.build import build_bundle
from kvcli.engine.conversation import Conversation
from kvcli.engine.engine import Engine
from kvcli.engine.generation import generate
from kvcli.engine.prompt_cache import common_prefix, minus
from kvcli.errors import ContextError
from kvcli.llama.runtime import ContextSettings
from kvcli.predict.apply import PredictorInputs, needed_positions, predict_base_kv
from kvcli.state.codec import parse_seq_state, write_seq_state
from kvcli.state.layout import layers_by_index

TURNS = [
    "the cat and the dog sat on the mat in the sun and the cat ate the fish",
    "and then the man saw the cat on the mat and the dog in the sun",
    "is the cat on the mat or in the sun, and is the fish on the mat",
]


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gemma3, tmp_path_factory):
    return build_bundle(tiny_gemma3, tmp_path_factory.mktemp("chat") / "b", n_aux_layers=2, n_tokens=600)


def open_engine(bundle, n_ctx=1024):
    return Engine.from_bundle(bundle, settings=ContextSettings(n_ctx=n_ctx))


def cells(ctx, info):
    return layers_by_index(parse_seq_state(ctx.get_state(0)), info)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0


def test_three_incremental_turns_equal_prediction_from_scratch(tiny_bundle):
    with open_engine(tiny_bundle) as eng:
        info = eng.base_info
        conv = Conversation(eng, mode="kvp", n_predict=6)
        for text in TURNS[:2]:
            conv.send(text)
        before = cells(eng.base, info)
        tokens = conv._fit({"role": "user", "content": TURNS[2]})
        cached = conv._prefill(tokens)
        logits, n_new, n_predicted = cached.prefill.logits, cached.n_new, cached.n_predicted
        assert n_predicted == n_new - 1 > 10 and len(conv.predicted_spans) == 3
        after = cells(eng.base, info)
        p0, n_pred = conv.predicted_spans[-1]
        # what the base held before this turn (its replies, tails, earlier predictions) stays,
        # byte for byte; sliding layers may drop cells no later query can see
        for il, old in before.items():
            kept = old.positions[old.positions < p0]
            both = np.intersect1d(kept, after[il].positions)
            if not info.is_swa[il]:
                assert len(both) == len(kept) > 0
            a, o = np.searchsorted(after[il].positions, both), np.searchsorted(old.positions, both)
            np.testing.assert_array_equal(after[il].k[a], old.k[o])
            np.testing.assert_array_equal(after[il].v[a], old.v[o])

        # from scratch: the auxiliary prefills the whole conversation in one go
        aux = eng.aux
        aux.clear()
        aux.capture.clear()
        aux.decode(tokens[:n_pred])
        hidden = aux.capture.take(n_pred)
        aux_layers = layers_by_index(parse_seq_state(aux.get_state(-1)), eng.aux_state_info)
        positions = needed_positions(info, n_pred, first_query=n_pred)
        scratch = predict_base_kv(
            PredictorInputs(
                aux_layers,
                eng.aux_info,
                info,
                eng.predictor,
                first_cell=eng.first_cell(tokens[0]),
                key_norms=eng.key_norms,
                hidden=hidden,
            ),
            positions,
        )
        predicted = np.concatenate([np.arange(a, b) for a, b in conv.predicted_spans])
        group_of = {il: g for g, group in enumerate(info.cache_layer_groups) for il in group}
        compared = 0
        for il in eng.predictor.predicted_layers:
            pos = positions[group_of[il]]
            both = np.intersect1d(np.intersect1d(pos, predicted), after[il].positions)
            inc_rows = np.searchsorted(after[il].positions, both)
            scr_rows = np.searchsorted(pos, both)
            for inc, scr in ((after[il].k, scratch[il][0]), (after[il].v, scratch[il][1])):
                a, b = inc[inc_rows].astype(np.float32), scr[scr_rows]
                assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), il
            compared += len(both)
        assert compared > 50

        # the same first token from a base given the scratch prediction at those positions
        rebuilt = {}
        for il, c in after.items():
            c.k, c.v, c.positions = (
                c.k[c.positions < n_pred],
                c.v[c.positions < n_pred],
                c.positions[c.positions < n_pred],
            )  # the base decodes the tail again below
            k, v = c.k.astype(np.float32), c.v.astype(np.float32)
            if il in scratch:
                pos = positions[group_of[il]]
                both = np.intersect1d(np.intersect1d(pos, predicted), c.positions)
                k[np.searchsorted(c.positions, both)] = scratch[il][0][np.searchsorted(pos, both)]
                v[np.searchsorted(c.positions, both)] = scratch[il][1][np.searchsorted(pos, both)]
            rebuilt[il] = (k, v)
        layout = eng.base_layout()
        group_positions = [after[g[0]].positions for g in info.cache_layer_groups]
        eng.base.set_state(write_seq_state(layout.build_state(group_positions, rebuilt)), 0, n_past=n_pred)
        eng.base.decode(tokens[n_pred:], start=n_pred, logits_last=True)
        assert int(np.argmax(eng.base.last_logits())) == int(np.argmax(logits))


def test_base_mode_matches_a_plain_prefill_and_context_policy(tiny_bundle):
    with open_engine(tiny_bundle, n_ctx=256) as eng:
        conv = Conversation(eng, mode="base", n_predict=4)
        conv.send(TURNS[0])
        tokens = conv._fit({"role": "user", "content": TURNS[1]})
        cached = conv._prefill(tokens)
        logits, n_new, n_predicted = cached.prefill.logits, cached.n_new, cached.n_predicted
        assert n_predicted == 0 and n_new < len(tokens)
        with Engine(tiny_bundle.base, settings=ContextSettings(n_ctx=256)) as plain:
            plain.base.decode(conv.base_tokens[: len(tokens)], logits_last=True)
            assert int(np.argmax(plain.base.last_logits())) == int(np.argmax(logits))
        conv.reset()
        long_text = " ".join(TURNS) * 3
        with pytest.raises(ContextError, match="--drop-old"):
            conv.send(long_text)
        assert conv.messages == []
        conv.drop_old = True
        conv.send(TURNS[0])
        conv.send(TURNS[1])
        conv.send(" ".join(TURNS))  # does not fit beside the earlier turns: they are dropped
        assert conv.messages[0]["content"] != TURNS[0]


def test_an_interrupted_prefill_leaves_a_usable_conversation(tiny_bundle):
    """Ctrl-C while the auxiliary or the base decodes a turn: the turn is dropped, and the
    next turn gives what it gives in a conversation that never saw the interrupted one."""
    with open_engine(tiny_bundle) as eng, open_engine(tiny_bundle) as clean_eng:
        conv, clean = Conversation(eng, n_predict=4), Conversation(clean_eng, n_predict=4)
        for c in (conv, clean):
            c.send(TURNS[0])
        for ctx in (eng.aux, eng.base):
            real = ctx.decode
            calls = []

            def interrupt_once(tokens, real=real, calls=calls, **kw):
                if not calls:
                    calls.append(1)
                    real(tokens[: len(tokens) // 2], **{k: v for k, v in kw.items() if k == "start"})
                    raise KeyboardInterrupt
                return real(tokens, **kw)

            ctx.decode = interrupt_once
            with pytest.raises(KeyboardInterrupt):
                conv.send(TURNS[1])
            ctx.decode = real
            assert [m["content"] for m in conv.messages] == [m["content"] for m in clean.messages]
        reply, _ = conv.send(TURNS[2])
        want, _ = clean.send(TURNS[2])
        assert reply == want


def test_a_chat_turn_is_prefilled_as_generate_prefills_it(gemma_bundle):
    """One prefill path: chat's first turn and ``generate`` on the same rendered prompt, with
    the same (default) kvp settings, recompute the same spans and give the same first token."""
    import random

    from kvcli.eval.tasks import document

    with Engine.from_bundle(gemma_bundle, settings=ContextSettings(n_ctx=2048)) as eng:
        settings = eng.kvp_settings()
        assert settings.spans > 0
        example = document(random.Random(3), 700, eng.tokenize)
        conv = Conversation(eng, n_predict=1)
        tokens = conv.tokens_for([{"role": "user", "content": example.prompt}])
        gen = generate(eng, tokens, mode="kvp", n_predict=1, kvp=settings)
        assert gen.recomputed
        conv.send(example.prompt)
        assert list(conv.history[-1].recomputed) == gen.recomputed
        assert conv.history[-1].n_predicted < len(tokens) - settings.tail - 1
        assert conv.messages[-1]["content"] == gen.text
        assert conv.predicted_spans == minus([(1, len(tokens) - 1 - settings.tail)], gen.recomputed)


def test_a_question_in_a_later_turn_recomputes_spans_of_an_earlier_one(tiny_llama, tmp_path):
    """Spans chosen from the tail look among every position still predicted: a short
    question after a long pasted turn (nothing new to predict) recomputes spans of that turn,
    which are then no longer predicted."""
    from test_engine import copy_everything_predictor

    from kvcli.models.aux_cut import cut_auxiliary
    from kvcli.models.model_info import read_model_info

    n_layer = read_model_info(tiny_llama).n_layer
    aux = cut_auxiliary(tiny_llama, tmp_path / "aux.gguf", list(range(n_layer)))
    with Engine(
        tiny_llama, aux_path=aux, settings=ContextSettings(n_ctx=1024), tail_focus_layers=[n_layer - 1]
    ) as eng:
        eng.predictor = copy_everything_predictor(tiny_llama, aux)
        conv = Conversation(eng, tail=24, spans=2, n_predict=2)
        conv.send(" ".join(TURNS) * 4)
        first = list(conv.predicted_spans)
        assert first and conv.history[-1].recomputed
        conv.send("cat?")
        recomputed = conv.history[-1].recomputed
        assert conv.history[-1].n_predicted == 0
        assert len(recomputed) == 2
        for a, b in recomputed:
            assert any(x <= a and b <= y for x, y in first)
        assert conv.predicted_spans == minus(first, recomputed)
