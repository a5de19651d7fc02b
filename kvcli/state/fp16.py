"""float32 -> float16 casts of predicted K and V rows through ggml's own row converter.

numpy's astype to float16 runs about 2.5 ns an element here (28 ms for the 11 M values of
a 1024-token predicted state); ggml_cpu_fp32_to_fp16 (public in ggml-cpu.h, in the
libggml-cpu that llama-cpp-python ships) uses the CPU's conversion instructions: 3.8 ms,
the same bits (round to nearest even). Where the library or the symbol is missing, numpy
casts as before.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

_ROW_CAST = None  # the C function, False once looked for and not found


def _row_cast():
    global _ROW_CAST
    if _ROW_CAST is None:
        _ROW_CAST = False
        try:
            import llama_cpp

            lib_dir = Path(llama_cpp.__file__).parent / "lib"
            for path in sorted(lib_dir.glob("libggml-cpu.*")):
                fn = getattr(ctypes.CDLL(str(path)), "ggml_cpu_fp32_to_fp16", None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                    fn.restype = None
                    _ROW_CAST = fn
                    break
        except (ImportError, OSError):
            pass
    return _ROW_CAST


def cast_into(dest: np.ndarray, src: np.ndarray, transpose: bool = False) -> None:
    """``dest[...] = src.T if transpose else src``; float32 into a C-contiguous float16
    ``dest`` goes through ggml (ctypes releases the GIL, so pool threads cast in parallel)."""
    fn = _row_cast()
    if fn and dest.dtype == np.float16 and dest.flags.c_contiguous and src.dtype == np.float32:
        rows = np.ascontiguousarray(src.T if transpose else src)
        if rows.shape == dest.shape:
            fn(rows.ctypes.data, dest.ctypes.data, rows.size)
            return
    dest[...] = src.T if transpose else src
