"""The quality each prefill method keeps of the base's answers, at a measured TTFT.

For every example the base runs first: its greedy answer, and its greedy next FORCED tokens
with their log-probabilities. Then each method (kvp at each tail, truncate, the auxiliary
alone) prefills the same prompt: its own greedy answer is scored strictly, and, teacher-
forced on the base's FORCED tokens, KL(base || method) and top-1 agreement are measured.
Truncation keeps the last M tokens with M matched to the TTFT of the costliest kvp setting
on the first example (kvcli.eval.matched).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvcli.engine.engine import Engine
from kvcli.engine.prefill_types import KvpSettings
from kvcli.eval.matched import matched_count, median_ttft, timed_prefill
from kvcli.eval.prompts import ANSWER_TOKENS, Example
from kvcli.eval.stats import wilson
from kvcli.eval.tasks import make_examples
from kvcli.state.codec import parse_seq_state
from kvcli.state.layout import LayerCells, layers_by_index

FORCED = 32


@dataclass
class MethodStats:
    method: str
    tail: int | None = None
    spans: int | None = None
    keep: int | None = None
    select_by: str | None = None
    correct: list[bool] = field(default_factory=list)
    first_agree: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    k_err: list[list[float]] = field(default_factory=list)  # per example, per base layer
    v_err: list[list[float]] = field(default_factory=list)


def kv_relative_errors(
    got: dict[int, LayerCells], want: dict[int, LayerCells], below: int
) -> tuple[list[float], list[float]]:
    """Per layer, ||got - want|| / ||want|| of K and of V over the positions < ``below``
    that both caches hold (a sliding-window layer holds only its window)."""
    k_err, v_err = [], []
    for il in sorted(want):
        g, w = got[il], want[il]
        common, gi, wi = np.intersect1d(g.positions, w.positions, return_indices=True)
        keep = common < below
        gi, wi = gi[keep], wi[keep]
        for out, a, b in ((k_err, g.k, w.k), (v_err, g.v, w.v)):
            ref = b[wi].astype(np.float32)
            out.append(
                float(np.linalg.norm(a[gi].astype(np.float32) - ref) / max(float(np.linalg.norm(ref)), 1e-12))
            )
    return k_err, v_err


def cache_layers(engine: Engine) -> dict[int, LayerCells]:
    """The base context's cache (seq 0), by layer."""
    return layers_by_index(parse_seq_state(engine.base.get_state(0)), engine.base_info)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class BaseReference:
    tokens: list[int]  # the base's greedy next FORCED tokens
    logp: np.ndarray  # (FORCED, n_vocab) float32 log-probabilities
    answer: str
    greedy: list[int]  # its greedy tokens: the FORCED ones, or more where a long answer needs them


def _answer_text(model, tokens: list[int], n: int = ANSWER_TOKENS) -> str:
    """The first ``n`` greedy tokens up to end of generation, as text."""
    answer = []
    for token in tokens[:n]:
        if model.is_eog(token):
            break
        answer.append(token)
    return model.detokenize(answer)


def base_reference(
    engine: Engine, tokens: list[int], n_greedy: int = FORCED
) -> tuple[BaseReference, float, dict[int, LayerCells]]:
    """The base's reference, its TTFT and its cache right after the prefill."""
    ctx, logits, _, ttft, _ = timed_prefill(engine, tokens, mode="base")
    cache = cache_layers(engine)
    return reference_after_prefill(ctx, logits, n_greedy), ttft, cache


def reference_after_prefill(ctx, logits: np.ndarray, n_greedy: int = FORCED) -> BaseReference:
    """The base's greedy next FORCED tokens and log-probabilities, from its prefilled ``ctx``
    (``n_greedy`` > FORCED: that many greedy tokens in ``greedy``, for a long answer)."""
    token = int(np.argmax(logits))
    out, rows = [], []
    for i in range(max(FORCED, n_greedy)):
        out.append(token)
        if i < FORCED:
            rows.append(_log_softmax(logits).astype(np.float32))
        if i >= FORCED and ctx.model.is_eog(token):
            break
        ctx.decode([token], logits_last=True)
        logits = ctx.last_logits()
        token = int(np.argmax(logits))
    return BaseReference(out[:FORCED], np.stack(rows), _answer_text(ctx.model, out), out)


def forced_scores(ctx, logits: np.ndarray, ref: BaseReference) -> tuple[float, float]:
    """Mean KL(base || method) and top-1 agreement, teacher-forced on the base's tokens from
    a method's prefilled ``ctx`` (its last logits ``logits``); ``ctx`` advances FORCED - 1."""
    ctx.decode(ref.tokens[: FORCED - 1], logits_all=True)
    rows = np.concatenate([logits[None, :], ctx.logits_rows(FORCED - 1)])
    logp = _log_softmax(rows)
    p_base = np.exp(ref.logp.astype(np.float64))
    kl = float(np.mean(np.sum(p_base * (ref.logp - logp), axis=-1)))
    return kl, float(np.mean(rows.argmax(axis=-1) == np.array(ref.tokens)))


def score_method(
    engine: Engine,
    tokens: list[int],
    ref: BaseReference,
    stats: MethodStats,
    example: Example,
    true_cache: dict[int, LayerCells] | None = None,
) -> None:
    """One method on one example: answer, first token, teacher-forced KL and top-1; for kvp
    with ``true_cache`` (the base's own after its prefill), per-layer K, V errors over the
    positions kvp did not decode with the base itself at the end (spans included)."""
    mode = stats.method
    ctx, logits, first, ttft, _ = timed_prefill(engine, tokens, **_settings(stats))
    n_past = ctx.n_past
    if mode == "kvp" and true_cache is not None:
        k_err, v_err = kv_relative_errors(
            cache_layers(engine), true_cache, below=len(tokens) - 1 - (stats.tail or 0)
        )
        stats.k_err.append(k_err)
        stats.v_err.append(v_err)
    kl, top1 = forced_scores(ctx, logits, ref)
    stats.kl.append(kl)
    stats.top1.append(top1)
    stats.first_agree.append(first == ref.tokens[0])
    stats.ttft_ms.append(ttft)
    if example.answer is not None or example.answers:
        ctx.truncate(n_past)
        greedy = [first]
        while len(greedy) < example.answer_tokens and not ctx.model.is_eog(greedy[-1]):
            ctx.decode(greedy[-1:], logits_last=True)
            greedy.append(int(np.argmax(ctx.last_logits())))
        stats.correct.append(example.correct(_answer_text(ctx.model, greedy, example.answer_tokens)))


def _settings(stats: MethodStats) -> dict:
    """The prefill settings of one method."""
    kvp = KvpSettings(tail=stats.tail or 0, spans=stats.spans or 0)
    out = dict(mode=stats.method, kvp=kvp, keep=stats.keep)
    return out | ({"select_by": stats.select_by} if stats.select_by else {})


def evaluate_task(
    engine: Engine,
    task: str,
    n_tokens: int,
    *,
    n: int,
    tails: list[int],
    spans: list[int] = (0,),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Rows of base, kvp at each (tail, spans), truncation and token selection (each ranking)
    matched to the TTFT of the costliest kvp setting, the auxiliary alone."""
    from kvcli.engine.token_select import MIN_SELECT_KEEP, selection_rankings

    examples = make_examples(task, n=n, n_tokens=n_tokens, tokenize=engine.tokenize, seed=seed)
    prompts = [engine.tokenize(ex.prompt) for ex in examples]
    target = median_ttft(engine, prompts[0], mode="kvp", kvp=KvpSettings(tail=max(tails), spans=max(spans)))
    base = MethodStats("base")
    methods = [MethodStats("kvp", tail=t, spans=s) for s in spans for t in tails]
    base_ms = median_ttft(engine, prompts[0], mode="base")
    methods.append(MethodStats("truncate", keep=matched_count(engine, prompts[0], target, base_ms=base_ms)))
    for by in selection_rankings(engine):
        keep = matched_count(
            engine,
            prompts[0],
            target,
            mode="select",
            select_by=by,
            base_ms=base_ms,
            minimum=MIN_SELECT_KEEP,
        )
        methods.append(MethodStats("select", keep=keep, select_by=by))
    methods.append(MethodStats("aux"))
    for i, (ex, tokens) in enumerate(zip(examples, prompts)):
        ref, ttft, true_cache = base_reference(engine, tokens, ex.answer_tokens)
        base.ttft_ms.append(ttft)
        base.first_agree.append(True)
        base.kl.append(0.0)
        base.top1.append(1.0)
        if ex.answer is not None or ex.answers:
            base.correct.append(ex.correct(_answer_text(engine.model, ref.greedy, ex.answer_tokens)))
        for stats in methods:
            score_method(engine, tokens, ref, stats, ex, true_cache)
        if progress:
            progress(i + 1, len(examples))
    base_ttft = statistics.median(base.ttft_ms)
    base_acc = float(np.mean(base.correct)) if base.correct else None
    rows = []
    for stats in [base, *methods]:
        acc = float(np.mean(stats.correct)) if stats.correct else None
        ttft = statistics.median(stats.ttft_ms)
        rows.append(
            {
                "task": task,
                "n_prompt": n_tokens,
                "method": stats.method,
                "tail": stats.tail,
                "spans": stats.spans,
                "keep": stats.keep,
                "select_by": stats.select_by,
                "n": len(examples),
                "seed": seed,
                "haystacks": [ex.haystack for ex in examples],
                "accuracy": acc,
                "correct": int(sum(stats.correct)) if stats.correct else None,
                "ci95": [round(x, 4) for x in wilson(int(sum(stats.correct)), len(stats.correct))]
                if stats.correct
                else None,
                "retention": (acc / base_acc) if acc is not None and base_acc else None,
                "first_token_agreement": float(np.mean(stats.first_agree)),
                "kl_mean": float(np.mean(stats.kl)),
                "top1_agreement": float(np.mean(stats.top1)),
                "ttft_ms_median": ttft,
                "ttft_ratio": ttft / base_ttft,
                "k_rel_err": _layer_means(stats.k_err),
                "v_rel_err": _layer_means(stats.v_err),
                "kv_rel_err_predicted_layers": _predicted_mean(engine, stats),
            }
        )
    return rows


def _predicted_mean(engine: Engine, stats: MethodStats) -> list[float] | None:
    """Mean K and V relative error over the layers the predictor predicts."""
    if not stats.k_err or engine.predictor is None:
        return None
    layers = engine.predictor.predicted_layers
    return [round(float(np.mean(np.asarray(e)[:, layers])), 4) for e in (stats.k_err, stats.v_err)]


def _layer_means(per_example: list[list[float]]) -> list[float] | None:
    return [round(float(x), 4) for x in np.mean(per_example, axis=0)] if per_example else None
