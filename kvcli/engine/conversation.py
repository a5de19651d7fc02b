"""A conversation with predicted prefill, incremental across turns.

The base context keeps its cache from turn to turn. Each turn the conversation is rendered
with the chat template and tokenized; the tokens the base already holds stay and the rest is
prefilled (kvcli.engine.prompt_cache, the one path for prefix reuse); the base generates the
reply (kvcli.engine.generation.Reply).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvcli.choices import Choice
from kvcli.engine.engine import Engine
from kvcli.engine.generation import Reply
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.prompt_cache import CachedPrefill, PromptCache
from kvcli.engine.sampling import Sampler
from kvcli.errors import ContextError, KvcliError
from kvcli.llama.chat_template import apply_chat_template, chat_template_for

# the template of an architecture whose GGUF stores none (llama.cpp's built-in names)


class ChatMode(Choice):
    KVP = "kvp"
    BASE = "base"


CHAT_MODES = ChatMode.values()


@dataclass
class TurnStats:
    mode: str
    n_new: int  # prompt tokens processed this turn (after the cached prefix)
    n_predicted: int  # of those, positions whose base cells were predicted
    ttft_ms: float
    n_gen: int
    gen_ms: float
    interrupted: bool = False
    recomputed: tuple[tuple[int, int], ...] = ()  # kvp: the ranges the base recomputed this turn

    @property
    def tokens_per_s(self) -> float:
        return self.n_gen / (self.gen_ms / 1e3) if self.gen_ms > 0 else 0.0


class Conversation:
    def __init__(
        self,
        engine: Engine,
        *,
        system: str | None = None,
        template: str | None = None,
        mode: str = "kvp",
        tail: int | None = None,
        spans: int | None = None,
        n_predict: int = 256,
        drop_old: bool = False,
        sampler: Sampler | None = None,
    ):
        """``tail``, ``spans``: kvp's, as ``generate``'s (None: the engine's defaults)."""
        self.engine = engine
        self.template = template or chat_template_for(engine.model, engine.base_info.arch)
        self.system = system
        self.cache = PromptCache(
            engine,
            engine.kvp_settings(tail, spans) if engine.predictor is not None else KvpSettings(tail=tail or 0),
        )
        self.n_predict, self.drop_old = n_predict, drop_old
        self.sampler = sampler or Sampler()
        self.messages: list[dict] = []
        self.history: list[TurnStats] = []
        self.mode = "base"
        self.set_mode(mode)
        self.render([{"role": "user", "content": "hi"}])  # fail early on an unknown template

    def set_mode(self, mode: str) -> None:
        mode = ChatMode.parse(mode, "chat mode")
        if mode == "kvp" and self.engine.predictor is None:
            raise KvcliError("mode kvp needs a bundle with an auxiliary and a predictor")
        self.mode = mode

    @property
    def kvp(self) -> KvpSettings:
        return self.cache.kvp

    @property
    def base_tokens(self) -> list[int]:
        """What the base context holds, by position."""
        return self.cache.base_tokens

    @property
    def predicted_spans(self) -> list[tuple[int, int]]:
        """[a, b) whose base cells are predicted."""
        return self.cache.predicted_spans

    def reset(self) -> None:
        self.messages.clear()
        self.cache.reset()

    def render(self, messages: list[dict]) -> str:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return apply_chat_template(self.template, head + messages, add_assistant=True)

    def tokens_for(self, messages: list[dict]) -> list[int]:
        return self.engine.model.tokenize(self.render(messages))

    def _fit(self, user: dict) -> list[int]:
        """The prompt tokens with ``user`` added; drops old turns with ``drop_old``."""
        n_ctx = self.engine.base.n_ctx
        while True:
            tokens = self.tokens_for([*self.messages, user])
            if len(tokens) + 1 <= n_ctx:
                return tokens
            if not self.drop_old or not self.messages:
                raise ContextError(
                    f"this turn needs {len(tokens)} tokens but the context holds "
                    f"{n_ctx}; /reset, a larger --ctx, or --drop-old"
                )
            del self.messages[: 2 if len(self.messages) > 1 else 1]  # the oldest exchange

    def send(self, text: str, on_token: Callable[[int], None] | None = None) -> tuple[str, TurnStats]:
        """One turn: prefill what is new, then stream the reply. Ctrl-C stops the reply."""
        user = {"role": "user", "content": text}
        tokens = self._fit(user)
        start = time.perf_counter()
        cached = self._prefill(tokens)
        token = self.sampler.sample(cached.prefill.logits)
        ttft = (time.perf_counter() - start) * 1e3
        self.messages.append(user)
        reply = Reply(self.engine.base, token, self.sampler, max_tokens=self.n_predict, on_token=on_token)
        try:
            with _ctrl_c_as_flag() as stop:
                reply.stop_event = stop
                reply.run()
        except KeyboardInterrupt:
            reply.finish_reason = "interrupted"
        finally:
            self.cache.held(tokens + reply.tokens)
        text = self.engine.model.detokenize(reply.tokens)
        self.messages.append({"role": "assistant", "content": text})
        stats = TurnStats(
            self.mode,
            cached.n_new,
            cached.n_predicted,
            ttft,
            len(reply.tokens),
            reply.gen_ms,
            reply.finish_reason == "interrupted",
            cached.prefill.recomputed,
        )
        self.history.append(stats)
        return text, stats

    def _prefill(self, tokens: list[int]) -> CachedPrefill:
        return self.cache.prefill(tokens, self.mode)


@contextmanager
def _ctrl_c_as_flag() -> Iterator[threading.Event]:
    """While a reply streams, Ctrl-C sets the returned event instead of raising: a
    KeyboardInterrupt raised wherever Python happened to be (a callback, a finalizer) can be
    swallowed there, and the reply would run on; the loop checks the event every token.
    Outside the main thread (no signal handlers there) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
