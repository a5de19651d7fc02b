"""Parse and write llama.cpp's sequence state bytes (``llama_state_seq_get_data``).

Layout (llama-cpp-python 0.3.36, vendored llama.cpp src/llama-context.cpp and
src/llama-kv-cache.cpp ``state_write_meta`` / ``state_write_data``), all little-endian::

    u32 magic 0xaf143cd8, i32 seq_id
    then one blob per KV cache (an iSWA model has two: full-attention layers, then sliding):
      u32 n_stream
      per stream: u32 cell_count; if cell_count > 0:
        per cell: i32 pos, u32 n_seq_id, i32 seq_id * n_seq_id
        u32 v_trans, u32 n_layer
        per layer K: i32 ggml_type, u64 row_size, cell_count rows
        per layer V, v_trans == 0: same as K
        per layer V, v_trans == 1: i32 ggml_type, u32 element_size, u32 n_embd_v,
                                  n_embd_v runs of cell_count elements

Values are kept per cell (``cells x n_embd``) whatever the layout, so a transposed V is
transposed back on write. Parse then write gives back the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvcli.errors import StateFormatError
from kvcli.state.fp16 import cast_into

STATE_MAGIC = 0xAF143CD8

# ggml_type ids (ggml.h) kvcli can read: the predictor needs real-valued K and V.
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
KV_DTYPES = {GGML_TYPE_F32: np.dtype("<f4"), GGML_TYPE_F16: np.dtype("<f2")}
GGML_TYPE_NAMES = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    6: "q5_0",
    7: "q5_1",
    8: "q8_0",
    9: "q8_1",
    10: "q2_k",
    11: "q3_k",
    12: "q4_k",
    13: "q5_k",
    14: "q6_k",
    15: "q8_k",
    20: "iq4_nl",
    30: "bf16",
}


def ggml_type_name(type_id: int) -> str:
    return GGML_TYPE_NAMES.get(type_id, f"ggml type {type_id}")


@dataclass
class LayerKV:
    """One layer's cached keys and values, one row per cell."""

    k_type: int
    k: np.ndarray | Pending  # (cells, n_embd_k)
    v_type: int
    v: np.ndarray | Pending  # (cells, n_embd_v)


@dataclass(frozen=True)
class Pending:
    """Rows that ``write_seq_state`` computes only when it fills their place: ``compute()``
    returns the layer's (K, V) pair, called once per layer, and ``index`` picks K (0) or V (1).
    A writer can then stream layers into its buffer without every layer's float32 rows alive."""

    shape: tuple[int, int]
    compute: Callable[[], tuple[np.ndarray, np.ndarray]]
    index: int


@dataclass
class StreamState:
    """The cells of one stream of one KV cache and their per-layer K and V."""

    positions: np.ndarray  # (cells,) int32
    seq_ids: list[np.ndarray]  # per cell, the sequences it belongs to
    v_trans: bool = False
    layers: list[LayerKV] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class CacheBlob:
    """One KV cache's part of the state: a list of streams (None for an empty stream)."""

    streams: list[StreamState | None]


@dataclass
class SeqState:
    seq_id: int
    blobs: list[CacheBlob]


class _Reader:
    def __init__(self, data: bytes | memoryview):
        self.buf = memoryview(data)
        self.offset = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.offset + n
        if end > len(self.buf):
            raise StateFormatError(
                f"sequence state ends early while reading {what} "
                f"(needs {n} bytes at offset {self.offset}, {len(self.buf)} in all)"
            )
        chunk = self.buf[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)

    @property
    def at_end(self) -> bool:
        return self.offset == len(self.buf)


def _kv_dtype(type_id: int, what: str) -> np.dtype:
    if type_id not in KV_DTYPES:
        raise StateFormatError(
            f"{what} is stored as {ggml_type_name(type_id)}; kvcli reads only f16 and f32 "
            "KV caches (run with --cache-type-k f16 --cache-type-v f16)"
        )
    return KV_DTYPES[type_id]


def _parse_cells(r: _Reader, n_cells: int, cell_ext_bytes: int):
    if cell_ext_bytes == 0:
        # Fast path: every cell in exactly one sequence -> 3 int32 per cell.
        start = r.offset
        if start + 12 * n_cells <= len(r.buf):
            triples = np.frombuffer(r.buf[start : start + 12 * n_cells], dtype="<i4").reshape(-1, 3)
            if np.all(triples[:, 1] == 1):
                r.offset += 12 * n_cells
                seq_ids = [triples[i, 2:3].copy() for i in range(n_cells)]
                return triples[:, 0].copy(), seq_ids
    positions = np.empty(n_cells, dtype=np.int32)
    seq_ids = []
    for i in range(n_cells):
        pos, n_seq = r.unpack("<iI", "a cell")
        if cell_ext_bytes:
            r.take(cell_ext_bytes, "a cell extension")
        positions[i] = pos
        seq_ids.append(r.array(np.dtype("<i4"), n_seq, "a cell's sequence ids").copy())
    return positions, seq_ids


def _parse_stream(r: _Reader, n_cells: int, cell_ext_bytes: int) -> StreamState:
    positions, seq_ids = _parse_cells(r, n_cells, cell_ext_bytes)
    v_trans, n_layer = r.unpack("<II", "v_trans and n_layer")
    if v_trans not in (0, 1):
        raise StateFormatError(f"unknown V layout v_trans={v_trans} (expected 0 or 1)")
    keys = []
    for il in range(n_layer):
        k_type, row_size = r.unpack("<iQ", "a key header")
        dtype = _kv_dtype(k_type, f"the key cache of layer {il}")
        if row_size % dtype.itemsize:
            raise StateFormatError(f"key row size {row_size} of layer {il} is not whole elements")
        n_embd = row_size // dtype.itemsize
        keys.append((k_type, r.array(dtype, n_cells * n_embd, "key rows").reshape(n_cells, n_embd)))
    layers = []
    for il in range(n_layer):
        if not v_trans:
            v_type, row_size = r.unpack("<iQ", "a value header")
            dtype = _kv_dtype(v_type, f"the value cache of layer {il}")
            n_embd = row_size // dtype.itemsize
            v = r.array(dtype, n_cells * n_embd, "value rows").reshape(n_cells, n_embd)
        else:
            v_type, el_size, n_embd = r.unpack("<iII", "a transposed value header")
            dtype = _kv_dtype(v_type, f"the value cache of layer {il}")
            if el_size != dtype.itemsize:
                raise StateFormatError(
                    f"value element size {el_size} of layer {il} does not match {ggml_type_name(v_type)}"
                )
            v = r.array(dtype, n_cells * n_embd, "value columns").reshape(n_embd, n_cells).T
        k_type, k = keys[il]
        layers.append(LayerKV(k_type=k_type, k=k, v_type=v_type, v=v))
    return StreamState(positions=positions, seq_ids=seq_ids, v_trans=bool(v_trans), layers=layers)


def parse_seq_state(
    data: bytes | memoryview, *, n_blobs: int | None = None, cell_ext_bytes: int = 0
) -> SeqState:
    """Parse a sequence state. ``n_blobs``: how many KV caches to expect (None: until the end).

    The arrays returned are read-only views into ``data`` where the layout allows it.
    """
    r = _Reader(data)
    magic, seq_id = r.unpack("<Ii", "the header")
    if magic != STATE_MAGIC:
        raise StateFormatError(f"not a llama.cpp sequence state (magic {magic:#x})")
    blobs = []
    while not r.at_end and (n_blobs is None or len(blobs) < n_blobs):
        (n_stream,) = r.unpack("<I", "a stream count")
        if n_stream == 0 or n_stream > 256:
            raise StateFormatError(f"implausible stream count {n_stream} at offset {r.offset - 4}")
        streams: list[StreamState | None] = []
        for _ in range(n_stream):
            (n_cells,) = r.unpack("<I", "a cell count")
            streams.append(_parse_stream(r, n_cells, cell_ext_bytes) if n_cells else None)
        blobs.append(CacheBlob(streams=streams))
    if n_blobs is not None and len(blobs) != n_blobs:
        raise StateFormatError(f"expected {n_blobs} KV cache blobs, found {len(blobs)}")
    if not r.at_end:
        raise StateFormatError(f"{len(r.buf) - r.offset} unexpected bytes after the last blob")
    return SeqState(seq_id=seq_id, blobs=blobs)


class _Writer:
    """Fills one preallocated buffer: K and V rows are cast (and V transposed) straight into
    it, with no intermediate copies. The casts are queued per layer and run at the end, on
    ``map`` (e.g. a thread pool's: numpy casts release the GIL)."""

    def __init__(self, size: int):
        self.buf = bytearray(size)
        self.view = np.frombuffer(self.buf, dtype=np.uint8)
        self.offset = 0
        self.jobs: list[list[tuple[np.ndarray, np.ndarray | Pending, bool]]] = []

    def run_copies(self, map_fn=map) -> None:
        def run(job):
            computed = {}
            for dest, src, transpose in job:
                if isinstance(src, Pending):
                    if src.compute not in computed:
                        computed[src.compute] = src.compute()
                    src = computed[src.compute][src.index]
                cast_into(dest, src, transpose)

        for _ in map_fn(run, self.jobs):
            pass

    def pack(self, fmt: str, *values) -> None:
        struct.pack_into(fmt, self.buf, self.offset, *values)
        self.offset += struct.calcsize(fmt)

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * dtype.itemsize
        out = self.view[self.offset : self.offset + n].view(dtype).reshape(shape)
        self.offset += n
        return out


def _cells_size(s: StreamState) -> int:
    if all(len(ids) == 1 for ids in s.seq_ids):
        return 12 * s.n_cells
    return sum(8 + 4 * len(ids) for ids in s.seq_ids)


def _stream_size(s: StreamState) -> int:
    size = 4 + _cells_size(s) + 8
    for layer in s.layers:
        kt = _kv_dtype(layer.k_type, "a key cache")
        vt = _kv_dtype(layer.v_type, "a value cache")
        size += 12 + layer.k.shape[0] * layer.k.shape[1] * kt.itemsize
        size += 12 + layer.v.shape[0] * layer.v.shape[1] * vt.itemsize
    return size


def _write_stream(w: _Writer, s: StreamState) -> None:
    n = s.n_cells
    if all(len(ids) == 1 for ids in s.seq_ids):
        triples = w.array(np.dtype("<i4"), (n, 3))
        triples[:, 0] = s.positions
        triples[:, 1] = 1
        triples[:, 2] = np.concatenate(s.seq_ids) if n else []
    else:
        for pos, ids in zip(s.positions, s.seq_ids):
            w.pack("<iI", int(pos), len(ids))
            w.array(np.dtype("<i4"), (len(ids),))[:] = ids
    w.pack("<II", int(s.v_trans), len(s.layers))
    jobs = [[] for _ in s.layers]  # one per layer: its K and V copies run together
    for layer, job in zip(s.layers, jobs):
        dtype = _kv_dtype(layer.k_type, "a key cache")
        w.pack("<iQ", layer.k_type, layer.k.shape[1] * dtype.itemsize)
        job.append((w.array(dtype, layer.k.shape), layer.k, False))
    for layer, job in zip(s.layers, jobs):
        dtype = _kv_dtype(layer.v_type, "a value cache")
        cells, width = layer.v.shape
        if s.v_trans:
            w.pack("<iII", layer.v_type, dtype.itemsize, width)
            job.append((w.array(dtype, (width, cells)), layer.v, True))
        else:
            w.pack("<iQ", layer.v_type, width * dtype.itemsize)
            job.append((w.array(dtype, (cells, width)), layer.v, False))
    w.jobs.extend(jobs)


def write_seq_state(state: SeqState, map_fn=map) -> bytearray:
    """Serialize a SeqState into the bytes ``llama_state_seq_set_data`` reads.

    K and V rows may be of any float dtype, or Pending: they are cast to each layer's ggml
    type, one layer per call of ``map_fn`` (default: the builtin map, in order)."""
    streams = [s for blob in state.blobs for s in blob.streams if s is not None and s.n_cells]
    size = 8 + sum(4 + 4 * len(blob.streams) for blob in state.blobs)
    size += sum(_stream_size(s) - 4 for s in streams)
    w = _Writer(size)
    w.pack("<Ii", STATE_MAGIC, state.seq_id)
    for blob in state.blobs:
        w.pack("<I", len(blob.streams))
        for stream in blob.streams:
            if stream is None or stream.n_cells == 0:
                w.pack("<I", 0)
                continue
            w.pack("<I", stream.n_cells)
            _write_stream(w, stream)
    if w.offset != size:
        raise StateFormatError(f"state writer filled {w.offset} of {size} bytes")
    w.run_copies(map_fn)
    return w.buf
