"""Running a typer app the kvcli way: a one-line ``Error: ...`` and exit 1 for problems a user
can fix, exit 130 on Ctrl-C (SIGTERM too), llama.cpp's log and tracebacks with --debug."""

from __future__ import annotations

import sys

import typer

_DEBUG = False


def set_debug(debug: bool) -> None:
    global _DEBUG
    _DEBUG = debug
    if debug:
        from kvcli.llama.runtime import set_verbose

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
