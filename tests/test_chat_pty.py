"""kvcli chat driven through a pseudo-terminal on the embedded default model."""

import json
import os
import pty
import re
import select
import sys
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    def __init__(self, args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: kvcli chat on the pty's slave side
            os.execvp(sys.executable, [sys.executable, "-m", "kvcli.cli.app", "chat", *args])
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = 180) -> bytes:
        """Read until ``pattern`` (a regex over the output without colours) appears after
        what earlier calls consumed; return the output up to its end."""
        deadline = time.monotonic() + timeout
        while True:
            text = ANSI.sub(b"", self.seen)
            m = re.search(pattern, text, re.S)
            if m:
                self.seen = text[m.end() :]
                return text[: m.end()]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output: {text[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child exited
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"chat exited waiting for {pattern!r}: {text[-2000:]!r}")
                self.seen += chunk

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError("chat did not exit")


def test_two_turns_a_file_ctrl_c_during_a_reply_and_exit(gemma_bundle, tmp_path):
    paste = tmp_path / "notes.py"
    paste.write_text("def area(r):\n    return 3.14159 * r * r\n" * 20)
    transcript = tmp_path / "chat.jsonl"
    term = Terminal(["--bundle", str(gemma_bundle.folder), "-n", "160", "--save", str(transcript)])
    term.expect(rb"kvcli chat: .*?Ctrl-D exits\.\r?\n> ")
    term.send("Name three colours.\r")
    first = term.expect(rb"kvp: (\d+) prompt tokens.*?TTFT \d+ ms.*?\n> ")
    assert b"Traceback" not in first
    term.send("And three animals?\r")
    term.expect(rb"kvp: \d+ prompt tokens.*?TTFT.*?\n> ")
    term.send(f"/file {paste}\r")
    shown = term.expect(rb"kvp: (\d+) prompt tokens \((\d+) predicted\).*?\n> ")
    n_file = int(re.search(rb"kvp: (\d+) prompt tokens", shown).group(1))
    assert n_file > 300  # the file's tokens were this turn's, predicted, not the whole chat again
    term.send("Tell me a long story about a dragon.\r")
    term.expect(rb"dragon\.\r?\n[^>]{20}", timeout=120)  # the reply has begun streaming
    term.send("\x03")
    stopped = term.expect(rb"\(interrupted\).*?\n> ")
    assert b"Traceback" not in stopped
    term.send("/stats\r")
    term.expect(rb"turns 4.*?\n> ")
    term.send("\x04")  # Ctrl-D at the prompt
    assert term.wait() == 0
    assert b"Traceback" not in term.seen
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [r["role"] for r in records] == ["user", "assistant"] * 4
    assert records[-1]["interrupted"] and not records[1]["interrupted"]
    assert records[4]["content"].startswith("def area")
