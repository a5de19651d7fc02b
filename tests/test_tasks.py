"""Evaluation task generators: deterministic, sized, the answer stated once and early."""

import pytest

from kvcli.eval.tasks import TASKS, is_correct, make_examples, normalize


def char_tokenize(text: str) -> list[int]:
    return [ord(c) for c in text][::4]  # ~4 characters a token, like a real tokenizer


@pytest.mark.parametrize("task", sorted(TASKS))
def test_examples_are_deterministic_and_fit_the_length(task):
    a = make_examples(task, n=3, n_tokens=600, tokenize=char_tokenize, seed=1)
    b = make_examples(task, n=3, n_tokens=600, tokenize=char_tokenize, seed=1)
    assert a == b
    assert a != make_examples(task, n=3, n_tokens=600, tokenize=char_tokenize, seed=2)
    for ex in a:
        assert 500 <= len(char_tokenize(ex.prompt)) <= 600


@pytest.mark.parametrize("task", ["passkey", "multikey", "document", "code"])
def test_answer_is_stated_in_the_first_half_and_not_in_the_question(task):
    for ex in make_examples(task, n=5, n_tokens=800, tokenize=char_tokenize):
        first = ex.prompt.find(ex.answer)
        assert 0 <= first < len(ex.prompt) // 2
        assert ex.answer not in ex.prompt[-120:]


def test_strict_scoring():
    assert is_correct(" 48213.\nQuestion", "48213")
    assert is_correct(" Lima and is 57 years old", "Lima")
    assert not is_correct(" 482130", "48213")
    assert not is_correct(" the 48213", "48213")
    assert not is_correct("", "48213")
    assert normalize("  Hello, World! ") == "hello world"


def test_source_asks_a_default_that_has_a_lookalike_in_the_window():
    from kvcli.eval.source import GUESSABLE, defaults_of, source_files

    files = dict(source_files())
    for ex in make_examples("source", n=6, n_tokens=1200, tokenize=char_tokenize, seed=3):
        body, question = ex.prompt.rsplit("\n\n# Check the default of `", 1)
        param, qualname = question.split("` defined above.")[0].split("` in `")
        assert question.endswith(f'assert inspect.signature({qualname}).parameters["{param}"].default ==')
        text = files[ex.haystack.split(" at ")[0]]
        begin = text.index(body)
        window = [
            d for d in defaults_of(text) if begin <= d.def_offset and d.value_offset < begin + len(body)
        ]
        asked = [d for d in window if (d.qualname, d.param) == (qualname, param)]
        assert [d.value for d in asked] == [ex.answer] and ex.answer not in GUESSABLE
        assert normalize(ex.answer)  # an empty default ("") could never be scored right
        # a look-alike: the same parameter with another default in another function
        assert any(d.param == param and d.value != ex.answer and d.qualname != qualname for d in window)
