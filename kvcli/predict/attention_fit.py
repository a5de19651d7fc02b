"""Train one predicted layer against the base's own attention output, pure numpy.

Ridge fits keys and values for ||k_hat - k||^2, but the base only ever uses a key by dotting it
with its queries after RoPE, and a value by mixing it with the attention its position gets.
This fits what the base computes: for the base's true queries q_t of one layer (captured once,
pre-RoPE, from calibration prompts), the attention output

    o_t = sum_s softmax_s(q_t . R_t k_s) v_s

over a cache in which the prompt is predicted, against the same over the true cache:
loss = sum ||o_hat - o||^2 / sum ||o||^2. No step runs the base: one layer's features, keys,
values and queries are all it needs, so every layer trains on its own in minutes on a CPU.

Which cells are predicted, as a kvp prefill writes them: position 0 exact (the first cell),
and a query at position t sees the predicted cache before the segment of ``segment``
positions it falls in, exact cells from that segment's start on (the tail the base computes
itself over the predicted prompt). Sliding-window layers see their window only. The
predicted keys get the base's key-norm scale (``apply.rescale_to_key_norm``), as at run time.

The gradient is written out by hand (checked against finite differences in the tests);
the optimizer is Adam with steps relative to the weights' own scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvcli.models.model_info import ModelInfo, RopeParams
from kvcli.state.rope import rotate, unrotate


def _es(spec: str, *arrays: np.ndarray) -> np.ndarray:
    return np.einsum(spec, *arrays, optimize=True)  # optimize: BLAS, not einsum's own loops


@dataclass(frozen=True)
class LayerAttention:
    """What one base layer does with its cache, as far as the loss needs it."""

    rope: RopeParams
    head_dim: int
    k_width: int  # n_head_kv * head_dim
    n_head: int  # query heads
    window: int  # sliding window in positions; 0: the layer sees every earlier position
    key_norm_inv: np.ndarray | None  # 1 / the key norm's weight (0 where it hides a dimension)

    @property
    def scale(self) -> float:
        return float(1.0 / np.sqrt(self.head_dim))


def layer_attention(base: ModelInfo, layer: int, key_norms: dict[int, np.ndarray] | None) -> LayerAttention:
    inv = None
    if key_norms is not None:
        w = key_norms[layer]
        visible = np.abs(w) > 1e-3  # as apply.rescale_to_key_norm
        inv = np.where(visible, 1.0 / np.where(visible, w, 1.0), 0.0).astype(np.float32)
    return LayerAttention(
        rope=base.rope[layer],
        head_dim=base.head_dim_k,
        k_width=base.n_embd_k(layer),
        n_head=base.n_head[layer],
        window=base.n_swa if base.is_swa[layer] else 0,
        key_norm_inv=inv,
    )


@dataclass
class Sample:
    """One calibration prompt's rows for one layer: the predictor's features, the base's
    pre-RoPE keys, its values, and its pre-RoPE queries (n, n_head, head_dim)."""

    features: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q: np.ndarray


def _rescale(k: np.ndarray, inv: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    heads = k.reshape(len(k), -1, head_dim)
    n_visible = max(int((inv != 0).sum()), 1)
    r = np.sqrt(_es("chd,chd->ch", heads * inv, heads * inv) / n_visible)
    r = np.maximum(r, 1e-6)
    return (heads / r[..., None]).reshape(k.shape), r


def _rescale_back(
    grad: np.ndarray, normed: np.ndarray, r: np.ndarray, inv: np.ndarray, head_dim: int
) -> np.ndarray:
    g = grad.reshape(len(grad), -1, head_dim)
    kn = normed.reshape(len(normed), -1, head_dim)
    n_visible = max(int((inv != 0).sum()), 1)
    dot = _es("chd,chd->ch", g, kn)
    return ((g - dot[..., None] * kn * (inv * inv) / n_visible) / r[..., None]).reshape(grad.shape)


def segment_cuts(rows: np.ndarray, segment: int) -> np.ndarray:
    """Per query row, where its exact cells start: the start of its ``segment``."""
    return (rows // segment) * segment


def masks(n: int, rows: np.ndarray, cuts: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(hidden, predicted), each (len(rows), n): the cells query row t may not see (later
    ones, or outside a sliding window), and those it sees predicted (1 <= s < its cut)."""
    pos = np.arange(n)
    hidden = pos[None, :] > rows[:, None]
    if window:
        hidden |= (rows[:, None] - pos[None, :]) >= window
    predicted = (pos[None, :] >= 1) & (pos[None, :] < np.asarray(cuts)[:, None])
    return hidden, predicted


def _heads(rows: np.ndarray, n_kv: int) -> np.ndarray:
    """(n, n_kv * d) -> (n_kv, n, d), contiguous."""
    return np.ascontiguousarray(rows.reshape(len(rows), n_kv, -1).transpose(1, 0, 2))


def _rows(heads: np.ndarray) -> np.ndarray:
    """(n_kv, n, d) -> (n, n_kv * d)."""
    return heads.transpose(1, 0, 2).reshape(heads.shape[1], -1)


def _softmax(logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    logits = np.where(hidden, -np.inf, logits)
    logits -= logits.max(-1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(-1, keepdims=True)


def attention_loss(
    sample: Sample,
    weight: np.ndarray,
    bias: np.ndarray,
    layer: LayerAttention,
    rows: np.ndarray,
    cuts: np.ndarray,
    grad: bool = True,
) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The relative squared error of the attention output at query ``rows`` (each seeing
    predicted cells before its cut, ``masks``) with the cache predicted by ``features @
    weight + bias`` (keys then values), and its gradients in ``weight`` and ``bias``."""
    x, n, hd, kw = sample.features, len(sample.features), layer.head_dim, layer.k_width
    n_kv = kw // hd
    group = layer.n_head // n_kv
    y = x @ weight + bias
    k_pred, v_pred = y[:, :kw], y[:, kw:]
    if layer.key_norm_inv is not None:
        k_normed, r = _rescale(k_pred, layer.key_norm_inv, hd)
    else:
        k_normed, r = k_pred, None
    pos = np.arange(n)
    t = len(rows)
    # heads first, a KV head's query heads stacked: each product below is one matmul per KV head
    q = rotate(sample.q[rows].reshape(t, -1), rows, layer.rope).reshape(t, n_kv, group, hd)
    q = np.ascontiguousarray(q.transpose(1, 2, 0, 3)).reshape(n_kv, group * t, hd)
    kp = _heads(rotate(k_normed, pos, layer.rope), n_kv)
    ke = _heads(rotate(sample.k, pos, layer.rope), n_kv)
    vp, ve = _heads(v_pred, n_kv), _heads(np.asarray(sample.v, np.float32), n_kv)
    hidden, predicted = masks(n, rows, cuts, layer.window)
    s = layer.scale

    def scores(k):  # (n_kv, group, t, n)
        return (q @ k.transpose(0, 2, 1)).reshape(n_kv, group, t, n) * s

    def stacked(m):  # (n_kv, group, t, n) -> (n_kv, group * t, n), a view
        return m.reshape(n_kv, group * t, n)

    logits_exact = scores(ke)
    a = _softmax(np.where(predicted, scores(kp), logits_exact), hidden)
    a_pred = a * predicted
    out = stacked(a_pred) @ vp + stacked(a - a_pred) @ ve
    truth = stacked(_softmax(logits_exact, hidden)) @ ve
    norm = max(float((truth * truth).sum()), 1e-30)
    diff = out - truth
    loss = float((diff * diff).sum()) / norm
    if not grad:
        return loss, None, None
    d_out = (2.0 / norm) * diff
    d_v = _rows(stacked(a_pred).transpose(0, 2, 1) @ d_out)
    d_a = np.where(
        predicted,
        (d_out @ vp.transpose(0, 2, 1)).reshape(n_kv, group, t, n),
        (d_out @ ve.transpose(0, 2, 1)).reshape(n_kv, group, t, n),
    )
    d_logits = a * (d_a - (a * d_a).sum(-1, keepdims=True))
    d_kp = _rows(stacked(d_logits * predicted * s).transpose(0, 2, 1) @ q)
    d_k = unrotate(d_kp, pos, layer.rope)
    if r is not None:
        d_k = _rescale_back(d_k, k_normed, r, layer.key_norm_inv, hd)
    d_y = np.concatenate([d_k, d_v], axis=1).astype(np.float32)
    return loss, x.T @ d_y, d_y.sum(0)


def relative_error(samples: list[Sample], weight, bias, layer: LayerAttention, last: int) -> float:
    """Mean over ``samples`` of ||o_hat - o|| / ||o|| for the ``last`` queries of each, the
    cache before them predicted: the held-out judge."""
    errors = []
    for smp in samples:
        n = len(smp.features)
        rows = np.arange(max(n - last, 1), n)
        cuts = np.full(len(rows), rows[0])
        errors.append(np.sqrt(attention_loss(smp, weight, bias, layer, rows, cuts, grad=False)[0]))
    return float(np.mean(errors))


@dataclass
class LayerFit:
    weight: np.ndarray
    bias: np.ndarray
    before: float  # held-out relative error of the starting weights
    after: float  # ... of the weights kept (the best checked; the start if none was better)
    steps: int


def train_layer(
    train: list[Sample],
    heldout: list[Sample],
    weight: np.ndarray,
    bias: np.ndarray,
    layer: LayerAttention,
    *,
    steps: int,
    lr: float = 3e-4,
    batch: int = 4,
    segment: int = 64,
    check_every: int = 30,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> LayerFit:
    """Adam on the attention loss from (``weight``, ``bias``); every ``check_every`` steps the
    held-out error is measured and the best weights so far kept. ``lr`` is relative to the
    starting weights' RMS (ridge weights differ in scale by orders across models)."""
    rng = np.random.default_rng(seed)
    w, b = weight.astype(np.float32).copy(), bias.astype(np.float32).copy()
    before = relative_error(heldout, w, b, layer, segment)
    best = (before, w.copy(), b.copy())
    scale = float(np.sqrt(np.mean(w * w))) or 1.0
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in (w, b)]
    for step in range(1, steps + 1):
        picked = [train[i] for i in rng.choice(len(train), min(batch, len(train)), replace=False)]
        gw, gb = np.zeros_like(w), np.zeros_like(b)
        for smp in picked:
            rows = np.arange(segment, len(smp.features))
            _, dw, db = attention_loss(smp, w, b, layer, rows, segment_cuts(rows, segment))
            gw += dw
            gb += db
        for p, g, (m, v) in zip((w, b), (gw, gb), moments):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= (lr * scale) * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-12)
        if step % check_every == 0 or step == steps:
            err = relative_error(heldout, w, b, layer, segment)
            if err < best[0]:
                best = (err, w.copy(), b.copy())
        if progress:
            progress(step, steps)
    return LayerFit(weight=best[1], bias=best[2], before=before, after=best[0], steps=steps)
