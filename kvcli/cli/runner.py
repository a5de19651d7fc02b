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
        from kvcli.llama.library import set_verbose

        set_verbose(True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _usage_errors() -> tuple[type[Exception], ...]:
    """The option parser's usage errors, whichever typer is installed: typer < 0.26 raises
    click's, later ones those of their own copy of click (without depending on click). Both
    export ``BadParameter``; its ``ClickException`` base is the class to catch."""
    (base,) = [cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"]
    typer_exception = getattr(typer, "TyperException", None)  # typer >= 0.29's own errors
    return (base, typer_exception) if typer_exception else (base,)


def run(typer_app: typer.Typer) -> None:
    """Run a typer app with kvcli's error handling: a one-line ``Error: ...``, exit 1 (exit 2
    for a command line click cannot read: a bad value, a missing argument)."""
    import signal

    from kvcli.errors import KvcliError

    # SIGTERM unwinds like Ctrl-C, so that temp outputs are cleaned up on the way out
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # not standalone: click raises its usage errors instead of printing a boxed usage
        code = typer.main.get_command(typer_app).main(standalone_mode=False)
    except KvcliError as exc:
        if _DEBUG:
            raise
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except _usage_errors() as exc:
        message = " ".join(exc.format_message().split())
        typer.echo(f"Error: {message} (see --help)", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)
