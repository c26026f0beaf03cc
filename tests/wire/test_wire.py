"""The wire format: round trips in every format and protocol, and hostile bodies refused."""

from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import pickletools
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve import wire
from studioserve.errors import UnsafePickle, UnsupportedMediaType, WireError

# The functions numpy pickles arrays with (numpy.core in 1.x, numpy._core in 2.x).
_NP_CORE: Any = getattr(np, "_core", None) or np.core
_RECONSTRUCT = _NP_CORE.multiarray._reconstruct
_SCALAR = _NP_CORE.multiarray.scalar
_FROMBUFFER = _NP_CORE.numeric._frombuffer

PROTOCOLS = list(range(pickle.HIGHEST_PROTOCOL + 1))
DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
]


def _shapes(dtype: Any) -> list[np.ndarray]:
    base = np.arange(60).reshape(3, 4, 5) % 7
    arr3 = (base > 2) if dtype is np.bool_ else base.astype(dtype)
    return [
        np.array(3, dtype=dtype),  # 0-d
        np.zeros((0,), dtype=dtype),  # empty
        np.zeros((2, 0, 3), dtype=dtype),  # empty with shape
        arr3[0, 0].copy(),  # 1-d
        arr3,  # 3-d
        np.asfortranarray(arr3[1]),  # Fortran order
        arr3[:, ::2, 1:],  # non-contiguous slice
        arr3.transpose(2, 0, 1),  # permuted axes (protocol 5: order "K")
        arr3.astype(np.dtype(dtype).newbyteorder(">")),  # big-endian
    ]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_arrays_round_trip_every_protocol(protocol: int, dtype: Any) -> None:
    arrays = _shapes(dtype)
    data = {f"a{i}": a for i, a in enumerate(arrays)}
    payload = pickle.dumps(data, protocol=protocol)
    out = wire.safe_loads(payload)
    trusted = pickle.loads(payload)  # what numpy itself rebuilds from our own pickle
    assert list(out) == list(data)
    for key, arr in data.items():
        assert type(out[key]) is np.ndarray
        assert _same(out[key], trusted[key]), (key, out[key], arr)
        assert np.array_equal(out[key], arr)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_scalars_and_dtypes_round_trip(protocol: int) -> None:
    data = {np.dtype(d).name: np.dtype(d).type(1) for d in DTYPES}
    data["dt"] = np.dtype("float32")
    data["dt_be"] = np.dtype(">i4")
    out = wire.safe_loads(pickle.dumps(data, protocol=protocol))
    for key, value in data.items():
        assert type(out[key]) is type(value), key
        assert out[key] == value


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_values_and_nesting_round_trip(protocol: int) -> None:
    data = {
        "int": 3,
        "big": 2**80,
        "float": 1.5,
        "nan": float("inf"),
        "bool": True,
        "none": None,
        "str": "héllo",
        "bytes": b"\x00\xffab",
        "empty_bytes": b"",
        "bytearray": bytearray(b"xy"),
        "complex": 1 - 2j,
        "list": [1, [2, [3.0, "four"]]],
        "tuple": (1, (2, 3)),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a", "b"}),
        "nested": {"a": {"b": [np.arange(3), {"c": np.ones((2, 2), np.float32)}]}},
        "shared": [[1, 2]] * 3,
    }
    out = wire.safe_loads(pickle.dumps(data, protocol=protocol))
    assert out["nested"]["a"]["b"][1]["c"].dtype == np.float32
    assert np.array_equal(out["nested"]["a"]["b"][0], np.arange(3))
    del out["nested"], data["nested"]
    assert out == data
    assert type(out["bytearray"]) is bytearray


def test_shared_array_is_visited_once_and_stays_shared() -> None:
    arr = np.arange(4.0)
    out = wire.safe_loads(pickle.dumps({"a": arr, "b": arr, "c": [arr, (arr,)]}))
    assert out["a"] is out["b"] is out["c"][0] is out["c"][1][0]


def test_arrays_from_protocol_5_bytearray_are_writable() -> None:
    out = wire.safe_loads(pickle.dumps({"x": np.arange(4.0)}, protocol=5))
    out["x"] += 1
    assert out["x"].tolist() == [1.0, 2.0, 3.0, 4.0]


def _frame_fix(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace a short unicode string in a framed pickle, fixing the string and frame lengths."""
    assert data[2] == 0x95, "expected one frame"
    body = data[11:].replace(bytes([0x8C, len(old)]) + old, bytes([0x8C, len(new)]) + new)
    return data[:2] + b"\x95" + struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_1x_global_names_are_accepted(protocol: int) -> None:
    data = {"x": np.arange(6.0).reshape(2, 3), "s": np.float32(2.5), "v": np.ones(4)[::2]}
    raw = pickle.dumps(data, protocol=protocol)
    if protocol < 4:
        old = raw.replace(b"numpy._core", b"numpy.core")
    else:
        old = raw
        for name in (b"numpy._core.multiarray", b"numpy._core.numeric"):
            old = _frame_fix(old, name, name.replace(b"._core", b".core"))
    assert b"numpy._core" not in old
    assert b"numpy.core" in old
    out = wire.safe_loads(old)
    assert _same(out["x"], data["x"])
    assert _same(out["v"], data["v"])
    assert out["s"] == np.float32(2.5)
    assert type(out["s"]) is np.float32


# --------------------------------------------------------------------------------------------
# hostile pickles


class _Reduce:
    """An object that pickles as ``func(*args)``, optionally followed by BUILD ``state``."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> Any:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_os_system_pickle_is_refused_and_never_runs(protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"x": _Reduce(os.system, (f"touch {marker}",))}, protocol=protocol)
    with pytest.raises(UnsafePickle) as info:
        wire.safe_loads(payload)
    assert f"refused to unpickle {os.system.__module__}.system" in str(info.value)
    assert "only numpy arrays, dtypes, scalars and plain containers are allowed" in str(info.value)
    assert info.value.http_status == 400
    assert not marker.exists()
    # the same through the request decoder, with every pickle content type
    for content_type in (None, "", wire.PICKLE, wire.OCTET_STREAM):
        with pytest.raises(UnsafePickle):
            wire.decode_request(payload, content_type)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("func", "args", "refused"),
    [
        (builtins.eval, ("__import__('os').getcwd()",), "builtins.eval"),
        (builtins.exec, ("import os",), "builtins.exec"),
        (builtins.getattr, (os, "system"), "builtins.getattr"),
        (builtins.__import__, ("os",), "builtins.__import__"),
        (builtins.open, ("/etc/passwd",), "io.open"),
        (collections.OrderedDict, ([("a", 1)],), "collections.OrderedDict"),
        (np.load, ("/tmp/x.npy",), "numpy.load"),
        (np.frombuffer, (b"\0" * 8,), "numpy.frombuffer"),
        (np.ndarray, ((10**12,), "u1"), "call numpy.ndarray directly"),
        (io.BytesIO, (b"",), "_io.BytesIO"),
    ],
)
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_dangerous_globals_are_refused(
    func: Any, args: tuple[Any, ...], refused: str, protocol: int
) -> None:
    if func is builtins.getattr:
        # getattr(os, "system") needs the module itself: write the opcodes by hand
        payload = b"cbuiltins\ngetattr\n(cos\nsystem\nS'system'\ntR."
    else:
        payload = pickle.dumps({"x": _Reduce(func, args)}, protocol=protocol)
    if protocol < 3:  # protocols 0-2 spell builtins as __builtin__
        refused = refused.replace("builtins.", "(__builtin__|builtins).")
    if not refused.startswith("call"):
        refused = "unpickle " + refused
    with pytest.raises(UnsafePickle, match="refused to " + refused):
        wire.safe_loads(payload)


def test_import_trick_with_inst_opcode_is_refused() -> None:
    # INST builds cls(*args) from a module/name pair, like GLOBAL + REDUCE
    with pytest.raises(UnsafePickle, match=r"refused to unpickle os\.system"):
        wire.safe_loads(b"(S'echo hi'\nios\nsystem\n.")


class _MyDict(dict):  # type: ignore[type-arg]
    pass


class _MyStr(str):
    pass


class _MyArray(np.ndarray):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    "value",
    [
        _MyDict(a=1),
        _MyStr("x"),
        np.arange(3).view(_MyArray),
        np.ma.masked_array([1, 2], mask=[0, 1]),
        np.rec.fromrecords([(1, 2.0)], names="a,b"),
        collections.OrderedDict(a=1),
    ],
    ids=lambda v: type(v).__name__,
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_subclasses_of_allowed_types_are_refused(value: Any, protocol: int) -> None:
    with pytest.raises(UnsafePickle, match="refused"):
        wire.safe_loads(pickle.dumps({"x": value}, protocol=protocol))


def test_reconstruct_with_a_subclass_is_refused() -> None:
    payload = pickle.dumps(_Reduce(_RECONSTRUCT, (_MyArray, (0,), b"b")), protocol=2)
    with pytest.raises(UnsafePickle, match=r"refused to unpickle .*_MyArray"):
        wire.safe_loads(payload)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "value",
    [
        np.array([1, "a"], dtype=object),
        np.array([None, None]),
        np.array([(1, "a")], dtype=[("n", "i4"), ("o", "O")]),
        np.zeros(3, dtype=[("a", "f4"), ("b", "i2")]),
        np.array(["text"]),
        np.array([b"raw"]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.array(1.0, dtype=object),
    ],
    ids=[
        "object",
        "none",
        "struct_obj",
        "struct",
        "unicode",
        "bytes",
        "datetime",
        "object_0d",
    ],
)
def test_object_structured_and_non_numeric_arrays_are_refused(protocol: int, value: Any) -> None:
    with pytest.raises(UnsafePickle, match="refused"):
        wire.safe_loads(pickle.dumps({"x": value}, protocol=protocol))


def _forged_dtype() -> _Reduce:
    # a float64 dtype whose BUILD state sets the "holds objects" flags
    return _Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 0x1F))


@pytest.mark.parametrize(
    "value",
    [
        _forged_dtype(),
        _Reduce(
            _RECONSTRUCT,
            (np.ndarray, (0,), b"b"),
            (1, (1,), _forged_dtype(), False, b"A" * 8),
        ),
        _Reduce(_FROMBUFFER, (bytearray(8), _forged_dtype(), (1,), "C")),
        _Reduce(_SCALAR, (_forged_dtype(), b"A" * 8)),
    ],
    ids=["dtype", "reconstruct", "frombuffer", "scalar"],
)
def test_forged_dtype_flags_are_refused(value: Any) -> None:
    for protocol in (2, 5):
        with pytest.raises(UnsafePickle, match="forged"):
            wire.safe_loads(pickle.dumps({"x": value}, protocol=protocol))


@pytest.mark.parametrize(
    "value",
    [
        # object arrays through allowed globals, without the numpy.dtype global
        _Reduce(_RECONSTRUCT, (np.ndarray, (2,), b"O")),
        _Reduce(
            _RECONSTRUCT,
            (np.ndarray, (0,), b"b"),
            (1, (2,), np.dtype("f8"), False, [1, 2]),
        ),
        _Reduce(_SCALAR, (np.dtype("O"), [1])),
        # memory bombs through allowed globals
        _Reduce(_RECONSTRUCT, (np.ndarray, (10**12,), b"b")),
        _Reduce(bytearray, (10**12,)),
        _Reduce(bytes, (10**12,)),
        # arbitrary calls on allowed globals
        _Reduce(np.dtype, ("f8,O",)),
        _Reduce(np.dtype, ([("a", "O")],)),
        _Reduce(_FROMBUFFER, (b"\0" * 8, np.dtype("f8"), (1,), "Z")),
    ],
    ids=[
        "reconstruct_O",
        "setstate_list",
        "scalar_O",
        "huge_shape",
        "bytearray_n",
        "bytes_n",
        "dtype_struct_obj",
        "dtype_list",
        "bad_order",
    ],
)
def test_allowed_globals_refuse_dangerous_arguments(value: Any) -> None:
    with pytest.raises(UnsafePickle):
        wire.safe_loads(pickle.dumps({"x": value}, protocol=2))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # numpy's own dtype.__setstate__ crashes the interpreter on this state
        (
            _Reduce(np.dtype, ("f8", False, True), (3, "<", (None, None), -1, -1, 0)),
            "not a plain dtype's state",
        ),
        (
            _Reduce(np.dtype, ("f8", False, True), (3, "<", None, ("a",), None, -1, -1, 0)),
            "structured",
        ),
        (_Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, 64, -1, 0)), "size"),
        (_Reduce(np.dtype, ("f8", False, True), (3, "?", None, None, None, -1, -1, 0)), "order"),
        # BUILD on an array that did not come from _reconstruct goes to numpy unchecked
        (
            _Reduce(
                _FROMBUFFER,
                (bytearray(8), np.dtype("f8"), (1,), "C"),
                (1, (1,), np.dtype("f8"), False, b"\0" * 8),
            ),
            "only a fresh _reconstruct array takes a state",
        ),
        (
            _Reduce(
                _RECONSTRUCT,
                (np.ndarray, (0,), b"b"),
                (1, (1,), np.dtype("f8"), False, b"\0" * 8, "extra"),
            ),
            "expected a 4- or 5-tuple",
        ),
        (
            _Reduce(
                _RECONSTRUCT,
                (np.ndarray, (0,), b"b"),
                (7, (1,), np.dtype("f8"), False, b"\0" * 8),
            ),
            "unknown version",
        ),
    ],
    ids=[
        "dtype_crash",
        "dtype_fields",
        "dtype_size",
        "dtype_order",
        "frombuffer_build",
        "len6",
        "v7",
    ],
)
def test_malformed_states_never_reach_numpy(value: Any, message: str) -> None:
    for protocol in (2, 5):
        with pytest.raises(UnsafePickle, match=message):
            wire.safe_loads(pickle.dumps({"x": value}, protocol=protocol))


def _build_twice(payload: bytes) -> bytes:
    """A protocol 2 pickle ``... state BINPUT n BUILD STOP`` with the BUILD repeated."""
    ops = list(pickletools.genops(payload))
    assert [op.name for op, _, _ in ops[-3:]] == ["BINPUT", "BUILD", "STOP"]
    state_index = ops[-3][1]
    assert isinstance(state_index, int)
    return payload[:-1] + b"h" + bytes([state_index]) + b"b."


@pytest.mark.parametrize("value", [np.arange(3.0)[::2], np.dtype("f4")], ids=["array", "dtype"])
def test_second_build_on_an_array_or_dtype_is_refused(value: Any) -> None:
    payload = pickle.dumps(value, protocol=2)
    assert str(wire.safe_loads(payload)) == str(value)  # one BUILD is fine
    with pytest.raises(UnsafePickle, match="only a fresh _reconstruct array|twice"):
        wire.safe_loads(_build_twice(payload))


def test_memo_index_bomb_is_refused() -> None:
    # 10 bytes asking the C unpickler for gigabytes of memo table
    for payload in (
        b"\x80\x04N" + b"r" + struct.pack("<I", 2**30) + b".",
        b"Np1073741824\n.",
        b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00Nr\xff\xff\xff\x0f.",
    ):
        with pytest.raises(UnsafePickle, match="memo index"):
            wire.safe_loads(payload)


def test_repeated_copies_of_one_value_are_bounded() -> None:
    # _codecs.encode of one memoized 1 MB string, 10,000 times: 10 GB from a 1 MB body
    big = "x" * (1 << 20)
    head = b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(big)) + big.encode()
    head += b"q\x01X\x06\x00\x00\x00latin1q\x02("
    call = b"h\x00h\x01h\x02\x86R"
    payload = head + call * 10_000 + b"l."
    with pytest.raises(UnsafePickle, match="far more data than its body holds"):
        wire.safe_loads(payload)


def test_out_of_band_buffers_are_refused() -> None:
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps({"x": np.arange(4.0)}, protocol=5, buffer_callback=buffers.append)
    assert buffers
    with pytest.raises(UnsafePickle, match="buffer_callback"):
        wire.safe_loads(payload)


def test_persistent_ids_and_extension_codes_are_refused() -> None:
    with pytest.raises(UnsafePickle, match="persistent"):
        wire.safe_loads(b"Pfoo\n.")
    with pytest.raises(UnsafePickle, match="extension"):
        wire.safe_loads(b"\x80\x02\x82\x01.")


def test_newobj_on_an_allowed_global_is_refused() -> None:
    # NEWOBJ needs a class; the unpickler only hands out checked callables
    payload = b"\x80\x02cbuiltins\nset\n)\x81."
    with pytest.raises(WireError):
        wire.safe_loads(payload)


def test_build_on_an_allowed_global_is_refused() -> None:
    # BUILD on the numpy.dtype global would otherwise set attributes on it
    payload = b"\x80\x02cnumpy\ndtype\n}S'x'\nK\x01sb."
    with pytest.raises(UnsafePickle, match="refused to modify numpy.dtype"):
        wire.safe_loads(payload)


def test_deep_nesting_and_cycles_are_refused() -> None:
    deep: list[Any] = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(WireError, match="nested deeper than 64 levels"):
        wire.safe_loads(pickle.dumps({"x": deep}))
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    with pytest.raises(WireError, match="contains itself"):
        wire.safe_loads(pickle.dumps({"x": cyclic}))
    # a wide DAG of shared lists (2**40 paths) is visited once per node
    shared: list[Any] = [1]
    for _ in range(40):
        shared = [shared, shared]
    assert wire.safe_loads(pickle.dumps({"x": shared}))["x"][0] is not None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_truncation_is_a_clean_wire_error(protocol: int) -> None:
    payload = pickle.dumps({"x": np.arange(5.0), "s": np.int8(3), "t": ("a", b"b")}, protocol)
    for cut in range(len(payload) - 1):
        with pytest.raises(WireError, match="not a valid pickle"):
            wire.safe_loads(payload[:cut])


def test_garbage_and_bit_flips_only_raise_wire_errors() -> None:
    rng = random.Random(1234)
    for n in range(300):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        if n % 2:
            garbage = b"\x80\x05" + garbage
        with pytest.raises(WireError):
            wire.safe_loads(garbage)
    payload = bytearray(pickle.dumps({"x": np.arange(6.0).reshape(2, 3), "y": [1, "a"]}, 5))
    for _ in range(1000):
        flipped = bytearray(payload)
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        try:
            wire.safe_loads(bytes(flipped))
        except WireError:
            pass


_FUZZ_GLOBALS = [
    b"numpy\ndtype\n",
    b"numpy\nndarray\n",
    b"numpy._core.multiarray\n_reconstruct\n",
    b"numpy.core.multiarray\nscalar\n",
    b"numpy._core.numeric\n_frombuffer\n",
    b"_codecs\nencode\n",
    b"builtins\nset\n",
    b"builtins\ncomplex\n",
    b"builtins\nbytearray\n",
]
_FUZZ_STRINGS = ["f8", "<f4", ">i2", "b", "O", "U3", "V8", "?", "C", "F", "K", "latin1", "<", "|"]


def _random_call_pickle(rng: random.Random) -> bytes:
    """A protocol 2 pickle of nested calls of allowed globals on random arguments, with BUILDs
    of random states: the inputs numpy's own unpickling code would crash on."""

    def const() -> bytes:
        kind = rng.randrange(6)
        if kind == 0:
            return b"J" + struct.pack("<i", rng.choice([0, 1, 2, 3, 8, -1, 10**6]))
        if kind == 1:
            text = rng.choice(_FUZZ_STRINGS).encode()
            return b"X" + struct.pack("<I", len(text)) + text
        if kind == 2:
            n = rng.choice([0, 1, 8, 16])
            return b"C" + bytes([n]) + bytes(rng.randrange(256) for _ in range(n))
        return [b"N", b"\x88", b"\x89", b"G" + struct.pack(">d", 0.5)][kind - 3]

    def state(depth: int) -> bytes:
        # numpy's dtype or array state with some items replaced
        items = rng.choice(
            [
                [b"K\x03", b"X\x01\x00\x00\x00<", b"N", b"N", b"N", b"J\xff\xff\xff\xff"]
                + [b"J\xff\xff\xff\xff", b"K\x00"],
                [b"K\x01", b"K\x02\x85", expr(depth + 1), b"\x89", b"C\x10" + bytes(16)],
            ]
        )
        for _ in range(rng.randrange(3)):
            items[rng.randrange(len(items))] = expr(depth + 1)
        return b"(" + b"".join(items) + b"t"

    def expr(depth: int) -> bytes:
        kind = rng.randrange(11)
        if depth > 3 or kind < 3:
            return const()
        if kind < 5:
            return b"(" + b"".join(expr(depth + 1) for _ in range(rng.randrange(9))) + b"t"
        if kind < 9:
            args = b"".join(expr(depth + 1) for _ in range(rng.randrange(6)))
            return b"c" + rng.choice(_FUZZ_GLOBALS) + b"(" + args + b"tR"
        if kind < 10:
            return expr(depth + 1) + expr(depth + 1) + b"b"
        text = rng.choice(_FUZZ_STRINGS).encode()
        target = rng.choice(
            [
                b"cnumpy\ndtype\n(X" + struct.pack("<I", len(text)) + text + b"tR",
                b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\nK\x00\x85C\x01btR",
                expr(depth + 1),
            ]
        )
        return target + state(depth) + b"b"

    return b"\x80\x02}(X\x01\x00\x00\x00k" + expr(0) + b"u."


def test_random_calls_of_allowed_globals_only_raise_wire_errors() -> None:
    rng = random.Random(99)
    loaded = 0
    for _ in range(3000):
        payload = _random_call_pickle(rng)
        for kinds in (wire.REQUEST_ARRAY_KINDS, wire.RESPONSE_ARRAY_KINDS):
            try:
                wire.safe_loads(payload, array_kinds=kinds)
                loaded += 1
            except WireError:
                pass
    assert loaded > 0  # the generator does reach valid pickles


def test_garbage_message() -> None:
    with pytest.raises(WireError, match="body is not a valid pickle"):
        wire.safe_loads(b"hello world")
    with pytest.raises(WireError, match="body is not a valid pickle: it is empty"):
        wire.safe_loads(b"")


# --------------------------------------------------------------------------------------------
# decode_request


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        (None, "pickle"),
        ("", "pickle"),
        ("application/x-pickle", "pickle"),
        ("application/octet-stream", "pickle"),
        ("Application/X-Pickle; protocol=5", "pickle"),
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("application/x-npz", "npz"),
    ],
)
def test_content_types(content_type: str | None, fmt: str) -> None:
    data = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    body, _ = wire.encode_request(data, fmt)
    out, got_fmt = wire.decode_request(body, content_type)
    assert got_fmt == fmt
    assert np.array_equal(out["x"], data["x"])


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "multipart/form-data; boundary=x", "application/xml", "image/png"],
)
def test_unsupported_content_type_is_415(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        wire.decode_request(b"{}", content_type)
    assert info.value.http_status == 415
    assert info.value.error_type == "unsupported_media_type"
    assert repr(content_type) in str(info.value)
    assert "application/x-pickle" in str(info.value)


@pytest.mark.parametrize("content_type", [None, "application/json", "application/x-npz"])
def test_empty_body(content_type: str | None) -> None:
    with pytest.raises(WireError, match="empty request body: POST a pickled dict"):
        wire.decode_request(b"", content_type)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ([1, 2], "got list"),
        (np.zeros((2, 3)), "a numpy array of shape (2, 3)"),
        ({1: np.zeros(2)}, "the int key 1"),
        ({("a",): 1}, "the tuple key"),
        ("x", "got str"),
        (None, "got NoneType"),
    ],
)
def test_top_level_must_be_a_dict_of_str_keys(value: Any, named: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode_request(pickle.dumps(value), None)
    assert "must be a dict of str keys" in str(info.value)
    assert named in str(info.value)


def test_json_values() -> None:
    body = json.dumps(
        {
            "ints": [[1, 2], [3, 4]],
            "floats": [1, 2.5],
            "bools": [True, False],
            "cube": [[[0.5]]],
            "empty": [],
            "words": ["a", "b"],
            "scalar": 3,
            "text": "hi",
            "nothing": None,
            "nested": {"y": [1, 2]},
        }
    ).encode()
    out, fmt = wire.decode_request(body, "application/json")
    assert fmt == "json"
    assert out["ints"].dtype == np.int64
    assert out["ints"].shape == (2, 2)
    assert out["floats"].dtype == np.float64
    assert out["bools"].dtype == np.bool_
    assert out["cube"].shape == (1, 1, 1)
    assert out["empty"].shape == (0,)
    assert out["words"] == ["a", "b"]
    assert out["scalar"] == 3
    assert out["text"] == "hi"
    assert out["nothing"] is None
    assert out["nested"]["y"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"x": [[1, 2], [3]]}', "not a rectangular list of numbers"),
        (b'{"x": [1, "a"]}', "mixes numbers, strings"),
        (b'{"x": [1, null]}', "mixes numbers, strings"),
        (b'{"x": [1, {"a": 1}]}', "mixes numbers, strings"),
        (b'{"x": [100000000000000000000000]}', "outside the int64 range"),
        (b'{"x": [1, 2', "body is not valid JSON"),
        (b"\xff\xfe garbage", "body is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "body is not valid JSON"),
        (b"[1, 2]", "must be a dict of str keys to values, got list"),
    ],
)
def test_bad_json(body: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message.replace("(", r"\(")):
        wire.decode_request(body, "application/json")


def _npz(compressed: bool = False, **arrays: Any) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(compressed: bool) -> None:
    arrays = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f": np.asfortranarray(np.ones((2, 3), np.int16)),
        "b": np.array([True, False]),
        "s": np.array(2.5),
    }
    out, fmt = wire.decode_request(_npz(compressed, **arrays), "application/x-npz")
    assert fmt == "npz"
    for key, arr in arrays.items():
        assert _same(out[key], arr)
    out["x"] += 1  # writable


def test_npz_refuses_object_arrays_damage_and_bombs() -> None:
    with pytest.raises(UnsafePickle, match="refused numpy dtype object"):
        wire.decode_request(_npz(x=np.array([1, "a"], dtype=object)), wire.NPZ)
    with pytest.raises(UnsafePickle, match="refused numpy dtype <U"):
        wire.decode_request(_npz(x=np.array(["a"])), wire.NPZ)
    with pytest.raises(WireError, match="not a valid npz"):
        wire.decode_request(b"PK\x03\x04 not a zip", wire.NPZ)
    good = _npz(x=np.zeros(1000))
    with pytest.raises(WireError):
        wire.decode_request(good[: len(good) // 2], wire.NPZ)
    # a zip bomb: 100 MB of zeros compressed to ~100 kB
    bomb = _npz(True, x=np.zeros(100 * 1024 * 1024, np.uint8))
    assert len(bomb) < 1024 * 1024
    with pytest.raises(WireError, match="expands to"):
        wire.decode_request(bomb, wire.NPZ, max_decoded_bytes=10 * 1024 * 1024)


def test_npz_header_that_lies_about_the_shape_is_refused() -> None:
    member = io.BytesIO()
    np.lib.format.write_array(member, np.zeros(2), version=(1, 0))
    raw = member.getvalue()
    # same header length: a bigger shape, four fewer padding spaces
    lied = raw.replace(b"(2,)", b"(99999999,)", 1).replace(b"       \n", b"\n", 1)
    assert len(lied) == len(raw)
    assert b"99999999" in lied
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", lied)
    with pytest.raises(WireError, match="its header says"):
        wire.decode_request(buf.getvalue(), wire.NPZ)


# --------------------------------------------------------------------------------------------
# responses


@pytest.mark.parametrize(
    ("accept", "request_format", "expected"),
    [
        (None, "pickle", "pickle"),
        ("", "json", "json"),
        ("*/*", "json", "json"),
        ("*/*", "npz", "npz"),
        ("application/*", "pickle", "pickle"),
        ("application/json", "pickle", "json"),
        ("application/x-npz", "json", "npz"),
        ("application/x-pickle", "json", "pickle"),
        ("application/octet-stream", "json", "pickle"),
        ("Application/JSON; charset=utf-8", "pickle", "json"),
        ("application/json;q=0.5, application/x-npz", "pickle", "npz"),
        ("application/json;q=0.5, */*;q=0.1", "pickle", "json"),
        ("application/json, */*", "pickle", "pickle"),  # tie: the request's format
        ("application/json, application/x-npz", "pickle", "json"),  # tie: the first listed
        ("application/json;q=0, */*", "pickle", "pickle"),
        ("application/json;q=0", "npz", "npz"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "json", "json"),
        ("text/html", "pickle", "pickle"),
        ("application/json;q=oops, application/x-npz;q=0.3", "pickle", "npz"),
    ],
)
def test_accept_negotiation(accept: str | None, request_format: str, expected: str) -> None:
    assert wire.response_format(accept, request_format) == expected


def test_responses_round_trip_every_format() -> None:
    data = {
        "y": np.arange(6, dtype=np.float32).reshape(2, 3),
        "labels": np.array(["cat", "dog"]),
        "n": np.int64(3),
        "ok": np.bool_(True),
    }
    for fmt in wire.FORMATS:
        body, content_type = wire.encode_response(data, fmt)
        assert content_type == wire.CONTENT_TYPES[fmt]
        out = wire.decode_response(body, content_type)
        assert np.array_equal(out["y"], data["y"])
        assert list(np.asarray(out["labels"])) == ["cat", "dog"]
        assert out["n"] == 3
        assert out["ok"]


def test_pickle_response_uses_protocol_5() -> None:
    body, _ = wire.encode_response({"y": np.ones(3)}, "pickle")
    assert body[:2] == b"\x80\x05"


def test_json_response_converts_numpy_values() -> None:
    data = {
        "y": np.array([[1.5, np.nan]], np.float32),
        "i": np.int16(3),
        "b": np.bool_(False),
        "f": np.float64(0.25),
        "t": (1, 2),
        "dt": np.dtype("f4"),
    }
    body, content_type = wire.encode_response(data, "json")
    assert content_type == "application/json"
    raw = json.loads(body)
    assert raw["y"][0][0] == 1.5
    assert raw["y"][0][1] != raw["y"][0][1]
    assert raw["i"] == 3
    assert raw["b"] is False
    assert raw["f"] == 0.25
    assert raw["t"] == [1, 2]
    assert raw["dt"] == "float32"


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        ({"z": np.array([1 + 2j])}, "json"),
        ({"z": 1j}, "json"),
        ({"z": b"raw"}, "json"),
        ({"z": np.array([b"raw"])}, "json"),
        ({"z": {"nested": 1}}, "npz"),
        ({"z": [np.zeros(2), np.zeros(3)]}, "npz"),
    ],
)
def test_format_that_cannot_carry_the_response_is_406(data: dict[str, Any], fmt: str) -> None:
    with pytest.raises(wire.NotAcceptable) as info:
        wire.encode_response(data, fmt)
    assert info.value.http_status == 406
    assert "application/x-pickle" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [np.array([1, "a"], dtype=object), object(), _MyDict(), {"deep": [print]}],
    ids=["object_array", "object", "subclass", "function"],
)
def test_unencodable_model_output_is_500(value: Any) -> None:
    with pytest.raises(wire.UnencodableResponse) as info:
        wire.encode_response({"y": value}, "pickle")
    assert info.value.http_status == 500
    assert "the model's output cannot be sent" in str(info.value)


def test_array_subclasses_are_sent_as_plain_arrays_without_touching_the_input() -> None:
    matrix = np.array([[1, 2]]).view(_MyArray)
    data = {"y": matrix, "z": [matrix]}
    for fmt in ("pickle", "npz"):
        body, content_type = wire.encode_response({"y": matrix}, fmt)
        out = wire.decode_response(body, content_type)
        assert type(out["y"]) is np.ndarray
        assert out["y"].tolist() == [[1, 2]]
    body, content_type = wire.encode_request(data)
    assert data["y"] is matrix
    assert data["z"][0] is matrix
    assert type(wire.decode_response(body, content_type)["z"][0]) is np.ndarray


def test_encode_request_refuses_what_the_server_would_refuse() -> None:
    with pytest.raises(WireError, match="the request cannot be sent: refused numpy dtype object"):
        wire.encode_request({"x": np.array([None])})
    with pytest.raises(WireError, match="dict of str keys"):
        wire.encode_request({1: 2})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown wire format"):
        wire.encode_request({"x": 1}, "xml")


def test_decode_response_is_restricted_too(tmp_path: Path) -> None:
    marker = tmp_path / "client-pwned"
    hostile = pickle.dumps({"y": _Reduce(os.system, (f"touch {marker}",))})
    with pytest.raises(UnsafePickle, match="system"):
        wire.decode_response(hostile, wire.PICKLE)
    assert not marker.exists()
    with pytest.raises(UnsafePickle):
        wire.decode_response(pickle.dumps({"y": np.array([1, None])}), wire.PICKLE)
    with pytest.raises(WireError, match="unsupported Content-Type"):
        wire.decode_response(b"<html>", "text/html")
    with pytest.raises(WireError, match="empty body"):
        wire.decode_response(b"", wire.PICKLE)


def test_error_body() -> None:
    body = wire.error_body("invalid_input", "x has shape (3,), expected (8,)", {"x": "bad shape"})
    assert json.loads(body) == {
        "error": {
            "type": "invalid_input",
            "message": "x has shape (3,), expected (8,)",
            "keys": {"x": "bad shape"},
        }
    }
    assert json.loads(wire.error_body("t", "m"))["error"]["keys"] == {}
    assert wire.parse_error_body(body) == (
        "invalid_input",
        "x has shape (3,), expected (8,)",
        {"x": "bad shape"},
    )
    assert wire.parse_error_body(b"<html>502</html>") is None
    assert wire.parse_error_body(b'{"error": "text"}') is None
