"""The command line: wires commands, declares shared options, handles errors once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli import __version__

app = typer.Typer(
    name="kvcli",
    help="Faster time-to-first-token on a laptop: KV Prediction (arXiv 2410.08391) on "
    "llama.cpp. A small auxiliary model prefills the prompt, linear predictors map its KV "
    "cache to the base model's, and the base generates every output token itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

BundleOpt = Annotated[Optional[Path], typer.Option(
    "--bundle", help="Bundle folder (base, auxiliary, predictor). Default: the embedded "
    "Gemma 3 270M bundle, built in the cache folder on first use.")]
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="A base GGUF to run alone (modes base and truncate) without a bundle.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", help="CPU threads (0: auto).")]
CtxOpt = Annotated[int, typer.Option("--ctx", "-c", help="Context size in tokens.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for sampling (with --temp > 0).")]

_DEBUG = False


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show llama.cpp's log and tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    set_debug(debug)
    if version:
        typer.echo(f"kvcli {__version__}")
        raise typer.Exit()


def paragraphs(text: str) -> str:
    """Unwrap a docstring-style help text: blank lines separate paragraphs."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


def _register() -> None:
    from kvcli.commands import bench, chat, doctor, eval, generate, inspect, train

    for name, module in (("generate", generate), ("chat", chat), ("bench-ttft", bench),
                         ("eval", eval), ("train", train), ("doctor", doctor), ("inspect", inspect)):
        app.command(name, help=paragraphs(module.HELP))(module.command)


def set_debug(debug: bool) -> None:
    global _DEBUG
    _DEBUG = debug
    if debug:
        from kvcli.runtime import set_verbose

        set_verbose(True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(typer_app: typer.Typer) -> None:
    """Run a typer app with kvcli's error handling: a one-line ``Error: ...``, exit 1."""
    import signal

    from kvcli.errors import KvcliError

    # SIGTERM unwinds like Ctrl-C, so that temp outputs are cleaned up on the way out
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        typer_app()
    except KvcliError as exc:
        if _DEBUG:
            raise
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


def main() -> None:
    _register()
    run(app)


if __name__ == "__main__":
    main()
