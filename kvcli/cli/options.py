"""Options several commands share, and the unwrapping of their help texts: a leaf module
(the commands import it; it imports no command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

BundleOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--bundle",
        help="Bundle folder (base, auxiliary, predictor). Default: the embedded "
        "Gemma 3 270M bundle, built in the cache folder on first use.",
    ),
]
ModelOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--model", "-m", help="A base GGUF to run alone (modes base and truncate) without a bundle."
    ),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", help="CPU threads (0: auto).")]
CtxOpt = Annotated[int, typer.Option("--ctx", "-c", help="Context size in tokens.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for sampling (with --temp > 0).")]


def paragraphs(text: str) -> str:
    """Unwrap a docstring-style help text: blank lines separate paragraphs."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))
