"""A conversation with predicted prefill, incremental across turns.

The base context keeps its cache from turn to turn. Each turn the conversation is rendered
with the chat template and tokenized; the tokens the base already holds (the longest common
prefix) stay, the rest are new. With kvp the auxiliary, whose own context is kept in step
with the conversation, decodes the new tokens but the last W+1; the base's cells of those
positions are predicted, and the state written back holds the base's earlier cells byte for
byte plus the predicted ones (``llama_state_seq_set_data`` replaces a whole sequence). The
base then decodes the last W+1 prompt tokens and the reply itself.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from kvcli.engine import Engine
from kvcli.errors import ContextError, KvcliError
from kvcli.kv_layout import layers_by_index
from kvcli.predict_state import needed_positions, predict_base_kv, state_bytes
from kvcli.runtime import apply_chat_template, model_chat_template
from kvcli.sampling import Sampler
from kvcli.spans import residual_sinks
from kvcli.state_codec import parse_seq_state

# the template of an architecture whose GGUF stores none (llama.cpp's built-in names)
ARCH_TEMPLATES = {"gemma3": "gemma", "qwen2": "chatml", "llama": "llama2", "openelm": "llama2"}
CHAT_MODES = ("kvp", "base")
# a turn's attention sinks within its first SINK_HEAD new positions are decoded by the base
SINK_HEAD = 64


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

    @property
    def tokens_per_s(self) -> float:
        return self.n_gen / (self.gen_ms / 1e3) if self.gen_ms > 0 else 0.0


class Conversation:
    def __init__(self, engine: Engine, *, system: str | None = None, template: str | None = None,
                 mode: str = "kvp", tail: int = 0, n_predict: int = 256, drop_old: bool = False,
                 sampler: Sampler | None = None):
        self.engine = engine
        self.template = template or model_chat_template(engine.model) or \
            ARCH_TEMPLATES.get(engine.base_info.arch, "chatml")
        self.system = system
        self.tail, self.n_predict, self.drop_old = tail, n_predict, drop_old
        self.sampler = sampler or Sampler()
        self.messages: list[dict] = []
        self.base_tokens: list[int] = []  # what the base context holds, by position
        self.aux_tokens: list[int] = []  # what the auxiliary context holds
        self.history: list[TurnStats] = []
        self.predicted_spans: list[tuple[int, int]] = []  # [p0, p1) whose base cells were predicted
        self.mode = "base"
        self.set_mode(mode)
        self.render([{"role": "user", "content": "hi"}])  # fail early on an unknown template

    def set_mode(self, mode: str) -> None:
        if mode not in CHAT_MODES:
            raise KvcliError(f"unknown chat mode {mode!r} (one of {', '.join(CHAT_MODES)})")
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
                raise ContextError(f"this turn needs {len(tokens)} tokens but the context holds "
                                   f"{n_ctx}; /reset, a larger --ctx, or --drop-old")
            del self.messages[: 2 if len(self.messages) > 1 else 1]  # the oldest exchange

    def send(self, text: str, on_token: Callable[[int], None] | None = None) -> tuple[str, TurnStats]:
        """One turn: prefill what is new, then stream the reply. Ctrl-C stops the reply."""
        user = {"role": "user", "content": text}
        tokens = self._fit(user)
        start = time.perf_counter()
        logits, n_new, n_predicted = self._prefill(tokens)
        token = self.sampler.sample(logits)
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
        stats = TurnStats(self.mode, n_new, n_predicted, ttft, len(out),
                          (time.perf_counter() - gen_start) * 1e3, interrupted)
        self.history.append(stats)
        return reply, stats

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, int, int]:
        """Returns the last logits, the prompt tokens processed, the positions predicted."""
        base = self.engine.base
        p0 = min(common_prefix(self.base_tokens, tokens), len(tokens) - 1)
        base.truncate(p0)
        self.base_tokens = tokens[:p0]
        self.predicted_spans = [(a, min(b, p0)) for a, b in self.predicted_spans if a < p0]
        n_new = len(tokens) - p0
        n_pred = len(tokens) - 1 - max(0, self.tail)
        n_predicted = 0
        if self.mode == "kvp" and n_pred > p0:
            self._predict_into_base(tokens, p0, n_pred)
            self.predicted_spans.append((p0, n_pred))
            n_predicted = n_pred - p0
            p0 = n_pred
        base.decode(tokens[p0:], start=p0, logits_last=True)
        self.base_tokens = list(tokens)
        return base.last_logits(), n_new, n_predicted

    def _sink_head(self, hidden: list[np.ndarray], a0: int, p0: int, n_pred: int) -> int:
        """One past the last attention sink among the new positions' first SINK_HEAD
        (kvcli.spans.sink_positions: a chat template's first newlines and the like, whose
        predicted cells are garbage), else p0. Needs the residual feature and 16 new rows."""
        if n_pred - a0 < 16:
            return p0
        sinks = [a0 + p for p in residual_sinks(self.engine.predictor, hidden)]
        sinks = [p for p in sinks if p0 <= p < min(n_pred, p0 + SINK_HEAD)]
        return max(sinks) + 1 if sinks else p0

    def _predict_into_base(self, tokens: list[int], p0: int, n_pred: int) -> None:
        eng = self.engine
        aux = eng.aux
        # the auxiliary decodes from no later than p0: an interrupted turn can leave it
        # holding positions the base does not (the features must cover p0..n_pred-1)
        a0 = min(common_prefix(self.aux_tokens, tokens[:n_pred]), p0)
        aux.truncate(a0)
        self.aux_tokens = tokens[:a0]
        if aux.capture is not None:
            aux.capture.clear()
        aux.decode(tokens[a0:n_pred], start=a0)
        self.aux_tokens = tokens[:n_pred]
        hidden, raw_kv = eng.take_captured(n_pred - a0)
        head = self._sink_head(hidden, a0, p0, n_pred)
        if head > p0:  # the base decodes the turn's head itself, through its last attention sink
            eng.base.decode(tokens[p0:head], start=p0)
            if head == n_pred:
                return
            p0 = head
        aux_layers = layers_by_index(parse_seq_state(aux.get_state(-1)), eng.aux_state_info)
        layout = eng.base_layout()
        new_positions = [p[p >= p0] for p in needed_positions(eng.base_info, n_pred, first_query=n_pred)]
        kv = predict_base_kv(aux_layers, eng.aux_info, eng.base_info, eng.predictor, new_positions,
                             first_cell=eng.first_cell(tokens[0]) if p0 == 0 else None,
                             key_norms=eng.key_norms, hidden=hidden, hidden_start=a0, raw_kv=raw_kv)
        old = layers_by_index(parse_seq_state(eng.base.get_state(0)), eng.base_info) if p0 else {}
        merged_positions = []
        for group, positions in zip(eng.base_info.cache_layer_groups, new_positions):
            cells = old.get(group[0]) if group else None
            keep = (cells.positions < p0) if cells is not None else None
            old_positions = cells.positions[keep] if cells is not None else positions[:0]
            merged_positions.append(np.concatenate([old_positions, positions]))
            for il in group:
                if cells is None:
                    continue
                k, v = kv[il]
                kv[il] = (np.concatenate([old[il].k[keep], k]), np.concatenate([old[il].v[keep], v]))
        eng.base.set_state(state_bytes(layout, merged_positions, kv), 0, n_past=n_pred)


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
