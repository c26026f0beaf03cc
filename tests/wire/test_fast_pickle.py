"""The fast path for common pickles (issue 15), held to the general path.

:func:`~studioserve.wire.fast_pickle.fast_loads` must give, for every body, what
:func:`~studioserve.wire.safe_pickle.safe_loads` gives, or None: the same values (dtype, byte
order, shape, strides, flags), the same charge to the budget, the same error class and status
when it refuses one. The common bodies (what ``pickle.dumps`` writes for a dict of arrays and
numpy scalars, protocols 2 to 5, numpy 1.x and 2.x) must take it, read cold (the parser) and
warm (a remembered skeleton); bodies built to look almost right must get None or the general
path's error.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve import wire
from studioserve.errors import StudioServeError
from studioserve.wire import fast_pickle, formats
from studioserve.wire.budget import DecodeLimits
from studioserve.wire.fast_pickle import fast_loads
from studioserve.wire.safe_pickle import REQUEST_ARRAY_KINDS, RESPONSE_ARRAY_KINDS, safe_loads
from tests.wire import sentinel
from tests.wire.numpy1 import make_bodies

LIMITS = DecodeLimits()
NUMPY1 = Path(__file__).parent / "numpy1"
PROTOCOLS = (2, 3, 4, 5)
# every dtype a request may carry, in both byte orders
DTYPES = [np.dtype(c) for c in "?bBhHiIlLqQefdgFDG"]
DTYPES += [d.newbyteorder() for d in DTYPES if d.itemsize > 1]


@pytest.fixture(autouse=True)
def _no_skeletons() -> Iterator[None]:
    """Each test starts with no remembered skeleton."""
    fast_pickle._SKELETONS.clear()
    yield
    fast_pickle._SKELETONS.clear()


def outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except StudioServeError as e:
        return e


def general(body: bytes, limits: DecodeLimits = LIMITS, kinds: str = REQUEST_ARRAY_KINDS) -> Any:
    budget = limits.budget(len(body))
    value = outcome(lambda: safe_loads(body, array_kinds=kinds, budget=budget))
    return value, budget.used


def fast(body: bytes, limits: DecodeLimits = LIMITS, kinds: str = REQUEST_ARRAY_KINDS) -> Any:
    budget = limits.budget(len(body))
    sentinel.CALLS.clear()
    value = outcome(lambda: fast_loads(body, kinds, budget))
    assert not sentinel.CALLS
    return value, budget.used


def assert_same_value(got: Any, want: Any) -> None:
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same_value(got[key], want[key])
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype
        assert got.dtype.str == want.dtype.str
        assert got.shape == want.shape
        assert got.strides == want.strides
        for flag in ("writeable", "owndata", "c_contiguous", "f_contiguous", "aligned"):
            assert getattr(got.flags, flag) == getattr(want.flags, flag), flag
        np.testing.assert_array_equal(got, want)
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def assert_agrees(
    body: bytes,
    limits: DecodeLimits = LIMITS,
    kinds: str = REQUEST_ARRAY_KINDS,
    *,
    taken: bool | None = None,
) -> Any:
    """The fast path agrees with the general path on ``body``, cold and warm: the same value
    and charge, or the same error class and status, or None. ``taken``: whether it must (not)
    decode it."""
    want, want_used = general(body, limits, kinds)
    results = [fast(body, limits, kinds), fast(body, limits, kinds)]  # cold, then warm
    for got, got_used in results:
        if taken is True:
            assert got is not None, "the common body did not take the fast path"
        if taken is False:
            assert got is None
        if got is None:
            continue
        if isinstance(want, StudioServeError):
            assert type(got) is type(want), f"{got!r} where the general path raised {want!r}"
            assert got.http_status == want.http_status
        else:
            assert not isinstance(got, StudioServeError), f"{got!r}; the general path decoded"
            assert_same_value(got, want)
            assert got_used == want_used
    return results[0][0]


def arrays_of(dtype: np.dtype[Any]) -> list[np.ndarray]:
    base = np.arange(24).astype(dtype)
    readonly = base[:6].copy()
    readonly.flags.writeable = False
    return [
        base[:16],  # 1-d
        base.reshape(2, 3, 4),  # n-d
        np.asfortranarray(base.reshape(4, 6)),  # Fortran order
        base.reshape(2, 3, 4).transpose(1, 0, 2),  # neither C nor Fortran order
        base[::3],  # strided
        base[:1].reshape(()),  # 0-d
        base[:0].reshape(0, 3),  # empty
        readonly,
        base.reshape(1, 2, 1, 3, 1, 2, 2),  # more than three dimensions
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.str)
def test_every_dtype_layout_and_protocol(dtype: np.dtype[Any], protocol: int) -> None:
    for arr in arrays_of(dtype):
        body = pickle.dumps({"x": arr}, protocol=protocol)
        # protocol 2 spells b"" as builtins.bytes(): a body the fast path leaves to the other
        empty_protocol2 = protocol == 2 and arr.size == 0
        assert_agrees(body, taken=not empty_protocol2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_several_keys_scalars_and_memo_hits(protocol: int) -> None:
    values = {
        "x": np.ones((2, 3), np.float32),
        "y": np.arange(4, dtype=">f8"),  # a second dtype: its byte order memoized
        "z": np.ones((2, 3), np.float32),  # the memoized dtype, globals and type code
        "C": np.arange(3, dtype=np.int8),  # a key the order "C" (protocol 5) reuses
        "<": np.float32(2.5),  # scalars, and a key that is the byte order
        "numpy": np.float64(-1.0),  # a key that is a module name
        "t": np.True_,
        "f": np.False_,
        "i": np.int64(7),
        "c": np.complex128(1 - 2j),
        "é": np.zeros(2, np.uint16),  # non-ASCII keys: the charge follows their width
        "€uro": np.zeros(2, np.uint16),
        "😀": np.zeros(2, np.uint16),
        "k" * 300: np.zeros(1, np.bool_),  # a long key: BINUNICODE
        "surrogate\ud800": np.zeros(1),
    }
    assert_agrees(pickle.dumps(values, protocol=protocol), taken=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_writers_that_store_only_what_they_fetch(protocol: int) -> None:
    """``pickletools.optimize`` drops the memo stores no memo fetch needs (and frames anew):
    what a writer without a memo (studioserve's own response writer, say) writes."""
    values = {
        "x": np.ones((2, 3), np.float32),
        "y": np.ones((2, 3), np.float32),
        "s": np.float64(2.0),
        "t": np.True_,
        "u": np.True_,
        "big": np.ones(70_000, np.uint8),
    }
    for body in [pickle.dumps(values, protocol=protocol), pickle.dumps({}, protocol=protocol)]:
        optimized = pickletools.optimize(body)
        assert len(optimized) < len(body)
        assert_agrees(optimized, taken=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shapes_of_every_int_width(protocol: int) -> None:
    for shape in [(300,), (2, 300), (70_000,), (1, 1, 70_000)]:
        assert_agrees(pickle.dumps({"x": np.zeros(shape, np.int8)}, protocol=protocol), taken=True)
    # a zero dimension with a huge one: refused for its extent, by both paths alike
    for shape in [(0, 2**40), (0, 2**62), (3, 0, 2**31), (0, 2**63 - 1)]:
        empty = {"x": np.empty(shape, np.uint8)}
        got = assert_agrees(pickle.dumps(empty, protocol=protocol), taken=protocol > 2)
        if got is not None:
            assert isinstance(got, wire.UnsafePickle)
            assert "refused array shape" in str(got)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_large_bodies_frames_and_batches(protocol: int) -> None:
    # buffers past 64 KiB are written outside frames; many small ones make many frames; more
    # than 1000 keys make several SETITEMS batches
    big = {"a": np.ones(100_000, np.float32), "b": np.ones((3, 40_000)), "c": np.float32(1.5)}
    assert_agrees(pickle.dumps(big, protocol=protocol), taken=True)
    many = {f"k{i}": np.full(1000, i, np.float32) for i in range(40)}
    assert_agrees(pickle.dumps(many, protocol=protocol), taken=True)
    keys = {f"k{i}": np.full(3, i, np.int16) for i in range(2500)}
    assert_agrees(pickle.dumps(keys, protocol=protocol), taken=True)
    assert_agrees(pickle.dumps({}, protocol=protocol), taken=True)


@pytest.mark.parametrize("protocol", make_bodies.PROTOCOLS)
def test_what_numpy_1_writes(protocol: int) -> None:
    body = (NUMPY1 / f"protocol{protocol}.pickle").read_bytes()
    assert b"numpy.core" in body
    assert b"numpy._core" not in body
    got = assert_agrees(body, taken=True)
    want = make_bodies.values()
    assert list(got) == list(want)
    for key, value in want.items():  # (protocols 2-4 give native byte order)
        assert got[key].dtype.newbyteorder("=") == value.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got[key], value)


def test_the_common_bodies_never_reach_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return safe_loads(*args, **kwargs)

    monkeypatch.setattr(formats, "safe_loads", counting)
    for protocol in PROTOCOLS:
        for _ in range(2):  # cold, then warm
            for values in [
                {"x": np.zeros(16, np.float32)},
                {"x": np.zeros((4, 512), np.float32), "mask": np.ones(4, np.bool_)},
                {"x": np.zeros(3), "temperature": np.float32(0.5)},
            ]:
                data, fmt = wire.decode_request(pickle.dumps(values, protocol=protocol), None)
                assert fmt == "pickle"
                assert list(data) == list(values)
    assert calls == []
    # what it does not know goes to the general path, once
    for body in [pickle.dumps({"x": [1, 2]}), pickle.dumps({"x": np.ones(2)}, protocol=0)]:
        wire.decode_request(body, None)
    assert len(calls) == 2


def test_responses_too() -> None:
    """decode_response shares the integration point: numeric arrays take the fast path, the
    string arrays responses may carry take the general one."""
    body = pickle.dumps({"y": np.ones(3, np.float32)}, protocol=5)
    assert_agrees(body, DecodeLimits.for_response(len(body)), RESPONSE_ARRAY_KINDS, taken=True)
    labels = pickle.dumps({"y": np.array(["cat", "dog"])}, protocol=5)
    assert_agrees(labels, kinds=RESPONSE_ARRAY_KINDS, taken=False)
    out = wire.decode_response(labels, wire.PICKLE)
    assert out["y"].tolist() == ["cat", "dog"]


def test_a_skeleton_reads_each_body_s_own_data() -> None:
    first = pickle.dumps({"x": np.arange(16, dtype=np.float32), "s": np.float32(1)})
    second = pickle.dumps({"x": -np.arange(16, dtype=np.float32), "s": np.float32(2)})
    assert len(first) == len(second)
    a, _ = fast(first)
    assert len(fast_pickle._SKELETONS) == 1
    b, _ = fast(second)  # the skeleton of the first, the data of the second
    assert_same_value(b, general(second)[0])
    np.testing.assert_array_equal(a["x"], -b["x"])
    assert (a["s"], b["s"]) == (1, 2)
    # a body of the same length that differs outside its data is parsed again
    other = first.replace(b"\x8c\x01s", b"\x8c\x01t")
    assert list(assert_agrees(other, taken=True)) == ["x", "t"]


def test_a_skeleton_follows_each_budget() -> None:
    body = pickle.dumps({"x": np.zeros((0, 2**40), np.uint8)}, protocol=5)
    tight = DecodeLimits(max_body=1 << 10, constant=0, body_multiple=4, max_keys=1)
    assert isinstance(fast(pickle.dumps({"x": np.zeros(4)}))[0], dict)  # remembered
    for limits in (LIMITS, tight, LIMITS):
        assert_agrees(pickle.dumps({"x": np.zeros(4)}), limits)
        assert_agrees(pickle.dumps({"x": np.zeros(4), "y": np.zeros(4)}), limits)
        assert_agrees(body, limits)


def test_the_budget_refuses_what_the_general_path_refuses() -> None:
    body = pickle.dumps({f"k{i}": np.zeros(100, np.float32) for i in range(10)}, protocol=4)
    want, used = general(body)
    assert isinstance(want, dict)
    for limit in [used - 1, used // 2, 1000, 1, used, used + 1]:
        # a budget of ``limit`` bytes (at least the body's length)
        limits = DecodeLimits(max_body=1 << 20, constant=max(limit - len(body), 0), body_multiple=1)
        got = assert_agrees(body, limits)
        if limits.budget_for(len(body)) < used:
            assert got is None or isinstance(got, wire.PickleTooLarge)
    # the general path's pre-scan refuses it first: so does the fast path, itself
    small = DecodeLimits(max_body=1 << 20, constant=0, body_multiple=1)
    got = assert_agrees(body, small)
    assert isinstance(got, wire.PickleTooLarge)
    assert got.http_status == 413


def test_max_keys() -> None:
    body = pickle.dumps({f"k{i}": np.zeros(1) for i in range(10)}, protocol=5)
    for max_keys in (9, 10, 1):
        got = assert_agrees(body, DecodeLimits(max_keys=max_keys), taken=True)
        assert isinstance(got, wire.TooManyKeys) == (max_keys < 10)


def test_it_charges_what_it_builds_and_more() -> None:
    """It charges what the general path would; what it allocates is within that."""
    for protocol in PROTOCOLS:
        body = pickle.dumps({"x": np.ones((64, 64), np.float32)}, protocol=protocol)
        budget = LIMITS.budget(len(body))
        tracemalloc.start()
        try:
            assert fast_loads(body, REQUEST_ARRAY_KINDS, budget) is not None
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert budget.used == general(body)[1]
        assert peak <= budget.used


# --------------------------------------------------------------------------------------------
# bodies that look almost right


def _body(protocol: int = 4) -> bytes:
    return pickle.dumps({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, protocol=protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_truncation_and_trailing_bytes(protocol: int) -> None:
    body = _body(protocol)
    for end in range(len(body)):
        assert_agrees(body[:end])
    for extra in (b".", b"\x00", b"N.", b"\x95\x00\x00\x00\x00\x00\x00\x00\x00"):
        assert_agrees(body + extra, taken=False)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_byte_changed(protocol: int) -> None:
    body = _body(protocol)
    for at in range(len(body)):
        for value in {0, 1, 0x28, 0x4B, 0x68, 0x94, 0xFF, body[at] ^ 1, body[at] + 1 & 0xFF}:
            assert_agrees(body[:at] + bytes([value]) + body[at + 1 :])


def _replace(body: bytes, old: bytes, new: bytes) -> bytes:
    assert old in body
    return body.replace(old, new, 1)


def _short(text: bytes) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text


def test_other_globals() -> None:
    body = _body(4)
    for module, name in [
        (b"tests.wire.sentinel", b"trip"),
        (b"tests.wire.sentinel", b"Trip"),
        (b"numpy._core.multiarray", b"scalar"),
        (b"numpy._core.numeric", b"_frombuffer"),
        (b"numpy._core.multiarrax", b"_reconstruct"),
        (b"numpy", b"load"),
        (b"builtins", b"eval"),
        (b"numpy._core.multiarray", b"_reconstruct\x00"),
    ]:
        odd = _replace(
            body,
            _short(b"numpy._core.multiarray") + b"\x94" + _short(b"_reconstruct"),
            _short(module) + b"\x94" + _short(name),
        )
        # the frame's length no longer fits: fix it, so that only the global differs
        odd = odd[:3] + struct.pack("<Q", len(odd) - 11) + odd[11:]
        assert_agrees(odd, taken=False)
    for line in [b"tests.wire.sentinel\ntrip\n", b"numpy.core.multiarray\n_reconstructx\n"]:
        odd = _replace(_body(2), b"cnumpy._core.multiarray\n_reconstruct\n", b"c" + line)
        assert_agrees(odd, taken=False)


def test_dtypes_not_allowed() -> None:
    for typestr, order in [
        (b"O8", b"|"),
        (b"U3", b"<"),
        (b"V8", b"|"),
        (b"M8", b"<"),
        (b"S2", b"|"),
    ]:
        for protocol in (4, 5):
            body = _replace(_body(protocol), _short(b"f4") + b"\x94", _short(typestr) + b"\x94")
            body = _replace(body, _short(b"<") + b"\x94", _short(order) + b"\x94")
            body = body[:3] + struct.pack("<Q", len(body) - 11) + body[11:]
            assert_agrees(body, taken=False)
            assert_agrees(body, kinds=RESPONSE_ARRAY_KINDS, taken=False)
    # a forged state: the size, alignment or flags numpy's own dtype would not have
    for forged in [
        b"J\x04\x00\x00\x00J\xff\xff\xff\xffK\x00",
        b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x01",
    ]:
        body = _replace(_body(4), b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00", forged)
        assert_agrees(body, taken=False)


def test_shape_and_data_that_disagree() -> None:
    for protocol in PROTOCOLS:
        body = _body(protocol)
        for old, new in [
            (b"K\x02K\x03\x86", b"K\x02K\x04\x86"),
            (b"K\x02K\x03\x86", b"K\x01K\x03\x86"),
        ]:
            if old in body:
                assert_agrees(_replace(body, old, new), taken=False)


def test_duplicated_and_non_str_keys() -> None:
    for protocol in PROTOCOLS:
        body = pickle.dumps({"a": np.zeros(2), "b": np.ones(2)}, protocol=protocol)
        twice = body.replace(b"\x01\x00\x00\x00b", b"\x01\x00\x00\x00a").replace(
            b"\x8c\x01b", b"\x8c\x01a"
        )
        assert_agrees(twice, taken=False)  # the general path keeps the last: so it decides
        assert_agrees(pickle.dumps({1: np.zeros(2)}, protocol=protocol), taken=False)
        assert_agrees(pickle.dumps({b"x": np.zeros(2)}, protocol=protocol), taken=False)
        assert_agrees(pickle.dumps({("x",): np.zeros(2)}, protocol=protocol), taken=False)
        assert_agrees(pickle.dumps([np.zeros(2)], protocol=protocol), taken=False)


def test_memo_tricks() -> None:
    shared = np.zeros(3, np.float32)
    for protocol in PROTOCOLS:
        # one array under two keys: the second is a memo reference to an array
        assert_agrees(pickle.dumps({"a": shared, "b": shared}, protocol=protocol), taken=False)
    body = pickle.dumps({"a": np.zeros(3, np.float32), "b": np.ones(3, np.float32)}, protocol=4)
    gets = [i for i in range(len(body) - 1) if body[i] == 0x68]
    assert gets
    for at in gets:  # every memo reference pointed elsewhere
        for index in range(40):
            assert_agrees(body[: at + 1] + bytes([index]) + body[at + 2 :])
    # BINPUT out of order, LONG_BINPUT, LONG_BINGET
    body = _body(3)
    assert_agrees(_replace(body, b"q\x01", b"q\x02"), taken=False)
    assert_agrees(_replace(body, b"q\x01", b"r\x01\x00\x00\x00"))
    assert_agrees(_replace(body, b"q\x01", b"r\x00\x00\x00\x01"), taken=False)
    assert_agrees(_replace(pickle.dumps({"a": np.zeros(2), "b": np.ones(2)}, 3), b"h", b"j"))


def test_frames_that_lie() -> None:
    for protocol in (4, 5):
        body = pickle.dumps({"a": np.ones(100_000, np.uint8), "b": np.ones(4)}, protocol=protocol)
        frames = [i for i in range(len(body) - 9) if body[i] == 0x95]
        for at in frames:
            (size,) = struct.unpack_from("<Q", body, at + 1)
            for lie in {0, 1, size - 1, size + 1, size + 9, 2**63}:
                assert_agrees(body[: at + 1] + struct.pack("<Q", lie) + body[at + 9 :])
        # no frames at all: protocol 4 without framing reads the same
        unframed = pickle.dumps({"a": np.ones(4)}, protocol=protocol)
        unframed = unframed[:2] + unframed[11:]
        assert_agrees(unframed, taken=True)


def test_bodies_that_are_not_common() -> None:
    for body in [
        b"",
        b".",
        b"\x80",
        b"\x80\x04",
        b"\x80\x04.",
        b"\x80\x06}\x94.",
        pickle.dumps({"x": np.ones(2)}, protocol=0),
        pickle.dumps({"x": np.ones(2)}, protocol=1),
        pickle.dumps({"x": 1.5, "y": [1, 2], "z": "text"}),
        pickle.dumps({"x": {"nested": np.ones(2)}}),
        pickle.dumps({"x": np.array([object()], dtype=object)}),
        pickle.dumps({"x": np.zeros(2, dtype=[("a", "f4")])}),
        pickle.dumps({"x": np.datetime64("2020-01-01")}),
        pickle.dumps({"x": np.ones(2)}, protocol=5, buffer_callback=lambda b: False),
    ]:
        assert_agrees(body, taken=False)
