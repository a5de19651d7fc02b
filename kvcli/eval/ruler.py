"""Task families in the manner of RULER (Hsieh et al., arXiv 2404.06654), written from the
paper's description: retrieval of a UUID, of every value of one key, of the values of two
keys, variable tracking through chains of assignments, and the most frequent words of a
long list. Each is seeded and grows to any prompt length. As in RULER, the key-value
needles hide in real prose (``needle``, ``multivalue``, ``multiquery``) or in repeated noise
(``uuid``, ``vartrack``; kvcli.eval.haystack).
"""

from __future__ import annotations

import itertools
import random

from kvcli.eval.haystack import noise, prose, spread
from kvcli.eval.prompts import Example, Tokenize, fit_prompt

KEYS = [
    "amber-falcon",
    "quiet-harbor",
    "iron-meadow",
    "silver-orchid",
    "north-lantern",
    "velvet-canyon",
    "copper-willow",
    "hollow-summit",
    "crimson-delta",
    "pale-juniper",
    "lunar-thistle",
    "granite-fjord",
]
MEDIUM_ANSWER = 16  # a 7-digit number: Gemma 3 spells digits one token each, after ": "
LONG_ANSWER = 64  # greedy tokens scored where the answer is a UUID or several values (32 cut
# Qwen 2.5's UUIDs short: it spells digits one token each)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1000000, 9999999))


def uuid_value(rng: random.Random) -> str:
    hexes = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{hexes[:8]}-{hexes[8:12]}-{hexes[12:16]}-{hexes[16:20]}-{hexes[20:]}"


def needle(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """One needle, a 7-digit number, at a random depth in real prose."""
    key, value, depth = rng.choice(KEYS), _number(rng), rng.uniform(0.05, 0.95)
    hay = prose(rng)
    head = "A special magic number is hidden within the following text. Make sure to memorize it.\n"
    text = f"One of the special magic numbers for {key} is: {value}. "
    tail = (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    prompt = fit_prompt(lambda k: head + spread(hay, k, [text], [depth]) + tail, n_tokens, tokenize)
    return Example("needle", prompt, value, answer_tokens=MEDIUM_ANSWER, haystack=hay.name)


def uuid(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """One needle whose value is a UUID, at a random depth in noise."""
    key, value, depth = rng.choice(KEYS), uuid_value(rng), rng.uniform(0.05, 0.95)
    head = "A special magic uuid is hidden within the following text. Make sure to memorize it.\n"
    needle = f" One of the special magic uuids for {key} is: {value}. "
    tail = (
        f"\nWhat is the special magic uuid for {key} mentioned in the provided text? "
        f"The special magic uuid for {key} mentioned in the provided text is"
    )
    prompt = fit_prompt(lambda k: head + spread(noise(), k, [needle], [depth]) + tail, n_tokens, tokenize)
    return Example("uuid", prompt, value, answer_tokens=LONG_ANSWER, haystack="noise")


def multivalue(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """Four values of one key at random depths in real prose; all four are asked for."""
    key, values = rng.choice(KEYS), [_number(rng) for _ in range(4)]
    depths = [rng.uniform(0.02, 0.98) for _ in values]
    hay = prose(rng)
    head = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
    needles = [f"One of the special magic numbers for {key} is: {v}. " for v in values]
    tail = (
        f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
        f"The special magic numbers for {key} mentioned in the provided text are"
    )
    prompt = fit_prompt(lambda k: head + spread(hay, k, needles, depths) + tail, n_tokens, tokenize)
    return Example(
        "multivalue", prompt, None, answers=tuple(values), answer_tokens=LONG_ANSWER, haystack=hay.name
    )


def multiquery(rng: random.Random, n_tokens: int, tokenize: Tokenize) -> Example:
    """Four keys with a value each at random depths in real prose; the values of two are
    asked for."""
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    depths = [rng.uniform(0.02, 0.98) for _ in keys]
    asked = rng.sample(range(4), 2)
    hay = prose(rng)
    head = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
    needles = [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
    names = f"{keys[asked[0]]} and {keys[asked[1]]}"
    tail = (
        f"\nWhat are the special magic numbers for {names} mentioned in the provided text? "
        f"The special magic numbers for {names} mentioned in the provided text are"
    )
    prompt = fit_prompt(lambda k: head + spread(hay, k, needles, depths) + tail, n_tokens, tokenize)
    answers = tuple(values[i] for i in asked)
    return Example("multiquery", prompt, None, answers=answers, answer_tokens=LONG_ANSWER, haystack=hay.name)


def _var_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct names, in the order drawn (never a set's order: that follows the
    process's string hashing, and the prompts must be the same in every process)."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def vartrack(rng: random.Random, n_tokens: int, tokenize: Tokenize, hops: int = 4) -> Example:
    """A chain VAR A = 12345, VAR B = A, ... (``hops`` assignments after the first) spread in
    order through the noise, beside a distractor chain of another value; every variable
    bound to the first value is asked for."""
    names = _var_names(rng, 2 * (hops + 1))
    chain, other = names[: hops + 1], names[hops + 1 :]
    value, distractor = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))

    def statements(vars_: list[str], v: str) -> list[str]:
        return [f" VAR {vars_[0]} = {v} "] + [f" VAR {b} = {a} " for a, b in itertools.pairwise(vars_)]

    needles = statements(chain, value) + statements(other, distractor)
    depths = sorted(rng.uniform(0.02, 0.98) for _ in chain) + sorted(rng.uniform(0.02, 0.98) for _ in other)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    tail = (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
        f"variables are assigned the value {value}, they are:"
    )
    prompt = fit_prompt(lambda k: head + spread(noise(), k, needles, depths) + tail, n_tokens, tokenize)
    answers = tuple(chain)
    return Example("vartrack", prompt, None, answers=answers, answer_tokens=LONG_ANSWER, haystack="noise")


def coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3))


def words(rng: random.Random, n_tokens: int, tokenize: Tokenize, vocabulary: int = 40) -> Example:
    """Frequent-words extraction: coded words drawn with Zipf-like frequencies (the r-th
    word about 1/r of the time); the three most frequent are asked for. Counts are made
    strictly decreasing at the top, so the answer is unique."""
    vocab = list(dict.fromkeys(coded_word(rng) for _ in range(vocabulary * 2)))[:vocabulary]
    weights = [1 / (r + 1) for r in range(len(vocab))]
    head = "Read the following coded text and track the frequency of each coded word.\n"
    tail = (
        "\nQuestion: What are the three most frequently appeared words in the above coded "
        "text? Answer: According to the coded text above, the three most frequently appeared words are:"
    )

    seed = rng.random()

    def build(k: int) -> str:
        draw = random.Random(f"words:{seed}:{k}")
        counts = {w: 0 for w in vocab}
        seq = draw.choices(vocab, weights, k=k * 8)
        for w in seq:
            counts[w] += 1
        # the top three: strictly more than any other word, in this order
        floor = max(counts[w] for w in vocab[3:]) if len(vocab) > 3 else 0
        extra = [vocab[i] for i in range(3) for _ in range(max(0, floor + 3 - i - counts[vocab[i]]))]
        seq += extra
        draw.shuffle(seq)
        return head + " ".join(seq) + tail

    prompt = fit_prompt(build, n_tokens, tokenize)
    return Example("words", prompt, None, answers=tuple(vocab[:3]), answer_tokens=LONG_ANSWER)


RULER_TASKS = {
    "needle": needle,
    "uuid": uuid,
    "multivalue": multivalue,
    "multiquery": multiquery,
    "vartrack": vartrack,
    "words": words,
}
