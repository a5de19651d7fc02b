"""Which prompt spans the base recomputes itself: where the question looks.

A predicted cache loses facts stated once, far back (docs/design.md); the base recomputing the
sentences that state them, over the predicted cache, gets them back. They are found in the
first base layer after a prefix auxiliary. Its keys come from the predictor (0.28 relative
error on the default bundle); the queries are computed here in numpy from the tensors the
auxiliary already captures (the residual entering its last layer and that layer's attention
output: the rest of that layer, then the next layer's query projection), one per token of
the question (the tail the base decodes itself). A position scores, per head, the largest
weight any of those queries gives it, averaged over the heads; the spans are the sentences
around the peaks.

Why the whole question and the mean over heads (a scratch run over the judge's prompts,
1,024 tokens, seed 0, 10 each; docs/judge.md has the judge's runs): among five records of
one shape, the best 16-token window by the last token's query, max over heads, held the
asked value in 3/10 (records) and 3/10 (records_between) prompts over predicted keys, and
2/10 and 5/10 over the base's exact keys: the name asked for is in the question's middle,
not its last token. By the question's 24 last tokens, mean over heads: 9/10 and 10/10 over
predicted keys, 8/10 and 10/10 over exact ones (which cost 70 ms more): exact keys are not
worth computing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcli import keys
from kvcli.errors import IncompatibleError
from kvcli.models.gguf_header import read_tensors
from kvcli.models.model_info import ModelInfo
from kvcli.state.rope import rotate

_ARCHS = ("gemma3", "llama", "qwen2")


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


@dataclass
class QueryProjector:
    """Queries of base layer ``layer`` (= k, the auxiliary's depth) from the auxiliary's
    captured ``l_out-(k-2)`` and ``kqv_out-(k-1)`` rows: layer k-1's output projection,
    post-attention norm, FFN, then layer k's norm, query projection, query norm and RoPE."""

    info: ModelInfo
    layer: int
    w: dict[str, np.ndarray]

    @classmethod
    def for_base(cls, info: ModelInfo, layer: int) -> QueryProjector:
        if info.arch not in _ARCHS:
            raise IncompatibleError(f"choosing spans supports {', '.join(_ARCHS)}, not {info.arch}")
        if layer < 1 or layer >= info.n_layer:
            raise IncompatibleError(f"no base layer {layer} to choose spans with")
        if info.n_swa and info.is_swa[layer]:
            raise IncompatibleError(
                f"base layer {layer}, the first after the auxiliary, is a sliding-window layer: "
                "its attention cannot see far back, so it cannot choose spans"
            )
        prev, names = layer - 1, []
        names += [
            f"blk.{prev}.{n}"
            for n in (
                "attn_output.weight",
                "attn_output.bias",
                "post_attention_norm.weight",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
                "post_ffw_norm.weight",
            )
        ]
        names += [
            f"blk.{layer}.{n}"
            for n in ("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_q_norm.weight")
        ]
        w = read_tensors(info.path, set(names))
        missing = [
            n
            for n in names
            if n not in w
            and not n.endswith(".bias")
            and (info.arch == "gemma3" or ("post_" not in n and "q_norm" not in n))
        ]
        if missing:
            raise IncompatibleError(f"{info.path.name} has no tensor {missing[0]}")
        return cls(info, layer, w)

    def _proj(self, x: np.ndarray, name: str) -> np.ndarray:
        out = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return out if bias is None else out + bias

    def residual(self, into_prev: np.ndarray, prev_attention: np.ndarray) -> np.ndarray:
        """The residual entering layer k: layer k-1 finished from its attention output."""
        p, eps, gemma = f"blk.{self.layer - 1}", self.info.rms_eps, self.info.arch == "gemma3"
        x = into_prev.astype(np.float32)
        att = self._proj(prev_attention.astype(np.float32), f"{p}.attn_output")
        x = x + (_rms_norm(att, self.w[f"{p}.post_attention_norm.weight"], eps) if gemma else att)
        h = _rms_norm(x, self.w[f"{p}.ffn_norm.weight"], eps)
        gate = self._proj(h, f"{p}.ffn_gate")
        ffn = self._proj(
            (_gelu_tanh(gate) if gemma else _silu(gate)) * self._proj(h, f"{p}.ffn_up"), f"{p}.ffn_down"
        )
        return x + (_rms_norm(ffn, self.w[f"{p}.post_ffw_norm.weight"], eps) if gemma else ffn)

    def queries(self, residual: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(rows, n_head, head_dim) queries after the query norm and RoPE (llama.cpp's
        ``Qcur-k``), before the attention scale."""
        info, p = self.info, f"blk.{self.layer}"
        h = _rms_norm(residual.astype(np.float32), self.w[f"{p}.attn_norm.weight"], info.rms_eps)
        q = self._proj(h, f"{p}.attn_q").reshape(len(h), info.n_head[self.layer], info.head_dim_k)
        if f"{p}.attn_q_norm.weight" in self.w:
            q = _rms_norm(q, self.w[f"{p}.attn_q_norm.weight"], info.rms_eps)
        q = rotate(q.reshape(len(h), -1), np.asarray(positions), info.rope[self.layer])
        return q.reshape(len(h), info.n_head[self.layer], info.head_dim_k)


def spans_supported(hidden_kinds) -> bool:
    return keys.FEATURE_AUX_RESIDUAL in hidden_kinds and keys.FEATURE_AUX_ATTN in hidden_kinds


def question_scores(queries: np.ndarray, cached_keys: np.ndarray) -> np.ndarray:
    """Per key row, the mean over query heads of the largest softmax weight any of the
    question's query rows gives it in that head.

    ``queries`` (rows, n_head, d) all come after every key (no mask); ``cached_keys``
    (n_keys, n_head_kv * d), heads grouped as llama.cpp groups them (query head h reads KV
    head h // (n_head / n_head_kv)). The largest over rows: the question's name and its
    answer's lead-in ask different tokens for the fact; the mean over heads, not the
    largest: one head's look at a look-alike name does not outvote the others."""
    _, n_head, d = queries.shape
    kv = cached_keys.reshape(len(cached_keys), -1, d)
    group = n_head // kv.shape[1]
    total = np.zeros(len(kv), dtype=np.float64)
    for h in range(n_head):
        s = queries[:, h, :] @ kv[:, h // group, :].T / np.sqrt(d)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        total += (s / s.sum(axis=1, keepdims=True)).max(axis=0)
    return (total / n_head).astype(np.float32)


# A span is the sentence around an attention peak, not a fixed window: a fact's value follows
# its name by a few tokens to a few dozen (a 36-character UUID is 34 Gemma tokens), and a
# window cut mid-value gives the base half a fact.
# The first positions are never chosen. Measured with none left out (Gemma 3 270M default
# bundle, 1024 tokens, records / needle / passkey, seed 7, 9 prompts): position 0 drew
# 128-582x the median score on every prompt (a sink, whatever the question; it is never
# chosen anyway, being exact), and next came the prompt's own opening instruction ("A
# special magic number is hidden within...", positions 1-12: 25-145x), which the question
# echoes: left in, the second span went there on 5 of 9 prompts (the fact's sentence was
# still the first). So 8 leaves out the sink and the echoed instruction's head, not sinks
# alone; the sinks a model has beyond position 0 are found per prompt from the residual's
# norm (recompute.sink_positions) and recomputed.
SINK_POSITIONS = 8
SENTENCE_ENDS = (".", "\n", "?", "!", ";")
SPAN_MIN = 16  # ... at least this long: a short sentence ("7182 is the pass key.") with the one before
SPAN_MAX = 64  # ... at most this long
SPAN_LEAD_MAX = 24  # tokens back from the peak to its sentence's start, at most


def sentence_ends(texts: list[str]) -> np.ndarray:
    """Whether each token's text ends a sentence or a line (holds one of SENTENCE_ENDS)."""
    return np.array([any(c in t for c in SENTENCE_ENDS) for t in texts], dtype=bool)


def sentence_spans(
    scores: np.ndarray,
    n_spans: int,
    ends: np.ndarray,
    lo: int,
    hi: int,
    max_width: int = SPAN_MAX,
    allowed: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """Up to ``n_spans`` disjoint spans within [lo, hi), in position order, around the
    highest ``scores``: each from the peak's sentence start (at most SPAN_LEAD_MAX back) to
    its end (``ends[i]``: token i ends a sentence), earlier sentences added while it is
    shorter than SPAN_MIN, ``max_width`` tokens at most, never into a position ``allowed``
    (if given) leaves out."""
    ok = np.ones(len(scores), dtype=bool) if allowed is None else allowed.copy()
    s = np.zeros(len(scores), dtype=np.float64)
    s[lo:hi] = np.where(ok[lo:hi], scores[lo:hi], 0.0)
    out: list[tuple[int, int]] = []
    for _ in range(n_spans):
        peak = int(np.argmax(s))
        if s[peak] <= 0:
            break
        a, b = peak, peak + 1
        while a > lo and ok[a - 1] and peak - a < SPAN_LEAD_MAX and not ends[a - 1]:
            a -= 1
        while b < hi and ok[b] and b - a < max_width and not ends[b - 1]:
            b += 1
        while b - a < min(SPAN_MIN, max_width) and a > lo and ok[a - 1]:  # one more sentence back
            a -= 1
            while a > lo and ok[a - 1] and b - a < max_width and not ends[a - 1]:
                a -= 1
        out.append((a, b))
        s[a:b] = 0.0
        ok[a:b] = False  # the next span grows up to this one, never into it
    return sorted(out)
