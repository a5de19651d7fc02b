"""Families where the fact asked for has look-alikes: several records of one shape (a name
and a value) spread through real prose, one asked for by name (``records``), the same with
every look-alike between the asked record and the question (``records_between``), and a
question over several documents where one holds the answer among others like it
(``paragraphs``, in the manner of RULER's QA). The wording of the records is drawn per
example from several shapes, so no one phrasing is what a method gets right.
"""

from __future__ import annotations

import random

from kvcli.eval.haystack import paragraphs_of, prose, spread
from kvcli.eval.prompts import Example, Tokenize, fit_prompt
from kvcli.eval.ruler import MEDIUM_ANSWER

PEOPLE = [
    "Agnes Thornbury",
    "Bastian Kovac",
    "Celia Marchetti",
    "Dorian Okafor",
    "Edith Lindqvist",
    "Felix Aranda",
    "Gemma Holloway",
    "Hugo Brandt",
    "Imke Varga",
    "Jasper Quill",
    "Klara Novotna",
    "Leon Duarte",
    "Mira Castellan",
    "Nils Ekberg",
    "Odile Ferrand",
    "Pavel Sokol",
]
# (record, question, answer prefix): one shape per example, every record in it alike
SHAPES = [
    (
        "The locker of {name} is number {value}. ",
        "What is the number of {name}'s locker?",
        "{name}'s locker is number",
    ),
    (
        "{name} was given the room {value} at the inn. ",
        "Which room was {name} given at the inn?",
        "{name} was given the room",
    ),
    (
        "The ticket {name} bought reads {value}. ",
        "What does the ticket {name} bought read?",
        "The ticket {name} bought reads",
    ),
    (
        "{name} keeps the spare key in box {value}. ",
        "In which box does {name} keep the spare key?",
        "{name} keeps the spare key in box",
    ),
    (
        "The badge of {name} carries the code {value}. ",
        "What code does the badge of {name} carry?",
        "The badge of {name} carries the code",
    ),
]
N_RECORDS = 5  # the asked one and four look-alikes


def _value(rng: random.Random) -> str:
    return str(rng.randint(1000, 9999))


def _records(rng: random.Random) -> tuple[list[str], list[str], int, tuple[str, str, str]]:
    people = rng.sample(PEOPLE, N_RECORDS)
    values: list[str] = []
    while len(values) < N_RECORDS:
        v = _value(rng)
        if v not in values:
            values.append(v)
    return people, values, rng.randrange(N_RECORDS), rng.choice(SHAPES)


def _lookalike_example(
    task: str, rng: random.Random, n_tokens: int, tokenize: Tokenize, between: bool
) -> Example:
    people, values, asked, (record, question, answer) = _records(rng)
    if between:  # the asked record first, every look-alike after it
        depths = [rng.uniform(0.05, 0.3) if i == asked else rng.uniform(0.4, 0.95) for i in range(N_RECORDS)]
    else:
        depths = [rng.uniform(0.05, 0.95) for _ in range(N_RECORDS)]
    hay = prose(rng)
    needles = [record.format(name=p, value=v) for p, v in zip(people, values)]
    head = "Read the following text; some records about people are hidden in it.\n"
    who = people[asked]
    tail = f"\nQuestion: {question.format(name=who)} Answer: {answer.format(name=who)}"
    prompt = fit_prompt(lambda k: head + spread(hay, k, needles, depths) + tail, n_tokens, tokenize)
    return Example(task, prompt, values[asked], answer_tokens=MEDIUM_ANSWER, haystack=hay.name)


def records(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """Five records of one shape at random depths in real prose; one asked for by name."""
    return _lookalike_example("records", rng, n_tokens, tokenize, between=False)


def records_between(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """As ``records``, with the asked record in the first third and its four look-alikes
    after it, between it and the question."""
    return _lookalike_example("records_between", rng, n_tokens, tokenize, between=True)


SHIPS = ["Meridian", "Lodestar", "Halcyon", "Wayfarer", "Tern", "Corvina", "Bellwether", "Kestrel"]
PORTS = ["Valparaiso", "Honolulu", "Hobart", "Mauritius", "Callao", "Fayal", "Zanzibar", "Tahiti"]
CARGO = ["sperm oil", "whalebone", "sandalwood", "tea", "copra", "hides", "salt", "timber"]


def _voyage(rng: random.Random, ship: str, port: str) -> str:
    return (
        f"The {ship} left Nantucket in the spring under captain {rng.choice(PEOPLE)} and, after "
        f"{rng.randint(40, 180)} days at sea, made her first landfall at {port}, where she took on "
        f"{rng.choice(CARGO)} and fresh water before turning south."
    )


def paragraphs(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """Numbered documents: paragraphs of real prose and four voyage reports alike in shape
    (ship, captain, days, landfall); the landfall of one ship is asked for."""
    ships, ports = rng.sample(SHIPS, 4), rng.sample(PORTS, 4)
    asked = rng.randrange(4)
    voyages = [_voyage(rng, s, p) for s, p in zip(ships, ports)]
    hay = prose(rng)
    slots = [rng.random() for _ in voyages]
    head = "Answer the question based on the given documents.\n\nThe following are given documents.\n\n"
    tail = (
        f"\nAnswer the question based on the given documents.\nQuestion: Where did the "
        f"{ships[asked]} make her first landfall? Answer: The {ships[asked]} made her first landfall at"
    )

    def build(k: int) -> str:
        docs = paragraphs_of(hay.units(k))  # k sentences
        for voyage, slot in sorted(zip(voyages, slots), key=lambda x: x[1], reverse=True):
            docs.insert(int(slot * (len(docs) + 1)), voyage)
        return head + "".join(f"Document {i + 1}:\n{d}\n\n" for i, d in enumerate(docs)) + tail

    prompt = fit_prompt(build, n_tokens, tokenize)
    return Example("paragraphs", prompt, ports[asked], haystack=hay.name)


LOOKALIKE_TASKS = {"records": records, "records_between": records_between, "paragraphs": paragraphs}
