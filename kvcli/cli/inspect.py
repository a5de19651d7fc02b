"""kvcli inspect: what a GGUF model, a predictor file or a bundle is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvcli.cli.options import JsonOpt

HELP = """Describe a GGUF model (architecture, layers, heads, KV heads, head dim, RoPE layout
and bases, sliding-window pattern, size), a kvcli predictor (the models it was fit for, on
how many tokens, layer map, features, storage type, held-out error) or a bundle folder (all
three, and whether they fit together)."""


def _value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) if len(v) <= 40 else f"{','.join(map(str, v[:40]))},... ({len(v)})"
    if isinstance(v, dict):
        return " ".join(f"{k}={_value(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


def _section(title: str, d: dict):
    from kvcli.cli import ui

    rows = [
        [k, _value(v)]
        for k, v in d.items()
        if not isinstance(v, dict) or k in ("rope", "cut_from", "origin", "sha256_ok")
    ]
    return ui.table(title, ["field", "value"], rows)


def command(
    path: Annotated[Path, typer.Argument(help="A GGUF file or a bundle folder.")],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="For a bundle: check every file's sha256 against the manifest (reads every byte).",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    from kvcli.eval.describe import describe

    info = describe(path, verify=verify)
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    from kvcli.cli import ui

    if info["kind"] != "bundle":
        ui.out.print(_section(f"{info['kind']}: {path}", info))
        return
    summary = {k: v for k, v in info.items() if k not in ("base", "aux", "predictor")}
    ui.out.print(_section(f"bundle: {path}", summary))
    for role in ("base", "aux", "predictor"):
        ui.out.print(_section(role, info[role]))
