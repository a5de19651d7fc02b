"""kvcli chat: an interactive conversation with predicted prefill, incremental across turns."""

from __future__ import annotations

import codecs
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.cli.options import BundleOpt, CtxOpt, SeedOpt, ThreadsOpt
from kvcli.engine.conversation import ChatMode
from kvcli.engine.recompute import DEFAULT_SPANS_TAIL
from kvcli.errors import KvcliError

HELP = """Chat with the base model; each turn's new prompt tokens are prefilled by the
auxiliary and predicted into the base's cache (--mode kvp, the default), which keeps the
conversation's earlier cells as they are; as in generate, the base recomputes the spans the
question looks for and decodes the turn's last tokens itself. The reply streams as it comes, then a dim status
line: prompt tokens this turn, TTFT, tokens/s.

Commands: /file PATH (a file as the next message), /reset, /mode kvp|base, /stats, /exit.
Ctrl-C during a reply stops it and keeps the conversation; Ctrl-C at the prompt or Ctrl-D
exits.

When stdin is not a terminal, each line is a message (or all of stdin one message with
--one), and replies go to stdout."""

COMMANDS = "/file PATH, /reset, /mode kvp|base, /stats, /exit"


class Transcript:
    """--save: one JSON object per message, flushed and fsynced as it is written."""

    def __init__(self, path: Path | None):
        self.file = None
        if path is not None:
            try:
                self.file = open(path, "a", encoding="utf-8")
            except OSError as exc:
                raise KvcliError(f"cannot write the transcript {path}: {exc.strerror}") from None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _status(stats) -> str:
    note = " (interrupted)" if stats.interrupted else ""
    return (
        f"{stats.mode}: {stats.n_new} prompt tokens ({stats.n_predicted} predicted), "
        f"TTFT {stats.ttft_ms:.0f} ms, {stats.tokens_per_s:.1f} tokens/s{note}"
    )


def _turn(conv, text: str, transcript: Transcript, err, interactive: bool = True) -> None:
    model = conv.engine.model
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_token(token: int) -> None:
        sys.stdout.write(decoder.decode(model.token_bytes(token)))
        sys.stdout.flush()

    transcript.write({"role": "user", "content": text})
    try:
        reply, stats = conv.send(text, on_token=on_token)
    except KeyboardInterrupt:  # during the prefill: the turn is dropped
        transcript.write({"role": "assistant", "content": "", "interrupted": True})
        if not interactive:
            raise
        err.print("[dim]interrupted before the reply; the message was not added[/dim]")
        return
    sys.stdout.write(decoder.decode(b"", final=True))
    sys.stdout.write("\n")
    sys.stdout.flush()
    transcript.write(
        {
            "role": "assistant",
            "content": reply,
            "mode": stats.mode,
            "n_prompt_new": stats.n_new,
            "ttft_ms": round(stats.ttft_ms, 2),
            "tokens_per_s": round(stats.tokens_per_s, 2),
            "interrupted": stats.interrupted,
        }
    )
    err.print(f"[dim]{_status(stats)}[/dim]")


def _stats(conv) -> str:
    h = conv.history
    lines = [
        f"turns {len(h)}, context {len(conv.base_tokens)}/{conv.engine.base.n_ctx} tokens, "
        f"mode {conv.mode}, template {conv.template[:30]!r}"
    ]
    for i, s in enumerate(h, 1):
        lines.append(f"  {i}: {_status(s)}")
    return "\n".join(lines)


def _command(conv, line: str, transcript: Transcript, err) -> bool:
    """Run a /command; False means exit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conv.reset()
        err.print("[dim]conversation cleared[/dim]")
    elif name == "/mode":
        conv.set_mode(arg)
        err.print(f"[dim]mode {conv.mode}[/dim]")
    elif name == "/stats":
        err.print(_stats(conv))
    elif name == "/file":
        path = Path(arg).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KvcliError(f"cannot read {path}: {exc}") from None
        err.print(f"[dim]{path.name}: {len(text)} characters[/dim]")
        _turn(conv, text, transcript, err)
    else:
        raise KvcliError(f"unknown command {name} ({COMMANDS})")
    return True


def _interactive(conv, transcript: Transcript, err) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    err.print(
        f"[dim]kvcli chat: {conv.engine.base_info.path.name}, mode {conv.mode}, "
        f"template {conv.template[:30]!r}. {COMMANDS}. Ctrl-C stops a reply; "
        f"Ctrl-D exits.[/dim]"
    )
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(conv, line, transcript, err):
                    return
            else:
                _turn(conv, line, transcript, err)
        except KvcliError as exc:  # a bad turn or command: say so, keep the conversation
            err.print(f"[red]Error: {exc}[/red]")


def command(
    bundle: BundleOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    mode: Annotated[ChatMode, typer.Option("--mode", help="kvp (predicted prefill) or base.")] = ChatMode.KVP,
    tail: Annotated[
        Optional[int],
        typer.Option(
            "--tail",
            help="kvp: the last W prompt tokens of each turn the base decodes itself "
            f"(default: as generate's, {DEFAULT_SPANS_TAIL} with spans, else 0).",
        ),
    ] = None,
    spans: Annotated[
        Optional[int],
        typer.Option(
            "--spans",
            help="kvp: spans the base recomputes each turn, chosen where the question "
            "looks among every position still predicted (default: the bundle's, as generate's; "
            "0 for none).",
        ),
    ] = None,
    n_predict: Annotated[int, typer.Option("-n", "--n-predict", help="Most tokens per reply.")] = 256,
    ctx: CtxOpt = 4096,
    save: Annotated[
        Optional[Path], typer.Option("--save", help="Append the transcript to this JSONL file as it goes.")
    ] = None,
    chat_template: Annotated[
        Optional[str],
        typer.Option(
            "--chat-template",
            help="A llama.cpp built-in template name (gemma, chatml, llama3, ...) "
            "instead of the GGUF's own (or its architecture's).",
        ),
    ] = None,
    drop_old: Annotated[
        bool,
        typer.Option(
            "--drop-old", help="When the context fills, drop the oldest turns instead of refusing the turn."
        ),
    ] = False,
    one: Annotated[bool, typer.Option("--one", help="Not a terminal: all of stdin is one message.")] = False,
    temp: Annotated[float, typer.Option("--temp", help="Sampling temperature (0: greedy).")] = 0.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 0,
) -> None:
    from kvcli.cli import ui
    from kvcli.cli.common import notice_aux_load, resolve_bundle, warn_if_checked_worse
    from kvcli.engine.conversation import Conversation
    from kvcli.engine.engine import Engine
    from kvcli.engine.sampling import Sampler
    from kvcli.llama.runtime import ContextSettings

    if (tail is not None and tail < 0) or (spans is not None and spans < 0) or n_predict < 1:
        raise KvcliError("--tail and --spans must be >= 0 and -n >= 1")
    b = resolve_bundle(bundle)
    if mode == "kvp":
        warn_if_checked_worse(b)
    transcript = Transcript(save)
    settings = ContextSettings(n_ctx=ctx, n_threads=threads)
    try:
        with notice_aux_load(Engine.from_bundle(b, settings=settings)) as engine:
            conv = Conversation(
                engine,
                system=system,
                template=chat_template,
                mode=mode,
                tail=tail,
                spans=spans,
                n_predict=n_predict,
                drop_old=drop_old,
                sampler=Sampler(temperature=temp, seed=seed),
            )
            if sys.stdin.isatty():
                _interactive(conv, transcript, ui.err)
            else:
                messages = [sys.stdin.read()] if one else sys.stdin.read().splitlines()
                for text in (m for m in messages if m.strip()):
                    _turn(conv, text, transcript, ui.err, interactive=False)
    finally:
        transcript.close()
