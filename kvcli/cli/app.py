"""The command line: the ``kvcli`` app and its commands (one module each in this package)."""

from __future__ import annotations

from typing import Annotated

import typer

from kvcli import __version__
from kvcli.cli.options import paragraphs
from kvcli.cli.runner import run, set_debug

app = typer.Typer(
    name="kvcli",
    help="Faster time-to-first-token on a laptop: KV Prediction (arXiv 2410.08391) on "
    "llama.cpp. A small auxiliary model prefills the prompt, linear predictors map its KV "
    "cache to the base model's, and the base generates every output token itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kvcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show llama.cpp's log and tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    set_debug(debug)


def _register() -> None:
    from kvcli.cli import bench, chat, doctor, eval, generate, inspect, serve, train
    from kvcli.cli.convert import converter

    for name, module in (
        ("generate", generate),
        ("chat", chat),
        ("serve", serve),
        ("bench-ttft", bench),
        ("eval", eval),
        ("train", train),
        ("doctor", doctor),
        ("inspect", inspect),
    ):
        app.command(name, help=paragraphs(module.HELP))(module.command)
    convert_app = converter()
    app.add_typer(convert_app, name="convert", help=paragraphs(convert_app.info.help or ""))


def main() -> None:
    _register()
    run(app)


if __name__ == "__main__":
    main()
