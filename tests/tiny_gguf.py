"""Tiny random-weight GGUF language models for fast llama.cpp test fixtures.

The writers here produce complete, loadable models (a few hundred KiB) with a
small SentencePiece-style vocabulary and random weights drawn from
``numpy.random.default_rng(seed)``, so the same arguments always give a
byte-identical file.  The weights are small (std 0.02, norms near 1), which
keeps the forward pass finite; the outputs are of course meaningless.

This is a helper module, not a test module: pytest does not collect it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import gguf
import numpy as np

__all__ = ["tiny_vocab", "write_tiny_gemma3", "write_tiny_llama", "write_tiny_qwen2"]

_WEIGHT_STD = 0.02

# Word pieces in SentencePiece style ("▁" marks a word start).  Every
# multi-character piece can be reached by merging two shorter pieces, which is
# how llama.cpp's SPM tokenizer builds tokens; e.g. "the cat" -> "▁the", "▁cat".
# fmt: off
_PIECES = [
    "▁", "e", "t", "a", "o", "i", "n", "s", "h", "r", "d", "l", "c", "u", "m",
    "w", "f", "g", "y", "p", "b", ".", ",",
    "▁t", "th", "he", "▁a", "in", "er", "an", "re", "on", "at", "en", "nd",
    "▁th", "▁the", "▁s", "▁w", "▁o", "▁i", "▁c", "▁b", "▁f", "▁m", "▁p",
    "▁of", "▁an", "▁and", "▁to", "▁in", "▁is", "▁it", "▁ca", "▁cat", "▁on",
    "ing", "ed", "es", "or",
]
# fmt: on
# A same-sized vocabulary with different pieces, for "mismatched tokenizer" tests.
_OTHER_PIECES = [piece.upper() for piece in _PIECES]

_BOS_ID, _EOS_ID, _UNK_ID = 1, 2, 0


def tiny_vocab(vocab: str = "default") -> list[str]:
    """Return the token list used by the tiny models ("default" or "other")."""
    tokens, _, _ = _vocab(vocab)
    return tokens


def _vocab(vocab: str) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of an SPM vocabulary."""
    pieces = {"default": _PIECES, "other": _OTHER_PIECES}.get(vocab)
    if pieces is None:
        raise ValueError(f"unknown vocab {vocab!r}; expected 'default' or 'other'")
    kind = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    types = [kind.UNKNOWN, kind.CONTROL, kind.CONTROL] + [kind.BYTE] * 256
    types += [kind.NORMAL] * len(pieces)
    return tokens, scores, [int(t) for t in types]


class _Shape(NamedTuple):
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int


class _Weights:
    """Seeded random tensors in numpy (row-major) layout."""

    def __init__(self, seed: int, matrix_dtype: type = np.float32) -> None:
        self._rng = np.random.default_rng(seed)
        self._matrix_dtype = matrix_dtype

    def matrix(self, n_out: int, n_in: int) -> np.ndarray:
        """A weight mapping n_in -> n_out (llama.cpp shape {n_in, n_out})."""
        w = self._rng.normal(0.0, _WEIGHT_STD, size=(n_out, n_in))
        return w.astype(self._matrix_dtype)

    def norm(self, n: int) -> np.ndarray:
        """An RMS-norm weight vector near 1 (always F32)."""
        return (1.0 + self._rng.normal(0.0, _WEIGHT_STD, size=n)).astype(np.float32)


def _start_writer(
    path: str | os.PathLike[str],
    arch: str,
    s: _Shape,
    *,
    context_length: int,
    rope_freq_base: float,
    vocab: str,
    file_type: gguf.LlamaFileType,
) -> tuple[gguf.GGUFWriter, int]:
    """Create a writer holding the metadata shared by all architectures."""
    tokens, scores, types = _vocab(vocab)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(file_type)
    w.add_context_length(context_length)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(1e-6)

    w.add_tokenizer_model("llama")  # SentencePiece (SPM)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(_BOS_ID)
    w.add_eos_token_id(_EOS_ID)
    w.add_unk_token_id(_UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return w, len(tokens)


def _add_common_tensors(w: gguf.GGUFWriter, rand: _Weights, s: _Shape, n_vocab: int) -> None:
    """Embeddings, output head and the attention/FFN blocks common to both archs."""
    n_embd, n_head, n_head_kv, head_dim, n_ff = s.n_embd, s.n_head, s.n_head_kv, s.head_dim, s.n_ff
    w.add_tensor("token_embd.weight", rand.matrix(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", rand.norm(n_embd))
    w.add_tensor("output.weight", rand.matrix(n_vocab, n_embd))
    for i in range(s.n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", rand.norm(n_embd))
        w.add_tensor(f"{blk}.attn_q.weight", rand.matrix(n_head * head_dim, n_embd))
        w.add_tensor(f"{blk}.attn_k.weight", rand.matrix(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"{blk}.attn_v.weight", rand.matrix(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"{blk}.attn_output.weight", rand.matrix(n_embd, n_head * head_dim))
        w.add_tensor(f"{blk}.ffn_norm.weight", rand.norm(n_embd))
        w.add_tensor(f"{blk}.ffn_gate.weight", rand.matrix(n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_up.weight", rand.matrix(n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_down.weight", rand.matrix(n_embd, n_ff))


def _finish(w: gguf.GGUFWriter, path: str | os.PathLike[str]) -> pathlib.Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 3,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 128,
    context_length: int = 1024,
    rope_freq_base: float = 10000.0,
    seed: int = 0,
    vocab: str = "default",
    file_type: str = "f32",
) -> pathlib.Path:
    """Write a tiny "llama" model (GQA, normal RoPE, SwiGLU FFN) to ``path``.

    ``file_type="f16"`` stores the 2-D weight matrices as F16 (norms stay F32).
    ``vocab="other"`` uses a different token list of the same size.
    """
    ftypes = {
        "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
        "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
    }
    if file_type not in ftypes:
        raise ValueError(f"unknown file_type {file_type!r}; expected 'f32' or 'f16'")
    matrix_dtype, ftype = ftypes[file_type]
    shape = _Shape(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff)

    w, n_vocab = _start_writer(
        path,
        "llama",
        shape,
        context_length=context_length,
        rope_freq_base=rope_freq_base,
        vocab=vocab,
        file_type=ftype,
    )
    _add_common_tensors(w, _Weights(seed, matrix_dtype), shape, n_vocab)
    return _finish(w, path)


def write_tiny_gemma3(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 1,
    head_dim: int = 16,
    n_ff: int = 128,
    context_length: int = 1024,
    sliding_window: int = 16,
    swa_pattern: Sequence[bool] | None = None,
    rope_freq_base: float = 1e6,
    rope_freq_base_swa: float = 10000.0,
    seed: int = 0,
    vocab: str = "default",
) -> pathlib.Path:
    """Write a tiny "gemma3" model with interleaved sliding-window attention (iSWA).

    ``swa_pattern`` gives one bool per layer (True = sliding-window layer); the
    default makes every layer sliding except the last.  Rope bases are
    ``rope_freq_base`` for global layers and ``rope_freq_base_swa`` for SWA ones.
    """
    if swa_pattern is None:
        swa_pattern = [True] * (n_layer - 1) + [False]
    swa_pattern = [bool(x) for x in swa_pattern]
    if len(swa_pattern) != n_layer:
        raise ValueError(f"swa_pattern has {len(swa_pattern)} entries, expected {n_layer}")
    shape = _Shape(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff)

    w, n_vocab = _start_writer(
        path,
        "gemma3",
        shape,
        context_length=context_length,
        rope_freq_base=rope_freq_base,
        vocab=vocab,
        file_type=gguf.LlamaFileType.ALL_F32,
    )
    # Explicit keys: older gguf-py releases lack the helpers for these two.
    w.add_uint32("gemma3.attention.sliding_window", sliding_window)
    w.add_array("gemma3.attention.sliding_window_pattern", swa_pattern)
    w.add_float32("gemma3.rope.freq_base_swa", rope_freq_base_swa)

    rand = _Weights(seed)
    _add_common_tensors(w, rand, shape, n_vocab)
    for i in range(n_layer):  # gemma3's extra norms: QK-norm and post-norms
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", rand.norm(head_dim))
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", rand.norm(head_dim))
        w.add_tensor(f"blk.{i}.post_attention_norm.weight", rand.norm(n_embd))
        w.add_tensor(f"blk.{i}.post_ffw_norm.weight", rand.norm(n_embd))
    return _finish(w, path)


def write_tiny_qwen2(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 3,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 128,
    context_length: int = 1024,
    rope_freq_base: float = 1e6,
    seed: int = 0,
) -> pathlib.Path:
    """Write a tiny "qwen2" model: llama's blocks plus Q, K, V biases, NEOX RoPE."""
    shape = _Shape(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff)
    w, n_vocab = _start_writer(
        path,
        "qwen2",
        shape,
        context_length=context_length,
        rope_freq_base=rope_freq_base,
        vocab="default",
        file_type=gguf.LlamaFileType.ALL_F32,
    )
    rand = _Weights(seed)
    _add_common_tensors(w, rand, shape, n_vocab)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_q.bias", rand.norm(n_head * head_dim) - 1.0)
        w.add_tensor(f"blk.{i}.attn_k.bias", rand.norm(n_head_kv * head_dim) - 1.0)
        w.add_tensor(f"blk.{i}.attn_v.bias", rand.norm(n_head_kv * head_dim) - 1.0)
    return _finish(w, path)
