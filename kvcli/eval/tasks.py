"""Evaluation tasks where early prompt content decides the answer, generated from a seed.

Each task makes prompts of a requested token length (filler is added until the prompt
reaches it) with one expected answer, stated once, early; the question comes last. No
network, no data files: everything is generated, except ``continuation``, which takes text
from the held-out part of the offline corpus (never used for calibration).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from kvcli.errors import KvcliError
from kvcli.eval.lookalike import LOOKALIKE_TASKS
from kvcli.eval.prompts import FILLER, Example, Tokenize, fit_prompt, is_correct, normalize  # noqa: F401
from kvcli.eval.ruler import RULER_TASKS
from kvcli.eval.source import SOURCE_TASKS
from kvcli.predict.corpus import corpus_texts, docstring_texts

NAMES = [
    "Alice",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Esther",
    "Farid",
    "Greta",
    "Hiroshi",
    "Ingrid",
    "Jonas",
    "Kemal",
    "Lucia",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Stefan",
    "Tamar",
    "Ulrich",
    "Vera",
    "Walter",
    "Ximena",
    "Yusuf",
    "Zofia",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Kyoto",
    "Dublin",
    "Quito",
    "Hanoi",
    "Perth",
    "Tunis",
    "Riga",
    "Porto",
    "Bergen",
    "Dakar",
    "Cusco",
    "Lyon",
    "Turin",
    "Graz",
]
THINGS = ["lamp", "violin", "bicycle", "kettle", "compass", "notebook", "umbrella", "telescope"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "black"]


def _code(rng: random.Random) -> str:
    return str(rng.randint(1000, 9999))


def passkey(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.05, 0.3)
    head = "There is an important pass key hidden in a lot of irrelevant text. Find it and remember it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nQuestion: What is the pass key? Answer: The pass key is"

    def build(k: int) -> str:
        before = int(k * depth)
        return head + FILLER * before + needle + FILLER * (k - before) + tail

    return Example("passkey", fit_prompt(build, n_tokens, tokenize), key, haystack="noise")


def multikey(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    people = rng.sample(NAMES, 4)
    codes = [_code(rng) for _ in people]
    asked = rng.randrange(len(people))
    facts = [f" The secret code of {p} is {c}. " for p, c in zip(people, codes)]
    depths = sorted(rng.uniform(0.0, 0.4) for _ in facts)
    head = "Read the text and remember the secret codes of the people in it.\n"
    who = people[asked]
    tail = f"\nQuestion: What is the secret code of {who}? Answer: The secret code of {who} is"

    def build(k: int) -> str:
        parts, at = [head], 0
        for fact, d in zip(facts, depths):
            upto = int(k * d)
            parts.append(FILLER * (upto - at) + fact)
            at = upto
        return "".join(parts) + FILLER * (k - at) + tail

    return Example("multikey", fit_prompt(build, n_tokens, tokenize), codes[asked], haystack="noise")


def document(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    # 4 residents, one fact each: with 6 and their ages the base scored 2-5/10 at 1024 tokens
    people = rng.sample(NAMES, 4)
    cities = rng.sample(CITIES, 4)
    register = " ".join(f"{p} lives in {c}." for p, c in zip(people, cities))
    head = f"The village register.\n{register}\n\nStories of the market:\n"
    asked = rng.randrange(len(people))

    def story(i: int) -> str:
        r = random.Random(i)
        return (
            f"Someone found a {r.choice(COLORS)} {r.choice(THINGS)} near the market and gave it to a friend. "
        )

    tail = f"\n\nQuestion: Where does {people[asked]} live? Answer: {people[asked]} lives in"

    def build(k: int) -> str:
        return head + "".join(story(i) for i in range(k)) + tail

    return Example("document", fit_prompt(build, n_tokens, tokenize), cities[asked])


def code(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    value = str(rng.randint(10000, 99999))
    prefix = rng.choice(["MAX", "BASE", "DEFAULT", "SERVICE"])
    name = f"{prefix}_{rng.choice(['PORT', 'LIMIT', 'TIMEOUT', 'SIZE'])}"
    head = f'"""Service settings."""\n\n{name} = {value}\n\n'

    def func(i: int) -> str:
        return (
            f"def helper_{i}(items):\n    total = 0\n    for item in items:\n"
            f"        total += item * {i % 7 + 1}\n    return total\n\n\n"
        )

    tail = f"def test_settings():\n    assert {name} =="

    def build(k: int) -> str:
        return head + "".join(func(i) for i in range(k)) + tail

    return Example("code", fit_prompt(build, n_tokens, tokenize), value)


_HELDOUT: dict[str, list[str]] = {}  # a cache of the held-out texts, per kind


def _excerpt(
    task: str, texts: list[str], rng: random.Random, n_tokens: int, tokenize: Tokenize, source: str
) -> Example:
    """About ``n_tokens`` tokens of one of ``texts`` from a random start, scored by KL only."""
    text = rng.choice(texts)
    tokens_per_char = len(tokenize(text[:4000])) / max(1, len(text[:4000]))
    chars = int(n_tokens / max(tokens_per_char, 1e-3))
    start = rng.randrange(0, max(1, len(text) - chars))
    prompt = fit_prompt(lambda k: text[start : start + k * 16], n_tokens, tokenize)
    return Example(task, prompt, None, haystack=source)


def continuation(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """Held-out Python source: code."""
    texts = _HELDOUT.setdefault("code", [t for _, t in corpus_texts("heldout")])
    return _excerpt("continuation", texts, rng, n_tokens, tokenize, "held-out stdlib sources")


def prose(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """Held-out docstrings: English prose about programs."""
    texts = _HELDOUT.setdefault("prose", [t for _, t in docstring_texts("heldout")])
    return _excerpt("prose", texts, rng, n_tokens, tokenize, "held-out stdlib docstrings")


TASKS: dict[str, Callable[[random.Random, int, Tokenize], Example]] = {
    "passkey": passkey,
    "multikey": multikey,
    "document": document,
    "code": code,
    "continuation": continuation,
    "prose": prose,
    **RULER_TASKS,
    **LOOKALIKE_TASKS,
    **SOURCE_TASKS,
}


DEFAULT_TASKS = list(TASKS)  # kvcli eval's families without --tasks


def make_examples(task: str, *, n: int, n_tokens: int, tokenize: Tokenize, seed: int = 0) -> list[Example]:
    """``n`` examples of ``task`` of at most ``n_tokens`` tokens each, the same for a seed."""
    if task not in TASKS:
        raise KvcliError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    rng = random.Random(f"{task}:{seed}:{n_tokens}")
    return [TASKS[task](rng, n_tokens, tokenize) for _ in range(n)]
