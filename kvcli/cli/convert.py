"""The converter's commands, ``kvcli convert ...`` (and ``python tools/convert_gguf.py ...``,
the same app): thin over kvcli/.

make-aux, calibrate, quantize and bundle build every file a kvcli bundle holds; factor makes a
bundle's predictor cheaper to run; import-corenet
turns a corenet KV-prediction checkpoint into a bundle. Each output
is written atomically: a converter stopped at any moment leaves no partial file.
"""

from __future__ import annotations

import typer

from kvcli.cli.convert_app import app
from kvcli.cli.runner import run


def converter() -> typer.Typer:
    """The converter's app with every subcommand registered."""
    from kvcli.cli import convert_bundles, convert_files  # noqa: F401  (they register on ``app``)

    return app


def main() -> None:
    run(converter())
