"""Thin owners of llama.cpp's native handles (model, context, batch) over llama_cpp's C API.

This is kvcli's only model loader. It sets ``use_extra_bufts = False``: a default source
build of llama-cpp-python 0.3.36 enables ggml's AMX kernels, which segfault on the first
decode on some CPUs (docs/design.md, the AMX crash); without extra buffer types no AMX buffer is used.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.errors import ContextError, ModelFileError
from kvcli.llama.library import _lib, default_threads
from kvcli.models.model_info import check_gguf_file

KV_TYPES = {
    "f32": 0,
    "f16": 1,
    "q8_0": 8,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "bf16": 30,
    "iq4_nl": 20,
}


def _kv_overrides(lib, values: dict[str, int]):
    """A sentinel-terminated llama_model_kv_override array of integer overrides."""
    array = (lib.llama_model_kv_override * (len(values) + 1))()
    for entry, (key, value) in zip(array, values.items()):
        entry.key = key.encode()
        entry.tag = lib.LLAMA_KV_OVERRIDE_TYPE_INT
        entry.value.val_i64 = value
    array[len(values)].key = b"\0"
    return array


class Model:
    """A loaded llama.cpp model; ``close()`` frees it (safe to call twice)."""

    def __init__(self, path: str | Path, *, what: str = "model", prefix_layers: int = 0, arch: str = ""):
        """``prefix_layers`` k > 0 loads only the file's layers 0..k-1 as a model of their own
        (a kv override of ``{arch}.block_count``): a prefix view whose weights share the file's
        pages. Only a llama.cpp built with kvcli's patches/ can (see prefix_view_supported)."""
        lib = _lib()
        self.path = check_gguf_file(path, what)
        params = lib.llama_model_default_params()
        params.use_extra_bufts = False  # see module docstring: avoids the AMX crash
        params.n_gpu_layers = 0
        if prefix_layers:
            self._overrides = _kv_overrides(lib, {f"{arch}.block_count": prefix_layers})
            params.kv_overrides = self._overrides
        handle = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise ModelFileError(
                f"llama.cpp could not load the {what} file (run with --debug to see why): {self.path}"
            )
        self._lib = lib
        self.handle = handle
        self.vocab = lib.llama_model_get_vocab(handle)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))

    @property
    def prompt_bos(self) -> int | None:
        """The token a prompt starts with: BOS where the model adds one (Gemma, Llama), else
        None (Qwen2 prompts start with their own first token)."""
        return self.bos if self.add_bos else None

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (ctypes.c_int32 * n_max)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            buf = (ctypes.c_int32 * -n)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, True)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.handle:
            self._lib.llama_model_free(self.handle)
            self.handle = None


@dataclass(frozen=True)
class ContextSettings:
    """The settings that change speed or the state layout, named as llama-bench names them."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0  # 0: default_threads()
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False  # off: the re-injected cache is then exact to the bit

    def resolved_threads(self) -> int:
        return self.n_threads or default_threads()


class Context:
    """A llama.cpp context whose prompt and reply live in sequence 0, and a reusable batch."""

    def __init__(
        self,
        model: Model,
        settings: ContextSettings,
        *,
        capture=None,
        scratch_seqs: int = 0,
        scratch_cells: int = 0,
    ):
        """``capture``: a capture.TensorCapture whose callback observes the graph.
        ``scratch_seqs`` sequences beside seq 0 and ``scratch_cells`` cells beyond the
        context's size, for work on seq 0's cache in place (``recompute``, ``append_state``):
        one unified cache, so that sequences share cells instead of copying them."""
        lib = model._lib
        for name in (settings.type_k, settings.type_v):
            if name not in KV_TYPES:
                raise ContextError(f"unknown KV cache type {name!r} (one of {', '.join(KV_TYPES)})")
        params = lib.llama_context_default_params()
        params.n_ctx = settings.n_ctx + scratch_cells
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_ubatch
        params.n_seq_max = 1 + scratch_seqs
        params.kv_unified = scratch_seqs > 0
        params.n_threads = params.n_threads_batch = settings.resolved_threads()
        params.flash_attn_type = 1 if settings.flash_attn else 0
        params.type_k = KV_TYPES[settings.type_k]
        params.type_v = KV_TYPES[settings.type_v]
        params.swa_full = True  # every position stays in the sliding cache (needed to predict)
        params.no_perf = True
        if capture is not None:
            params.cb_eval = capture.callback
            params.cb_eval_user_data = None
        self.capture = capture
        handle = lib.llama_init_from_model(model.handle, params)
        if not handle:
            raise ContextError("llama.cpp could not create a context (run with --debug to see why)")
        self._lib = lib
        self.model = model
        self.settings = settings
        self.handle = handle
        # llama.cpp may round the requested size up; scratch cells are not the prompt's
        self.n_ctx = (
            min(settings.n_ctx, lib.llama_n_ctx(handle) - scratch_cells)
            if scratch_cells
            else lib.llama_n_ctx(handle)
        )
        self.scratch_seqs, self.scratch_cells = scratch_seqs, scratch_cells
        self.n_batch = lib.llama_n_batch(handle)  # ... and clamp n_batch to the requested n_ctx
        self.memory = lib.llama_get_memory(handle)
        self._batch = lib.llama_batch_init(settings.n_batch, 0, 1)
        self.n_past = 0
        # whether cache cell i holds position i of seq 0 (a captured attention row's columns
        # are cells): true from empty while tokens are only appended
        self.cells_in_order = True
        self._gaps_ok: bool | None = None  # gapped_positions_supported, once probed

    def clear(self) -> None:
        self._lib.llama_memory_clear(self.memory, True)
        self.n_past = 0
        self.cells_in_order = True

    def decode(
        self,
        tokens: list[int] | np.ndarray,
        *,
        start: int | None = None,
        logits_last: bool = False,
        logits_all: bool = False,
    ) -> None:
        """Decode ``tokens`` at positions start.. (default: after what is cached) in seq 0.

        Logits: for the last token with ``logits_last``, for every token with ``logits_all``
        (one batch only), else none (the LM head is skipped).
        """
        start = self.n_past if start is None else start
        if start + len(tokens) > self.n_ctx:
            raise ContextError(
                f"{start + len(tokens)} tokens do not fit the context of "
                f"{self.n_ctx}; use a shorter prompt or a larger --ctx"
            )
        if logits_all and len(tokens) > min(self.n_batch, self.settings.n_batch):
            raise ContextError(
                f"logits for every token need at most {min(self.n_batch, self.settings.n_batch)} tokens"
            )
        self._decode_pieces([(tokens, start, 0)], logits_last=logits_last, logits_all=logits_all)
        self.n_past = start + len(tokens)

    def gapped_positions_supported(self) -> bool:
        """Whether this build's llama.cpp decodes a sequence whose positions jump forward
        (kvcli's patches/0002; stock llama.cpp refuses the batch): probed once per context
        by two tokens at positions 0 and 2 of the last scratch sequence, removed after."""
        if self._gaps_ok is None:
            if not self.scratch_seqs:
                raise ContextError("this context has no scratch sequence to probe in")
            seq, bos = self.scratch_seqs, self.model.bos
            try:
                self._decode_pieces([([bos], 0, seq), ([bos], 2, seq)])
                self._gaps_ok = True
            except ContextError:
                self._gaps_ok = False
            self._lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        return self._gaps_ok

    def decode_at(
        self, tokens: list[int], positions: list[int] | np.ndarray, *, logits_last: bool = False
    ) -> None:
        """Decode ``tokens`` at their increasing ``positions`` (gaps allowed) in an empty seq 0:
        the positions skipped are never in the cache, the ones kept keep their own RoPE
        angles. Needs kvcli's patches/0002 (stock llama.cpp asks for consecutive positions)."""
        positions = np.asarray(positions, dtype=np.int32)
        if len(positions) != len(tokens) or np.any(np.diff(positions) <= 0):
            raise ContextError("positions must increase, one for each token")
        if positions[-1] + 1 > self.n_ctx:
            raise ContextError(f"position {positions[-1]} does not fit the context of {self.n_ctx}")
        breaks = np.flatnonzero(np.diff(positions) > 1) + 1
        runs = np.split(np.arange(len(tokens)), breaks)
        toks = np.asarray(tokens, dtype=np.int32)
        self._decode_pieces([(toks[r], int(positions[r[0]]), 0) for r in runs], logits_last=logits_last)
        self.n_past = int(positions[-1]) + 1
        self.cells_in_order = False  # cell i no longer holds position i

    def _decode_pieces(
        self,
        pieces: list[tuple[list[int] | np.ndarray, int, int]],
        *,
        logits_last: bool = False,
        logits_all: bool = False,
    ) -> None:
        """Decode pieces (tokens, first position, sequence) as one stream of batches: the
        weights are read once per batch, however many pieces it holds."""
        tokens = np.concatenate([np.asarray(t, dtype=np.int32) for t, _, _ in pieces])
        pos = np.concatenate([np.arange(p, p + len(t), dtype=np.int32) for t, p, _ in pieces])
        # (consecutive pieces of one sequence may jump forward: Context.decode_at)
        seqs = np.concatenate([np.full(len(t), s, dtype=np.int32) for t, _, s in pieces])
        b = self._batch
        n_batch = min(self.n_batch, self.settings.n_batch)
        for lo in range(0, len(tokens), n_batch):
            n = len(tokens[lo : lo + n_batch])
            np.ctypeslib.as_array(b.token, shape=(n,))[:] = tokens[lo : lo + n]
            np.ctypeslib.as_array(b.pos, shape=(n,))[:] = pos[lo : lo + n]
            np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
            for i in range(n):
                b.seq_id[i][0] = int(seqs[lo + i])
            want = np.full(n, 1 if logits_all else 0, dtype=np.int8)
            if logits_last and lo + n == len(tokens):
                want[-1] = 1
            np.ctypeslib.as_array(b.logits, shape=(n,))[:] = want
            b.n_tokens = n
            rc = self._lib.llama_decode(self.handle, b)
            if rc != 0:
                raise ContextError(f"llama_decode failed with code {rc} at position {pos[lo]}")

    def recompute(self, tokens: list[int], ranges: list[tuple[int, int]]) -> None:
        """Decode ``tokens[a:b]`` for each range [a, b) of seq 0 over the cells seq 0 holds
        before a, and put the new cells in place of seq 0's at a..b-1: the rest of the cache
        stays as it is (no state is read or written). Ranges are decoded together, as many as
        the scratch sequences and cells allow per batch (a longer range in pieces), each over
        the cells before it as they were (a later one in the same batch sees an earlier one's
        old cells)."""
        if not ranges:
            return
        if not self.scratch_seqs:
            raise ContextError("this context has no scratch sequences to recompute in place")
        step = self.scratch_cells
        pieces = [(a, min(a + step, b)) for a0, b in ranges for a in range(a0, b, step)]
        groups: list[list[tuple[int, int]]] = []
        for a, b in pieces:
            if (
                groups
                and len(groups[-1]) < self.scratch_seqs
                and sum(y - x for x, y in groups[-1]) + b - a <= self.scratch_cells
            ):
                groups[-1].append((a, b))
            else:
                groups.append([(a, b)])
        lib, mem = self._lib, self.memory
        for group in groups:
            for s, (a, _) in enumerate(group, 1):
                lib.llama_memory_seq_cp(mem, 0, s, -1, a)  # shares the cells, copies nothing
            self._decode_pieces([(tokens[a:b], a, s) for s, (a, b) in enumerate(group, 1)])
            for s, (a, b) in enumerate(group, 1):
                lib.llama_memory_seq_rm(mem, 0, a, b)
                lib.llama_memory_seq_cp(mem, s, 0, a, b)
            for s in range(1, len(group) + 1):
                lib.llama_memory_seq_rm(mem, s, -1, -1)
        self.cells_in_order = False  # the new cells went wherever the cache had room

    def append_state(self, data: bytes | bytearray, *, n_past: int) -> None:
        """Add the cells of a sequence state (``get_state``'s format) to seq 0, keeping the
        cells seq 0 holds (``set_state`` would replace them)."""
        if not self.scratch_seqs:
            raise ContextError("this context has no scratch sequence to append a state through")
        self.set_state(data, 1)
        self._lib.llama_memory_seq_cp(self.memory, 1, 0, -1, -1)
        self._lib.llama_memory_seq_rm(self.memory, 1, -1, -1)
        self.n_past = n_past

    def last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.handle, -1)
        if not ptr:
            raise ContextError("no logits available: the last decode requested none")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def logits_rows(self, n: int) -> np.ndarray:
        """The logits of the last decode's ``n`` output rows, (n, n_vocab)."""
        rows = [
            np.ctypeslib.as_array(
                self._lib.llama_get_logits_ith(self.handle, i), shape=(self.model.n_vocab,)
            ).copy()
            for i in range(n)
        ]
        return np.stack(rows)

    def truncate(self, n_past: int) -> None:
        """Forget every cached position >= ``n_past`` (seq 0)."""
        self._lib.llama_memory_seq_rm(self.memory, 0, n_past, -1)
        if n_past < self.n_past:
            self.cells_in_order = False  # what comes next may fill the freed cells or not
        self.n_past = n_past

    def get_state(self, seq_id: int = 0) -> bytearray:
        """``llama_state_seq_get_data``; seq_id -1 reads every cell of every sequence.

        llama.cpp writes straight into the returned bytearray (no second copy)."""
        size = self._lib.llama_state_seq_get_size(self.handle, seq_id)
        data = bytearray(size)
        n = self._lib.llama_state_seq_get_data(
            self.handle, (ctypes.c_uint8 * size).from_buffer(data), size, seq_id
        )
        if n != size:
            raise ContextError(f"llama_state_seq_get_data wrote {n} of {size} bytes")
        return data

    def set_state(self, data: bytes | bytearray, seq_id: int = 0, *, n_past: int | None = None) -> None:
        """``llama_state_seq_set_data`` into ``seq_id``; it clears that sequence first."""
        if seq_id == 0 and self.n_past:
            self.cells_in_order = False
        if isinstance(data, bytearray):
            buf = (ctypes.c_uint8 * len(data)).from_buffer(data)  # no copy
        else:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        n = self._lib.llama_state_seq_set_data(self.handle, buf, len(data), seq_id)
        if n == 0:
            raise ContextError(
                "llama.cpp refused the sequence state (layout, types or size do "
                "not match this context; run with --debug to see why)"
            )
        if n_past is not None:
            self.n_past = n_past
        else:
            self.n_past = int(self._lib.llama_memory_seq_pos_max(self.memory, seq_id)) + 1

    def shift(self, delta: int, *, p0: int = 0, p1: int = -1) -> None:
        """Add ``delta`` to the positions in [p0, p1) of seq 0 (applied on the next decode)."""
        self._lib.llama_memory_seq_add(self.memory, 0, p0, p1, delta)

    def close(self) -> None:
        if self.handle:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.handle)
            self.handle = None
