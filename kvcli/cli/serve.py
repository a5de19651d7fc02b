"""kvcli serve: an OpenAI-compatible local server over a bundle (the ``serve`` extra)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kvcli.cli.options import BundleOpt, CtxOpt, ModelOpt, ThreadsOpt
from kvcli.engine.conversation import ChatMode
from kvcli.errors import KvcliError

HELP = """Serve the OpenAI API on this machine: POST /v1/chat/completions (the model's own
chat template), POST /v1/completions, GET /v1/models, GET /health; stream: true as
server-sent events.


A request that starts as the last one did (the same system prompt, document or conversation)
keeps those cells and prefills only the rest: by kvp where the rest reaches the bundle's
break-even, by the base where it is shorter. One request decodes at a time; the others wait
in order. Each response carries `timings` (cache_n reused, prompt_n prefilled,
kvp_predicted_n, ttft_ms). Point a client at http://HOST:PORT/v1 with any API key."""


def command(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    mode: Annotated[ChatMode, typer.Option("--mode", help="How prompts are prefilled.")] = ChatMode.KVP,
    tail: Annotated[
        Optional[int], typer.Option("--tail", help="kvp: the base recomputes the last W prompt tokens.")
    ] = None,
    spans: Annotated[
        Optional[int],
        typer.Option("--spans", help="kvp: the base also recomputes S sentences the question attends to."),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds a request may wait for earlier ones before a 503.")
    ] = 600.0,
    threads: ThreadsOpt = 0,
    ctx: CtxOpt = 4096,
    bundle: BundleOpt = None,
    model: ModelOpt = None,
) -> None:
    try:
        import uvicorn

        from kvcli.api.server import create_app
    except ImportError as exc:
        raise KvcliError(
            f"kvcli serve needs the serve extra ({exc.name} is missing): pip install 'kvcli[serve]'"
        ) from None
    if not 0 < port < 65536 or timeout <= 0:
        raise KvcliError("--port must be in 1-65535 and --timeout > 0")
    if (tail is not None and tail < 0) or (spans is not None and spans < 0):
        raise KvcliError("--tail and --spans must be >= 0")
    from kvcli.api.local_model import LocalModel, engine_for
    from kvcli.cli import ui
    from kvcli.llama.runtime import ContextSettings

    if model is not None and mode == "kvp":
        mode = ChatMode.BASE  # a plain model has no other mode
    with ui.progress_reporter() as report:
        engine = engine_for(
            bundle, model, mode, ContextSettings(n_ctx=ctx, n_threads=threads), progress=report
        )
    with LocalModel(engine, mode=mode, tail=tail, spans=spans) as llm:
        app = create_app(llm, timeout_s=timeout)
        ui.err.print(
            f"kvcli serve: {llm.name}, mode {mode}, context {llm.n_ctx}; "
            f"http://{host}:{port}/v1 (Ctrl-C stops)",
            highlight=False,
            soft_wrap=True,
        )
        uvicorn.run(app, host=host, port=port, log_level="warning")
