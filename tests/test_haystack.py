"""The prose haystacks and the look-alike families: the text ships with kvcli and is none of
its calibration or training text; the families are seeded, within the asked length, and
state the asked fact once among look-alikes."""

import re

import pytest

from kvcli.eval.haystack import (
    PARAGRAPH_CHARS,
    PROSE_SOURCES,
    noise,
    paragraphs_of,
    prose,
    prose_sentences,
    spread,
)
from kvcli.eval.lookalike import LOOKALIKE_TASKS, N_RECORDS, SHAPES
from kvcli.eval.tasks import make_examples
from kvcli.predict.corpus import stdlib_root


def tokenize(text):  # a stand-in: one token per 4 characters
    return list(range((len(text) + 3) // 4))


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def test_prose_ships_and_splits_into_sentences_and_paragraphs():
    for source in PROSE_SOURCES:
        sentences = prose_sentences(source)
        assert len(sentences) > 2000 and all(s.endswith((" ", "\n\n")) for s in sentences)
        assert sum(s.endswith("\n\n") for s in sentences) >= 6  # one a document at least
        paragraphs = paragraphs_of(sentences)
        assert len(paragraphs) > 100 and max(map(len, paragraphs)) < 3 * PARAGRAPH_CHARS


def test_prose_is_none_of_the_calibration_or_training_text():
    """No run of 8 words of the prose is in the standard library's sources, which calibrate
    the predictor (sources, docstrings and conversations made of them) and train it."""
    shingles = set()
    for source in PROSE_SOURCES:
        words = _words("".join(prose_sentences(source)))
        shingles |= {tuple(words[i : i + 8]) for i in range(0, len(words) - 8, 3)}
    assert len(shingles) > 40_000
    found = []
    for path in stdlib_root().rglob("*.py"):
        try:
            words = _words(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        found += [path.name for i in range(len(words) - 7) if tuple(words[i : i + 8]) in shingles]
    assert not found


def test_spread_puts_needles_at_their_depths_in_order():
    hay = noise()
    text = spread(hay, 10, ["<b>", "<a>"], [0.9, 0.2])
    assert text.index("<a>") < text.index("<b>") and text.count(hay.units(1)[0]) == 10


def test_a_prose_haystack_is_seeded():
    import random

    a, b = prose(random.Random(3)), prose(random.Random(3))
    assert a.name == b.name and a.units(50) == b.units(50) and len(set(a.units(50))) > 40


@pytest.mark.parametrize("task", sorted(LOOKALIKE_TASKS))
@pytest.mark.parametrize("n_tokens", [512, 2048])
def test_lookalike_families_are_seeded_and_within_the_length(task, n_tokens):
    a = make_examples(task, n=3, n_tokens=n_tokens, tokenize=tokenize, seed=5)
    assert a == make_examples(task, n=3, n_tokens=n_tokens, tokenize=tokenize, seed=5)
    assert a != make_examples(task, n=3, n_tokens=n_tokens, tokenize=tokenize, seed=6)
    for ex in a:
        assert n_tokens * 0.75 <= len(tokenize(ex.prompt)) <= n_tokens
        assert ex.prompt.count(ex.answer) >= 1 and "@" in ex.haystack


def _records_in(prompt):
    """(name, value, offset) of every record of any shape in ``prompt``."""
    found = []
    for record, _, _ in SHAPES:
        pattern = re.escape(record.strip()).replace(r"\{name\}", r"(?P<name>[A-Z][a-z]+ [A-Z][a-z]+)")
        pattern = pattern.replace(r"\{value\}", r"(?P<value>\d{4})")
        found += [(m["name"], m["value"], m.start()) for m in re.finditer(pattern, prompt)]
    return found


def test_records_state_the_asked_value_once_among_lookalikes():
    for task in ("records", "records_between"):
        for ex in make_examples(task, n=6, n_tokens=1024, tokenize=tokenize):
            records = _records_in(ex.prompt)
            assert len(records) == N_RECORDS and len({n for n, _, _ in records}) == N_RECORDS
            asked = re.search(r"Question: .*?([A-Z][a-z]+ [A-Z][a-z]+)", ex.prompt).group(1)
            (value, at), *_ = [(v, at) for n, v, at in records if n == asked]
            assert value == ex.answer and ex.prompt.count(ex.answer) == 1
            if task == "records_between":  # every look-alike lies between it and the question
                assert at == min(at for _, _, at in records)


def test_paragraphs_ask_one_of_four_voyages_alike():
    for ex in make_examples("paragraphs", n=4, n_tokens=1024, tokenize=tokenize):
        assert len(re.findall(r"made her first landfall at", ex.prompt)) == 5  # four and the answer's lead
        ship = re.search(r"Where did the (\w+) make", ex.prompt).group(1)
        assert re.search(rf"The {ship} left Nantucket.*?landfall at {ex.answer},", ex.prompt)
