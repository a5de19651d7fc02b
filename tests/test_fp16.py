"""kvcli.state.fp16: ggml's float32 -> float16 row cast gives numpy's bits, transposed or not."""

import numpy as np

from kvcli.state import fp16


def awkward_values(n_rows: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n_rows, width)) * np.geomspace(1e-8, 1e5, width)).astype(np.float32)
    specials = [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        65504.0,
        65520.0,
        1e6,
        -1e6,
        6e-8,
        2.9e-8,
        1e-10,
        np.float32(1.0009765625),
        np.float32(1.00048828125),
    ]  # ties round to even
    x[0, : len(specials)] = specials
    return x


def test_ggml_cast_is_found_and_matches_numpy_bit_for_bit():
    assert fp16._row_cast(), "libggml-cpu's ggml_cpu_fp32_to_fp16 should ship with llama-cpp-python"
    x = awkward_values(37, 300)
    for transpose in (False, True):
        with np.errstate(over="ignore"):  # 65520 and 1e6 overflow to inf on purpose
            want = (x.T if transpose else x).astype(np.float16)
        got = np.full(want.shape, 7, np.float16)
        fp16.cast_into(got, x, transpose)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_nan_stays_nan_and_other_dtypes_fall_back_to_numpy():
    x = np.array([[np.nan, 1.5, -2.0]], np.float32)
    got = np.zeros(x.shape, np.float16)
    fp16.cast_into(got, x)
    assert np.isnan(got[0, 0]) and got[0, 1] == 1.5 and got[0, 2] == -2.0
    as_f32 = np.zeros((3, 1), np.float32)
    fp16.cast_into(as_f32, x, transpose=True)  # a float32 destination: numpy's copy
    np.testing.assert_array_equal(as_f32[:, 0], x[0])
    strided = np.zeros((2, 6), np.float16)[:, ::2]  # not contiguous: numpy's cast
    fp16.cast_into(strided, np.ones((2, 3), np.float32))
    assert (strided == 1).all()
