import pytest

from kvcli.choices import parse_list
from kvcli.errors import KvcliError


def test_reads_items_ranges_and_skips_empty_pieces():
    assert parse_list("1024, 2048,", "-p", int) == [1024, 2048]
    assert parse_list("0-3,8", "--layers", int, ranges=True) == [0, 1, 2, 3, 8]
    assert parse_list("0.1,1", "--lambda", float) == [0.1, 1.0]
    assert parse_list("kvp,base", "--modes", choices=("base", "kvp")) == ["kvp", "base"]


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("", {}, "-x is empty"),
        (" , ", {}, "-x is empty"),
        ("12,a", {"item": int}, "-x takes comma-separated integers, not 'a'"),
        ("4-2", {"item": int, "ranges": True}, "the range '4-2' runs backwards"),
        ("kvp,nope", {"choices": ("kvp", "base")}, "unknown 'nope' (one of kvp, base)"),
        ("3,-1", {"item": int, "minimum": 0}, "takes values >= 0, not -1"),
        ("1,1", {"item": int, "distinct": True}, "names an item twice"),
    ],
)
def test_bad_lists_get_one_line_naming_the_option(text, options, message):
    with pytest.raises(KvcliError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_list(text, "-x", **options)
    assert "\n" not in str(err.value) and str(err.value).startswith("-x")
