"""The sequence-state codec: synthetic layouts here; real llama.cpp states in test_llama_state.py."""

import struct

import numpy as np
import pytest

from kvcli.errors import StateFormatError
from kvcli.state.codec import (
    STATE_MAGIC,
    CacheBlob,
    LayerKV,
    SeqState,
    StreamState,
    parse_seq_state,
    write_seq_state,
)


def make_stream(n_cells, widths, *, v_trans, dtype, seq_ids=None, seed=0):
    rng = np.random.default_rng(seed)
    type_id = 1 if dtype == np.float16 else 0
    layers = [
        LayerKV(
            type_id,
            rng.normal(size=(n_cells, w)).astype(dtype),
            type_id,
            rng.normal(size=(n_cells, w)).astype(dtype),
        )
        for w in widths
    ]
    seq_ids = seq_ids or [np.array([0], np.int32)] * n_cells
    return StreamState(np.arange(n_cells, dtype=np.int32) + 3, seq_ids, v_trans, layers)


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip_two_blobs_different_cells(v_trans, dtype):
    state = SeqState(
        seq_id=-1,
        blobs=[
            CacheBlob([make_stream(7, [8, 8], v_trans=v_trans, dtype=dtype)]),
            CacheBlob([make_stream(4, [8, 8, 8], v_trans=v_trans, dtype=dtype, seed=1)]),
        ],
    )
    data = write_seq_state(state)
    parsed = parse_seq_state(data, n_blobs=2)
    assert write_seq_state(parsed) == data
    got = parsed.blobs[1].streams[0]
    assert got.n_cells == 4 and got.v_trans == v_trans
    np.testing.assert_array_equal(got.layers[2].v, state.blobs[1].streams[0].layers[2].v)


def test_transposed_values_are_stored_column_by_column():
    s = make_stream(3, [2], v_trans=True, dtype=np.float32)
    data = write_seq_state(SeqState(0, [CacheBlob([s])]))
    v = s.layers[0].v
    assert data.endswith(np.ascontiguousarray(v.T).tobytes())
    assert data[-len(v.tobytes()) - 12 : -len(v.tobytes())] == struct.pack("<iII", 0, 4, 2)


def test_cells_in_several_sequences_and_empty_streams_and_layerless_blobs():
    multi = [np.array([0, 2], np.int32), np.array([1], np.int32)]
    s = make_stream(2, [4], v_trans=False, dtype=np.float16, seq_ids=multi)
    layerless = StreamState(np.arange(2, dtype=np.int32), [np.array([0], np.int32)] * 2, True, [])
    state = SeqState(-1, [CacheBlob([s, None]), CacheBlob([layerless])])
    data = write_seq_state(state)
    parsed = parse_seq_state(data)
    assert write_seq_state(parsed) == data
    assert parsed.blobs[0].streams[1] is None
    assert [list(x) for x in parsed.blobs[0].streams[0].seq_ids] == [[0, 2], [1]]
    assert parsed.blobs[1].streams[0].layers == []


def _header_and_one_layer(k_type, row_size):
    return (
        struct.pack("<IiII", STATE_MAGIC, 0, 1, 1)
        + struct.pack("<iIi", 0, 1, 0)
        + struct.pack("<II", 0, 1)
        + struct.pack("<iQ", k_type, row_size)
        + b"\0" * row_size
    )


def test_quantized_kv_type_is_refused_by_name():
    with pytest.raises(StateFormatError, match="q8_0"):
        parse_seq_state(_header_and_one_layer(8, 34))


def test_unknown_layouts_are_refused():
    good = write_seq_state(SeqState(0, [CacheBlob([make_stream(2, [4], v_trans=False, dtype=np.float16)])]))
    with pytest.raises(StateFormatError, match="magic"):
        parse_seq_state(b"\0" * 8 + good[8:])
    with pytest.raises(StateFormatError, match="ends early"):
        parse_seq_state(good[:-3])
    with pytest.raises(StateFormatError, match="unexpected bytes"):
        parse_seq_state(good + b"\0" * 5, n_blobs=1)
    bad_vtrans = bytearray(good)
    offset = 4 + 4 + 4 + 4 + 2 * 12
    bad_vtrans[offset : offset + 4] = struct.pack("<I", 7)
    with pytest.raises(StateFormatError, match="v_trans=7"):
        parse_seq_state(bytes(bad_vtrans))
    with pytest.raises(StateFormatError, match="expected 2 KV cache blobs"):
        parse_seq_state(good, n_blobs=2)
