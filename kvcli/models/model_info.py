"""What kvcli needs to know about a GGUF language model, read with gguf-py.

Validates the file (exists, is GGUF, not truncated, a supported architecture), and gives the
per-layer facts the KV path rests on: KV widths, RoPE parameters (Gemma 3's sliding layers
have their own frequency base), which layers use sliding-window attention, a fingerprint of
the weights and a digest of the tokenizer.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.errors import ModelFileError
from kvcli.models.gguf_header import GGUFHeader, RawArray, read_header

SUPPORTED_ARCHS = ("gemma3", "llama", "qwen2", "openelm")
NEOX_ARCHS = ("gemma3", "qwen2", "openelm")
GGUF_MAGIC = b"GGUF"
# llama.cpp's default for sliding-window layers when rope.freq_base_swa is absent (llama-hparams.h)
DEFAULT_FREQ_BASE_SWA = 10000.0
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
DEFAULT_GEMMA3_SWA_PATTERN = 6


@dataclass(frozen=True)
class RopeParams:
    head_dim: int
    n_rot: int
    freq_base: float
    freq_scale: float = 1.0
    neox: bool = True


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    arch: str
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_swa: int  # 0: no sliding window
    is_swa: tuple[bool, ...]
    rope: tuple[RopeParams, ...]
    context_length: int
    rms_eps: float
    fingerprint: str
    tokenizer_digest: str
    source_layers: tuple[int, ...] | None = None  # an auxiliary cut by kvcli: its base layers
    source_fingerprint: str | None = None  # ... and its base's fingerprint
    file_size: int = 0

    def n_embd_k(self, layer: int) -> int:
        return self.n_head_kv[layer] * self.head_dim_k

    def n_embd_v(self, layer: int) -> int:
        return self.n_head_kv[layer] * self.head_dim_v

    @property
    def cache_layer_groups(self) -> list[list[int]]:
        """Model layers in the order of the state's blobs: full-attention then sliding (iSWA)."""
        if self.n_swa > 0 and any(self.is_swa):
            full = [il for il in range(self.n_layer) if not self.is_swa[il]]
            swa = [il for il in range(self.n_layer) if self.is_swa[il]]
            return [full, swa]
        return [list(range(self.n_layer))]


def check_gguf_file(path: str | Path, what: str = "model") -> Path:
    """Raise a ModelFileError naming the problem unless ``path`` is a readable GGUF file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{what} file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"{what} path is not a file: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{what} file is not a GGUF file (it starts with {magic!r}): {path}")
    return path


def field_value(header: GGUFHeader, key: str, default=None):
    """A key's value (scalar, string, small list or RawArray), or ``default`` when absent."""
    return header.fields.get(key, default)


def _fingerprint(header: GGUFHeader, tensors=None) -> str:
    """sha256 over every tensor's name, type and shape and a sample of every tensor's bytes
    (``tensors``: only these of the header's, in order).

    Cheap (no full read of the file) and it changes when the weights do.
    """
    h = hashlib.sha256()
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    for t in header.tensors if tensors is None else tensors:
        h.update(f"{t.name}:{t.ggml_type}:{t.shape};".encode())
        step = max(1, t.nbytes // 4096)
        h.update(data[t.offset : t.offset + t.nbytes : step][:4096].tobytes())
    del data
    return h.hexdigest()[:16]


def _tokenizer_digest(header: GGUFHeader) -> str:
    """sha256 over the tokenizer's model, token list, scores, types and merges."""
    h = hashlib.sha256()
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ):
        value = header.get(key)
        h.update(key.encode())
        h.update(header.raw_bytes(value) if isinstance(value, RawArray) else repr(value).encode())
    return h.hexdigest()[:16]


def _per_layer(value, n_layer: int, name: str) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelFileError(f"{name} has {len(value)} entries for {n_layer} layers")
        return tuple(int(x) for x in value)
    return (int(value),) * n_layer


def _swa_layers(header, arch: str, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    if n_swa <= 0:
        return (False,) * n_layer
    pattern = field_value(header, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return tuple(bool(x) for x in pattern)
    n_pattern = int(pattern) if pattern is not None else DEFAULT_GEMMA3_SWA_PATTERN
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


@lru_cache(maxsize=16)
def _read_model_info(path: Path, mtime_ns: int, size: int) -> ModelInfo:
    header = read_header(path)
    arch = field_value(header, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(
            f"architecture {arch!r} is not supported (kvcli supports {', '.join(SUPPORTED_ARCHS)}): {path}"
        )
    type_name = field_value(header, "general.type", "model")
    if type_name not in ("model", None):
        raise ModelFileError(f"{path} is a GGUF of type {type_name!r}, not a model")

    def req(key: str):
        value = field_value(header, f"{arch}.{key}")
        if value is None:
            raise ModelFileError(f"model file lacks {arch}.{key}: {path}")
        return value

    n_layer = int(req("block_count"))
    n_embd = int(req("embedding_length"))
    n_head = _per_layer(req("attention.head_count"), n_layer, "head_count")
    n_head_kv = _per_layer(
        field_value(header, f"{arch}.attention.head_count_kv", n_head[0]), n_layer, "head_count_kv"
    )
    head_dim_k = int(field_value(header, f"{arch}.attention.key_length", n_embd // n_head[0]))
    head_dim_v = int(field_value(header, f"{arch}.attention.value_length", head_dim_k))
    n_rot = int(field_value(header, f"{arch}.rope.dimension_count", head_dim_k))

    scaling = field_value(header, f"{arch}.rope.scaling.type", "none")
    factor = float(field_value(header, f"{arch}.rope.scaling.factor", 0.0) or 0.0)
    if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
        raise ModelFileError(f"RoPE scaling {scaling!r} is not supported yet: {path}")
    freq_scale = 1.0 / factor if scaling == "linear" and factor > 0 else 1.0
    freq_base = float(field_value(header, f"{arch}.rope.freq_base", 10000.0))
    freq_base_swa = float(field_value(header, f"{arch}.rope.freq_base_swa", DEFAULT_FREQ_BASE_SWA))

    n_swa = int(field_value(header, f"{arch}.attention.sliding_window", 0) or 0)
    if arch != "gemma3":
        n_swa = 0  # llama and qwen2 run with a plain (non-iSWA) cache in llama.cpp
    is_swa = _swa_layers(header, arch, n_layer, n_swa)
    neox = arch in NEOX_ARCHS
    rope = tuple(
        RopeParams(
            head_dim=head_dim_k,
            n_rot=n_rot,
            neox=neox,
            freq_base=freq_base_swa if is_swa[il] else freq_base,
            freq_scale=1.0 if is_swa[il] else freq_scale,
        )
        for il in range(n_layer)
    )
    return ModelInfo(
        path=path,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_swa=n_swa,
        is_swa=is_swa,
        rope=rope,
        context_length=int(field_value(header, f"{arch}.context_length", 2048)),
        rms_eps=float(field_value(header, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        fingerprint=_fingerprint(header),
        tokenizer_digest=_tokenizer_digest(header),
        source_layers=_source_layers(header, n_layer),
        source_fingerprint=field_value(header, keys.AUX_BASE_FINGERPRINT),
        file_size=header.file_size,
    )


def _source_layers(header, n_layer: int) -> tuple[int, ...] | None:
    value = field_value(header, keys.AUX_BASE_LAYERS)
    if isinstance(value, list) and len(value) == n_layer:
        return tuple(int(x) for x in value)
    return None


def read_model_info(path: str | Path, what: str = "model") -> ModelInfo:
    """Read and validate a model GGUF; cached per (path, mtime, size)."""
    path = check_gguf_file(path, what).resolve()
    st = path.stat()
    try:
        return _read_model_info(path, st.st_mtime_ns, st.st_size)
    except ModelFileError as exc:
        if what != "model":
            raise ModelFileError(str(exc).replace("model file", f"{what} file", 1)) from None
        raise


# read by llama.cpp's get_key_or_arr with the file's layer count: an array must be that long
_LAYER_COUNT_ARRAYS = (
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
)


def has_per_layer_arrays(info: ModelInfo) -> bool:
    """Whether the file stores per-layer head counts or FFN widths as arrays (OpenELM):
    llama.cpp refuses to load such a file as its first k layers (patches/README.md)."""
    header = read_header(info.path)
    return any(isinstance(header.get(f"{info.arch}.{key}"), list) for key in _LAYER_COUNT_ARRAYS)


def prefix_view_info(base_path: str | Path, k: int) -> ModelInfo:
    """The ModelInfo of the base's layers 0..k-1 as a model of their own, read from the base
    alone: what ``read_model_info`` gives for a prefix cut of it (aux_cut.cut_auxiliary keeps
    the tensors' order, names, types and bytes, so even the fingerprint is the cut file's)."""
    return _prefix_view_info(read_model_info(base_path, "base model"), k)


@lru_cache(maxsize=16)
def _prefix_view_info(base: ModelInfo, k: int) -> ModelInfo:
    if not 1 <= k < base.n_layer:
        raise ModelFileError(f"a prefix of the base needs 1..{base.n_layer - 1} layers, not {k}")
    header = read_header(base.path)
    kept = [t for t in header.tensors if not (m := _BLOCK_TENSOR.match(t.name)) or int(m.group(1)) < k]
    return replace(
        base,
        n_layer=k,
        n_head=base.n_head[:k],
        n_head_kv=base.n_head_kv[:k],
        is_swa=base.is_swa[:k],
        rope=base.rope[:k],
        fingerprint=_fingerprint(header, kept),
        source_layers=tuple(range(k)),
        source_fingerprint=base.fingerprint,
        file_size=0,
    )


def key_norm_weights(info: ModelInfo) -> dict[int, np.ndarray] | None:
    """Per layer, the weight of the key norm (``blk.N.attn_k_norm``), or None without one.

    Keys are cached after that norm: each head is RMS-normalised, then scaled by the weight.
    """
    header = read_header(info.path)
    tensors = {t.name: t for t in header.tensors}
    out = {}
    for il in range(info.n_layer):
        t = tensors.get(f"blk.{il}.attn_k_norm.weight")
        if t is None or t.ggml_type != 0:  # absent, or not f32
            return None
        out[il] = np.fromfile(info.path, dtype="<f4", count=t.nbytes // 4, offset=t.offset)
    return out
