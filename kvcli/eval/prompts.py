"""What every evaluation task is made of: an example (a prompt and its expected answers), the
scoring of a greedy answer, and a prompt grown to a token length by adding filler units."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kvcli.errors import KvcliError

ANSWER_TOKENS = 8  # greedy tokens scored for a one-value answer

Tokenize = Callable[[str], list[int]]


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str | None  # None: scored by KL and top-1 agreement only (continuation)
    # several expected values, in any order (all values of a key, every variable bound to a
    # value): the answer is right when each appears in the greedy output as a whole word
    answers: tuple[str, ...] = ()
    answer_tokens: int = ANSWER_TOKENS
    haystack: str = "generated"  # where the text around the facts comes from (kvcli.eval.haystack)

    def correct(self, output: str) -> bool:
        if self.answers:
            return contains_all(output, self.answers)
        return self.answer is not None and is_correct(output, self.answer)


def normalize(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def is_correct(output: str, answer: str) -> bool:
    """Strict: the normalised greedy output starts with the normalised answer."""
    out, want = normalize(output), normalize(answer)
    return bool(want) and (out == want or out.startswith(want + " "))


def contains_all(output: str, answers: tuple[str, ...]) -> bool:
    """Every answer, normalised, appears in the normalised output as whole words."""
    out = f" {normalize(output)} "
    return bool(answers) and all(f" {normalize(a)} " in out for a in answers)


def fit_prompt(build: Callable[[int], str], n_tokens: int, tokenize: Tokenize) -> str:
    """The longest ``build(k)`` (k filler units) that stays within ``n_tokens`` tokens."""
    lo, hi = 0, 1
    while len(tokenize(build(hi))) <= n_tokens:
        lo, hi = hi, hi * 2
        if hi > 1 << 16:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenize(build(mid))) <= n_tokens:
            lo = mid
        else:
            hi = mid
    text = build(lo)
    if len(tokenize(text)) > n_tokens:
        raise KvcliError(f"prompt length {n_tokens} is too short for this task")
    return text
