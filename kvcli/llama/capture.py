"""Capture named intermediate tensors of a llama.cpp graph through its eval callback.

The auxiliary's hidden state cannot be had by asking for embeddings without running the
262k-token LM head at every position, and llama.cpp trims its last layer to the output rows
after attention. What every position does have: the residual stream entering the last
layer (``l_out-{k-2}``) and that layer's attention output (``kqv_out-{k-1}``). The
callback (``cb_eval`` in the context params) copies them out as they are computed.
"""

from __future__ import annotations

import ctypes

import numpy as np

from kvcli import keys
from kvcli.errors import ContextError


class _GGMLTensor(ctypes.Structure):
    """The head of ggml.h's ``struct ggml_tensor`` (GGML_MAX_DIMS 4, MAX_SRC 10, MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def hidden_tensor_names(n_aux_layers: int, kinds=keys.HIDDEN_FEATURES) -> list[str]:
    """Graph tensor names of hidden feature ``kinds`` (keys.HIDDEN_KINDS) of a k-layer
    auxiliary: the residual entering its last layer, that layer's attention output, and the
    residual leaving it (all rows only in a view of the base: llama.cpp trims a model's own
    last layer to the output rows)."""
    if n_aux_layers < 2:
        raise ValueError("hidden-state features need an auxiliary of at least 2 layers")
    k = n_aux_layers
    names = {
        keys.FEATURE_AUX_RESIDUAL: f"l_out-{k - 2}",
        keys.FEATURE_AUX_ATTN: f"kqv_out-{k - 1}",
        keys.FEATURE_AUX_OUT: f"l_out-{k - 1}",
        keys.FEATURE_AUX_OUT_NORMED: f"l_out-{k - 1}",
    }
    return [names[kind] for kind in kinds]


# the normed feature's epsilon; beside a residual's mean square any base's (1e-6 on Gemma 3 and
# Qwen2) makes no difference
RMS_EPS = 1e-6


def rms_normed(rows: np.ndarray) -> np.ndarray:
    """Each row over the root of its mean square (RMSNorm without a weight), float32."""
    rows = np.asarray(rows, np.float32)
    return rows / np.sqrt(np.mean(rows * rows, axis=1, keepdims=True) + RMS_EPS)


def hidden_features(kinds, rows: list[np.ndarray]) -> list[np.ndarray]:
    """The hidden features of ``kinds`` from their captured rows (``hidden_tensor_names``'s
    order): the normed kind RMS-normalised, the others as captured."""
    return [rms_normed(r) if kind == keys.FEATURE_AUX_OUT_NORMED else r for kind, r in zip(kinds, rows)]


def hidden_feature_width(info, kinds=keys.HIDDEN_FEATURES) -> int:
    """Columns of the hidden tensors of ``kinds``: a residual is n_embd wide, the last
    layer's attention output n_head * head_dim_v."""
    attn = info.n_head[info.n_layer - 1] * info.head_dim_v
    return sum(attn if kind == keys.FEATURE_AUX_ATTN else info.n_embd for kind in kinds)


class TensorCapture:
    """Collects the rows of the named f32 tensors, ubatch by ubatch, until ``take``.

    ``stop_after``: a tensor after which the graph stops (the callback returns False):
    a base model run as a view of its own prefix computes layers 0..k-1 only. ``extra``:
    names captured only while ``extra_armed`` (an attention row wanted for some tokens)."""

    def __init__(self, names: list[str], stop_after: str | None = None, extra: list[str] = ()):
        import llama_cpp

        self.names = list(names)
        self._wanted = {n.encode() for n in names}
        self._stop = stop_after.encode() if stop_after else None
        self._asked = self._wanted | ({self._stop} if self._stop else set())
        self._extra = {n.encode() for n in extra}
        self._rows: dict[str, list[np.ndarray]] = {n: [] for n in [*names, *extra]}
        self._error: str | None = None
        self.armed = True  # off: the callback asks for nothing (a context that captures at times)
        self.extra_armed = False

        @llama_cpp.ggml_backend_sched_eval_callback
        def callback(tensor, ask, user_data):
            t = ctypes.cast(tensor, ctypes.POINTER(_GGMLTensor)).contents
            extra = self.extra_armed and t.name in self._extra
            if ask:
                return self.armed and (t.name in self._asked or extra)
            if t.name in self._wanted or extra:
                self._copy(t)
            return t.name != self._stop

        self.callback = callback  # keep a reference: llama.cpp holds only the pointer

    def _copy(self, t: _GGMLTensor) -> None:
        width, rows = int(t.ne[0]), int(t.ne[1] * t.ne[2] * t.ne[3])
        if t.type != 0 or t.nb[1] != width * 4 or not t.data:
            self._error = f"tensor {t.name.decode()} is not a contiguous f32 host tensor"
            return
        data = ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float))
        self._rows[t.name.decode()].append(np.ctypeslib.as_array(data, shape=(rows, width)).copy())

    def rows(self, name: str) -> np.ndarray:
        """Every row captured of ``name`` since the last clear, in order."""
        if self._error:
            raise ContextError(self._error)
        rows = self._rows[name]
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    def clear(self) -> None:
        for rows in self._rows.values():
            rows.clear()

    def take(self, n_rows: int) -> list[np.ndarray]:
        """The first ``n_rows`` rows captured of each name (in order), then forget them all."""
        if self._error:
            raise ContextError(self._error)
        out = []
        for name in self.names:
            rows = np.concatenate(self._rows[name]) if self._rows[name] else np.zeros((0, 0))
            if len(rows) < n_rows:
                raise ContextError(f"captured {len(rows)} rows of {name}, expected {n_rows}")
            out.append(rows[:n_rows])
        self.clear()
        return out
