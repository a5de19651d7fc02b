"""A fast reader of a GGUF file's header: key-values and tensor infos, no tensor data.

gguf-py's GGUFReader builds a Python object per element of every array; for a 262k-token
vocabulary that takes ~8 s. kvcli only needs scalars, small arrays, and digests of the large
ones, so large arrays are skipped and kept as (offset, size) spans of the raw file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.errors import ModelFileError

# GGUF value types (gguf.GGUFValueType): struct format of the fixed-size ones
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
SMALL_ARRAY = 4096  # arrays up to this many elements are decoded into lists


@dataclass(frozen=True)
class RawArray:
    """A large array left undecoded: where its elements lie in the file."""

    value_type: int
    count: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    fields: dict[str, object]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def raw_bytes(self, span: RawArray) -> bytes:
        with self.path.open("rb") as f:
            f.seek(span.offset)
            return f.read(span.nbytes)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError(f"GGUF header is truncated: {self.path}")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"GGUF header is truncated: {self.path}")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        buf, pos, unpack = self.buf, self.pos, struct.unpack_from
        for _ in range(count):
            (n,) = unpack("<Q", buf, pos)
            pos += 8 + n
        if pos > len(buf):
            raise ModelFileError(f"GGUF header is truncated: {self.path}")
        self.pos = pos

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ModelFileError(f"unknown GGUF value type {vtype}: {self.path}")
        etype, count = self.unpack("<IQ")
        start = self.pos
        if count > SMALL_ARRAY:
            if etype == _STRING:
                self.skip_strings(count)
            elif etype in _NUMPY:
                self.pos += count * np.dtype(_NUMPY[etype]).itemsize
            else:
                raise ModelFileError(f"unsupported GGUF array of type {etype}: {self.path}")
            return RawArray(etype, count, start, self.pos - start)
        if etype in _NUMPY:
            size = count * np.dtype(_NUMPY[etype]).itemsize
            if self.pos + size > len(self.buf):
                raise ModelFileError(f"GGUF header is truncated: {self.path}")
            arr = np.frombuffer(self.buf[self.pos : self.pos + size], dtype=_NUMPY[etype])
            self.pos += size
            return [bool(x) for x in arr] if etype == 7 else arr.tolist()
        return [self.value(etype) for _ in range(count)]


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelFileError(f"unknown tensor type {ggml_type}") from None
    n = int(np.prod(shape)) if shape else 1
    return n // block * type_size


def read_header(path: str | Path) -> GGUFHeader:
    """Read a GGUF header; raises ModelFileError (one line) on a bad or truncated file."""
    path = Path(path)
    try:
        return _read_header(path)
    except ModelFileError:
        raise
    except (struct.error, ValueError, OverflowError, IndexError, MemoryError) as exc:
        # lengths and counts are untrusted: whatever they break, the file is damaged
        raise ModelFileError(f"GGUF header is corrupt ({type(exc).__name__}): {path}") from None


def _read_header(path: Path) -> GGUFHeader:
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"file is too short to be GGUF: {path}")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if buf[:4] != b"GGUF":
            raise ModelFileError(f"not a GGUF file: {path}")
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("<IQQ")
        if version not in (2, 3):
            raise ModelFileError(f"unsupported GGUF version {version}: {path}")
        fields = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ggml_type, rel = cur.unpack("<IQ")
            infos.append((name, shape, ggml_type, rel))
        align = int(fields.get("general.alignment", 32))
        data_offset = (cur.pos + align - 1) // align * align
    tensors = []
    for name, shape, ggml_type, rel in infos:
        t = TensorInfo(name, shape, ggml_type, data_offset + rel, _tensor_nbytes(ggml_type, shape))
        if t.offset + t.nbytes > size:
            raise ModelFileError(f"file is truncated (tensor {name} ends past the end): {path}")
        tensors.append(t)
    return GGUFHeader(
        path=path, version=version, fields=fields, tensors=tensors, data_offset=data_offset, file_size=size
    )


def read_tensors(path: str | Path, names=None) -> dict[str, np.ndarray]:
    """The named tensors (all with ``names`` None), dequantized with gguf-py to float32 in
    llama.cpp's row layout (a matrix is (n_out, n_in), a vector 1-D). Read through this
    module's header, not gguf-py's GGUFReader, which builds an object per vocabulary
    string (~600 MiB of peak memory for a 262k-token vocabulary, measured)."""
    import gguf
    import gguf.quants

    out = {}
    for t in read_header(path).tensors:
        if names is None or t.name in names:
            raw = np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
            rows = int(np.prod(t.shape[1:], dtype=np.int64))
            w = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(t.ggml_type))
            w = np.ascontiguousarray(w, dtype=np.float32).reshape(*t.shape[:0:-1], t.shape[0])
            out[t.name] = w
    return out
