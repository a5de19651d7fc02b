"""Read a PyTorch checkpoint (``torch.save``'s zip format) into numpy arrays, without torch.

A checkpoint is a zip holding ``<name>/data.pkl`` (a pickle) and one file per tensor storage
(``<name>/data/<key>``). Unpickling runs whatever callables the pickle names, so this reader
resolves only the few names that rebuild tensors and containers (the same set llama.cpp's
legacy converter allowed) and refuses any other by name: a checkpoint cannot run code here.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from kvcli.errors import ModelFileError

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# The pickle of a state dict (names, shapes, storage references) is kilobytes; a cap keeps a
# hostile one from growing without bound (a zip bomb, or dict keys built to collide).
MAX_PICKLE_BYTES = 16 << 20


class CheckpointError(ModelFileError):
    """The file is not a checkpoint kvcli can read, or it asks for more than tensors."""


class _Storage:
    def __init__(self, data, dtype):
        """``data``: the storage's bytes (a bytes object or a uint8 memmap)."""
        if dtype == "bfloat16":  # numpy has no bfloat16: widen to float32 (exact)
            raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            self.array = raw.view(np.float32)
        else:
            self.array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> np.ndarray:
    base = storage.array
    if not size:
        return base[offset : offset + 1].reshape(()).copy()
    needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or needed > len(base) or any(n < 0 or s < 0 for n, s in zip(size, stride)):
        raise CheckpointError(f"a tensor of shape {tuple(size)} reaches past its storage")
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        # a broadcast view (expand()): not in a model's weights, and copying one out of a
        # few bytes of storage is how a small file would exhaust memory
        raise CheckpointError(f"a tensor of shape {tuple(size)} repeats its storage (stride 0)")
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=tuple(size), strides=tuple(s * base.itemsize for s in stride)
    )
    if view.flags.c_contiguous:
        return view  # a read-only view of the file's pages (stored members are memory-mapped)
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


def _ordered_dict(*args):
    return OrderedDict(*args)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_record):
        super().__init__(io.BytesIO(data))
        self.read_record = read_record

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"the checkpoint's pickle asks for {module}.{name}; only tensors "
            "and plain containers are read (nothing in it is executed)"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        ):
            raise CheckpointError(f"unexpected storage reference in the checkpoint: {pid!r:.80}")
        return _Storage(self.read_record(str(pid[2])), STORAGE_DTYPES[pid[1].name])


def load_checkpoint(path: str | Path) -> dict:
    """The unpickled object of a ``torch.save`` zip checkpoint, tensors as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise CheckpointError(f"not a PyTorch zip checkpoint (no single data.pkl): {path}")
            prefix = pkl[0][: -len("data.pkl")]
            cache: dict[str, object] = {}
            whole = np.memmap(path, dtype=np.uint8, mode="r")

            def read_record(key: str):
                if key not in cache:
                    try:
                        info = zf.getinfo(f"{prefix}data/{key}")
                    except KeyError:
                        raise CheckpointError(f"the checkpoint lacks tensor storage {key}: {path}") from None
                    cache[key] = _member_bytes(zf, info, whole)
                return cache[key]

            info = zf.getinfo(pkl[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(
                    f"the checkpoint's pickle is {info.file_size} bytes; a state "
                    f"dict's is far below {MAX_PICKLE_BYTES}: {path}"
                )
            return _Unpickler(zf.read(pkl[0]), read_record).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as exc:
        raise CheckpointError(f"not a readable PyTorch zip checkpoint ({exc}): {path}") from None
    except Exception as exc:  # untrusted bytes: any other failure is a damaged pickle or zip
        raise CheckpointError(f"the checkpoint is corrupt ({type(exc).__name__}: {exc}): {path}") from None


def _member_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, whole: np.memmap):
    """A zip member's bytes: a view of the mapped file for a stored (uncompressed) member,
    as torch.save writes them, so a checkpoint larger than memory can still be read."""
    if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses them
        raise CheckpointError(f"tensor storage {info.filename} is compressed; torch.save writes them stored")
    header = bytes(whole[info.header_offset : info.header_offset + 30])
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError("a tensor storage's zip entry is damaged")
    start = (
        info.header_offset
        + 30
        + int.from_bytes(header[26:28], "little")
        + int.from_bytes(header[28:30], "little")
    )
    if start + info.file_size > len(whole):
        raise CheckpointError("the checkpoint is truncated")
    return whole[start : start + info.file_size]


def state_dict_of(obj, path: str | Path = "") -> dict[str, np.ndarray]:
    """The model state dict in a loaded checkpoint (a training checkpoint wraps it under
    ``model_state_dict``); every value must be an array."""
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"the checkpoint holds no state dict: {path}")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"state dict entry {bad[0]!r} is not a tensor: {path}")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}
