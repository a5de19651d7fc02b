"""Fixtures: tiny GGUF models written with gguf-py, the embedded Gemma 3 270M, bundles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import write_tiny_gemma3, write_tiny_llama, write_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama.gguf")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return write_tiny_gemma3(tmp_path_factory.mktemp("tiny") / "gemma3.gguf")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "qwen2.gguf")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from kvcli.engine.bundle import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def gemma_bundle(tmp_path_factory, gemma_path):
    """A bundle of the embedded model with a quick calibration (same code as the default)."""
    from kvcli.bundles.build import build_bundle

    return build_bundle(gemma_path, tmp_path_factory.mktemp("bundles") / "gemma", n_tokens=2048)


def random_prompt(n: int, n_vocab: int, bos: int, seed: int = 0, low: int = 300) -> list[int]:
    rng = np.random.default_rng(seed)
    return [bos] + [int(x) for x in rng.integers(low, n_vocab, size=n - 1)]


def _real_model(name: str) -> Path:
    from kvcli.models.real_models import real_model_path

    path = real_model_path(name)
    if path is None:
        pytest.skip(f"{name} is not fetched (python tools/fetch_models.py)")
    return path


@pytest.fixture(scope="session")
def qwen_base() -> Path:
    """Qwen2.5-Coder 1.5B Instruct, when tools/fetch_models.py has fetched it."""
    from kvcli.models.real_models import QWEN_BASE

    return _real_model(QWEN_BASE)


@pytest.fixture(scope="session")
def qwen_aux() -> Path:
    """Qwen2.5-Coder 0.5B Instruct (its KVP-C auxiliary), when fetched."""
    from kvcli.models.real_models import QWEN_AUX

    return _real_model(QWEN_AUX)
