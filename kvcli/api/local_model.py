"""The Python API: a loaded bundle that completes prompts and chats, with the OpenAI names.

    import kvcli
    llm = kvcli.load()                      # the embedded default; kvcli.load("my-bundle")
    out = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=32)
    print(out.text, out.usage.prompt_tokens, out.timings.ttft_ms)

The context is kept between calls: a prompt that starts as the last one did (the same
system prompt, the same document, the conversation so far) keeps those cells and prefills
only the rest (kvcli.engine.prompt_cache, the path ``kvcli chat`` takes too). One call at a
time: the object holds one context and is not safe to share between threads unguarded
(``kvcli serve`` queues its requests).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvcli import keys
from kvcli.bundles.default import default_bundle
from kvcli.bundles.make import MadeBundle, measure_break_even
from kvcli.engine.bundle import Bundle, Progress, load_bundle
from kvcli.engine.conversation import ChatMode
from kvcli.engine.engine import Engine
from kvcli.engine.generation import Reply
from kvcli.engine.prompt_cache import CachedPrefill, PromptCache
from kvcli.engine.sampling import Sampler
from kvcli.errors import ContextError, KvcliError
from kvcli.llama.chat_template import apply_chat_template, chat_template_for
from kvcli.llama.runtime import ContextSettings

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class CompletionTimings:
    """What one call cost and how its prompt was covered (llama-server reports ``timings``
    alike): ``prompt_reused`` cells kept from the previous call, ``prompt_new`` prefilled now,
    ``prompt_predicted`` of those predicted, ``prompt_recomputed`` positions the base
    recomputed inside the predicted part (spans, the opening)."""

    prefilled_by: str  # kvp, or base (mode base, or a new part under the bundle's break-even)
    prompt_reused: int
    prompt_new: int
    prompt_predicted: int
    prompt_recomputed: int
    ttft_ms: float
    generation_ms: float


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of generation or a stop string), "length", "interrupted"
    usage: Usage
    timings: CompletionTimings

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token."""
        ms = self.timings.generation_ms
        return round(self.usage.completion_tokens / (ms / 1e3), 2) if ms > 0 else None


class CompletionStream:
    """Iterate for the reply's text pieces; ``completion`` once the iteration ends (stopping
    early, as a client that hangs up does, ends it as "interrupted")."""

    def __init__(
        self, model: LocalModel, prompt: list[int], cached: CachedPrefill, ttft_ms: float, reply: Reply
    ):
        self._model, self._prompt, self._cached, self._ttft_ms = model, prompt, cached, ttft_ms
        self._reply = reply
        self.completion: Completion | None = None
        self._pieces = self._stream()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _stream(self) -> Iterator[str]:
        try:
            yield from self._reply
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.completion is not None:
            return
        reply, cached = self._reply, self._cached
        self._model.cache.held(self._prompt + reply.tokens)
        recomputed = sum(b - a for a, b in cached.prefill.recomputed)
        self.completion = Completion(
            text=reply.text,
            tokens=list(reply.tokens),
            finish_reason=reply.finish_reason or "interrupted",
            usage=Usage(len(self._prompt), len(reply.tokens)),
            timings=CompletionTimings(
                prefilled_by=cached.prefilled_by,
                prompt_reused=cached.n_reused,
                prompt_new=cached.n_new,
                prompt_predicted=cached.n_predicted,
                prompt_recomputed=recomputed,
                ttft_ms=round(self._ttft_ms, 3),
                generation_ms=round(reply.gen_ms, 3),
            ),
        )

    def close(self) -> None:
        """Stop the reply here (the context keeps what was generated)."""
        self._pieces.close()
        self._finish()  # where it was never iterated


class LocalModel:
    """A bundle's engine with a kept context: ``generate`` (a raw prompt) and ``chat``
    (messages through the model's own chat template)."""

    def __init__(
        self, engine: Engine, *, mode: str = "kvp", tail: int | None = None, spans: int | None = None
    ):
        mode = ChatMode.parse(mode, "mode")
        if mode == "kvp" and engine.predictor is None:
            raise KvcliError("mode kvp needs a bundle with an auxiliary and a predictor")
        self.engine, self.mode = engine, mode
        kvp = engine.kvp_settings(tail, spans) if engine.predictor is not None else None
        self.cache = PromptCache(engine, kvp)
        self.template = chat_template_for(engine.model, engine.base_info.arch)

    @property
    def name(self) -> str:
        return self.engine.base_info.path.stem

    @property
    def n_ctx(self) -> int:
        return self.engine.base.n_ctx

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """``messages`` ({"role", "content"}) rendered by the chat template, as tokens."""
        if not isinstance(messages, list) or not messages:
            raise KvcliError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise KvcliError(f"each message needs a role ({', '.join(ROLES)}) and a string content")
        rendered = apply_chat_template(
            self.template, [dict(role=m["role"], content=m["content"]) for m in messages]
        )
        return self.engine.model.tokenize(rendered)

    def generate(
        self, prompt: str | list[int], *, stream: bool = False, **sampling
    ) -> Completion | CompletionStream:
        """Complete ``prompt`` (text, or tokens as the model's tokenizer gives them).
        ``sampling``: max_tokens (256), temperature (0: greedy), top_p (1), seed, stop."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return self._run(tokens, stream, **sampling)

    def chat(
        self, messages: list[dict], *, stream: bool = False, **sampling
    ) -> Completion | CompletionStream:
        """Reply to ``messages`` as the assistant; ``sampling`` as ``generate``'s."""
        return self._run(self.chat_tokens(messages), stream, **sampling)

    def _run(
        self,
        tokens: list[int],
        stream: bool,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> Completion | CompletionStream:
        if not tokens:
            raise KvcliError("the prompt is empty")
        if len(tokens) + 1 > self.n_ctx:
            raise ContextError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise KvcliError("max_tokens must be a whole number >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise KvcliError("temperature must be >= 0 and top_p in (0, 1]")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampler = Sampler(
            temperature=temperature, top_p=top_p, seed=secrets.randbits(32) if seed is None else seed
        )
        start = time.perf_counter()
        cached = self.cache.prefill(tokens, self.mode)
        first = sampler.sample(cached.prefill.logits)
        ttft_ms = (time.perf_counter() - start) * 1e3
        reply = Reply(self.engine.base, first, sampler, max_tokens=max_tokens, stop=stops)
        out = CompletionStream(self, tokens, cached, ttft_ms, reply)
        if stream:
            return out
        for _ in out:
            pass
        return out.completion


def load(
    bundle: str | Path | None = None,
    *,
    model: str | Path | None = None,
    mode: str | None = None,
    tail: int | None = None,
    spans: int | None = None,
    ctx: int = 4096,
    threads: int = 0,
) -> LocalModel:
    """A bundle folder (None: the embedded default, made and measured on first use), or a
    plain GGUF ``model`` (the base alone), ready to ``generate`` and ``chat``. ``mode``: kvp
    (a bundle's default) or base (a model's only one)."""
    mode = ChatMode.parse(mode or ("base" if model is not None else "kvp"), "mode")
    engine = engine_for(bundle, model, mode, ContextSettings(n_ctx=ctx, n_threads=threads))
    try:
        return LocalModel(engine, mode=mode, tail=tail, spans=spans)
    except BaseException:
        engine.close()
        raise


def resolve_bundle(
    bundle: str | Path | None, progress: Progress | None = None
) -> tuple[Bundle, MadeBundle | None]:
    """The bundle at ``bundle``, or the embedded default's: made on first use, and where kvp
    pays on this machine measured once (that measurement returned too, for a caller to show)."""
    if bundle is not None:
        return load_bundle(bundle), None
    b = default_bundle(progress=progress)
    if keys.MANIFEST_BREAK_EVEN in b.manifest:
        return b, None
    measured = measure_break_even(b, progress)
    return measured.bundle, measured


def engine_for(
    bundle: str | Path | None,
    model: str | Path | None,
    mode: str,
    settings: ContextSettings,
    progress: Progress | None = None,
) -> Engine:
    """The engine ``load`` and ``kvcli serve`` open: a plain ``model`` serves mode base;
    otherwise the bundle (``resolve_bundle``)."""
    if model is not None:
        if bundle is not None:
            raise KvcliError("give either a bundle or a model, not both")
        if mode != "base":
            raise KvcliError(f"mode {mode} needs an auxiliary and a predictor: give a bundle")
        return Engine(model, settings=settings)
    return Engine.from_bundle(resolve_bundle(bundle, progress)[0], settings=settings)
