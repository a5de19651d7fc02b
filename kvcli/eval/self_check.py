"""A bundle's check of itself: is its predicted prefill better than the cheap fallbacks?

On held-out text of three kinds (prose: the standard library's held-out docstrings; code:
its held-out sources; a conversation: prose pasted into user turns of the base's own chat
template), never the calibration text, the base prefills each prompt and its greedy next
tokens are the reference; kvp (the bundle's default settings), truncation to the prompt's
last M tokens with M matched to kvp's measured TTFT, and the auxiliary alone are scored by
KL(base || method) and top-1 agreement teacher-forced on those tokens (kvcli.eval.quality).

The verdict is a line a user reads before trusting the bundle: where kvp's KL is above
truncation's at the same TTFT, kvp is worse than simply cutting the prompt, and what the
auxiliary alone costs against the base says whether a smaller model would have done.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

import numpy as np

from kvcli import keys
from kvcli.engine.engine import Engine
from kvcli.eval.matched import matched_keep
from kvcli.eval.quality import MethodStats, base_reference, score_method
from kvcli.eval.tasks import Example, make_examples, prose
from kvcli.llama.chat_template import apply_chat_template, chat_template_for

KINDS = ("prose", "code", "conversation")
DEFAULT_TOKENS = 512
DEFAULT_N = 2
SEED = 7  # not the judge's seeds: another draw of the held-out texts


def _conversation(engine: Engine, rng: random.Random, n_tokens: int) -> Example:
    """A user turn that pastes held-out prose and asks about it, in the base's template,
    cut to about ``n_tokens`` tokens."""
    template = chat_template_for(engine.model, engine.base_info.arch)
    text = prose(rng, n_tokens, engine.tokenize).prompt
    words = text.split()
    while True:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": " ".join(words) + "\n\nWhat is this text about?"},
        ]
        rendered = apply_chat_template(template, messages, add_assistant=True)
        if len(engine.tokenize(rendered)) <= n_tokens or len(words) < 16:
            return Example("conversation", rendered, None)
        words = words[: int(len(words) * 0.9)]


def check_prompts(
    engine: Engine, n_tokens: int = DEFAULT_TOKENS, n: int = DEFAULT_N, seed: int = SEED
) -> dict[str, list[list[int]]]:
    """Per kind, ``n`` held-out prompts of about ``n_tokens`` tokens."""
    rng = random.Random(f"self-check:{seed}:{n_tokens}")
    examples = {
        "prose": make_examples("prose", n=n, n_tokens=n_tokens, tokenize=engine.tokenize, seed=seed),
        "code": make_examples("continuation", n=n, n_tokens=n_tokens, tokenize=engine.tokenize, seed=seed),
        "conversation": [_conversation(engine, rng, n_tokens) for _ in range(n)],
    }
    return {kind: [engine.tokenize(ex.prompt) for ex in exs] for kind, exs in examples.items()}


def _summary(stats: MethodStats, base_ttft: float) -> dict:
    return {
        "kl": round(float(np.mean(stats.kl)), 4),
        "top1": round(float(np.mean(stats.top1)), 4),
        "ttft_ratio": round(statistics.median(stats.ttft_ms) / base_ttft, 3),
        **({"keep": stats.keep} if stats.keep is not None else {}),
    }


def check_engine(
    engine: Engine,
    *,
    n_tokens: int = DEFAULT_TOKENS,
    n: int = DEFAULT_N,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The check's figures and verdict for ``engine`` (a bundle's base, auxiliary and
    predictor), as stored in the bundle's manifest under ``check``."""
    kvp = engine.kvp_settings()
    prompts = check_prompts(engine, n_tokens, n)
    keep = matched_keep(engine, prompts["prose"][0], kvp)
    kinds, done, total = {}, 0, sum(len(p) for p in prompts.values())
    for kind, kind_prompts in prompts.items():
        base_ttft = []
        methods = [
            MethodStats("kvp", tail=kvp.tail, spans=kvp.spans),
            MethodStats("truncate", keep=keep),
            MethodStats("aux"),
        ]
        for tokens in kind_prompts:
            ref, ttft, _ = base_reference(engine, tokens)
            base_ttft.append(ttft)
            for stats in methods:
                score_method(engine, tokens, ref, stats, Example(kind, "", None))
            done += 1
            if progress:
                progress(done, total)
        median = statistics.median(base_ttft)
        kinds[kind] = {"base_ttft_ms": round(median, 1), **{m.method: _summary(m, median) for m in methods}}
    return verdict({"n_tokens": n_tokens, "n": n, "kvp_settings": kvp.recorded(), "kinds": kinds})


def verdict(check: dict) -> dict:
    """Add ``losing_kinds`` (where kvp's KL is above truncation's), ``aux_ttft_ratio``,
    ``kvp_ttft_ratio`` and ``warning`` (None, or the one line to show) to ``check``: kvp
    loses to truncation somewhere, or the auxiliary alone is both cheaper than kvp and
    closer to the base (a model of its own, KVP-C; a prefix of the base alone is not)."""
    kinds = check["kinds"]
    losing = [k for k, r in kinds.items() if r["kvp"]["kl"] > r["truncate"]["kl"]]
    aux_ratio = statistics.median(r["aux"]["ttft_ratio"] for r in kinds.values())
    kvp_ratio = statistics.median(r["kvp"]["ttft_ratio"] for r in kinds.values())
    warning = None
    if kvp_ratio >= 1.0:
        warning = f"kvp takes {kvp_ratio:.2f}x the base's TTFT: slower than the base alone"
    if losing:
        worst = max(losing, key=lambda k: kinds[k]["kvp"]["kl"] - kinds[k]["truncate"]["kl"])
        losing_line = (
            f"kvp loses to truncation at the same TTFT on {', '.join(losing)} (KL "
            f"{kinds[worst]['kvp']['kl']:.3f} vs {kinds[worst]['truncate']['kl']:.3f} on "
            f"{worst}): its predicted cache is worse than cutting the prompt"
        )
        warning = f"{warning}; {losing_line}" if warning else losing_line
    # closer than kvp and than truncation: a model of its own, not two failures compared
    aux_closer = [k for k, r in kinds.items() if r["aux"]["kl"] <= min(r["kvp"]["kl"], r["truncate"]["kl"])]
    if kvp_ratio >= aux_ratio and aux_closer:
        more = (
            f"the auxiliary alone is closer to the base on {', '.join(aux_closer)} and cheaper "
            f"({aux_ratio:.2f}x the base's TTFT against kvp's {kvp_ratio:.2f}x): use it instead"
        )
        warning = f"{warning}; {more}" if warning else more
    return {
        **check,
        "losing_kinds": losing,
        "aux_ttft_ratio": round(aux_ratio, 3),
        "kvp_ttft_ratio": round(kvp_ratio, 3),
        keys.CHECK_WARNING: warning,
    }


def summary_line(check: dict) -> str:
    """One line: the auxiliary alone's cost against the base's, kvp's, and the verdict."""
    head = (
        f"auxiliary alone: {check['aux_ttft_ratio']:.2f}x the base's TTFT; kvp: "
        f"{check['kvp_ttft_ratio']:.2f}x"
    )
    return (
        f"{head}. Warning: {check[keys.CHECK_WARNING]}"
        if check.get(keys.CHECK_WARNING)
        else (f"{head}; kvp is ahead of truncation at the same TTFT on {', '.join(check['kinds'])}")
    )
