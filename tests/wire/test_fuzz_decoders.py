"""Fuzzing every decoder: valid and malformed pickles, npz, JSON and OIP bodies.

Pickles are fuzzed on both paths: the fast path for common bodies alone (it returns a value,
None, or one of the errors the general path raises for the body) and the combined decode. For
every body hypothesis builds, the decoder either returns a value or raises one of the
documented errors (a ``StudioServeError`` with status 400, 413 or 415); it never raises
anything else, never calls the sentinel global (``tests.wire.sentinel``) however the pickle
tries to reach it, and never allocates (tracemalloc's peak) more than the decode budget for the
body's size. The limits are tightened (a 256 KiB constant, 1 MiB --max-body, 64 keys) so the
budget bounds small bodies too.

``make test`` runs the ``short`` profile (a fixed seed); ``make fuzz`` the ``long`` one. Every
crash found is kept in ``tests/wire/corpus`` and replayed by ``test_corpus.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import pickle
import pickletools
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from studioserve import wire
from studioserve.errors import StudioServeError, WireError
from studioserve.wire.budget import DecodeLimits
from studioserve.wire.fast_pickle import fast_loads
from studioserve.wire.oip_codec import DATATYPES, decode_infer_request
from studioserve.wire.safe_pickle import REQUEST_ARRAY_KINDS, safe_loads
from tests.wire import sentinel

# No strategy here uses the random module (each passes Hypothesis's check alone); in a full run a
# thread left by an earlier test (a server, a pool) can move the global random state while a
# strategy draws, which Hypothesis reports as this deprecation. It is not about these tests.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

#: Tight limits, so that the budget says something about small bodies too.
LIMITS = DecodeLimits(max_body=1 << 20, max_keys=64, constant=256 << 10)
DECODE_STATUSES = frozenset({400, 413, 415})
OIP_STATUSES = frozenset({400, 413})


def run_decoder(
    call: Callable[[], Any], length: int, statuses: frozenset[int] = DECODE_STATUSES
) -> Any:
    """``call()``, checked: only documented errors, no sentinel call, the peak within budget."""
    sentinel.CALLS.clear()
    budget = LIMITS.budget_for(length)
    tracemalloc.start()
    try:
        try:
            value = call()
        except StudioServeError as e:
            value = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if isinstance(value, StudioServeError):
        status = value.http_status
        assert status in statuses, f"{type(value).__name__} ({status}): {value}"
    assert not sentinel.CALLS, f"the sentinel global was called: {sentinel.CALLS}"
    assert peak <= budget, f"peak {peak} bytes > budget {budget} for a body of {length} bytes"
    return value


def decode(body: bytes, content_type: str | None) -> Any:
    return run_decoder(lambda: wire.decode_request(body, content_type, limits=LIMITS), len(body))


# --------------------------------------------------------------------------------------------
# pickles: opcode streams built from pickletools' table, and mutations of real pickles

_NP_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
GLOBALS = [
    # the allowed ones, under every name numpy and Python 2 use
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytes"),
    ("__builtin__", "bytearray"),
    # the sentinel, and what an attacker would reach for
    ("tests.wire.sentinel", "trip"),
    ("tests.wire.sentinel", "Trip"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("numpy", "load"),
    ("pickle", "loads"),
    ("copyreg", "_reconstructor"),
    ("numpy.lib.format", "read_array"),
]
TEXTS = ["f8", "<f4", ">i2", "b", "|b1", "O", "U3", "V8", "S2", "c16", "?", "C", "F", "K", "latin1"]
TEXTS += ["latin-1", "<", ">", "|", "tests.wire.sentinel", "trip", "os", "system", ""]


def _text() -> st.SearchStrategy[str]:
    return st.sampled_from(TEXTS) | st.text(max_size=6)


def _blob() -> st.SearchStrategy[bytes]:
    return st.sampled_from([t.encode() for t in TEXTS]) | st.binary(max_size=24)


def _counted(fmt: str, payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A length-prefixed argument whose length is usually true, sometimes a lie."""
    size = struct.calcsize(fmt)
    top = 2 ** (8 * size - (1 if fmt[-1].islower() else 0)) - 1

    def build(data: bytes, lie: int | None) -> bytes:
        n = len(data) if lie is None else lie
        return struct.pack(fmt, n) + data

    lies = st.none() | st.none() | st.none() | st.integers(0 if fmt[-1].isupper() else -5, top)
    return st.builds(build, payload, lies)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_MEMO_INDEX = st.integers(0, 40) | st.integers(0, 2**32 - 1)
ARGS: dict[str, st.SearchStrategy[bytes]] = {
    "uint1": st.integers(0, 255).map(lambda v: bytes([v])),
    "uint2": st.integers(0, 65535).map(lambda v: struct.pack("<H", v)),
    "int4": (st.integers(-5, 300) | st.integers(-(2**31), 2**31 - 1)).map(
        lambda v: struct.pack("<i", v)
    ),
    "uint4": _MEMO_INDEX.map(lambda v: struct.pack("<I", v)),
    "uint8": (st.integers(0, 64) | st.integers(0, 2**64 - 1)).map(lambda v: struct.pack("<Q", v)),
    "decimalnl_short": (st.integers(-5, 300).map(str) | st.sampled_from(["00", "01", "x", ""])).map(
        lambda v: f"{v}\n".encode()
    ),
    "decimalnl_long": st.integers(-(10**30), 10**30).map(lambda v: f"{v}L\n".encode()),
    "floatnl": st.floats().map(lambda v: f"{v!r}\n".encode()),
    "stringnl": st.text(
        st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="'\\"), max_size=8
    ).map(lambda t: f"'{t}'\n".encode()),
    "stringnl_noescape": _text().map(lambda t: _utf8(t.replace("\n", "")) + b"\n"),
    "stringnl_noescape_pair": st.sampled_from(GLOBALS).map(lambda g: f"{g[0]}\n{g[1]}\n".encode()),
    "string1": _counted("<B", _blob()),
    "string4": _counted("<i", _blob()),
    "bytes1": _counted("<B", _blob()),
    "bytes4": _counted("<I", _blob()),
    "bytes8": _counted("<Q", _blob()),
    "bytearray8": _counted("<Q", _blob()),
    "unicodestringnl": _text().map(lambda t: t.encode("raw-unicode-escape") + b"\n"),
    "unicodestring1": _counted("<B", _text().map(_utf8)),
    "unicodestring4": _counted("<I", _text().map(_utf8)),
    "unicodestring8": _counted("<Q", _text().map(_utf8)),
    "float8": st.floats().map(lambda v: struct.pack(">d", v)),
    "long1": _counted("<B", st.binary(max_size=9)),
    "long4": _counted("<i", st.binary(max_size=9) | st.just(b"\x01" * 2000)),
}
OPCODES = list(pickletools.opcodes)
_BY_CODE = {op.code.encode("latin-1"): op for op in OPCODES}
# Stack builders come up more often, so that streams reach deeper states.
_COMMON = [_BY_CODE[c] for c in [b"(", b"]", b"}", b")", b"N", b"K", b"X", b"C", b"c", b"R"]]
_COMMON += [_BY_CODE[c] for c in [b"b", b"t", b"\x85", b"\x86", b"\x94", b"h", b"s", b"u", b"e"]]


def _op(op: pickletools.OpcodeInfo) -> st.SearchStrategy[bytes]:
    code = op.code.encode("latin-1")
    if op.arg is None:
        return st.just(code)
    return ARGS[op.arg.name].map(lambda arg: code + arg)


OPCODE = st.sampled_from(OPCODES + _COMMON * 2).flatmap(_op)


@st.composite
def opcode_streams(draw: st.DrawFn) -> bytes:
    proto = draw(st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05"]))
    ops = draw(st.lists(OPCODE, max_size=40))
    stop = draw(st.sampled_from([b".", b".", b""]))
    return proto + b"".join(ops) + stop


def _arrays() -> st.SearchStrategy[np.ndarray]:
    dtypes = st.sampled_from(["f4", "f8", "i1", "i8", "u2", "?", "c8", ">f4", "f2"])
    shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
    return st.builds(
        lambda dt, shape, order: np.asarray(
            np.arange(int(np.prod(shape)) or 0).reshape(shape).astype(dt), order=order
        ),
        dtypes,
        shapes,
        st.sampled_from(["C", "F"]),
    )


def _containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(kids, max_size=4)
        | st.tuples(kids, kids)
        | st.dictionaries(st.text(max_size=3), kids, max_size=3)
        | st.frozensets(st.integers(), max_size=3)
    )


PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | _arrays(),
    _containers,
    max_leaves=12,
)
REAL_PICKLES = st.builds(
    lambda value, protocol: pickle.dumps(value, protocol=protocol),
    st.dictionaries(st.text(max_size=4), PLAIN, min_size=1, max_size=4),
    st.integers(0, pickle.HIGHEST_PROTOCOL),
)


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """A body with a few random edits: byte flips, inserted opcodes, deleted, repeated or cut
    spans."""
    data = bytearray(draw(bodies))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.integers(0, 4))
        if kind == 0:
            data[at] = draw(st.integers(0, 255))
        elif kind == 1:
            data[at:at] = draw(OPCODE)
        elif kind == 2:
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == 3:
            span = data[at : at + draw(st.integers(1, 12))]
            data[at:at] = span * draw(st.integers(1, 30))
        else:
            del data[at:]
    return bytes(data)


def _scalars() -> st.SearchStrategy[Any]:
    dtypes = st.sampled_from(["f4", "f8", "i1", "i8", "u2", "?", "c8", "f2"])
    return st.builds(lambda dt, v: np.array(v).astype(dt)[()], dtypes, st.integers(0, 300))


@st.composite
def common_pickles(draw: st.DrawFn) -> tuple[bytes, int]:
    """What the fast path reads: ``pickle.dumps`` of a dict of str keys to numpy arrays and
    scalars, protocols 2-5; and the protocol."""
    values = draw(st.dictionaries(st.text(max_size=4), _arrays() | _scalars(), max_size=5))
    protocol = draw(st.integers(2, 5))
    body = pickle.dumps(values, protocol=protocol)
    if draw(st.booleans()):  # only the memo stores it needs, as a writer without a memo
        body = pickletools.optimize(body)
    return body, protocol


COMMON_PICKLES = common_pickles().map(lambda case: case[0])
FAST_STATUSES = frozenset({400, 413})


def both_paths(body: bytes) -> Any:
    """The fast path alone (run_decoder's rules: documented errors or None, no global called,
    the peak within the budget), twice (cold, then from its skeleton), held to the general
    path: the same value, or the same error class, or None. Then the combined decode."""
    want: Any
    try:
        want = safe_loads(body, budget=LIMITS.budget(len(body)))
    except StudioServeError as e:
        want = e
    results = []
    for _ in range(2):
        got = run_decoder(
            lambda: fast_loads(body, REQUEST_ARRAY_KINDS, LIMITS.budget(len(body))),
            len(body),
            FAST_STATUSES,
        )
        results.append(got)
        if isinstance(got, StudioServeError):
            assert type(got) is type(want), f"{got!r} where the general path raised {want!r}"
        elif got is not None:
            assert not isinstance(want, StudioServeError), f"decoded what the other refused: {want}"
            assert list(got) == list(want)
            for key, value in want.items():
                assert type(got[key]) is type(value)
                assert got[key].dtype == value.dtype
                np.testing.assert_array_equal(got[key], value)
    decode(body, wire.PICKLE)
    return results[0]


@given(common_pickles())
def test_fast_path_on_common_pickles(case: tuple[bytes, int]) -> None:
    body, protocol = case
    got = both_paths(body)
    if protocol > 2:  # (protocol 2 spells empty data as builtins.bytes(): the general path's)
        assert got is not None, "a common body did not take the fast path"


@given(mutated(COMMON_PICKLES))
def test_fast_path_on_mutated_common_pickles(body: bytes) -> None:
    both_paths(body)


@given(REAL_PICKLES | mutated(REAL_PICKLES) | opcode_streams())
def test_fast_path_on_any_pickle(body: bytes) -> None:
    both_paths(body)


@given(opcode_streams())
def test_opcode_streams(body: bytes) -> None:
    decode(body, wire.PICKLE)


@given(REAL_PICKLES)
def test_real_pickles_load(body: bytes) -> None:
    out = decode(body, wire.PICKLE)
    assert not isinstance(out, StudioServeError) or out.http_status in (400, 413)


@given(mutated(REAL_PICKLES))
def test_mutated_pickles(body: bytes) -> None:
    decode(body, None)


@pytest.mark.parametrize("op", OPCODES, ids=lambda op: op.name)
def test_every_opcode_in_a_few_contexts(op: pickletools.OpcodeInfo) -> None:
    """Each opcode of protocols 0-5, with a plain argument, where it can and cannot run."""
    arg = {
        "uint1": b"\x01",
        "uint2": b"\x01\x00",
        "int4": b"\x01\x00\x00\x00",
        "uint4": b"\x01\x00\x00\x00",
        "uint8": b"\x01" + bytes(7),
        "decimalnl_short": b"1\n",
        "decimalnl_long": b"1L\n",
        "floatnl": b"1.5\n",
        "stringnl": b"'ab'\n",
        "stringnl_noescape": b"ab\n",
        "stringnl_noescape_pair": b"tests.wire.sentinel\ntrip\n",
        "string1": b"\x02ab",
        "string4": b"\x02\x00\x00\x00ab",
        "bytes1": b"\x02ab",
        "bytes4": b"\x02\x00\x00\x00ab",
        "bytes8": b"\x02" + bytes(7) + b"ab",
        "bytearray8": b"\x02" + bytes(7) + b"ab",
        "unicodestringnl": b"ab\n",
        "unicodestring1": b"\x02ab",
        "unicodestring4": b"\x02\x00\x00\x00ab",
        "unicodestring8": b"\x02" + bytes(7) + b"ab",
        "float8": struct.pack(">d", 1.5),
        "long1": b"\x01\x05",
        "long4": b"\x01\x00\x00\x00\x05",
    }
    code = op.code.encode("latin-1") + (arg[op.arg.name] if op.arg else b"")
    for before in (
        b"",
        b"N",
        b"NN",
        b"(N",
        b"}N",
        b"]",
        b"\x8f(N",
        b"ctests.wire.sentinel\ntrip\n)",
    ):
        for proto in (b"", b"\x80\x05"):
            body = proto + b"}(X\x01\x00\x00\x00k" + before + code + b"u."
            decode(body, wire.PICKLE)
            decode(proto + before + code + b".", wire.PICKLE)


# --------------------------------------------------------------------------------------------
# npz: real archives, lying zip headers, lying .npy headers


def _npz(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


NPZ_FIELDS = {  # (offset in a local header, offset in a central directory entry, format)
    "crc": (14, 16, "<I"),
    "compressed_size": (18, 20, "<I"),
    "file_size": (22, 24, "<I"),
    "method": (8, 10, "<H"),
    "flags": (6, 8, "<H"),
}


@st.composite
def lying_npz(draw: st.DrawFn) -> bytes:
    arrays = draw(
        st.dictionaries(st.text(min_size=1, max_size=3), _arrays(), min_size=1, max_size=3)
    )
    data = bytearray(_npz(arrays, draw(st.booleans())))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(sorted(NPZ_FIELDS)))
        local, central, fmt = NPZ_FIELDS[field]
        top = 2 ** (8 * struct.calcsize(fmt)) - 1
        value = draw(st.sampled_from([0, 1, 8, 12, 14, 2**30 & top, top]) | st.integers(0, top))
        where = draw(st.sampled_from([b"PK\x03\x04", b"PK\x01\x02"]))
        offsets = [i for i in range(len(data)) if data.startswith(where, i)]
        if not offsets:
            continue
        at = draw(st.sampled_from(offsets)) + (local if where == b"PK\x03\x04" else central)
        data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(data)


@st.composite
def lying_npy(draw: st.DrawFn) -> bytes:
    """An npz whose .npy headers say anything: huge, empty or negative shapes, any dtype."""
    buf = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for i in range(draw(st.integers(1, 3))):
            descr = draw(st.sampled_from(["<f8", "|b1", "<i4", "|u1", "|O", "<U3", "|V8", ">c16"]))
            dims = st.integers(0, 3) | st.sampled_from([0, 2**31, 2**40, 2**62, 2**63 - 1, -1])
            shape = tuple(draw(st.lists(dims, max_size=4)))
            header = {"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape}
            member = io.BytesIO()
            writer = draw(
                st.sampled_from(
                    [np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0]
                )
            )
            try:
                writer(member, header)
            except ValueError:
                member = io.BytesIO(b"\x93NUMPY\x01\x00" + b"v\x00" + repr(header).encode())
            member.write(draw(st.binary(max_size=64)))
            zf.writestr(f"k{i}.npy", member.getvalue())
    return buf.getvalue()


@given(lying_npz())
def test_npz_with_lying_zip_headers(body: bytes) -> None:
    decode(body, wire.NPZ)


@given(lying_npy())
def test_npz_with_lying_npy_headers(body: bytes) -> None:
    decode(body, wire.NPZ)


@given(
    mutated(
        st.builds(_npz, st.dictionaries(st.text(max_size=2), _arrays(), max_size=2), st.booleans())
    )
)
def test_mutated_npz(body: bytes) -> None:
    decode(body, wire.NPZ)


# --------------------------------------------------------------------------------------------
# JSON


def _json_containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=4), kids, max_size=4)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**40), 10**40)
    | st.floats()
    | st.text(max_size=6),
    _json_containers,
    max_leaves=40,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind <= 2:
        value = draw(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=5) | JSON_VALUES)
        return json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == 3:  # deep
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return ('{"x":' + opener * depth + "1" + closer * depth + "}").encode()
    if kind == 4:  # wide, or many keys
        n = draw(st.integers(0, 3000))
        if draw(st.booleans()):
            return json.dumps({f"k{i}": i for i in range(n)}).encode()
        return (
            '{"x": ['
            + ",".join(draw(st.sampled_from(["1", "1.5", "[]", '""', "null"])) for _ in range(n))
            + "]}"
        ).encode()
    if kind == 5:  # huge numbers, one long string among short values
        return draw(
            st.sampled_from(
                [
                    b'{"x": [' + b"9" * 5000 + b"]}",
                    b'{"x": 1e999999, "y": [-1e999]}',
                    b'{"x": [1, 2, "' + b"a" * 20000 + b'"]}',
                    b'{"x": ["' + b"a" * 20000 + b'"' + b', ""' * 500 + b"]}",
                    b'{"x": [NaN, Infinity, -Infinity]}',
                    b'{"x": "\\ud800", "y": "\\u00e9\\ud83d\\ude00"}',
                ]
            )
        )
    return draw(mutated(st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES)))


@given(json_bodies())
def test_json_bodies(body: bytes) -> None:
    decode(body, wire.JSON)


@given(json_bodies())
def test_json_responses(body: bytes) -> None:
    """The client's side: string arrays are made here, so they are charged here."""
    limits = DecodeLimits(max_body=1 << 20, max_keys=64, constant=256 << 10)
    run_decoder(lambda: wire.decode_response(body, wire.JSON, limits=limits), len(body))


# --------------------------------------------------------------------------------------------
# OIP

_DATATYPE = st.sampled_from([*DATATYPES, "FP128", "", None, 3])
_SHAPE = st.lists(
    st.integers(0, 4) | st.sampled_from([0, 2**31, 2**62, -1, True, 1.5]), max_size=4
) | st.sampled_from([None, "x", 3])


@st.composite
def oip_bodies(draw: st.DrawFn) -> tuple[bytes, str | None, str | None]:
    inputs = []
    binary = b""
    for i in range(draw(st.integers(0, 3))):
        t: dict[str, Any] = {
            "name": draw(st.sampled_from([f"x{i}", "x0"]) | st.integers()),
            "datatype": draw(_DATATYPE),
            "shape": draw(_SHAPE),
        }
        if draw(st.booleans()):
            chunk = draw(st.binary(max_size=48))
            size = draw(
                st.sampled_from([len(chunk), len(chunk)]) | st.integers(-1, 100) | st.just("8")
            )
            t["parameters"] = {"binary_data_size": size}
            binary += chunk
        else:
            t["data"] = draw(JSON_VALUES)
        inputs.append(t)
    doc: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.text(max_size=3)}), max_size=3)
            | st.sampled_from([None, "x", 1])
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3))
    head = json.dumps(doc).encode()
    body = head + binary
    header = draw(st.sampled_from([str(len(head)), None, "0", "x", str(len(body) + 1)]))
    if not binary and header == str(len(head)) and draw(st.booleans()):
        header = None
    encoding = draw(st.sampled_from([None, None, None, "gzip", "deflate", "identity", "br"]))
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if draw(st.booleans()):
        body = draw(mutated(st.just(body)))
    return body, header, encoding


@given(oip_bodies())
def test_oip_bodies(case: tuple[bytes, str | None, str | None]) -> None:
    body, header, encoding = case
    run_decoder(
        lambda: decode_infer_request(body, header, limits=LIMITS, content_encoding=encoding),
        len(body),
        OIP_STATUSES,
    )


# --------------------------------------------------------------------------------------------
# what decodes encodes back: the identity model answers with the request itself, in any format


@st.composite
def decodable(draw: st.DrawFn) -> tuple[bytes, str | None]:
    kind = draw(st.sampled_from(["pickle", "mutated", "json", "npz"]))
    if kind == "pickle":
        return draw(REAL_PICKLES), wire.PICKLE
    if kind == "mutated":
        return draw(mutated(REAL_PICKLES)), None
    if kind == "json":
        return draw(json_bodies()), wire.JSON
    return draw(lying_npz()), wire.NPZ


@given(decodable())
def test_what_decodes_encodes_back_in_every_format(case: tuple[bytes, str | None]) -> None:
    body, content_type = case
    try:
        data, _ = wire.decode_request(body, content_type, limits=LIMITS)
    except StudioServeError:
        return
    for fmt in wire.FORMATS:
        try:
            out, out_type = wire.encode_response(data, fmt)
        except wire.NotAcceptable:
            continue
        # JSON cannot say all that a pickle can ([None, []]), but decoding never crashes
        with contextlib.suppress(WireError):
            wire.decode_response(out, out_type)
