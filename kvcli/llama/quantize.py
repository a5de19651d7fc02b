"""Quantize a base or auxiliary model with llama.cpp's own quantizer (llama_model_quantize).

The output is written atomically (atomic.py): the quantizer writes into an unnamed file
that only appears under its name once complete.
"""

from __future__ import annotations

from pathlib import Path

from kvcli.atomic import write_atomically
from kvcli.errors import KvcliError, ModelFileError
from kvcli.models.model_info import read_model_info

# llama-quantize's names for the common file types -> llama_ftype (llama.h)
QUANT_TYPES = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_0",
    "q5_1",
    "q4_k_m",
    "q4_k_s",
    "q4_0",
    "q4_1",
    "q3_k_m",
    "q3_k_s",
    "q3_k_l",
    "q2_k",
)
_FLOAT_TYPES = {0, 1, 30}  # GGML F32, F16, BF16


def _ftype(lib, name: str) -> int:
    key = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    return int(getattr(lib, key))


def is_quantized(path: Path) -> bool:
    """Whether any 2-D weight of the model is stored in a quantized type."""
    from kvcli.models.gguf_header import read_header

    return any(len(t.shape) >= 2 and t.ggml_type not in _FLOAT_TYPES for t in read_header(path).tensors)


def quantize_model(
    src: str | Path, dest: str | Path, qtype: str, *, threads: int = 0, allow_requantize: bool = False
) -> Path:
    """Write ``src`` quantized to ``qtype`` (a name of QUANT_TYPES) at ``dest``."""
    from kvcli.llama.library import _lib, default_threads, last_llama_error

    qtype = qtype.lower()
    if qtype not in QUANT_TYPES:
        raise KvcliError(f"unknown quantization type {qtype!r} (one of {', '.join(QUANT_TYPES)})")
    info = read_model_info(src, "input model")
    dest = Path(dest)
    if dest.resolve() == info.path:
        raise KvcliError("the output would overwrite the input; choose another output path")
    if is_quantized(info.path) and not allow_requantize:
        raise KvcliError(
            f"{info.path.name} is already quantized; requantizing loses quality "
            "(pass --allow-requantize to do it anyway)"
        )
    lib = _lib()
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = _ftype(lib, qtype)
    params.allow_requantize = allow_requantize

    def write(tmp: Path) -> None:
        last_llama_error()
        rc = lib.llama_model_quantize(str(info.path).encode(), str(tmp).encode(), params)
        if rc != 0:
            why = last_llama_error()
            raise ModelFileError(
                f"llama.cpp could not quantize {info.path.name} to {qtype}"
                + (f": {why}" if why else " (run with --debug to see why)")
            )

    return write_atomically(dest, write)
