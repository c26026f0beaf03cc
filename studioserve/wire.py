"""The wire format of ``POST /``: request and response bodies, decoded safely.

A body is a dict of string keys to values in one of three formats:

- ``pickle``: Content-Type ``application/x-pickle``, ``application/octet-stream`` or none
  (Studio.ML's clients send none); any pickle protocol, 0 to 5.
- ``json``: ``application/json``, an object of nested lists (``{"x": [[1, 2], [3, 4]]}``).
- ``npz``: ``application/x-npz``, the output of :func:`numpy.savez` (no pickled members).

**Pickles are never loaded with** :func:`pickle.loads`. :func:`safe_loads` uses a restricted
unpickler that builds only numpy arrays (numeric or bool dtypes, never object), numpy dtypes and
scalars, and plain values and containers (dict, list, tuple, set, frozenset, str, bytes,
bytearray, int, float, complex, bool, None). Any other global is refused with
:class:`~studioserve.errors.UnsafePickle`; so are object arrays however the pickle tries to build
them, forged dtypes, out-of-band buffers, memo indices that would allocate memory the body does
not pay for, and values nested deeper than :data:`MAX_DEPTH`.

Both sides use this module: the server (``decode_request``, ``response_format``,
``encode_response``, ``error_body``) and :class:`studioserve.Client` (``encode_request``,
``decode_response``, which is just as restricted: a hostile server cannot run code on a client).
This module does no IO: no Flask, no sockets, no threads.

Example::

    body, content_type = encode_request({"x": np.ones((2, 8), np.float32)})
    data, fmt = decode_request(body, content_type)          # ({"x": array}, "pickle")
    body, content_type = encode_response({"y": data["x"] + 1}, response_format(None, fmt))
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from .errors import (
    NotAcceptable,
    UnencodableResponse,
    UnsafePickle,
    UnsupportedMediaType,
    WireError,
)

logger = logging.getLogger(__name__)

PICKLE: Final = "application/x-pickle"
JSON: Final = "application/json"
NPZ: Final = "application/x-npz"
OCTET_STREAM: Final = "application/octet-stream"

#: The wire formats, by name.
FORMATS: Final = ("pickle", "json", "npz")
#: The content type each format is sent with.
CONTENT_TYPES: Final[dict[str, str]] = {"pickle": PICKLE, "json": JSON, "npz": NPZ}
#: Request content types (without parameters) and the format each means. A missing or empty
#: Content-Type means pickle too: Studio.ML's clients send none.
REQUEST_FORMATS: Final[dict[str, str]] = {
    PICKLE: "pickle",
    OCTET_STREAM: "pickle",
    "application/pickle": "pickle",
    "application/python-pickle": "pickle",
    JSON: "json",
    NPZ: "npz",
}

#: numpy dtype kinds a request may carry: bool, signed and unsigned int, float, complex.
REQUEST_ARRAY_KINDS: Final = "biufc"
#: numpy dtype kinds a response may carry: also fixed-width unicode and byte strings (labels).
RESPONSE_ARRAY_KINDS: Final = "biufcUS"
#: The deepest nesting of containers a body may have.
MAX_DEPTH: Final = 64
#: The pickle protocol of responses (and of the client's requests): 5, with in-band buffers.
PICKLE_PROTOCOL: Final = 5
#: The most bytes an npz body may expand to (its members' uncompressed sizes together).
MAX_DECODED_BYTES: Final = 1 << 30

_MAX_NDIM: Final = 64
# How far a memo index may exceed its byte offset before it looks like an allocation attack.
_MEMO_SLACK: Final = 1024
_ALLOWED_SUMMARY: Final = "only numpy arrays, dtypes, scalars and plain containers are allowed"


# --------------------------------------------------------------------------------------------
# dtype and array checks


#: numpy's builtin dtype instances (immortal singletons), by id: an array whose dtype is one of
#: them needs no further checks.
_BUILTIN_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    id(d): d for d in (np.dtype(c) for c in "?bBhHiIlLqQpPefdgFDG")
}


def _dtype_name(dtype: Any) -> str:
    try:
        return str(np.dtype(dtype))
    except Exception:  # noqa: BLE001 - only for a message
        return repr(dtype)


def _kinds_text(kinds: str) -> str:
    names = {
        "b": "bool",
        "i": "int",
        "u": "uint",
        "f": "float",
        "c": "complex",
        "U": "str",
        "S": "bytes",
    }
    return "/".join(names.get(k, k) for k in kinds)


def _refuse_dtype(dtype: Any, kinds: str, why: str = "") -> UnsafePickle:
    reason = f" ({why})" if why else ""
    return UnsafePickle(
        f"refused numpy dtype {_dtype_name(dtype)}{reason}: only {_kinds_text(kinds)} arrays "
        "are allowed (never object or structured dtypes); convert the value with "
        "np.asarray(value, dtype=np.float32) or similar before sending"
    )


def _canonical_dtype(dtype: Any, kinds: str) -> np.dtype[Any]:
    """The plain numpy dtype equal to ``dtype``, or :class:`UnsafePickle`.

    A dtype's ``__setstate__`` can forge its flags (a float64 that claims to hold objects).
    Pickles never reach it (see :class:`_DtypeProxy`), but values from elsewhere might: the
    canonical dtype is rebuilt from the type string, and any mismatch is refused.
    """
    if not isinstance(dtype, np.dtype):
        raise UnsafePickle(f"expected a numpy dtype, got {type(dtype).__name__}")
    if _BUILTIN_DTYPES.get(id(dtype)) is dtype and dtype.kind in kinds:
        # numpy's own builtin instance: never handed to a pickle, so it cannot be forged.
        return dtype
    if dtype.kind not in kinds:
        raise _refuse_dtype(dtype, kinds)
    if dtype.names is not None or dtype.subdtype is not None:
        raise _refuse_dtype(dtype, kinds, "structured")
    if dtype.hasobject:
        raise _refuse_dtype(dtype, kinds, "forged: claims to hold objects")
    try:
        canonical = np.dtype(dtype.str)
    except (TypeError, ValueError):
        raise _refuse_dtype(dtype, kinds, "forged size") from None
    if (
        canonical.kind != dtype.kind
        or canonical.itemsize != dtype.itemsize
        or canonical.alignment != dtype.alignment
        or canonical.flags != dtype.flags
        or canonical.hasobject
    ):
        raise _refuse_dtype(dtype, kinds, "forged flags or size")
    return canonical


def _check_shape(shape: Any) -> tuple[int, ...]:
    if type(shape) is int:
        shape = (shape,)
    if type(shape) not in (tuple, list) or len(shape) > _MAX_NDIM:
        raise UnsafePickle(f"refused array shape {_r(shape)}: expected a tuple of at most 64 ints")
    out = []
    for n in shape:
        if type(n) is not int or n < 0:
            raise UnsafePickle(f"refused array shape {_r(shape)}: expected non-negative ints")
        out.append(n)
    return tuple(out)


def _check_array(arr: np.ndarray[Any, Any], kinds: str) -> np.ndarray[Any, Any]:
    """``arr`` as a plain :class:`numpy.ndarray` with an allowed dtype, or an error."""
    _canonical_dtype(arr.dtype, kinds)
    return arr if type(arr) is np.ndarray else arr.view(np.ndarray)


class _Budget:
    """The bytes the restricted unpickler may allocate beyond the pickle's own objects.

    The C unpickler's objects cost at most a small constant per body byte, but our globals
    copy data (``_codecs.encode``, ``bytearray``, array states), and a pickle can call them
    again and again on one memoized value. Every copy is charged here, so the total stays
    proportional to the body.
    """

    __slots__ = ("left",)

    def __init__(self, nbytes: int) -> None:
        self.left = nbytes

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise UnsafePickle(
                f"refused {what}: the pickle builds far more data than its body holds"
            )


# --------------------------------------------------------------------------------------------
# the restricted unpickler


class _SafeGlobal:
    """What the restricted unpickler hands out for an allowed global: a callable that checks
    its arguments, cannot be modified by ``BUILD`` and is not a type (so ``NEWOBJ`` fails)."""

    __slots__ = ("_func", "_name")

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        self._name = name
        self._func = func

    def __call__(self, *args: Any) -> Any:
        return self._func(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickle(f"refused to modify {self._name} while unpickling")

    def __reduce__(self) -> Any:
        raise TypeError(f"{self._name} placeholder cannot be pickled")

    def __repr__(self) -> str:
        return f"<safe {self._name}>"


def _refuse_ndarray_call(*args: Any) -> Any:
    raise UnsafePickle(
        "refused to call numpy.ndarray directly: arrays may only be rebuilt the way numpy "
        "pickles them"
    )


_NDARRAY: Final = _SafeGlobal("numpy.ndarray", _refuse_ndarray_call)


class _DtypeProxy:
    """What the ``numpy.dtype`` global returns while unpickling.

    numpy's own ``dtype.__setstate__`` trusts its input: a malformed state crashes the process
    and a forged one makes a float64 claim to hold objects. So the pickle never gets a real
    dtype: it gets this proxy, whose ``__setstate__`` (the pickle's ``BUILD``) accepts only the
    state numpy writes for a plain dtype (at most a byte order). Our other globals, and
    :func:`_finish`, swap the real dtype in.
    """

    __slots__ = ("built", "dtype")

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.built = False

    def __setstate__(self, state: Any) -> None:
        d = self.dtype
        if self.built:
            raise UnsafePickle(f"refused to set the state of numpy dtype {d} twice")
        if type(state) is not tuple or len(state) not in (8, 9) or state[8:] not in ((), (None,)):
            raise UnsafePickle(f"refused numpy dtype state for {d}: not a plain dtype's state")
        version, order, subarray, names, fields, elsize, alignment, flags = state[:8]
        if version not in (3, 4) or type(version) is not int:
            raise UnsafePickle(f"refused numpy dtype state for {d}: unknown version")
        if subarray is not None or names is not None or fields is not None:
            raise _refuse_dtype(d, RESPONSE_ARRAY_KINDS, "structured")
        if order not in ("<", ">", "|", "=") or type(order) is not str:
            raise UnsafePickle(f"refused numpy dtype state for {d}: bad byte order {_r(order)}")
        if type(elsize) is not int or elsize not in (-1, d.itemsize):
            raise _refuse_dtype(d, RESPONSE_ARRAY_KINDS, "forged size")
        if type(alignment) is not int or alignment not in (-1, d.alignment):
            raise _refuse_dtype(d, RESPONSE_ARRAY_KINDS, "forged alignment")
        if type(flags) is not int or flags != d.flags:
            raise _refuse_dtype(d, RESPONSE_ARRAY_KINDS, "forged flags")
        if order in "<>" and d.byteorder != "|":
            self.dtype = d.newbyteorder("<" if order == "<" else ">")
        self.built = True

    def __reduce__(self) -> Any:
        raise TypeError("a dtype placeholder cannot be pickled")


def _real_dtype(dtype: Any, kinds: str) -> np.dtype[Any]:
    """The checked numpy dtype behind a value the pickle passed where a dtype belongs."""
    if type(dtype) is _DtypeProxy:
        dtype = dtype.dtype
    return _canonical_dtype(dtype, kinds)


class _GuardedArray(np.ndarray):  # type: ignore[type-arg]
    """The arrays our globals return while unpickling. Their ``__setstate__`` (the pickle's
    ``BUILD``) checks the dtype, shape and data before numpy's own sees them, and runs at most
    once, only on a fresh ``_reconstruct`` array. Every guarded array is turned back into a
    plain ndarray before :func:`safe_loads` returns."""

    _budget: _Budget
    _settable: bool

    def __setstate__(self, state: Any) -> None:
        if not getattr(self, "_settable", False):
            raise UnsafePickle(
                "refused to set the state of this numpy array: only a fresh _reconstruct "
                "array takes a state, once"
            )
        self._settable = False
        if type(state) is not tuple or len(state) not in (4, 5):
            raise UnsafePickle("refused numpy array state: expected a 4- or 5-tuple")
        if len(state) == 5 and (state[0] != 1 or type(state[0]) is not int):
            raise UnsafePickle("refused numpy array state: unknown version")
        head = state[:-4]
        shape, dtype, fortran, raw = state[-4:]
        shape = _check_shape(shape)
        dtype = _real_dtype(dtype, RESPONSE_ARRAY_KINDS)
        if type(fortran) not in (bool, int):
            raise UnsafePickle("refused numpy array state: the order flag is not a bool")
        if type(raw) not in (bytes, bytearray):
            raise UnsafePickle(
                f"refused numpy array state: data is {type(raw).__name__}, not bytes "
                "(object arrays are not allowed)"
            )
        self._budget.charge(len(raw), "numpy array data")
        super().__setstate__((*head, shape, dtype, bool(fortran), raw))


class _RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose ``find_class`` only knows the globals numpy and the
    standard library use to pickle arrays, dtypes, scalars and plain containers."""

    def __init__(self, file: io.BytesIO, *, kinds: str, nbytes: int) -> None:
        super().__init__(file)
        self._kinds = kinds
        self._budget = _Budget(4 * nbytes + (1 << 20))

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            what = f"{module}.{name}"
            if len(what) > 100:
                what = what[:97] + "..."
            raise UnsafePickle(f"refused to unpickle {what}: {_ALLOWED_SUMMARY}")
        return factory(self)

    # -- the allowed globals -----------------------------------------------------------------

    def _dtype(self, obj: Any, align: Any = False, copy: Any = True, *rest: Any) -> Any:
        if type(obj) is not str or rest:
            raise UnsafePickle(
                "refused numpy.dtype call: only a type string like 'f4' is allowed here"
            )
        if type(align) not in (bool, int) or type(copy) not in (bool, int):
            raise UnsafePickle("refused numpy.dtype call: align and copy must be bools")
        dtype = np.dtype(obj, bool(align))
        if dtype.kind not in self._kinds or dtype.hasobject:
            raise _refuse_dtype(dtype, self._kinds)
        if dtype.names is not None or dtype.subdtype is not None:
            raise _refuse_dtype(dtype, self._kinds, "structured")
        return _DtypeProxy(dtype)

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> Any:
        if cls is not _NDARRAY:
            raise UnsafePickle(
                f"refused to rebuild an array of class {_r(cls)}: only numpy.ndarray is allowed"
            )
        if type(typecode) not in (bytes, str):
            raise UnsafePickle("refused numpy array typecode: expected a short type string")
        dtype = _canonical_dtype(np.dtype(typecode), self._kinds)
        shape = _check_shape(shape)
        self._budget.charge(math.prod(shape) * dtype.itemsize, f"an array of shape {shape}")
        arr = np.ndarray.__new__(_GuardedArray, shape, dtype)
        arr._budget = self._budget
        arr._settable = True
        return arr

    def _scalar(self, dtype: Any, data: Any = None) -> Any:
        dtype = _real_dtype(dtype, self._kinds)
        if type(data) is not bytes or len(data) != dtype.itemsize:
            raise UnsafePickle(
                f"refused numpy scalar of dtype {dtype}: expected {dtype.itemsize} bytes of data"
            )
        self._budget.charge(len(data), "a numpy scalar")
        return np.frombuffer(data, dtype=dtype)[0]

    def _frombuffer(
        self, buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
    ) -> Any:
        if type(buf) not in (bytes, bytearray):
            raise UnsafePickle(
                f"refused numpy array buffer of type {type(buf).__name__}: only in-band "
                "bytes are allowed (pickle with protocol 5 but without buffer_callback)"
            )
        dtype = _real_dtype(dtype, self._kinds)
        shape = _check_shape(shape)
        if order not in ("C", "F", "K"):
            raise UnsafePickle(f"refused numpy array order {_r(order)}")
        arr = np.frombuffer(buf, dtype=dtype)
        if order == "K" and axis_order is not None:
            axes = _check_shape(axis_order)
            if sorted(axes) != list(range(len(shape))):
                raise UnsafePickle(f"refused numpy axis order {_r(axis_order)}")
            arr = arr.reshape(shape, order="C").transpose(axes)
        else:
            arr = arr.reshape(shape, order="F" if order == "F" else "C")
        # guarded, so that a BUILD on it is refused rather than handed to numpy
        guarded = arr.view(_GuardedArray)
        guarded._settable = False
        return guarded

    def _encode(self, obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> Any:
        # Protocols 0-2 spell bytes as _codecs.encode(str, "latin1").
        if type(obj) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise UnsafePickle("refused _codecs.encode: only str.encode('latin1') is allowed")
        self._budget.charge(len(obj), "bytes")
        return obj.encode("latin1")

    def _set(self, items: Any = ()) -> Any:
        if type(items) not in (list, tuple, set, frozenset):
            raise UnsafePickle("refused set(): expected a list of items")
        self._budget.charge(8 * len(items), "a set")
        return set(items)

    def _frozenset(self, items: Any = ()) -> Any:
        if type(items) not in (list, tuple, set, frozenset):
            raise UnsafePickle("refused frozenset(): expected a list of items")
        self._budget.charge(8 * len(items), "a frozenset")
        return frozenset(items)

    def _complex(self, real: Any = 0.0, imag: Any = 0.0) -> Any:
        if type(real) not in (int, float) or type(imag) not in (int, float):
            raise UnsafePickle("refused complex(): expected two numbers")
        return complex(real, imag)

    def _bytes(self, source: Any = b"", *rest: Any) -> Any:
        # Protocols 0-2 spell b"" as bytes(). Never bytes(n), which allocates n bytes.
        if type(source) not in (bytes, bytearray) or rest:
            raise UnsafePickle("refused bytes(): expected bytes")
        self._budget.charge(len(source), "bytes")
        return bytes(source)

    def _bytearray(self, source: Any = b"", *rest: Any) -> Any:
        # Never bytearray(n): that would allocate n bytes the body did not pay for.
        if type(source) not in (bytes, bytearray) or rest:
            raise UnsafePickle("refused bytearray(): expected bytes")
        self._budget.charge(len(source), "a bytearray")
        return bytearray(source)


def _global(name: str, method: str) -> Callable[[_RestrictedUnpickler], _SafeGlobal]:
    def make(unpickler: _RestrictedUnpickler) -> _SafeGlobal:
        return _SafeGlobal(name, getattr(unpickler, method))

    return make


def _ndarray(unpickler: _RestrictedUnpickler) -> _SafeGlobal:
    return _NDARRAY


_ALLOWED_GLOBALS: Final[dict[tuple[str, str], Callable[[_RestrictedUnpickler], _SafeGlobal]]] = {
    ("numpy", "dtype"): _global("numpy.dtype", "_dtype"),
    ("numpy", "ndarray"): _ndarray,
    ("_codecs", "encode"): _global("_codecs.encode", "_encode"),
}
# numpy 1.x pickles name numpy.core, numpy 2.x numpy._core.
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _global(
        "numpy.ndarray", "_reconstruct"
    )
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _global("numpy scalar", "_scalar")
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _global(
        "numpy.frombuffer", "_frombuffer"
    )
# Protocols 0-2 name the builtins module __builtin__.
for _builtins in ("builtins", "__builtin__"):
    for _name in ("set", "frozenset", "complex", "bytes", "bytearray"):
        _ALLOWED_GLOBALS[(_builtins, _name)] = _global(_name, f"_{_name}")


# Opcode argument layouts, for the pre-scan. Values >= 0 are fixed argument sizes.
_LINE: Final = -1  # one newline-terminated argument
_LINE2: Final = -2  # two newline-terminated arguments (GLOBAL, INST)
_LEN1: Final = -3  # 1-byte length, then that many bytes
_LEN4: Final = -4  # 4-byte length
_LEN8: Final = -5  # 8-byte length
_LEN4S: Final = -9  # 4-byte signed length
_STOP: Final = -6
_FORBIDDEN: Final = -7
_UNKNOWN: Final = -8


def _opcode_table() -> list[int]:
    table = [_UNKNOWN] * 256

    def put(ops: bytes, kind: int) -> None:
        for op in ops:
            table[op] = kind

    put(b"(012NRbaeld}su)t]\x85\x86\x87\x88\x89\x81\x92o\x8f\x90\x91\x93\x94", 0)
    put(b"K\x80qh", 1)
    put(b"M", 2)
    put(b"Jjr", 4)
    put(b"G\x95", 8)
    put(b"ILFSVgp", _LINE)
    put(b"ci", _LINE2)
    put(b"UC\x8c\x8a", _LEN1)
    put(b"XB", _LEN4)
    put(b"T\x8b", _LEN4S)
    put(b"\x8d\x8e\x96", _LEN8)
    put(b".", _STOP)
    put(b"PQ\x82\x83\x84\x97\x98", _FORBIDDEN)
    return table


_OPCODES: Final = _opcode_table()
_FORBIDDEN_TEXT: Final = {
    ord("P"): "persistent ids",
    ord("Q"): "persistent ids",
    0x82: "copyreg extension codes",
    0x83: "copyreg extension codes",
    0x84: "copyreg extension codes",
    0x97: "out-of-band buffers (pickle without buffer_callback)",
    0x98: "out-of-band buffers (pickle without buffer_callback)",
}


def _scan_pickle(data: bytes) -> None:
    """Refuse opcodes we never accept and memo indices that would make the C unpickler
    allocate far more memory than the body holds (``LONG_BINPUT 2**30`` is 5 bytes that ask
    for gigabytes). Each memo entry takes at least one byte of pickle, so an index beyond its
    own offset (plus some slack) is refused. Truncation and other damage is left to the
    unpickler to report."""
    table = _OPCODES
    n = len(data)
    i = 0
    while i < n:
        op = data[i]
        kind = table[op]
        i += 1
        if kind >= 0:
            if op == 0x72:  # LONG_BINPUT
                index = int.from_bytes(data[i : i + 4], "little")
                if index > i + _MEMO_SLACK:
                    raise UnsafePickle(
                        f"refused pickle memo index {index} at byte {i - 1}: a pickle of "
                        f"{n} bytes cannot need it"
                    )
            i += kind
        elif kind == _LINE:
            end = data.find(b"\n", i)
            if end < 0:
                return
            if op == 0x70:  # PUT
                try:
                    index = int(data[i:end])
                except ValueError:
                    return  # let the unpickler report it
                if index > i + _MEMO_SLACK:
                    raise UnsafePickle(
                        f"refused pickle memo index {index} at byte {i - 1}: a pickle of "
                        f"{n} bytes cannot need it"
                    )
            i = end + 1
        elif kind == _LINE2:
            end = data.find(b"\n", i)
            end = data.find(b"\n", end + 1) if end >= 0 else -1
            if end < 0:
                return
            i = end + 1
        elif kind == _LEN1:
            if i >= n:
                return
            i += 1 + data[i]
        elif kind == _LEN4:
            i += 4 + int.from_bytes(data[i : i + 4], "little")
        elif kind == _LEN4S:
            size = int.from_bytes(data[i : i + 4], "little", signed=True)
            if size < 0:
                return  # the unpickler refuses negative sizes
            i += 4 + size
        elif kind == _LEN8:
            i += 8 + int.from_bytes(data[i : i + 8], "little")
        elif kind == _STOP:
            return
        elif kind == _FORBIDDEN:
            raise UnsafePickle(
                f"refused pickle opcode {bytes([op])!r} at byte {i - 1}: "
                f"{_FORBIDDEN_TEXT[op]} are not allowed"
            )
        else:
            raise WireError(
                f"body is not a valid pickle: unknown opcode {bytes([op])!r} at byte {i - 1}"
            )


_PLAIN_TYPES: Final = frozenset({str, int, float, bool, type(None), bytes, complex})


def _finish(value: Any, kinds: str, max_depth: int, *, in_place: bool) -> Any:
    """Check a value tree; return it with every array a plain ndarray and every dtype canonical.

    Refuses anything outside the allowed types, arrays with disallowed dtypes, nesting deeper
    than ``max_depth`` and self-referencing containers. Shared sub-values are visited once.
    With ``in_place``, changed dicts and lists are updated rather than copied (for values the
    caller owns, like a freshly loaded pickle).
    """
    done: dict[int, Any] = {}
    active: set[int] = set()
    plain = _PLAIN_TYPES
    builtin = _BUILTIN_DTYPES

    def visit(obj: Any, depth: int) -> Any:
        t = type(obj)
        if t in plain:
            return obj
        if t is np.ndarray:
            dtype: np.dtype[Any] = obj.dtype
            if not (builtin.get(id(dtype)) is dtype and dtype.kind in kinds):
                _canonical_dtype(dtype, kinds)
            return obj
        oid = id(obj)
        if oid in done:
            return done[oid]
        out: Any = obj
        if t is dict or t is list or t is tuple or t is set or t is frozenset:
            if depth >= max_depth:
                raise WireError(f"body is nested deeper than {max_depth} levels; send flatter data")
            if oid in active:
                raise WireError("body holds a container that contains itself; send plain data")
            active.add(oid)
            depth += 1
            if t is dict:
                changed = False
                items = []
                for k, v in obj.items():
                    k2 = k if type(k) is str else visit(k, depth)
                    v2 = visit(v, depth)
                    if k2 is not k or v2 is not v:
                        changed = True
                    items.append((k2, v2))
                if changed:
                    keys_same = all(k2 is k for (k2, _), k in zip(items, obj, strict=True))
                    if in_place and keys_same:
                        for k2, v2 in items:
                            obj[k2] = v2
                    else:
                        out = dict(items)
            else:
                new_items = [visit(item, depth) for item in obj]
                if any(a is not b for a, b in zip(new_items, obj, strict=True)):
                    if in_place and t is list:
                        obj[:] = new_items
                    else:
                        out = t(new_items)
            active.discard(oid)
        elif isinstance(obj, np.ndarray):
            out = _check_array(obj, kinds)
        elif isinstance(obj, np.generic):
            _canonical_dtype(obj.dtype, kinds)
        elif isinstance(obj, np.dtype) or t is _DtypeProxy:
            out = _real_dtype(obj, kinds)
        elif t is not bytearray:
            raise UnsafePickle(f"refused a value of type {t.__module__}.{t.__qualname__}")
        done[oid] = out
        return out

    return visit(value, 0)


def safe_loads(
    data: bytes,
    *,
    array_kinds: str = REQUEST_ARRAY_KINDS,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Unpickle ``data`` allowing only numpy arrays, dtypes, scalars and plain values.

    Handles pickle protocols 0 to 5 (protocol 5 with in-band buffers), and the global names of
    numpy 1.x (``numpy.core``) and 2.x (``numpy._core``). Arrays come back as plain
    :class:`numpy.ndarray`; one built from an in-band ``bytes`` buffer may be read-only.

    :param data: the pickle.
    :param array_kinds: the numpy dtype kinds allowed for arrays and scalars
        (:data:`REQUEST_ARRAY_KINDS` or :data:`RESPONSE_ARRAY_KINDS`).
    :param max_depth: the deepest container nesting allowed.
    :raises UnsafePickle: for a forbidden global (the message names it, e.g. ``posix.system``),
        an object or structured dtype, or a pickle built to exhaust memory.
    :raises WireError: for bytes that are not a valid pickle, or data nested too deeply.

    Example::

        >>> safe_loads(pickle.dumps({"x": np.arange(3)}))["x"]
        array([0, 1, 2])
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"safe_loads expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise WireError("body is not a valid pickle: it is empty")
    _scan_pickle(data)
    unpickler = _RestrictedUnpickler(io.BytesIO(data), kinds=array_kinds, nbytes=len(data))
    try:
        value = unpickler.load()
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside the unpickler is bad input
        raise WireError(f"body is not a valid pickle: {_short(e)}") from None
    return _finish(value, array_kinds, max_depth, in_place=True)


def _r(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: messages may quote what a hostile body sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# JSON and npz


def _json_value(value: Any, where: str, string_arrays: bool) -> Any:
    """A JSON value as the server sees it: lists of numbers become arrays, lists of strings
    stay lists (or become str arrays in responses), scalars stay Python values."""
    if isinstance(value, dict):
        return {k: _json_value(v, f"{where}[{_r(k)}]", string_arrays) for k, v in value.items()}
    if not isinstance(value, list):
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise WireError(
            f"value for {where} is not a rectangular list of numbers ({_short(e, 120)}); "
            "every row must have the same length"
        ) from None
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind == "U" and _all_leaves(value, str):
        return arr if string_arrays else value
    if arr.dtype.kind == "O" and _all_leaves(value, int):
        raise WireError(f"value for {where} holds an integer outside the int64 range")
    raise WireError(
        f"value for {where} mixes numbers, strings, nulls or objects; send a list of numbers "
        "(nested to any depth) or a list of strings"
    )


def _all_leaves(value: Any, kind: type) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, kind) or isinstance(item, bool) != (kind is bool):
            return False
    return True


def _json_loads(body: bytes, string_arrays: bool) -> Any:
    try:
        value = json.loads(body)
    except RecursionError:
        raise WireError("body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:
        raise WireError(f"body is not valid JSON: {_short(e)}") from None
    if isinstance(value, dict):
        try:
            return {k: _json_value(v, _r(k), string_arrays) for k, v in value.items()}
        except RecursionError:
            raise WireError("body is not valid JSON: it is nested too deeply") from None
    return value


def _npz_loads(body: bytes, kinds: str, max_decoded_bytes: int) -> dict[str, Any]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise WireError(f"body is not a valid npz file: {_short(e)}") from None
    with zf:
        infos = zf.infolist()
        total = sum(info.file_size for info in infos)
        if total > max_decoded_bytes:
            raise WireError(
                f"npz body expands to {total} bytes, more than the limit of "
                f"{max_decoded_bytes}; send fewer examples per request"
            )
        out: dict[str, Any] = {}
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            try:
                buf = bytearray(info.file_size)
                view = memoryview(buf)
                got = 0
                with zf.open(info) as f:
                    while got < len(buf):
                        chunk = f.read(min(1 << 22, len(buf) - got))
                        if not chunk:
                            break
                        view[got : got + len(chunk)] = chunk
                        got += len(chunk)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise WireError(f"npz member {_r(info.filename)} is damaged: {_short(e)}") from None
            out[key] = _npy_array(view[:got], info.filename, kinds)
        return out


def _npy_array(buf: memoryview, name: str, kinds: str) -> np.ndarray[Any, Any]:
    """One ``.npy`` member, checked before any memory is allocated for it."""
    fmt = np.lib.format
    # The header is small; copy only its neighbourhood, not the data.
    stream = io.BytesIO(bytes(buf[: 1 << 16]))
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - any header failure is bad input
        raise WireError(f"npz member {_r(name)} is not a valid .npy array: {_short(e)}") from None
    dtype = _canonical_dtype(dtype, kinds)
    shape = _check_shape(shape)
    offset = stream.tell()
    count = math.prod(shape)
    if len(buf) - offset != count * dtype.itemsize:
        raise WireError(
            f"npz member {_r(name)} holds {len(buf) - offset} bytes of data, but its header "
            f"says {count * dtype.itemsize} (shape {shape}, dtype {dtype})"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


# --------------------------------------------------------------------------------------------
# requests and responses


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower-case, without parameters."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def request_format(content_type: str | None) -> str:
    """The wire format a request's ``Content-Type`` names.

    :raises UnsupportedMediaType: for any type but pickle, octet-stream, JSON, npz or none.
    """
    media = media_type(content_type)
    if not media:
        return "pickle"
    fmt = REQUEST_FORMATS.get(media)
    if fmt is None:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {_r(content_type)}: send a pickled dict as "
            f"{PICKLE} (or {OCTET_STREAM}, or no Content-Type), a JSON object as {JSON}, "
            f"or numpy.savez output as {NPZ}"
        )
    return fmt


def _check_top(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        got = type(value).__name__
        if isinstance(value, np.ndarray):
            got = f"a numpy array of shape {value.shape}"
        raise WireError(
            f"{what} must be a dict of str keys to values, got {got}; "
            "for example {'x': np.array([...])}"
        )
    for key in value:
        if type(key) is not str:
            raise WireError(
                f"{what} must be a dict of str keys to values, got a dict with the "
                f"{type(key).__name__} key {_r(key)}"
            )
    return value


def _decode(
    body: bytes,
    fmt: str,
    kinds: str,
    max_decoded_bytes: int,
    string_arrays: bool,
    what: str,
) -> dict[str, Any]:
    if fmt == "pickle":
        value = safe_loads(body, array_kinds=kinds)
    elif fmt == "json":
        value = _json_loads(body, string_arrays)
    else:
        value = _npz_loads(body, kinds, max_decoded_bytes)
    return _check_top(value, what)


def decode_request(
    body: bytes,
    content_type: str | None,
    *,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> tuple[dict[str, Any], str]:
    """Decode a ``POST /`` body into ``(data, format)``.

    ``format`` is ``"pickle"``, ``"json"`` or ``"npz"``. Pickles go through
    :func:`safe_loads`. JSON lists of numbers become arrays (``int64`` when every number is an
    int, ``float64`` when any is a float, ``bool`` for all-bool lists; the server casts to the
    model's dtype), lists of strings stay lists, scalars stay Python values. npz members are
    read with no pickle, each checked against its declared size first.

    :param body: the request body.
    :param content_type: the ``Content-Type`` header, parameters allowed (``; charset=utf-8``).
    :param max_decoded_bytes: the most bytes an npz body may expand to.
    :raises UnsupportedMediaType: for an unknown content type (HTTP 415).
    :raises UnsafePickle: for a pickle that asks for anything but data (HTTP 400).
    :raises WireError: for an empty, damaged or non-dict body (HTTP 400).
    """
    fmt = request_format(content_type)
    if not body:
        raise WireError(
            "empty request body: POST a pickled dict of numpy arrays, e.g. "
            "pickle.dumps({'x': np.zeros((1, 8), np.float32)}), or a JSON object"
        )
    return _decode(body, fmt, REQUEST_ARRAY_KINDS, max_decoded_bytes, False, "the request"), fmt


_ACCEPT_FORMATS: Final[dict[str, str]] = {
    PICKLE: "pickle",
    OCTET_STREAM: "pickle",
    "application/pickle": "pickle",
    "application/python-pickle": "pickle",
    JSON: "json",
    NPZ: "npz",
}


def response_format(accept: str | None, request_format: str) -> str:
    """The response format for an ``Accept`` header.

    The media range with the highest ``q`` wins; ties go to the request's format, then to the
    first listed. No header, ``*/*``, ``application/*``, or only types we cannot produce (a
    browser's ``text/html``) mean the request's own format.
    """
    if not accept:
        return request_format
    best: str | None = None
    best_q = 0.0
    for part in accept.split(","):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, val = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(val.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0 or math.isnan(q):
                    q = 0.0
        if q <= 0.0:
            continue
        if media in ("*/*", "application/*"):
            fmt = request_format
        else:
            found = _ACCEPT_FORMATS.get(media)
            if found is None:
                continue
            fmt = found
        if q > best_q or (q == best_q and fmt == request_format and best != request_format):
            best, best_q = fmt, q
    return best or request_format


def _json_default(error: type[WireError]) -> Callable[[Any], Any]:
    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind == "c" or obj.dtype.kind not in RESPONSE_ARRAY_KINDS:
                raise error(
                    f"JSON cannot carry a numpy array of dtype {obj.dtype}; ask for "
                    f"{PICKLE} or {NPZ} instead"
                )
            if obj.dtype.kind == "S":
                raise error(f"JSON cannot carry bytes; ask for {PICKLE} or {NPZ} instead")
            return obj.tolist()
        if isinstance(obj, np.generic):
            if obj.dtype.kind in "cSV" or obj.dtype.hasobject:
                raise error(
                    f"JSON cannot carry a numpy {obj.dtype} scalar; ask for {PICKLE} instead"
                )
            return obj.item()
        if isinstance(obj, np.dtype):
            return str(obj)
        if isinstance(obj, (set, frozenset)):
            return list(obj)
        raise error(
            f"JSON cannot carry a value of type {type(obj).__name__}; ask for {PICKLE} instead"
        )

    return default


def _encode(data: dict[str, Any], fmt: str, error: type[WireError]) -> tuple[bytes, str]:
    if fmt == "pickle":
        return pickle.dumps(data, protocol=PICKLE_PROTOCOL), PICKLE
    if fmt == "json":
        try:
            text = json.dumps(data, default=_json_default(error), separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise error(f"cannot encode as JSON: {_short(e)}; ask for {PICKLE}") from None
        return text.encode("utf-8"), JSON
    if fmt == "npz":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in data.items():
                try:
                    arr = np.asarray(value)
                except (ValueError, TypeError) as e:
                    raise error(
                        f"npz cannot carry the {type(value).__name__} under {_r(key)} "
                        f"({_short(e, 80)}); ask for {PICKLE} instead"
                    ) from None
                if arr.dtype.hasobject or arr.dtype.kind not in RESPONSE_ARRAY_KINDS:
                    raise error(
                        f"npz can only carry arrays of numbers or strings, not the "
                        f"{type(value).__name__} under {_r(key)}; ask for {PICKLE} instead"
                    )
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
        return buf.getvalue(), NPZ
    raise ValueError(f"unknown wire format {fmt!r}: use one of {', '.join(FORMATS)}")


def _check_outgoing(data: Any, kinds: str, error: type[WireError], what: str) -> dict[str, Any]:
    """``data`` checked as :func:`safe_loads` would check it on the other side, with array
    subclasses turned into plain arrays (a copy where needed: ``data`` is not changed)."""
    if type(data) is not dict or not all(type(k) is str for k in data):
        raise error(f"{what} must be a dict of str keys, got {type(data).__name__}")
    try:
        out: dict[str, Any] = _finish(data, kinds, MAX_DEPTH, in_place=False)
    except WireError as e:
        raise error(f"{what} cannot be sent: {e}") from None
    return out


def encode_response(data: dict[str, Any], fmt: str) -> tuple[bytes, str]:
    """Encode a response dict as ``(body, content_type)`` in ``fmt``.

    Pickles use protocol 5 with in-band buffers; JSON turns arrays into nested lists and numpy
    scalars into Python numbers (non-finite floats are written ``NaN``/``Infinity``, as
    Python's json module reads them); npz writes each key as an ``.npy`` member without pickle.

    :raises UnencodableResponse: when a value is not data (an object array, a custom class).
    :raises NotAcceptable: when ``fmt`` cannot carry a value (complex numbers or bytes in
        JSON, nested dicts in npz).
    """
    data = _check_outgoing(data, RESPONSE_ARRAY_KINDS, UnencodableResponse, "the model's output")
    return _encode(data, fmt, NotAcceptable)


def encode_request(data: dict[str, Any], fmt: str = "pickle") -> tuple[bytes, str]:
    """Encode a request dict as ``(body, content_type)``: the client side of
    :func:`decode_request`.

    :raises WireError: when a value cannot be sent in ``fmt``.
    :raises ValueError: for an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown wire format {fmt!r}: use one of {', '.join(FORMATS)}")
    data = _check_outgoing(data, REQUEST_ARRAY_KINDS, WireError, "the request")
    return _encode(data, fmt, WireError)


def decode_response(
    body: bytes,
    content_type: str | None,
    *,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> dict[str, Any]:
    """Decode a successful response body; the client side of :func:`encode_response`.

    As restricted as :func:`decode_request` (a hostile server cannot run code on the client),
    but arrays of fixed-width strings are allowed (class labels). JSON lists become arrays.

    :raises WireError: for a body that is not a dict in a known format.
    """
    media = media_type(content_type)
    fmt = _ACCEPT_FORMATS.get(media, "pickle" if not media else "")
    if not fmt:
        raise WireError(f"the server answered with unsupported Content-Type {_r(content_type)}")
    if not body:
        raise WireError("the server answered with an empty body")
    return _decode(body, fmt, RESPONSE_ARRAY_KINDS, max_decoded_bytes, True, "the response")


def error_body(error_type: str, message: str, keys: dict[str, str] | None = None) -> bytes:
    """The JSON error body: ``{"error": {"type": ..., "message": ..., "keys": {...}}}``."""
    payload = {
        "error": {
            "type": error_type,
            "message": message,
            "keys": {str(k): str(v) for k, v in (keys or {}).items()},
        }
    }
    return json.dumps(payload).encode("utf-8")


def parse_error_body(body: bytes) -> tuple[str, str, dict[str, str]] | None:
    """``(type, message, keys)`` from an :func:`error_body`, or None if it is not one."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return None
    keys = err.get("keys")
    keys = {str(k): str(v) for k, v in keys.items()} if isinstance(keys, dict) else {}
    return str(err.get("type") or "error"), err["message"], keys
