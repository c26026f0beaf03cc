"""wire.fast_encode: the common response pickled without a Pickler, read back as pickle.dumps's."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from studioserve import wire
from studioserve.wire.fast_encode import dumps_arrays

DTYPES = ["?", "i1", "u1", "<i2", ">i2", "<u4", "<i8", ">i8"]
DTYPES += ["<f2", "<f4", ">f4", "<f8", "<c8", ">c16"]


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        g = got[k]
        assert type(g) is np.ndarray
        assert g.dtype == v.dtype
        assert g.shape == v.shape
        np.testing.assert_array_equal(g, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (16,), (2, 3), (2, 0, 4), (70000,)])
def test_read_back_as_pickle_dumps_would_be(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = np.asarray((rng.standard_normal(shape) * 100).astype(dtype))
    data = {"x": x, "second key": x.copy()}
    body = dumps_arrays(data)
    assert body is not None
    ref = pickle.loads(pickle.dumps(data, protocol=5))
    got = pickle.loads(body)
    _same(got, ref)
    assert all(v.flags.writeable and v.flags.c_contiguous for v in got.values())
    # and the restricted decoders read it (the client's decode_response, the server's)
    _same(wire.decode_response(body, wire.PICKLE), data)
    _same(wire.decode_request(body, wire.PICKLE)[0], data)


def test_keys_of_any_length_and_script() -> None:
    data = {"": np.ones(1), "é→": np.zeros(2), "k" * 300: np.arange(3)}
    body = dumps_arrays(data)
    assert body is not None
    _same(pickle.loads(body), data)


@pytest.mark.parametrize(
    "data",
    [
        {"x": np.ones((3, 2)).T},  # not C-contiguous
        {"x": np.ones(4)[::2]},
        {"x": np.array(["a", "b"])},  # strings: pickle.dumps writes them
        {"x": np.array([b"a"])},
        {"x": np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])},  # structured
        {"x": np.array([1, None], dtype=object)},
        {"x": np.ma.masked_array([1, 2])},  # a subclass
        {"x": [1, 2]},
        {"x": 3.0},
        {"x": np.float32(1)},
        {"x": {"nested": np.ones(2)}},
        {1: np.ones(2)},
    ],
    ids=lambda d: type(next(iter(d.values()))).__name__,
)
def test_anything_else_is_left_to_pickle(data: dict[Any, Any]) -> None:
    assert dumps_arrays(data) is None


def test_empty_dict() -> None:
    body = dumps_arrays({})
    assert body is not None
    assert pickle.loads(body) == {}


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8),
        hnp.arrays(
            st.sampled_from(DTYPES).map(np.dtype),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
        ),
        max_size=4,
    )
)
def test_fuzz_same_as_pickle(data: dict[str, np.ndarray]) -> None:
    body = dumps_arrays(data)
    assert body is not None
    got = pickle.loads(body)
    assert list(got) == list(data)
    for k, v in data.items():
        assert got[k].dtype == v.dtype
        assert got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
