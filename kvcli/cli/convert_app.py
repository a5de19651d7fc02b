"""The converter's Typer app and the options its commands share (kvcli/cli/convert_bundles.py
and convert_files.py register on ``app``; kvcli/cli/convert.py gathers them). Kept apart from
convert.py so the command modules import this one and nothing imports back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.cli.options import paragraphs
from kvcli.cli.runner import set_debug
from kvcli.predict.corpus import CalibrationText
from kvcli.predict.predictor import StorageType

app = typer.Typer(
    name="convert_gguf.py",
    help="Build, quantize and pack kvcli's GGUF files: an auxiliary cut from a base, a "
    "calibrated predictor, llama.cpp-quantized models, and bundles of all three.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

OutFile = Annotated[Path, typer.Option("--output", "-o", help="Output file (written atomically).")]
PredictorType = Annotated[
    StorageType,
    typer.Option(
        "--predictor-type",
        help="How the predictor's matrices are stored: f32, f16, q8_0 or q4_0 "
        "(gguf-py's quants; dequantized once at load).",
    ),
]
Tokens = Annotated[
    Optional[int], typer.Option("--tokens", help="Calibration tokens (default 20480: 40 prompts of 512).")
]
Corpus = Annotated[
    Optional[Path],
    typer.Option(
        "--corpus",
        exists=True,
        help="A text file or folder to calibrate on (default: the Python standard "
        "library's text, held-out files excluded; see --text).",
    ),
]
Text = Annotated[
    CalibrationText,
    typer.Option(
        "--text",
        help="Without --corpus, the standard library's text to calibrate on: mixed "
        "(its sources, their docstrings and conversations in the base's chat template, in turn) "
        "or code (its sources alone).",
    ),
]


def command(name: str):
    """Register a subcommand whose help is its docstring, unwrapped."""
    return lambda fn: app.command(name, help=paragraphs(fn.__doc__))(fn)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show llama.cpp's log and tracebacks.")] = False,
) -> None:
    set_debug(debug)
