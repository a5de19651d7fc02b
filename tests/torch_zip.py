"""Write ``torch.save``'s zip checkpoint format without torch (test fixtures).

The pickle is written opcode by opcode, as torch writes it: an OrderedDict whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
with each storage a persistent id ``('storage', torch.<Type>Storage, key, 'cpu', numel)``.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
}


class Strided:
    """A tensor written with this shape and these strides over ``data`` (e.g. stride 0)."""

    def __init__(self, data: np.ndarray, shape: tuple, stride: tuple):
        self.data, self.shape, self.stride = np.ascontiguousarray(data), shape, stride


class _Writer:
    def __init__(self):
        self.out = bytearray(pickle.PROTO + bytes([2]))
        self.storages: list[bytes] = []

    def op(self, code: bytes, payload: bytes = b"") -> None:
        self.out += code + payload

    def global_(self, module: str, name: str) -> None:
        self.op(pickle.GLOBAL, f"{module}\n{name}\n".encode())

    def str_(self, s: str) -> None:
        data = s.encode()
        self.op(pickle.BINUNICODE, struct.pack("<I", len(data)) + data)

    def int_(self, n: int) -> None:
        if 0 <= n < 2**31:
            self.op(pickle.BININT, struct.pack("<i", n))
        else:
            data = n.to_bytes(8, "little", signed=True)
            self.op(pickle.LONG1, bytes([len(data)]) + data)

    def tuple_(self, items) -> None:
        self.op(pickle.MARK)
        for x in items:
            self.value(x)
        self.op(pickle.TUPLE)

    def ordered_dict(self, items: dict) -> None:
        self.global_("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE)
        self.op(pickle.REDUCE)
        if items:
            self.op(pickle.MARK)
            for k, v in items.items():
                self.value(k)
                self.value(v)
            self.op(pickle.SETITEMS)

    def tensor(self, a: np.ndarray, shape=None, stride=None) -> None:
        a = np.ascontiguousarray(a)
        shape = a.shape if shape is None else shape
        stride = [s // a.itemsize for s in a.strides] if stride is None else stride
        key = str(len(self.storages))
        self.storages.append(a.astype(a.dtype.newbyteorder("<")).tobytes())
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        self.op(pickle.MARK)  # the persistent id tuple
        self.str_("storage")
        self.global_("torch", STORAGE_NAMES[a.dtype])
        self.str_(key)
        self.str_("cpu")
        self.int_(a.size)
        self.op(pickle.TUPLE)
        self.op(pickle.BINPERSID)
        self.int_(0)
        self.tuple_(shape)
        self.tuple_(stride if len(shape) else [])
        self.op(pickle.NEWFALSE)
        self.ordered_dict({})
        self.op(pickle.TUPLE)
        self.op(pickle.REDUCE)

    def value(self, v) -> None:
        if isinstance(v, np.ndarray):
            self.tensor(v)
        elif isinstance(v, Strided):
            self.tensor(v.data, v.shape, v.stride)
        elif isinstance(v, dict):
            self.ordered_dict(v)
        elif isinstance(v, str):
            self.str_(v)
        elif isinstance(v, bool):
            self.op(pickle.NEWTRUE if v else pickle.NEWFALSE)
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, (tuple, list)):
            self.tuple_(v)
        else:
            raise TypeError(type(v))


def save_torch_zip(
    path: Path,
    obj: dict,
    *,
    archive: str = "archive",
    raw_pickle: bytes | None = None,
    compress: bool = False,
) -> Path:
    """``obj`` (nested dicts of numpy arrays, str, int) as torch.save would write it;
    ``raw_pickle`` replaces the pickle (to write a hostile one); ``compress`` deflates the
    storages (torch never does)."""
    w = _Writer()
    w.value(obj)
    w.op(pickle.STOP)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", raw_pickle if raw_pickle is not None else bytes(w.out))
        zf.writestr(f"{archive}/byteorder", "little")
        for i, data in enumerate(w.storages):
            zf.writestr(
                f"{archive}/data/{i}",
                data,
                compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
            )
        zf.writestr(f"{archive}/version", "3\n")
    return path
