"""The common response, a dict of str keys to plain numeric arrays, pickled without a Pickler.

:func:`pickle.dumps` spends most of a small response's time outside the array's bytes: a
Pickler per call, the array's ``__reduce_ex__`` and its dtype's ``__reduce__`` (both Python
code in numpy), and the lookups that check each global's name. :func:`dumps_arrays` writes the
same objects' opcodes directly (protocol 5, in-band buffers), with each dtype's part built once
and kept: what any unpickler, numpy's own included, rebuilds exactly as it rebuilds
``pickle.dumps(data, protocol=5)`` (the same globals: numpy's ``_frombuffer`` and
``numpy.dtype``; no memo, which no reader needs). Anything else (another value type, an array
that is not C-contiguous, an object, structured or sub-array dtype) returns None and the caller
pickles it with :func:`pickle.dumps`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

__all__ = ["dumps_arrays"]

#: the dtype kinds written here: booleans and numbers (strings and the rest go to pickle)
_KINDS = frozenset("biufc")

_PROTO = b"\x80\x05"
_EMPTY_DICT = b"}"
_MARK = b"("
_SETITEMS_STOP = b"u."
_TUPLE_REDUCE = b"tR"
_ORDER_C = b"\x8c\x01C"
_pack_i = struct.Struct("<i").pack
_pack_q = struct.Struct("<Q").pack


def _str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    n = len(raw)
    if n < 256:
        return b"\x8c" + bytes((n,)) + raw  # SHORT_BINUNICODE
    return b"X" + _pack_i(n) + raw  # BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes((v,))  # BININT1
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)  # BININT2
    if -(2**31) <= v < 2**31:
        return b"J" + _pack_i(v)  # BININT
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes((len(raw),)) + raw  # LONG1 (a shape never needs more)


def _value(v: Any) -> bytes:
    """The few values a dtype's reduce and a shape hold: None, bools, ints, str, tuples."""
    if v is None:
        return b"N"
    if v is True:
        return b"\x88"
    if v is False:
        return b"\x89"
    if type(v) is int:
        return _int(v)
    if type(v) is str:
        return _str(v)
    if type(v) is tuple:
        return _tuple(v)
    raise TypeError(f"not written here: {type(v).__name__}")


def _tuple(t: tuple[Any, ...]) -> bytes:
    body = b"".join(_value(x) for x in t)
    n = len(t)
    if n == 0:
        return b")"  # EMPTY_TUPLE
    if n <= 3:
        return body + (b"\x85", b"\x86", b"\x87")[n - 1]  # TUPLE1-3
    return _MARK + body + b"t"  # TUPLE


def _frombuffer_global() -> bytes:
    """numpy's own reconstructor for a protocol-5 array, by the name numpy pickles it under."""
    func: Any = np.zeros(1).__reduce_ex__(5)[0]
    return _global(func.__module__, func.__name__)


_FROMBUFFER = _frombuffer_global()
_DTYPE_GLOBAL = _global(np.dtype.__module__, "dtype")
_DTYPES: dict[np.dtype[Any], bytes] = {}
_SHAPES: dict[tuple[int, ...], bytes] = {}


def _dtype_bytes(dtype: np.dtype[Any]) -> bytes | None:
    """The dtype's pickle (``numpy.dtype(*args)`` then its state), built once per dtype."""
    found = _DTYPES.get(dtype)
    if found is not None:
        return found
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        return None
    reduced: Any = dtype.__reduce__()
    cls, args, state = reduced
    if cls is not np.dtype:  # pragma: no cover - a numpy that reduces dtypes otherwise
        return None
    try:
        raw = _DTYPE_GLOBAL + _tuple(args) + b"R" + _tuple(state) + b"b"  # REDUCE, BUILD
    except TypeError:  # pragma: no cover - a state with other values
        return None
    if len(_DTYPES) < 256:
        _DTYPES[dtype] = raw
    return raw


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    found = _SHAPES.get(shape)
    if found is None:
        found = _tuple(shape)
        if len(_SHAPES) < 1024:
            _SHAPES[shape] = found
    return found


def dumps_arrays(data: dict[str, Any]) -> bytes | None:
    """``data`` pickled (protocol 5) if it is a dict of str keys to C-contiguous arrays of
    booleans or numbers, else None (the caller uses :func:`pickle.dumps`)."""
    parts = [_PROTO, _EMPTY_DICT, _MARK]
    append = parts.append
    for key, value in data.items():
        if type(key) is not str or type(value) is not np.ndarray:
            return None
        if not value.flags.c_contiguous:
            return None
        dtype = _dtype_bytes(value.dtype)
        if dtype is None:
            return None
        raw = value.tobytes()
        append(_str(key))
        append(_FROMBUFFER)
        append(_MARK)
        append(b"\x96" + _pack_q(len(raw)))  # BYTEARRAY8: a writable buffer, as numpy's own
        append(raw)
        append(dtype)
        append(_shape_bytes(value.shape))
        append(_ORDER_C)
        append(_TUPLE_REDUCE)
    append(_SETITEMS_STOP)
    return b"".join(parts)
