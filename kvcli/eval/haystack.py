"""Haystacks the judge hides its needles in: kvcli's repeated noise sentence, where the needles
are the only salient tokens, or real prose, where they are not.

The prose ships with kvcli (``kvcli/data/prose``, sources and licences in SOURCES.md there):
the first 45 chapters of Herman Melville's *Moby-Dick* (1851) and six State of the Union
addresses (1862-2010), public domain. Neither is in kvcli's calibration or training text
(a test checks it). A prose haystack is a run of consecutive sentences from a seeded start
in one source, paragraph breaks kept.
"""

from __future__ import annotations

import gzip
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvcli.eval.prompts import FILLER

PROSE_DIR = Path(__file__).resolve().parent.parent / "data" / "prose"
PROSE_SOURCES = ("moby_dick", "state_of_the_union")
PARAGRAPH_CHARS = 800
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'\u201c\u2018(])")  # before a capital or a quote


@cache
def prose_sentences(source: str) -> tuple[str, ...]:
    """The source's sentences in order, each ending in a space, or in a paragraph break
    where its paragraph ends."""
    text = gzip.decompress((PROSE_DIR / f"{source}.txt.gz").read_bytes()).decode()
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        parts = [s.strip() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip()]
        out += [s + " " for s in parts[:-1]] + [parts[-1] + "\n\n"] if parts else []
    return tuple(out)


def paragraphs_of(sentences) -> list[str]:
    """Consecutive ``sentences`` as paragraphs: their own, those past PARAGRAPH_CHARS cut
    into pieces of whole sentences about that long (the State of the Union texts come without
    paragraph breaks)."""
    out, current = [], ""
    for sentence in sentences:
        current += sentence
        if sentence.endswith("\n\n") or len(current) >= PARAGRAPH_CHARS:
            out.append(current.strip())
            current = ""
    return out + ([current.strip()] if current.strip() else [])


@dataclass(frozen=True)
class Haystack:
    """``units(k)``: k units of text, a needle may go between any two; ``name`` says where
    they come from (recorded with each example)."""

    name: str
    units: Callable[[int], list[str]]


def noise() -> Haystack:
    return Haystack("noise", lambda k: [FILLER] * k)


def prose(rng: random.Random) -> Haystack:
    """Consecutive sentences of one source from a seeded start (wrapping round at its end)."""
    source = rng.choice(PROSE_SOURCES)
    sentences = prose_sentences(source)
    start = rng.randrange(len(sentences))

    def units(k: int) -> list[str]:
        return [sentences[(start + i) % len(sentences)] for i in range(k)]

    return Haystack(f"{source}@{start}", units)


def spread(haystack: Haystack, k: int, needles: list[str], depths: list[float]) -> str:
    """``k`` haystack units with ``needles`` inserted at their relative ``depths``."""
    units = haystack.units(k)
    parts, at = [], 0
    for needle, d in sorted(zip(needles, depths), key=lambda x: x[1]):
        upto = int(k * d)
        parts += [*units[at:upto], needle]
        at = upto
    return "".join(parts + units[at:])
