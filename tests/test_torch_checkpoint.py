import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from torch_zip import Strided, save_torch_zip

from kvcli.models.torch_checkpoint import CheckpointError, load_checkpoint, state_dict_of

SAMPLE = Path(__file__).parent / "data" / "torch-2.13-sample.pt"


def test_reads_a_file_torch_wrote():
    """tests/data/torch-2.13-sample.pt was written by torch.save (torch 2.13.0): parameters,
    bfloat16, a transposed view and a slice of one shared storage, float16, int64."""
    obj = load_checkpoint(SAMPLE)
    assert obj["step"] == 7
    sd = state_dict_of(obj, SAMPLE)
    big = np.arange(30, dtype=np.float32).reshape(6, 5)
    np.testing.assert_array_equal(sd["lin.weight"], np.arange(12, dtype=np.float32).reshape(3, 4) / 8)
    np.testing.assert_array_equal(sd["lin.bias"], [1, 2, 3])
    np.testing.assert_array_equal(sd["bf"], np.arange(9, dtype=np.float32).reshape(3, 3) / 4)
    np.testing.assert_array_equal(sd["tr"], big.T)
    np.testing.assert_array_equal(sd["slice"], big[2:4])
    assert sd["f16"].dtype == np.float16 and sd["f16"].tolist() == [0.5, -2.0]
    assert sd["ids"].dtype == np.int64 and sd["ids"].tolist() == [3, 1, 2]


def test_round_trip_of_the_test_writer(tmp_path):
    sd = {
        "a.weight": np.random.default_rng(0).random((3, 4), dtype=np.float32),
        "module.b": np.arange(5, dtype=np.int64),
    }
    save_torch_zip(tmp_path / "c.pt", {"model_state_dict": sd, "epoch": 2})
    out = state_dict_of(load_checkpoint(tmp_path / "c.pt"))
    assert set(out) == {"a.weight", "b"}  # a DataParallel "module." prefix is dropped
    np.testing.assert_array_equal(out["a.weight"], sd["a.weight"])


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/kvcli-pwned",))


@pytest.mark.parametrize(
    "payload, named",
    [
        (pickle.dumps(_Evil(), protocol=2), "posix.system"),
        (pickle.dumps({"x": __import__("argparse").Namespace(a=1)}, protocol=2), "argparse.Namespace"),
    ],
)
def test_a_pickle_that_asks_for_code_is_refused_by_name(tmp_path, payload, named):
    path = save_torch_zip(tmp_path / "evil.pt", {}, raw_pickle=payload)
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(path)
    assert not Path("/tmp/kvcli-pwned").exists()


def test_bad_files(tmp_path):
    (tmp_path / "not.pt").write_bytes(b"\x80\x02}q\x00.")  # a legacy (non-zip) pickle
    with pytest.raises(CheckpointError, match="not a readable PyTorch zip"):
        load_checkpoint(tmp_path / "not.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    path = save_torch_zip(tmp_path / "c.pt", {"w": np.ones((4, 4), np.float32)})
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(tmp_path / "cut.pt", "w") as out:
        for name in zf.namelist():
            data = zf.read(name)
            out.writestr(name, data[:8] if name.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not a tensor"):
        state_dict_of({"w": np.ones(2), "n": 3})
    truncated = path.read_bytes()[:200]
    (tmp_path / "trunc.pt").write_bytes(truncated)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")


def test_a_small_file_cannot_ask_for_much_memory(tmp_path, monkeypatch):
    """A broadcast view (stride 0) over a few bytes, deflated storages and an oversized pickle
    are refused: each would let a small file allocate without bound."""
    from kvcli.models import torch_checkpoint

    tiny = np.ones(1, np.float32)
    path = save_torch_zip(tmp_path / "b.pt", {"w": Strided(tiny, (25_000_000,), (0,))})
    with pytest.raises(CheckpointError, match="stride 0"):
        load_checkpoint(path)
    path = save_torch_zip(tmp_path / "z.pt", {"w": np.ones((4, 4), np.float32)}, compress=True)
    with pytest.raises(CheckpointError, match="compressed"):
        load_checkpoint(path)
    monkeypatch.setattr(torch_checkpoint, "MAX_PICKLE_BYTES", 64)
    with pytest.raises(CheckpointError, match="far below"):
        load_checkpoint(SAMPLE)
