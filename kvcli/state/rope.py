"""Rotary position embedding on cached keys, in numpy, matching ggml_rope_ext (no YaRN).

llama.cpp caches keys after RoPE; the predictor works before it. ``unrotate`` takes cached
keys back to position-free space with the layer's own parameters, ``rotate`` applies a
(possibly different) layer's parameters. Rows are cells, columns are ``n_head * head_dim``.

NEOX layout (Gemma, Qwen2) rotates pairs (i, i + n_rot/2); the normal layout (Llama)
rotates pairs (2i, 2i + 1). theta_i = pos * freq_scale * freq_base ** (-2i / n_rot).
"""

from __future__ import annotations

import numpy as np

from kvcli.models.model_info import RopeParams

_TABLES: dict[RopeParams, tuple[np.ndarray, np.ndarray]] = {}


def _cos_sin(positions: np.ndarray, p: RopeParams) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of theta at ``positions``, from per-parameter tables grown on demand."""
    positions = np.asarray(positions, dtype=np.int64)
    need = int(positions.max()) + 1 if positions.size else 1
    table = _TABLES.get(p)
    if table is None or len(table[0]) < need:
        size = max(need, 4096, 2 * len(table[0]) if table else 0)
        half = p.n_rot // 2
        inv_freq = p.freq_base ** (-2.0 * np.arange(half, dtype=np.float64) / p.n_rot)
        theta = np.arange(size, dtype=np.float64)[:, None] * (p.freq_scale * inv_freq)[None, :]
        table = (np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32))
        _TABLES[p] = table
    return table[0][positions], table[1][positions]


def _apply(keys: np.ndarray, positions: np.ndarray, p: RopeParams, sign: float) -> np.ndarray:
    n_cells = keys.shape[0]
    heads = np.array(keys, dtype=np.float32).reshape(n_cells, -1, p.head_dim)
    cos, sin = _cos_sin(positions, p)
    cos, sin = cos[:, None, :], sign * sin[:, None, :]
    half = p.n_rot // 2
    if p.neox:
        x0, x1 = heads[..., :half].copy(), heads[..., half : p.n_rot].copy()
        heads[..., :half] = x0 * cos - x1 * sin
        heads[..., half : p.n_rot] = x0 * sin + x1 * cos
    else:
        x0, x1 = heads[..., 0 : p.n_rot : 2].copy(), heads[..., 1 : p.n_rot : 2].copy()
        heads[..., 0 : p.n_rot : 2] = x0 * cos - x1 * sin
        heads[..., 1 : p.n_rot : 2] = x0 * sin + x1 * cos
    return heads.reshape(n_cells, -1)


def rotate(keys: np.ndarray, positions: np.ndarray, params: RopeParams) -> np.ndarray:
    """Apply RoPE at ``positions`` to position-free keys; returns float32."""
    return _apply(keys, positions, params, 1.0)


def unrotate(keys: np.ndarray, positions: np.ndarray, params: RopeParams) -> np.ndarray:
    """Undo RoPE at ``positions`` on cached keys; returns float32."""
    return _apply(keys, positions, params, -1.0)
