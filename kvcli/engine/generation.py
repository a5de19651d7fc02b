"""The token loop after a prefill, one for every caller: ``Reply`` streams what the base
generates (text pieces as they become whole, stop strings held back until they cannot match),
``generate`` prefills a prompt and runs it (``kvcli generate``, eval), and the conversation and
the Python API run it after their cached prefill."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Iterator

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.sampling import Sampler
from kvcli.engine.timings import Generation
from kvcli.llama.runtime import Context


class Reply:
    """The base's reply after a prefill, from its first sampled token: iterate it for text
    pieces; once done, ``tokens``, ``text``, ``finish_reason`` ("stop": end of generation or a
    stop string; "length": ``max_tokens`` or a full context; "interrupted": ``stop_event``)
    and ``gen_ms``. The context holds the prompt and every reply token but the last."""

    def __init__(
        self,
        ctx: Context,
        first_token: int,
        sampler: Sampler,
        *,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        stop_event: threading.Event | None = None,
        on_token: Callable[[int], None] | None = None,
    ):
        self.ctx, self.token, self.sampler = ctx, first_token, sampler
        self.max_tokens, self.stop = max_tokens, tuple(s for s in stop if s)
        self.stop_event, self.on_token = stop_event, on_token
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = ""
        self.gen_ms = 0.0

    def __iter__(self) -> Iterator[str]:
        ctx, model = self.ctx, self.ctx.model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming
        text, sent, cut = "", 0, -1
        start = time.perf_counter()
        token = self.token
        try:
            while True:
                if model.is_eog(token):
                    self.finish_reason = "stop"
                    break
                self.tokens.append(token)
                if self.on_token is not None:
                    self.on_token(token)
                text += decoder.decode(model.token_bytes(token))
                # a stop string starts past what was sent: before it, no string was forming
                found = [i for i in (text.find(s, sent) for s in self.stop) if i >= 0]
                cut = min(found, default=-1)
                if cut >= 0:
                    text, self.finish_reason = text[:cut], "stop"
                    break
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold]
                    sent = len(text) - hold
                if len(self.tokens) >= self.max_tokens or ctx.n_past + 1 > ctx.n_ctx:
                    self.finish_reason = "length"
                    break
                if self.stop_event is not None and self.stop_event.is_set():
                    self.finish_reason = "interrupted"
                    break
                ctx.decode([token], logits_last=True)
                token = self.sampler.sample(ctx.last_logits())
            if cut < 0:
                text += decoder.decode(b"", final=True)
            if len(text) > sent:
                yield text[sent:]
        finally:
            self.text = text
            self.gen_ms = (time.perf_counter() - start) * 1e3
            if not self.finish_reason:
                self.finish_reason = "interrupted"  # the caller stopped iterating

    def run(self) -> Reply:
        for _ in self:
            pass
        return self


def generate(
    engine: Engine,
    tokens: list[int],
    *,
    mode: str = "kvp",
    n_predict: int = 64,
    kvp: KvpSettings | None = None,
    keep: int | None = None,
    select_by: str = "auto",
    sampler: Sampler | None = None,
    on_token=None,
    stop: tuple[str, ...] = (),
) -> Generation:
    """``engine`` prefills ``tokens`` by ``mode`` (kvp: by ``kvp``, KvpSettings() if None; by
    the base below the bundle's break-even, ``Engine.kvp_pays``), then its context generates
    up to ``n_predict`` tokens (stops at end of generation or a full context)."""
    sampler = sampler or Sampler()
    kvp = kvp or KvpSettings()
    by = "base" if mode == "kvp" and not engine.kvp_pays(len(tokens)) else mode
    start = time.perf_counter()
    prefill = engine.prefill(tokens, mode=by, kvp=kvp, keep=keep, select_by=select_by)
    ctx = prefill.context
    token = sampler.sample(prefill.logits)
    ttft_ms = (time.perf_counter() - start) * 1e3
    reply = Reply(ctx, token, sampler, max_tokens=n_predict, stop=stop, on_token=on_token).run()
    return Generation(
        mode=mode,
        n_prompt=len(tokens),
        ttft_ms=ttft_ms,
        timings=prefill.timings,
        tokens=reply.tokens,
        text=reply.text if stop else ctx.model.detokenize(reply.tokens),
        gen_ms=reply.gen_ms,
        first_logits=prefill.logits,
        tail=kvp.tail,
        spans=kvp.spans,
        recomputed=list(prefill.recomputed),
        selected=None if prefill.selected is None else len(prefill.selected),
        prefilled_by=by,
        finish_reason=reply.finish_reason,
    )
