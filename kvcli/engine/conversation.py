"""A conversation with predicted prefill, incremental across turns.

The base context keeps its cache from turn to turn. Each turn the conversation is rendered
with the chat template and tokenized; the tokens the base already holds (the longest common
prefix) stay, the rest are new and go through the engine's prefill from there, as
``generate``'s prompt does (kvcli.engine.kvp_prefill): with kvp the auxiliary, whose own context is
kept in step with the conversation, decodes the new tokens but the tail; their base cells
are predicted and added to the base's, the spans the question looks for (among every
position still predicted, this turn's or earlier) and the attention sinks are recomputed,
and the base decodes the tail and the reply itself.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from kvcli.choices import Choice
from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings, Prefill
from kvcli.engine.recompute import merge_ranges
from kvcli.engine.sampling import Sampler
from kvcli.errors import ContextError, KvcliError
from kvcli.llama.chat_template import apply_chat_template, chat_template_for

# the template of an architecture whose GGUF stores none (llama.cpp's built-in names)


class ChatMode(Choice):
    KVP = "kvp"
    BASE = "base"


CHAT_MODES = ChatMode.values()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


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
        self.kvp = (
            engine.kvp_settings(tail, spans) if engine.predictor is not None else KvpSettings(tail=tail or 0)
        )
        self.n_predict, self.drop_old = n_predict, drop_old
        self.sampler = sampler or Sampler()
        self.messages: list[dict] = []
        self.base_tokens: list[int] = []  # what the base context holds, by position
        self.aux_tokens: list[int] = []  # what the auxiliary context holds
        self.history: list[TurnStats] = []
        self.predicted_spans: list[tuple[int, int]] = []  # [a, b) whose base cells are predicted
        self.mode = "base"
        self.set_mode(mode)
        self.render([{"role": "user", "content": "hi"}])  # fail early on an unknown template

    def set_mode(self, mode: str) -> None:
        mode = ChatMode.parse(mode, "chat mode")
        if mode == "kvp" and self.engine.predictor is None:
            raise KvcliError("mode kvp needs a bundle with an auxiliary and a predictor")
        self.mode = mode

    def reset(self) -> None:
        self.messages.clear()
        self.base_tokens, self.aux_tokens, self.predicted_spans = [], [], []
        self.engine.base.clear()
        if self.engine.aux is not None:
            self.engine.aux.clear()

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
        prefill, n_new, n_predicted = self._prefill(tokens)
        token = self.sampler.sample(prefill.logits)
        ttft = (time.perf_counter() - start) * 1e3
        self.messages.append(user)
        ctx, out, interrupted = self.engine.base, [], False
        gen_start = time.perf_counter()
        try:
            with _ctrl_c_as_flag() as stop:
                while not ctx.model.is_eog(token) and len(out) < self.n_predict:
                    out.append(token)
                    if on_token is not None:
                        on_token(token)
                    if ctx.n_past + 1 >= ctx.n_ctx or stop.is_set():
                        break
                    ctx.decode([token], logits_last=True)
                    token = self.sampler.sample(ctx.last_logits())
                interrupted = stop.is_set()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.base_tokens = (tokens + out)[: ctx.n_past]
        reply = ctx.model.detokenize(out)
        self.messages.append({"role": "assistant", "content": reply})
        stats = TurnStats(
            self.mode,
            n_new,
            n_predicted,
            ttft,
            len(out),
            (time.perf_counter() - gen_start) * 1e3,
            interrupted,
            prefill.recomputed,
        )
        self.history.append(stats)
        return reply, stats

    def _prefill(self, tokens: list[int]) -> tuple[Prefill, int, int]:
        """Returns the prefill, the prompt tokens processed, the positions predicted."""
        eng = self.engine
        p0 = min(common_prefix(self.base_tokens, tokens), len(tokens) - 1)
        self.base_tokens = tokens[:p0]
        self.predicted_spans = [(a, min(b, p0)) for a, b in self.predicted_spans if a < p0]
        n_pred = len(tokens) - 1 - max(0, self.kvp.tail)
        short = not eng.kvp_pays(len(tokens) - p0)  # under the bundle's break-even
        if self.mode != "kvp" or short or (n_pred <= p0 and not (self.kvp.spans and self.predicted_spans)):
            prefill = eng.prefill(tokens, mode="base", kvp=KvpSettings(start=p0))
            self.base_tokens = list(tokens)
            return prefill, len(tokens) - p0, 0
        # the auxiliary decodes from no later than p0: an interrupted turn can leave it
        # holding positions the base does not (the features must cover p0..n_pred-1)
        a0 = min(common_prefix(self.aux_tokens, tokens[:n_pred]), p0)
        if n_pred > p0:
            self.aux_tokens = tokens[:a0]
        turn = replace(self.kvp, start=p0, aux_start=a0, earlier=self.predicted_spans)
        prefill = eng.prefill(tokens, mode="kvp", kvp=turn)
        if n_pred > p0:
            self.aux_tokens = tokens[: eng.aux.n_past]
        self.base_tokens = list(tokens)
        exact = prefill.recomputed
        # position 0's cell is the base's own (predict.apply.FirstCell), never predicted
        predicted = merge_ranges(self.predicted_spans, [(max(1, a), b) for a, b in prefill.predicted])
        self.predicted_spans = _minus(predicted, exact)
        return prefill, len(tokens) - p0, sum(b - a for a, b in _minus(prefill.predicted, exact))


def _minus(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The positions of ``ranges`` outside ``holes``, as ordered ranges."""
    out = []
    for a, b in ranges:
        for h0, h1 in holes:
            if h0 < b and a < h1:
                if a < h0:
                    out.append((a, h0))
                a = max(a, h1)
        if a < b:
            out.append((a, b))
    return out


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
