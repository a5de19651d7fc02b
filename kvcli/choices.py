"""What users choose on kvcli's command lines: named choices as enums (``Choice``), and the one
parser of comma lists ('1024,2048', 'kvp,base', '0-4,8'): one clear line for a bad item."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import TypeVar

from kvcli.errors import KvcliError

T = TypeVar("T")


class Choice(str, Enum):
    """A named choice: equal to its value ("kvp" == Mode.KVP) and printed as it (f-strings
    and JSON alike), so it goes wherever the string went."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: str, what: str):
        """The member named ``value``, or one line naming ``what`` and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise KvcliError(f"unknown {what} {value!r} (one of {', '.join(cls.values())})") from None


def parse_list(
    text: str,
    what: str,
    item: Callable[[str], T] = str,
    *,
    choices: Iterable[str] = (),
    minimum: float | None = None,
    ranges: bool = False,
    distinct: bool = False,
) -> list[T]:
    """``text`` -> items read by ``item`` (``int``, ``float``, ``str``). ``choices``: the only
    values allowed; ``minimum``: the smallest number allowed; ``ranges``: 'a-b' stands for
    a..b (integers); ``distinct``: no item twice. ``what`` names the option in errors."""
    choices = list(choices)
    kind = {int: "integers", float: "numbers"}.get(item, "names")
    out: list = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            if ranges and "-" in piece[1:]:
                lo, hi = (int(x) for x in piece.split("-", 1))
                if hi < lo:
                    raise KvcliError(f"{what}: the range {piece!r} runs backwards")
                out += range(lo, hi + 1)
            else:
                out.append(item(piece))
        except ValueError:
            raise KvcliError(f"{what} takes comma-separated {kind}, not {piece!r}") from None
        if choices and out[-1] not in choices:
            raise KvcliError(f"{what}: unknown {piece!r} (one of {', '.join(map(str, choices))})")
    if not out:
        raise KvcliError(f"{what} is empty")
    if minimum is not None and min(out) < minimum:
        raise KvcliError(f"{what} takes values >= {minimum:g}, not {min(out)}")
    if distinct and len(set(out)) < len(out):
        raise KvcliError(f"{what} names an item twice ({text!r})")
    return out
