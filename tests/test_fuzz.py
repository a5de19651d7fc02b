"""Fuzz kvcli's readers of untrusted bytes: mutated predictor files, sequence states and
torch checkpoints.

Each mutant must either parse or raise kvcli's own error (KvcliError): no other exception,
no crash, no hang. KVCLI_FUZZ_N sets the number of mutants per reader (default 1000).
"""

import os
import signal

import numpy as np
import pytest
from test_predictor import small_predictor
from test_state_codec import make_stream

from kvcli.errors import KvcliError
from kvcli.predict.predictor import load_predictor, save_predictor
from kvcli.state.codec import CacheBlob, SeqState, parse_seq_state, write_seq_state

N_MUTANTS = int(os.environ.get("KVCLI_FUZZ_N", "1000"))
SECONDS_PER_CASE = 5


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip bytes, overwrite a little-endian integer with an extreme, truncate,
    insert or delete a span; biased to the header, where the lengths and counts live."""
    buf = bytearray(data)
    kind = rng.integers(5)
    head = min(len(buf), 1024)
    at = int(rng.integers(head if rng.random() < 0.8 else len(buf)))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(head if rng.random() < 0.8 else len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        extremes = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]
        value = extremes[int(rng.integers(len(extremes)))]
        size = 4 if rng.random() < 0.5 else 8
        buf[at : at + size] = value.to_bytes(8, "little")[:size]
    elif kind == 2:
        del buf[int(rng.integers(len(buf))) :]
    elif kind == 3:
        buf[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:
        del buf[at : at + int(rng.integers(1, 64))]
    return bytes(buf)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def run_mutants(data: bytes, read, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {"parsed": 0, "refused": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(N_MUTANTS):
            mutant = mutate(data, rng)
            signal.alarm(SECONDS_PER_CASE)
            try:
                read(mutant)
                counts["parsed"] += 1
            except KvcliError:
                counts["refused"] += 1
            except _Timeout:
                pytest.fail(f"mutant {i} hung the reader")
            except Exception as exc:
                pytest.fail(f"mutant {i} raised {type(exc).__name__}: {exc}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return counts


def test_mutated_predictor_files(tmp_path):
    data = save_predictor(small_predictor(), tmp_path / "p.gguf", "q8_0").read_bytes()
    path = tmp_path / "mutant.gguf"

    def read(mutant: bytes):
        path.write_bytes(mutant)
        return load_predictor(path)

    counts = run_mutants(data, read, seed=1)
    print(f"predictor mutants: {counts}")
    assert counts["refused"] > N_MUTANTS // 4  # the mutations do reach the checks


def test_mutated_sequence_states():
    state = SeqState(
        seq_id=-1,
        blobs=[
            CacheBlob([make_stream(6, [8, 8], v_trans=True, dtype=np.float16)]),
            CacheBlob([make_stream(3, [8, 8, 8], v_trans=False, dtype=np.float32, seed=1)]),
        ],
    )
    data = write_seq_state(state)
    counts = run_mutants(data, lambda m: parse_seq_state(m, n_blobs=2), seed=2)
    print(f"state mutants: {counts}")
    assert counts["refused"] > N_MUTANTS // 4


def test_mutated_torch_checkpoints(tmp_path):
    """A checkpoint torch itself wrote (tests/data), mutated: corenet imports read untrusted .pt files."""
    from pathlib import Path

    from kvcli.models.torch_checkpoint import load_checkpoint, state_dict_of

    data = (Path(__file__).parent / "data" / "torch-2.13-sample.pt").read_bytes()
    path = tmp_path / "mutant.pt"

    def read(mutant: bytes):
        path.write_bytes(mutant)
        return state_dict_of(load_checkpoint(path), path)

    counts = run_mutants(data, read, seed=3)
    print(f"checkpoint mutants: {counts}")
    assert counts["refused"] > N_MUTANTS // 4
