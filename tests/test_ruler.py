"""The RULER-style families: seeded, within the asked length, the asked values stated in the
prompt as the question needs them, and scored as their answers say."""

import collections
import re

import pytest

from kvcli.eval.prompts import contains_all
from kvcli.eval.ruler import RULER_TASKS
from kvcli.eval.tasks import make_examples


def tokenize(text):  # a stand-in: one token per 4 characters
    return list(range((len(text) + 3) // 4))


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
@pytest.mark.parametrize("n_tokens", [512, 2048])
def test_seeded_and_within_the_length(task, n_tokens):
    a = make_examples(task, n=3, n_tokens=n_tokens, tokenize=tokenize, seed=5)
    b = make_examples(task, n=3, n_tokens=n_tokens, tokenize=tokenize, seed=5)
    c = make_examples(task, n=3, n_tokens=n_tokens, tokenize=tokenize, seed=6)
    assert a == b and a != c
    for ex in a:
        assert n_tokens * 0.75 <= len(tokenize(ex.prompt)) <= n_tokens  # prose: whole sentences
        assert ex.answer is not None or ex.answers
        for value in ex.answers or (ex.answer,):
            assert value in ex.prompt


def test_uuid_is_stated_once_and_asked_by_its_key():
    for ex in make_examples("uuid", n=4, n_tokens=1024, tokenize=tokenize):
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", ex.answer)
        key = re.search(r"magic uuids for (\S+) is: " + ex.answer, ex.prompt).group(1)
        assert ex.prompt.count(ex.answer) == 1 and ex.prompt.rstrip().endswith(
            f"{key} mentioned in the provided text is"
        )


def test_multivalue_and_multiquery_ask_for_the_right_values():
    for ex in make_examples("multivalue", n=3, n_tokens=1024, tokenize=tokenize):
        key = re.search(r"numbers for (\S+) mentioned", ex.prompt).group(1)
        assert sorted(re.findall(rf"numbers for {key} is: (\d+)", ex.prompt)) == sorted(ex.answers)
    for ex in make_examples("multiquery", n=3, n_tokens=1024, tokenize=tokenize):
        a, b = re.search(r"numbers for (\S+) and (\S+) mentioned", ex.prompt).groups()
        stated = dict(re.findall(r"numbers for (\S+) is: (\d+)", ex.prompt))
        assert len(stated) == 4 and ex.answers == (stated[a], stated[b])


def test_vartrack_answers_are_exactly_the_chain_bound_to_the_asked_value():
    for ex in make_examples("vartrack", n=4, n_tokens=1024, tokenize=tokenize):
        value = re.search(r"assigned the value (\d+) in the text", ex.prompt).group(1)
        bound, changed = set(), True
        assignments = re.findall(r"VAR (\w+) = (\w+)", ex.prompt)
        while changed:
            changed = False
            for name, src in assignments:
                if name not in bound and (src == value or src in bound):
                    bound.add(name)
                    changed = True
        assert bound == set(ex.answers) and len(bound) == 5


def test_words_answer_is_the_three_most_frequent_in_order():
    for ex in make_examples("words", n=4, n_tokens=1024, tokenize=tokenize):
        body = ex.prompt.split("\n")[1]
        counts = collections.Counter(body.split())
        top = [w for w, _ in counts.most_common()]
        assert tuple(top[:3]) == ex.answers
        assert counts[top[2]] > counts[top[3]]  # unique: the third beats the fourth


def test_set_answers_need_every_value_as_a_whole_word():
    assert contains_all("They are: 1234567, 7654321.", ("7654321", "1234567"))
    assert not contains_all("They are: 1234567.", ("7654321", "1234567"))
    assert not contains_all("12345678", ("1234567",))


def test_the_same_prompts_in_every_process():
    """Seeded means across processes too: nothing may follow a set's order, which follows
    the process's string hashing (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = (
        "from kvcli.eval.tasks import make_examples\n"
        "from kvcli.eval.ruler import RULER_TASKS\n"
        "for t in sorted(RULER_TASKS):\n"
        "    ex = make_examples(t, n=2, n_tokens=600, tokenize=lambda s: list(range((len(s) + 3) // 4)))\n"
        "    print([(e.answers or e.answer, len(e.prompt)) for e in ex])\n"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1
