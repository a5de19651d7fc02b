"""``kvcli serve``'s HTTP side: the OpenAI API over one LocalModel (FastAPI, as
llama-cpp-python's own server; the ``serve`` extra).

One request decodes at a time; the others wait in arrival order (an asyncio lock is FIFO)
and get 503 after ``timeout_s``. The engine runs in a worker thread, so the server keeps
answering /health and queueing while it computes. A client that hangs up mid-stream ends the
reply there: the context keeps what was generated, and the next request reuses what it can.
Errors come back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kvcli.api.local_model import Completion, CompletionStream, LocalModel
from kvcli.errors import KvcliError

DEFAULT_TIMEOUT_S = 600.0
FINISH = {"stop": "stop", "length": "length", "interrupted": "stop"}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: Optional[str] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints take; any other field is refused (400)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None  # one model is served, whatever the name
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: Optional[int] = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)
    user: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[int]


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def timings_json(c: Completion) -> dict:
    """llama-server's ``timings`` names where they exist (``cache_n``: reused, ``prompt_n``:
    prefilled now, ``predicted_*``: generated), with kvcli's prefill besides."""
    t = c.timings
    return {
        "cache_n": t.prompt_reused,
        "prompt_n": t.prompt_new,
        "prompt_ms": t.ttft_ms,
        "predicted_n": c.usage.completion_tokens,
        "predicted_ms": t.generation_ms,
        "predicted_per_second": c.tokens_per_s,
        "prefilled_by": t.prefilled_by,
        "kvp_predicted_n": t.prompt_predicted,
        "kvp_recomputed_n": t.prompt_recomputed,
        "ttft_ms": t.ttft_ms,
    }


def _usage(c: Completion) -> dict:
    u = c.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def create_app(llm: LocalModel, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> FastAPI:
    app = FastAPI(title="kvcli", docs_url=None, redoc_url=None)
    turn = asyncio.Lock()  # FIFO: waiters acquire in the order they asked

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        kind = first.get("type")
        if kind == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        what = "unknown field" if kind == "extra_forbidden" else first.get("msg", "invalid request")
        return _error(400, f"{what}: {where}" if where else what)

    @app.exception_handler(KvcliError)
    async def refused(request: Request, exc: KvcliError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": llm.name, "object": "model", "created": 0, "owned_by": "kvcli"}],
        }

    async def wait_turn() -> JSONResponse | None:
        try:
            await asyncio.wait_for(turn.acquire(), timeout_s)
        except asyncio.TimeoutError:
            return _error(
                503, f"the server is busy: waited {timeout_s:.0f} s for earlier requests", "server_error"
            )
        return None

    async def respond(start, body: Sampling, shape) -> JSONResponse | StreamingResponse:
        busy = await wait_turn()
        if busy is not None:
            return busy
        try:
            stream: CompletionStream = await run_in_threadpool(start)
        except BaseException:
            turn.release()
            raise
        if not body.stream:
            try:
                completion = await run_in_threadpool(_drain, stream)
            finally:
                turn.release()
            return JSONResponse(shape.whole(completion))
        return StreamingResponse(
            _events(stream, shape, body, turn),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    def sampling(body: Sampling, default_max: int) -> dict:
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max
        return dict(
            max_tokens=limit, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        options = sampling(body, llm.n_ctx)
        return await respond(
            lambda: llm.chat(messages, stream=True, **options), body, _Shape("chat", llm.name)
        )

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        options = sampling(body, 16)  # OpenAI's default for completions
        return await respond(
            lambda: llm.generate(body.prompt, stream=True, **options), body, _Shape("text", llm.name)
        )

    return app


def _drain(stream: CompletionStream) -> Completion:
    for _ in stream:
        pass
    return stream.completion


class _Shape:
    """How one endpoint's responses and chunks look (chat or text completion)."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, c: Completion) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": c.text}}
            obj = "chat.completion"
        else:
            choice, obj = {"index": 0, "text": c.text, "logprobs": None}, "text_completion"
        choice["finish_reason"] = FINISH[c.finish_reason]
        return {**self._head(obj), "choices": [choice], "usage": _usage(c), "timings": timings_json(c)}

    def chunk(self, piece: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.kind == "chat":
            delta = (
                {"role": "assistant", "content": piece or ""}
                if first
                else {"content": piece}
                if piece
                else {}
            )
            choice, obj = {"index": 0, "delta": delta}, "chat.completion.chunk"
        else:
            choice, obj = {"index": 0, "text": piece or "", "logprobs": None}, "text_completion"
        choice["finish_reason"] = finish
        return {**self._head(obj), "choices": [choice]}


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _events(
    stream: CompletionStream, shape: _Shape, body: Sampling, turn: asyncio.Lock
) -> AsyncIterator[bytes]:
    """The reply as server-sent events: a chunk per piece, the last with the finish reason
    and the timings, a usage chunk where asked, then [DONE]. A hang-up (the task cancelled)
    ends the reply and frees the turn."""
    pieces = iter(stream)
    try:
        first = True
        while True:
            piece = await run_in_threadpool(next, pieces, None)
            if piece is None:
                break
            yield _sse(shape.chunk(piece, first=first))
            first = False
        c = stream.completion
        last = shape.chunk(None, FINISH[c.finish_reason], first=first)
        last["timings"] = timings_json(c)
        yield _sse(last)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**shape._head(last["object"]), "choices": [], "usage": _usage(c)})
        yield _sse("[DONE]")
    finally:
        # no await here: after a hang-up the task is cancelled, and an await would be too,
        # leaving the turn held. The worker thread is done (run_in_threadpool waits for it).
        stream.close()  # ends the reply where a hang-up left it
        turn.release()
