"""TTFT side by side, in the manner of llama-bench: modes interleaved, quality on the side.

Per prompt length N: ``repeats`` distinct prompts of exactly N tokens from the held-out
corpus part. Each round runs every method on that round's prompt, base first (base, kvp per
tail, truncate, select), so that machine noise hits all alike. TTFT is from having the tokens to
having the greedy first token. Untimed, after each timed prefill: the base continues
greedily for FORCED tokens (the reference), and every other method is teacher-forced on
them (first-token agreement, mean KL(base || method)). Truncation keeps the last M tokens,
token selection M tokens the auxiliary ranks highest, each M matched to the last kvp
setting's TTFT on the first prompt (kvcli.eval.matched).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.engine.timings import Timings
from kvcli.engine.token_select import MIN_SELECT_KEEP
from kvcli.errors import KvcliError
from kvcli.eval.matched import TimedPrefill, matched_count, timed_prefill
from kvcli.eval.quality import forced_scores, reference_after_prefill
from kvcli.predict.corpus import token_chunks

BENCH_MODES = ("base", "kvp", "truncate", "select")


@dataclass(frozen=True)
class Method:
    mode: str
    tail: int = 0
    keep: int | None = None
    spans: int = 0
    aux_load: str = ""  # kvp: set when it runs on one of the extra engines (by its aux_load)


@dataclass
class Runs:
    ttft_ms: list[float] = field(default_factory=list)
    timings: list[Timings] = field(default_factory=list)
    first_agree: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)


def bench_prompts(engine: Engine, n_tokens: int, count: int) -> list[list[int]]:
    """``count`` distinct held-out prompts of exactly ``n_tokens`` tokens (BOS first where
    the model adds one)."""
    model = engine.model
    prompts = [
        t
        for _, t in token_chunks(
            "heldout",
            lambda s: model.tokenize(s, add_special=False),
            chunk_tokens=n_tokens,
            n_chunks=count,
            bos=model.prompt_bos,
        )
    ]
    if len(prompts) < count:
        raise KvcliError(f"the held-out corpus has only {len(prompts)} texts of {n_tokens} tokens")
    return prompts


def _prefill(engine: Engine, tokens: list[int], m: Method) -> TimedPrefill:
    return timed_prefill(
        engine, tokens, mode=m.mode, kvp=KvpSettings(tail=m.tail, spans=m.spans), keep=m.keep
    )


def bench_length(
    engine: Engine,
    n_tokens: int,
    *,
    modes: list[str],
    kvp: list[tuple[int, int]],
    repeats: int,
    warmup: int,
    progress: Callable[[], None] | None = None,
    extra_engines: dict[str, Engine] | None = None,
) -> tuple[dict[Method, Runs], list[list[int]]]:
    """``kvp``: its (tail, spans) settings, each a method; truncation and selection are
    matched to the TTFT of the last. ``extra_engines``: aux_load -> an engine that loads the auxiliary that
    way; kvp (tail 0) is also timed on each, side by side with the main engine's."""
    extra_engines = extra_engines or {}
    prompts = bench_prompts(engine, n_tokens, repeats)
    methods = [Method("base")] if "base" in modes else []
    if "kvp" in modes:
        methods += [Method("kvp", tail=t, spans=s) for t, s in kvp]
        methods += [Method("kvp", aux_load=load) for load in extra_engines]

    def pick(m: Method) -> Engine:
        return extra_engines.get(m.aux_load, engine)

    for _ in range(warmup):  # a first run allocates; it is never timed
        for m in methods:
            _prefill(pick(m), prompts[0], m)
    runs = {m: Runs() for m in methods}
    for i, tokens in enumerate(prompts):
        ref = None
        for m in list(methods):
            ref = _record(pick(m), tokens, m, runs[m], ref)
            if progress:
                progress()
        for mode in ("truncate", "select") if i == 0 else ():
            if mode not in modes:
                continue
            m = Method(mode, keep=_matched(engine, tokens, mode, runs, kvp))
            methods.append(m)
            runs[m] = Runs()
            _prefill(engine, tokens, m)  # untimed: its first run
            ref = _record(engine, tokens, m, runs[m], ref)
            if progress:
                progress()
    return runs, prompts


def _matched(engine: Engine, tokens: list[int], mode: str, runs: dict, kvp) -> int:
    """The keep of truncation or selection for the TTFT of the last kvp setting (a third of
    the prompt without kvp or the base in this run)."""
    matched = Method("kvp", tail=kvp[-1][0], spans=kvp[-1][1]) if kvp else None
    if Method("base") not in runs or matched not in runs:
        return len(tokens) // 3
    extra = dict(minimum=MIN_SELECT_KEEP) if mode == "select" else {}
    return matched_count(
        engine, tokens, runs[matched].ttft_ms[0], mode=mode, base_ms=runs[Method("base")].ttft_ms[0], **extra
    )


def _record(engine: Engine, tokens: list[int], m: Method, r: Runs, ref):
    """One timed prefill; the base's returns the reference, the others are scored on it."""
    ctx, logits, first, ttft, timings = _prefill(engine, tokens, m)
    r.ttft_ms.append(ttft)
    r.timings.append(timings)
    if m.mode == "base":
        ref = reference_after_prefill(ctx, logits)
        r.first_agree.append(True)
        r.kl.append(0.0)
    elif ref is not None:
        r.first_agree.append(first == ref.tokens[0])
        r.kl.append(forced_scores(ctx, logits, ref)[0])
    return ref


def summarize(n_tokens: int, runs: dict[Method, Runs]) -> list[dict]:
    """One row per method, ratios from the base's TTFT of this same run."""
    base = runs.get(Method("base"))
    base_mean = statistics.fmean(base.ttft_ms) if base else None
    rows = []
    for m, r in runs.items():
        mean = statistics.fmean(r.ttft_ms)
        row = {
            "n_prompt": n_tokens,
            "mode": m.mode,
            "tail": m.tail,
            "spans": m.spans,
            "keep": m.keep,
            "aux_load": m.aux_load or None,
            "repeats": len(r.ttft_ms),
            "ttft_ms_mean": round(mean, 2),
            "ttft_ms_std": round(statistics.stdev(r.ttft_ms), 2) if len(r.ttft_ms) > 1 else 0.0,
            "ttft_ms_median": round(statistics.median(r.ttft_ms), 2),
            "ttft_ratio": round(mean / base_mean, 4) if base_mean else None,
            "first_token_agreement": round(float(np.mean(r.first_agree)), 4) if r.first_agree else None,
            "kl_mean": round(float(np.mean(r.kl)), 5) if r.kl else None,
            "peak_rss_mib": None,
            "peak_pss_mib": None,
            "pss_mib": None,
        }
        if m.mode == "kvp":
            parts = {
                k: round(statistics.fmean(t.as_dict()[k] for t in r.timings), 2)
                for k in r.timings[0].as_dict()
            }
            floor = parts["aux_prefill_ms"] + parts["base_decode_ms"]
            overhead = (
                parts["state_get_ms"] + parts["predict_ms"] + parts["state_set_ms"] + parts["recompute_ms"]
            )
            row.update(
                breakdown_ms=parts,
                floor_ms=round(floor, 2),
                floor_ratio=round(mean / floor, 4),
                overhead_share=round(overhead / mean, 4),
            )
        rows.append(row)
    return rows
