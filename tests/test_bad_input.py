"""A sweep of bad input over every command's options: empty, negative, out of range, wrong
type, unknown names, missing files, unwritable outputs. Each gets one line (``Error: ...``)
and a non-zero exit, before any long work; never a traceback, never output on stdout."""

import pytest
from test_cli import kvcli

MISSING = "/nonexistent/kvcli-test"
UNWRITABLE = "/proc/kvcli-test/out"  # /proc takes no new folders, even for root

CASES = [
    # generate
    (("generate",), "exactly one of PROMPT"),
    (("generate", "hi", "-n", "0"), "-n must be >= 1"),
    (("generate", "hi", "-n", "abc"), "'-n'"),
    (("generate", "hi", "--temp", "-1"), "--temp >= 0"),
    (("generate", "hi", "--mode", "fast"), "'fast' is not one of"),
    (("generate", "hi", "--tail", "-1"), ">= 0"),
    (("generate", "hi", "--spans", "-2"), ">= 0"),
    (("generate", "hi", "--mode", "select", "--keep", "0"), "--keep must be >= 1"),
    (("generate", "hi", "--mode", "select", "--select-by", "eyes"), "'eyes' is not one of"),
    (("generate", "hi", "--mode", "select", "--model", MISSING), "needs an auxiliary"),
    (("bench-ttft", "--modes", "base,pick"), "pick"),
    (("generate", "--file", MISSING), "cannot read the prompt file"),
    (("generate", "--batch", MISSING), "cannot read the batch file"),
    (("generate", "hi", "--bundle", MISSING), "bundle folder not found"),
    (("generate", "hi", "--mode", "base", "--model", MISSING), "not found"),
    (("generate", "hi", "--unknown-flag"), "No such option"),
    # chat
    (("chat", "--mode", "aux"), "'aux' is not one of"),
    (("chat", "-n", "0"), "-n >= 1"),
    (("chat", "--tail", "-3"), ">= 0"),
    # bench-ttft
    (("bench-ttft", "-p", ""), "-p is empty"),
    (("bench-ttft", "-p", "8"), "-p takes values >= 16"),
    (("bench-ttft", "-p", "1024,x"), "integers, not 'x'"),
    (("bench-ttft", "--modes", "kvp,fast"), "unknown 'fast'"),
    (("bench-ttft", "--tails", "-1"), "--tails takes values >= 0"),
    (("bench-ttft", "-r", "0"), "-r >= 1"),
    (("bench-ttft", "--aux-load", "view,view"), "twice"),
    (("bench-ttft", "--plot", f"{UNWRITABLE}/x.png"), "output folder"),
    # eval
    (("eval", "--n", "0"), "--n must be >= 1"),
    (("eval", "--n", "-3"), "--n must be >= 1"),
    (("eval", "--lengths", "0"), "--lengths takes values >= 16"),
    (("eval", "--tasks", "passkey,nope"), "unknown 'nope'"),
    (("eval", "--spans", "a"), "integers, not 'a'"),
    (("eval", "--plot", f"{UNWRITABLE}/x.png"), "output folder"),
    # doctor, inspect
    (("doctor", "--prompts", "0"), "--prompts must be >= 1"),
    (("doctor", "--model", MISSING), "not found"),
    (("inspect",), "Missing argument"),
    (("inspect", MISSING), "not found"),
    # train
    (("train",), "Missing option '--output'"),
    (("train", "-o", UNWRITABLE), "output folder"),
    # the converter
    (("convert", "make-aux", MISSING, "-o", "/tmp/kvcli-x.gguf", "--layers", "0"), "not found"),
    (("convert", "calibrate", MISSING, MISSING, "-o", "/tmp/kvcli-x.gguf"), "not found"),
    (("convert", "calibrate", "a", "b", "-o", "x", "--text", "poems"), "'poems' is not one of"),
    (("convert", "calibrate", "a", "b", "-o", "x", "--corpus", MISSING), "does not exist"),
    (("convert", "quantize", MISSING, "/tmp/kvcli-y.gguf", "q4_0"), "not found"),
    (("convert", "bundle", "--base", MISSING, "-o", "/tmp/kvcli-z"), "not found"),
    (("convert", "bundle", "--base", "b", "-o", "z", "--predictor-type", "q2"), "'q2' is not one of"),
    (("convert", "import-corenet", MISSING), "Missing option"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(args, message):
    res = kvcli(*args, input="")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.stderr
    assert res.stdout == ""
