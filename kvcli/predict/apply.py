"""From the auxiliary's parsed state to the base's predicted state: pure numpy, no llama.cpp.

Copied layers take the auxiliary's cached rows as they are (same RoPE). Predicted layers:
un-RoPE the keys of the auxiliary layer the layer map names, predict pre-RoPE keys and
values, RoPE the keys with the base layer's own parameters. A sliding-window layer gets only
the cells that the base's later tokens can still see. The first cell (position 0) depends on
the first token alone; it is copied exactly from the base's own cache of that token (its
features are unlike every other position's: see FirstCell).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from kvcli import keys
from kvcli.errors import IncompatibleError
from kvcli.models.model_info import ModelInfo
from kvcli.predict.predictor import Predictor, build_features
from kvcli.state.codec import Pending
from kvcli.state.layout import CacheLayout, LayerCells
from kvcli.state.rope import rotate, unrotate

_POOL: ThreadPoolExecutor | None = None
_WORKERS = min(os.cpu_count() or 1, 8)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="kvcli-predict")
    return _POOL


@dataclass
class FirstCell:
    """The base's own K, V at position 0 for one token, per layer.

    Position 0 attends only to itself, so its cells are a function of its token; most models
    park attention there (an attention sink) and their hidden state at position 0 carries
    activations orders of magnitude above every other position's. A predictor fit on other
    positions maps those to keys and values hundreds of times too large: measured on
    Qwen2.5-Coder 1.5B (a prefix of 7 layers, whose prompts start with no BOS), the predicted
    position-0 cell was off by 10-570x its norm (K) and 44-210x (V) in every predicted layer,
    and the base's output was garbage; with this cell exact it was text again."""

    token: int
    k: dict[int, np.ndarray]
    v: dict[int, np.ndarray]


def _sliding(info: ModelInfo, group: list[int]) -> bool:
    return bool(group) and info.n_swa > 0 and all(info.is_swa[il] for il in group)


def _window_start(info: ModelInfo, first_query: int) -> int:
    return max(0, first_query - info.n_swa + 1)  # llama.cpp masks p1 - p0 >= n_swa


def needed_positions(info: ModelInfo, n_cells: int, first_query: int) -> list[np.ndarray]:
    """Per cache group of ``info``: positions 0..n_cells-1 that queries at >= first_query see."""
    return [
        np.arange(_window_start(info, first_query) if _sliding(info, group) else 0, n_cells, dtype=np.int32)
        for group in info.cache_layer_groups
    ]


def span_group_positions(
    info: ModelInfo, n_cells: int, starts: list[int], span_context: int, tail_context: int
) -> list[np.ndarray]:
    """Per cache group, the predicted positions < n_cells written when the base recomputes
    spans starting at ``starts``: every position in full-attention groups; in sliding-window
    groups only the last ``span_context`` cells before each span and the last
    ``tail_context`` before n_cells (each within the window), fewer than the window holds."""
    out = []
    for group in info.cache_layer_groups:
        if not _sliding(info, group):
            out.append(np.arange(n_cells, dtype=np.int32))
            continue
        seen = np.zeros(n_cells, dtype=bool)
        for start, context in [*((s, span_context) for s in starts), (n_cells, tail_context)]:
            seen[max(_window_start(info, start), start - context) : start] = True
        out.append(np.flatnonzero(seen).astype(np.int32))
    return out


def rescale_to_key_norm(k: np.ndarray, weight: np.ndarray, head_dim: int) -> np.ndarray:
    """Give each predicted key head the scale the base's key norm produces: rms(k / w) = 1.

    Ridge shrinks predictions toward the mean, which flattens attention; keys that came out
    of an RMS norm have a known per-head scale, so the direction is all that is predicted.
    """
    heads = k.reshape(len(k), -1, head_dim)
    visible = np.abs(weight) > 1e-3  # a zero weight hides that dimension of the normed key
    inv_w = np.where(visible, 1.0 / np.where(visible, weight, 1.0), 0.0).astype(np.float32)
    mean_sq = np.einsum("chd,chd->ch", heads * inv_w, heads * inv_w) / max(int(visible.sum()), 1)
    heads /= np.maximum(np.sqrt(mean_sq), 1e-6)[..., None]
    return k


def apply_key_norm(k: np.ndarray, weight: np.ndarray, head_dim: int, eps: float) -> np.ndarray:
    """The base's key norm on pre-norm keys: each head RMS-normalised, times the weight."""
    heads = k.reshape(len(k), -1, head_dim).astype(np.float32)
    heads = heads / np.sqrt(np.mean(heads * heads, axis=-1, keepdims=True) + eps) * weight
    return heads.reshape(len(k), -1)


@dataclass(frozen=True)
class PredictorInputs:
    """What the predictor reads once the auxiliary has prefilled a prompt.

    ``aux_layers``: the auxiliary's parsed cells, holding positions 0..n-1 (empty where the
    predictor neither copies layers nor reads keys from them). ``hidden``: the captured rows,
    row 0 at position ``hidden_start`` (a conversation's auxiliary decodes only its new
    tokens). ``raw_kv``: per auxiliary layer, its keys and values straight out of the QKV
    projection (captured like ``hidden``, from the same position), for a predictor that reads
    raw keys. ``first_cell``: the base's own cell at position 0 where the prompt starts
    there. ``cache``: where a factored predictor's basis products are reused across the
    calls on one prompt (``basis_rows``), hence mutable."""

    aux_layers: dict[int, LayerCells]
    aux: ModelInfo
    base: ModelInfo
    predictor: Predictor
    first_cell: FirstCell | None = None
    key_norms: dict[int, np.ndarray] | None = None
    hidden: list[np.ndarray] = ()
    hidden_start: int = 0
    raw_kv: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    cache: dict = field(default_factory=dict)


def predict_base_kv(
    inputs: PredictorInputs, group_positions: list[np.ndarray], only: list[int] | None = None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """K (post-RoPE) and V rows per base layer, for the positions of its cache group
    (``only``: just these layers)."""
    out, jobs = _layer_jobs(inputs, group_positions, only)
    # numpy releases the GIL in its kernels: layers run in parallel on single-threaded BLAS
    out.update(zip(jobs, _pool().map(lambda job: job(), jobs.values())))
    return out


def predicted_state_bytes(
    layout: CacheLayout,
    inputs: PredictorInputs,
    group_positions: list[np.ndarray],
    known: dict | None = None,
) -> bytearray:
    """The state bytes (seq 0, ``layout``) of ``predict_base_kv``'s rows, each predicted layer
    computed on the pool and cast into the buffer at once: only a few layers' float32 rows
    are alive at any time. ``known``: layers' rows already predicted (at these positions)."""
    known = known or {}
    out, jobs = _layer_jobs(inputs, group_positions)
    out.update(known)
    base = inputs.base
    for il, job in jobs.items():
        if il in known:
            continue
        n = len(_positions_of(base, group_positions, il))
        out[il] = (
            Pending((n, base.n_embd_k(il)), job, 0),
            Pending((n, base.n_embd_v(il)), job, 1),
        )
    return state_bytes(layout, group_positions, out)


def _positions_of(base: ModelInfo, group_positions: list[np.ndarray], il: int) -> np.ndarray:
    for group, positions in zip(base.cache_layer_groups, group_positions):
        if il in group:
            return positions
    raise IncompatibleError(f"base layer {il} is in no cache group")


def _check_covers(inputs: PredictorInputs, first: int, n_cells: int) -> None:
    """That ``inputs`` hold what the predictor reads for positions first..n_cells-1."""
    predictor, hidden, hidden_start = inputs.predictor, inputs.hidden, inputs.hidden_start
    raw_kv = inputs.raw_kv
    if hidden and not (hidden_start <= first and hidden_start + len(hidden[0]) >= n_cells):
        raise IncompatibleError(
            f"captured hidden rows cover positions {hidden_start}.."
            f"{hidden_start + len(hidden[0]) - 1}, not {first}..{n_cells - 1}"
        )
    if predictor.raw_keys and (
        raw_kv is None
        or any(
            src not in raw_kv or hidden_start > first or hidden_start + len(raw_kv[src][0]) < n_cells
            for src in predictor.feature_layers
        )
    ):
        raise IncompatibleError(
            f"this predictor reads the auxiliary's raw keys at positions {first}..{n_cells - 1}: capture them"
        )
    if predictor.key_space == keys.KEY_SPACE_PRE_NORM and inputs.key_norms is None:
        raise IncompatibleError(
            "this predictor's keys need the base's key norm, which the base "
            "model does not have as float32 weights"
        )
    for il in ([] if predictor.raw_keys else predictor.feature_layers) + predictor.copied_layers:
        cells = inputs.aux_layers.get(il)
        if (
            cells is None
            or len(cells.positions) < n_cells
            or (n_cells and int(cells.positions[n_cells - 1]) != n_cells - 1)
        ):
            raise IncompatibleError(f"auxiliary layer {il} does not hold positions 0..{n_cells - 1}")


def _layer_jobs(inputs: PredictorInputs, group_positions: list[np.ndarray], only: list[int] | None = None):
    """The copied layers' rows, and per predicted layer a function that computes its rows
    (``only``: just these layers)."""
    n_cells = max((len(p) and int(p[-1]) + 1) for p in group_positions)
    first = min((int(p[0]) for p in group_positions if len(p)), default=n_cells)
    _check_covers(inputs, first, n_cells)
    aux_layers, base, predictor = inputs.aux_layers, inputs.base, inputs.predictor
    raw_kv, hidden, key_norms = inputs.raw_kv, inputs.hidden, inputs.key_norms

    wanted = (lambda il: True) if only is None else (lambda il: il in only)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for il in filter(wanted, predictor.copied_layers):
        rows = _positions_of(base, group_positions, il)
        out[il] = (aux_layers[il].k[rows], aux_layers[il].v[rows])

    h0 = first - inputs.hidden_start

    def features_of(src: int) -> np.ndarray:  # row i: position first + i
        if predictor.raw_keys:
            kv = {src: (raw_kv[src][0][h0 : h0 + n_cells - first], raw_kv[src][1][h0 : h0 + n_cells - first])}
        else:
            cells, rope = aux_layers[src], inputs.aux.rope[src]
            positions = cells.positions[first:n_cells]
            kv = {src: (unrotate(cells.k[first:n_cells], positions, rope), cells.v[first:n_cells])}
        return build_features(kv, src, [h[h0 : h0 + n_cells - first] for h in hidden])

    layers = list(filter(wanted, predictor.predicted_layers))
    # the features unfactored layers read, built here (not in the pool's jobs); a factored
    # layer's source is built only where the basis product cached does not cover its rows
    dense = {predictor.layer_map[il] for il in layers if il not in predictor.factored_layers}
    features = {src: features_of(src) for src in dense}
    reduced = {}
    for src in predictor.sources_with_basis(layers):
        rows_of = partial(features.get, src) if src in features else partial(features_of, src)
        reduced[src] = basis_rows(inputs.cache, src, rows_of, n_cells - first, predictor.bases[src], first)

    def predict_one(il: int) -> tuple[np.ndarray, np.ndarray]:
        rows = _positions_of(base, group_positions, il)
        src = predictor.layer_map[il]
        x = reduced[src] if il in predictor.factored_layers else features[src]
        k, v = predictor.predict_layer(x, il, rows - first)
        if predictor.key_space == keys.KEY_SPACE_PRE_NORM:
            k = apply_key_norm(k, key_norms[il], base.head_dim_k, base.rms_eps)
        elif key_norms is not None:
            k = rescale_to_key_norm(np.ascontiguousarray(k), key_norms[il], base.head_dim_k)
        k = rotate(k, rows, base.rope[il])
        first_cell = inputs.first_cell
        if first_cell is not None and predictor.exact_first_cell and len(rows) and rows[0] == 0:
            k[0], v[0] = first_cell.k[il], first_cell.v[il]
        return k, v

    return out, {il: partial(predict_one, il) for il in layers}


def basis_rows(
    cache: dict, src: int, features: Callable[[], np.ndarray], n_rows: int, basis: np.ndarray, first: int
) -> np.ndarray:
    """features() @ basis for the ``n_rows`` positions from ``first``, a view of the product
    ``cache`` holds where that covers them (and then ``features`` is not called). The span
    chooser predicts its layer at every position, then the state is written in chunks of
    positions: without the view each chunk built its features and multiplied them again (at
    2048 tokens on Gemma 3 270M, 2008 x 2176 x 512 twice)."""
    key = ("basis", src)
    if key in cache:
        lo, product = cache[key]
        if lo <= first and first + n_rows <= lo + len(product):
            return product[first - lo : first - lo + n_rows]
    cache[key] = (first, _times_basis(features(), basis))
    return cache[key][1]


def _times_basis(features: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """features @ basis, its rows split over the pool (BLAS runs single-threaded there)."""
    n_parts = min(_WORKERS, len(features) // 256)
    if n_parts < 2:
        return features @ basis
    bounds = np.linspace(0, len(features), n_parts + 1).astype(int)
    return np.concatenate(
        list(_pool().map(lambda i: features[bounds[i] : bounds[i + 1]] @ basis, range(n_parts)))
    )


def state_bytes(
    layout: CacheLayout, group_positions: list[np.ndarray], kv: dict[int, tuple[np.ndarray, np.ndarray]]
) -> bytearray:
    """The state bytes of these rows in ``layout`` (seq 0), cast layer by layer on the pool."""
    from kvcli.state.codec import write_seq_state

    return write_seq_state(layout.build_state(group_positions, kv), map_fn=_pool().map)
