"""The restricted unpickler: the one place a pickled body turns into Python values.

**Pickles are never loaded with** :func:`pickle.loads`. :func:`safe_loads` uses a restricted
unpickler that builds only numpy arrays (numeric or bool dtypes, never object), numpy dtypes and
scalars, and plain values and containers (dict, list, tuple, set, frozenset, str, bytes,
bytearray, int, float, complex, bool, None). Any other global is refused with
:class:`~studioserve.errors.UnsafePickle`; so are object arrays however the pickle tries to build
them, forged dtypes, out-of-band buffers, memo indices that would allocate memory the body does
not pay for, pickles that would build more than their decode budget, arrays whose shape
spans more elements than that budget, more dict keys than ``max_keys``, and values nested deeper
than :data:`MAX_DEPTH`.

Everything here is one security boundary, and reads best together:

- an opcode pre-scan (:func:`_scan_pickle`) refuses persistent ids, extension codes,
  out-of-band buffers and memo indices the body cannot need, and charges the request's decode
  budget (:mod:`studioserve.wire.budget`) what every opcode will allocate, before the C
  unpickler runs;
- :class:`_RestrictedUnpickler` hands out checking stand-ins (:class:`_SafeGlobal`) for the few
  globals numpy and the standard library pickle data with, and never a real type;
- ``numpy.dtype`` yields a :class:`_DtypeProxy` and arrays are :class:`_GuardedArray`, so a
  pickle's ``BUILD`` never reaches numpy's trusting ``__setstate__``;
- the same budget is charged what those stand-ins copy and allocate (arrays, bytes, sets), so
  the total stays within it however often a pickle calls them on one memoized value;
- :func:`check_tree` walks the result and returns only plain, checked values. The encoders in
  :mod:`studioserve.wire.formats` use it too, so that nothing is sent that this side would
  refuse on the other.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from ..errors import PickleTooLarge, TooManyKeys, UnsafePickle, WireError
from ._checks import (
    BUILTIN_DTYPES,
    canonical_dtype,
    check_extent,
    check_shape,
    refuse_dtype,
    short_error,
    short_repr,
)
from .budget import Budget, DecodeLimits

#: numpy dtype kinds a request may carry: bool, signed and unsigned int, float, complex.
REQUEST_ARRAY_KINDS: Final = "biufc"
#: numpy dtype kinds a response may carry: also fixed-width unicode and byte strings (labels).
RESPONSE_ARRAY_KINDS: Final = "biufcUS"
#: The deepest nesting of containers a body may have.
MAX_DEPTH: Final = 64

# How far a memo index may exceed its byte offset before it looks like an allocation attack.
_MEMO_SLACK: Final = 1024
_ALLOWED_SUMMARY: Final = "only numpy arrays, dtypes, scalars and plain containers are allowed"


# --------------------------------------------------------------------------------------------
# array checks and the allocation budget's charges


def _check_array(arr: np.ndarray[Any, Any], kinds: str) -> np.ndarray[Any, Any]:
    """``arr`` as a plain :class:`numpy.ndarray` with an allowed dtype, or an error."""
    canonical_dtype(arr.dtype, kinds)
    return arr if type(arr) is np.ndarray else arr.view(np.ndarray)


def _charge(budget: Budget, nbytes: int, what: str) -> None:
    """Charge what one of our globals is about to copy or allocate while unpickling.

    The pre-scan charged the C unpickler's own objects; our globals copy data
    (``_codecs.encode``, ``bytearray``, array states), and a pickle can call them again and
    again on one memoized value. Charging every copy keeps the total within the budget.
    """
    budget.left -= nbytes
    if budget.left < 0:
        raise PickleTooLarge(
            f"refused {what}: the pickle builds far more data than its body holds (more than "
            f"the decode budget of {budget.limit} bytes for a body of {budget.length} bytes, "
            f"{budget.limits.rule()})",
            limit=budget.limit,
            length=budget.length,
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
    :func:`check_tree`, swap the real dtype in.
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
            raise refuse_dtype(d, RESPONSE_ARRAY_KINDS, "structured")
        if order not in ("<", ">", "|", "=") or type(order) is not str:
            raise UnsafePickle(
                f"refused numpy dtype state for {d}: bad byte order {short_repr(order)}"
            )
        if type(elsize) is not int or elsize not in (-1, d.itemsize):
            raise refuse_dtype(d, RESPONSE_ARRAY_KINDS, "forged size")
        if type(alignment) is not int or alignment not in (-1, d.alignment):
            raise refuse_dtype(d, RESPONSE_ARRAY_KINDS, "forged alignment")
        if type(flags) is not int or flags != d.flags:
            raise refuse_dtype(d, RESPONSE_ARRAY_KINDS, "forged flags")
        if order in "<>" and d.byteorder != "|":
            self.dtype = d.newbyteorder("<" if order == "<" else ">")
        self.built = True

    def __reduce__(self) -> Any:
        raise TypeError("a dtype placeholder cannot be pickled")


def _real_dtype(dtype: Any, kinds: str) -> np.dtype[Any]:
    """The checked numpy dtype behind a value the pickle passed where a dtype belongs."""
    if type(dtype) is _DtypeProxy:
        dtype = dtype.dtype
    return canonical_dtype(dtype, kinds)


class _GuardedArray(np.ndarray):  # type: ignore[type-arg]
    """The arrays our globals return while unpickling. Their ``__setstate__`` (the pickle's
    ``BUILD``) checks the dtype, shape and data before numpy's own sees them, and runs at most
    once, only on a fresh ``_reconstruct`` array. Every guarded array is turned back into a
    plain ndarray before :func:`safe_loads` returns."""

    _budget: Budget
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
        shape = check_shape(shape)
        check_extent(shape, self._budget.limit)
        dtype = _real_dtype(dtype, RESPONSE_ARRAY_KINDS)
        if type(fortran) not in (bool, int):
            raise UnsafePickle("refused numpy array state: the order flag is not a bool")
        if type(raw) not in (bytes, bytearray):
            raise UnsafePickle(
                f"refused numpy array state: data is {type(raw).__name__}, not bytes "
                "(object arrays are not allowed)"
            )
        _charge(self._budget, len(raw), "numpy array data")
        super().__setstate__((*head, shape, dtype, bool(fortran), raw))


class _RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose ``find_class`` only knows the globals numpy and the
    standard library use to pickle arrays, dtypes, scalars and plain containers."""

    def __init__(self, file: io.BytesIO, *, kinds: str, budget: Budget) -> None:
        super().__init__(file)
        self._builders = _Builders(kinds, budget)

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            what = f"{module}.{name}"
            if len(what) > 100:
                what = what[:97] + "..."
            raise UnsafePickle(f"refused to unpickle {what}: {_ALLOWED_SUMMARY}")
        return factory(self._builders)


class _Builders:
    """What the allowed globals do, for one unpickling. Apart from the unpickler, so that the
    stand-ins its memo and stack hold never point back at it: no reference cycle, and the
    unpickler's objects are freed the moment it is dropped, even after an error."""

    __slots__ = ("_budget", "_kinds")

    def __init__(self, kinds: str, budget: Budget) -> None:
        self._kinds = kinds
        self._budget = budget

    def _dtype(self, obj: Any, align: Any = False, copy: Any = True, *rest: Any) -> Any:
        if type(obj) is not str or rest:
            raise UnsafePickle(
                "refused numpy.dtype call: only a type string like 'f4' is allowed here"
            )
        if type(align) not in (bool, int) or type(copy) not in (bool, int):
            raise UnsafePickle("refused numpy.dtype call: align and copy must be bools")
        dtype = np.dtype(obj, bool(align))
        if dtype.kind not in self._kinds or dtype.hasobject:
            raise refuse_dtype(dtype, self._kinds)
        if dtype.names is not None or dtype.subdtype is not None:
            raise refuse_dtype(dtype, self._kinds, "structured")
        _charge(self._budget, _GLOBAL, "a numpy dtype")
        return _DtypeProxy(dtype)

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> Any:
        if cls is not _NDARRAY:
            raise UnsafePickle(
                f"refused to rebuild an array of class {short_repr(cls)}: only numpy.ndarray "
                "is allowed"
            )
        if type(typecode) not in (bytes, str):
            raise UnsafePickle("refused numpy array typecode: expected a short type string")
        dtype = canonical_dtype(np.dtype(typecode), self._kinds)
        shape = check_shape(shape)
        _charge(
            self._budget, _ARRAY + math.prod(shape) * dtype.itemsize, f"an array of shape {shape}"
        )
        check_extent(shape, self._budget.limit)
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
        _charge(self._budget, _ARRAY + len(data), "a numpy scalar")
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
        shape = check_shape(shape)
        check_extent(shape, self._budget.limit)
        _charge(self._budget, 3 * _ARRAY, "an array view")
        if order not in ("C", "F", "K"):
            raise UnsafePickle(f"refused numpy array order {short_repr(order)}")
        arr = np.frombuffer(buf, dtype=dtype)
        if order == "K" and axis_order is not None:
            axes = check_shape(axis_order)
            if sorted(axes) != list(range(len(shape))):
                raise UnsafePickle(f"refused numpy axis order {short_repr(axis_order)}")
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
        _charge(self._budget, _BYTES + len(obj), "bytes")
        return obj.encode("latin1")

    def _set(self, items: Any = ()) -> Any:
        if type(items) not in (list, tuple, set, frozenset):
            raise UnsafePickle("refused set(): expected a list of items")
        _charge(self._budget, _SET + _SET_ITEM * len(items), "a set")
        return set(items)

    def _frozenset(self, items: Any = ()) -> Any:
        if type(items) not in (list, tuple, set, frozenset):
            raise UnsafePickle("refused frozenset(): expected a list of items")
        _charge(self._budget, _SET + _SET_ITEM * len(items), "a frozenset")
        return frozenset(items)

    def _complex(self, real: Any = 0.0, imag: Any = 0.0) -> Any:
        if type(real) not in (int, float) or type(imag) not in (int, float):
            raise UnsafePickle("refused complex(): expected two numbers")
        _charge(self._budget, _FLOAT + 8, "a complex")
        return complex(real, imag)

    def _bytes(self, source: Any = b"", *rest: Any) -> Any:
        # Protocols 0-2 spell b"" as bytes(). Never bytes(n), which allocates n bytes.
        if type(source) not in (bytes, bytearray) or rest:
            raise UnsafePickle("refused bytes(): expected bytes")
        _charge(self._budget, _BYTES + len(source), "bytes")
        return bytes(source)

    def _bytearray(self, source: Any = b"", *rest: Any) -> Any:
        # Never bytearray(n): that would allocate n bytes the body did not pay for.
        if type(source) not in (bytes, bytearray) or rest:
            raise UnsafePickle("refused bytearray(): expected bytes")
        _charge(self._budget, _BYTEARRAY + len(source), "a bytearray")
        return bytearray(source)


def _global(name: str, method: str) -> Callable[[_Builders], _SafeGlobal]:
    def make(builders: _Builders) -> _SafeGlobal:
        return _SafeGlobal(name, getattr(builders, method))

    return make


def _ndarray(builders: _Builders) -> _SafeGlobal:
    return _NDARRAY


_ALLOWED_GLOBALS: Final[dict[tuple[str, str], Callable[[_Builders], _SafeGlobal]]] = {
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


# --------------------------------------------------------------------------------------------
# the opcode pre-scan: forbidden opcodes, memo indices, and what the C unpickler will allocate


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

# What the C unpickler (and check_tree after it) allocates, in bytes, from above: CPython's
# object sizes with their allocator and growth overheads, measured with tracemalloc
# (tests/wire/test_fuzz_decoders.py holds every accepted pickle to its budget).
_SLOT: Final = 12  # one unpickler stack slot (the stack grows by 1/8 and may move)
_MARK: Final = 32  # one entry of the mark stack, and the scan's own entry for it
_MEMO: Final = 16  # one memo table slot (the table doubles)
_CHECK: Final = 112  # check_tree's bookkeeping for one container (its done/active entries)
_ITEM: Final = 16  # one list or tuple entry (with growth), and check_tree's copy of it
_PAIR: Final = 240  # one dict entry (table growth), and check_tree's (key, value) pair
_SET_ITEM: Final = 96  # one set entry (table growth), and check_tree's copy of it
_LIST: Final = 56
_DICT: Final = 64
_SET: Final = 216
_TUPLE: Final = 40
_INT: Final = 32
_FLOAT: Final = 24
_STR: Final = 80
_BYTES: Final = 40
_BYTEARRAY: Final = 64
_CALL: Final = 160  # what a call or BUILD makes that our globals do not charge themselves
_ARRAY: Final = 112  # a numpy array object without its data
_GLOBAL: Final = 256  # a global's stand-in and its module and name strings

# Zero-argument opcodes whose stack effect does not depend on marks: (cost, stack change).
_PLAIN_OPS: Final[dict[int, tuple[int, int]]] = {
    ord("N"): (_SLOT, 1),
    0x88: (_SLOT, 1),  # NEWTRUE
    0x89: (_SLOT, 1),  # NEWFALSE
    ord(")"): (_SLOT, 1),
    ord("]"): (_LIST + _SLOT + _CHECK, 1),
    ord("}"): (_DICT + _SLOT + _CHECK, 1),
    0x8F: (_SET + _SLOT + _CHECK, 1),  # EMPTY_SET
    ord("2"): (_SLOT, 1),  # DUP
    0x94: (_MEMO, 0),  # MEMOIZE
    0x85: (_TUPLE + 8 + _CHECK, 0),  # TUPLE1
    0x86: (_TUPLE + 16 + _CHECK, -1),  # TUPLE2
    0x87: (_TUPLE + 24 + _CHECK, -2),  # TUPLE3
    ord("a"): (_ITEM, -1),  # APPEND
    ord("s"): (_PAIR, -2),  # SETITEM
    ord("R"): (_CALL, -1),  # REDUCE
    ord("b"): (_CALL, -1),  # BUILD
    0x81: (_CALL, -1),  # NEWOBJ
    0x92: (_CALL, -2),  # NEWOBJ_EX
    0x93: (_GLOBAL, -1),  # STACK_GLOBAL
}
# MARK then at once the opcode that pops it: an empty group, like a zero-argument opcode.
_EMPTY_GROUPS: Final[dict[int, tuple[int, int]]] = {
    ord("t"): (_SLOT, 1),  # (t: the empty tuple
    ord("l"): (_LIST + _SLOT + _CHECK, 1),
    ord("d"): (_DICT + _SLOT + _CHECK, 1),
    0x91: (_SET + _SLOT + _CHECK, 1),  # FROZENSET
    ord("e"): (0, 0),
    ord("u"): (0, 0),
    0x90: (0, 0),  # ADDITEMS
    ord("1"): (0, 0),  # POP_MARK
}
_PLAIN_COST: Final = [_PLAIN_OPS.get(op, (-1, 0))[0] for op in range(256)]
_PLAIN_DELTA: Final = [_PLAIN_OPS.get(op, (0, 0))[1] for op in range(256)]
_GROUP_COST: Final = [_EMPTY_GROUPS.get(op, (-1, 0))[0] for op in range(256)]
_GROUP_DELTA: Final = [_EMPTY_GROUPS.get(op, (0, 0))[1] for op in range(256)]
# A run of plain opcodes and empty groups is costed at C speed, a window at a time: its bytes
# are counted with numpy (a MARK in a run is always the first half of an empty group and costs
# nothing itself; the group's opcode carries the group's cost).
_RUN_COST: Final = np.array(
    [max(_PLAIN_COST[op], _GROUP_COST[op], 0) for op in range(256)], dtype=np.int64
)
_RUN_DELTA: Final = np.array(
    [_PLAIN_DELTA[op] + _GROUP_DELTA[op] for op in range(256)], dtype=np.int64
)
_RUN_BYTES: Final = re.compile(  # a character class: matched without backtracking state
    b"[" + b"".join(re.escape(bytes([op])) for op in [*_PLAIN_OPS, 0x28, *_EMPTY_GROUPS]) + b"]+"
)
_IS_MARK: Final = np.zeros(256, dtype=bool)
_IS_MARK[0x28] = True
_IS_GROUP: Final = np.zeros(256, dtype=bool)
_IS_GROUP[list(_EMPTY_GROUPS)] = True
_MARKS: Final = re.compile(rb"\(+")
_RUN_AFTER: Final = 32  # plain opcodes in a row before the rest of the run is costed at once
_RUN_WINDOW: Final = 1 << 16


def _run(data: bytes, i: int, n: int) -> tuple[int, int, int]:
    """``(length, cost, stack change)`` of the run of plain opcodes and empty groups at ``i``,
    at most one window long."""
    match = _RUN_BYTES.match(data, i, min(n, i + _RUN_WINDOW))
    if match is None:
        return 0, 0, 0
    seg = np.frombuffer(data, np.uint8, match.end() - i, i)
    mark = _IS_MARK[seg]
    group = _IS_GROUP[seg]
    # every group opcode follows a MARK and every MARK precedes one, or the run ends there
    bad = np.empty(len(seg) + 1, dtype=bool)
    bad[0] = group[0]
    bad[1:-1] = group[1:] != mark[:-1]
    bad[-1] = True  # the end of the match
    end = int(np.argmax(bad))
    if mark[-1] if end == len(seg) else not group[end]:
        end -= 1  # a MARK without its group opcode: the run ends before it
    if end <= 0:
        return 0, 0, 0
    counts = np.bincount(seg[:end], minlength=256)
    return end, int(counts @ _RUN_COST), int(counts @ _RUN_DELTA)


# Fixed-size-argument opcodes: (cost, stack change); BINPUT, LONG_BINPUT and FRAME are special.
_FIXED_OPS: Final[dict[int, tuple[int, int]]] = {
    ord("K"): (_SLOT, 1),  # BININT1: a cached small int
    ord("M"): (_SLOT + _INT, 1),
    ord("J"): (_SLOT + _INT, 1),
    ord("G"): (_SLOT + _FLOAT, 1),
    ord("h"): (_SLOT, 1),  # BINGET
    ord("j"): (_SLOT, 1),  # LONG_BINGET
    0x80: (0, 0),  # PROTO
}
_FIXED_COST: Final = [_FIXED_OPS.get(op, (-1, 0))[0] for op in range(256)]
_FIXED_DELTA: Final = [_FIXED_OPS.get(op, (0, 0))[1] for op in range(256)]
_WIDE: Final = re.compile(rb"[\xe0-\xff]")  # a UTF-8 lead byte of a 3- or 4-byte character
_ASTRAL: Final = re.compile(rb"[\xf0-\xff]")  # a UTF-8 lead byte of a 4-byte character


def _utf8_width(data: bytes, start: int, end: int) -> int:
    """The most bytes per character of a str decoded from UTF-8 ``data[start:end]``."""
    if _WIDE.search(data, start, end) is None:
        return 1
    return 4 if _ASTRAL.search(data, start, end) is not None else 2


def _escape_width(data: bytes, start: int, end: int) -> int:
    """The most bytes per character of a str decoded from raw-unicode-escape ``data``."""
    if data.find(b"\\U", start, end) >= 0:
        return 4
    return 2 if data.find(b"\\u", start, end) >= 0 else 1


def _memo_refused(index: int, at: int, n: int) -> UnsafePickle:
    return UnsafePickle(
        f"refused pickle memo index {index} at byte {at}: a pickle of {n} bytes cannot need it"
    )


def _truncated(op: int, at: int, size: int, left: int) -> WireError:
    return WireError(
        f"body is not a valid pickle: opcode {bytes([op])!r} at byte {at} declares {size} "
        f"bytes but only {left} remain (pickle data was truncated)"
    )


def _straddles(op: int, at: int) -> WireError:
    return WireError(
        f"body is not a valid pickle: opcode {bytes([op])!r} at byte {at} runs past the end of "
        "its frame"
    )


def _scan_pickle(data: bytes, budget: Budget) -> None:
    """Refuse opcodes we never accept, memo indices and lengths that would make the C unpickler
    allocate memory the body does not hold, and charge ``budget`` what every opcode would make
    before the unpickler runs.

    ``LONG_BINPUT 2**30`` is 5 bytes that ask for gigabytes of memo table: each memo entry
    takes at least one byte of pickle, so an index beyond its own offset (plus some slack) is
    refused. ``BINBYTES8`` allocates its declared size before reading it, so a size beyond the
    end is refused. An argument that runs past the end of its frame is refused too: the C
    unpickler drops the rest of the frame there and reads on from after it, so it would not
    read what this scan read. Then each opcode is charged its allocation (``EMPTY_SET``: 216
    bytes for one byte of pickle), and the entries of lists, dicts and sets as the opcodes that
    fill them pop their marks (the scan follows the stack depth and marks as the unpickler
    does). Long runs of zero-argument opcodes are costed at C speed, so 8 MiB of them are
    refused in milliseconds; other opcodes cost ~0.1-0.3 microseconds each to scan. Other
    damage is left to the unpickler to report.

    :raises UnsafePickle: for a forbidden opcode or memo index.
    :raises PickleTooLarge: (413) when the objects would exceed ``budget``.
    :raises WireError: for an unknown opcode or a length beyond the end.
    """
    table = _OPCODES
    plain_cost, plain_delta = _PLAIN_COST, _PLAIN_DELTA
    group_cost, group_delta = _GROUP_COST, _GROUP_DELTA
    fixed_cost, fixed_delta = _FIXED_COST, _FIXED_DELTA
    limit = budget.left
    n = len(data)
    i = 0
    cost = 0
    depth = 0  # the unpickler's stack size
    marks: list[int] = []  # the stack size at each mark
    put_hi = 0  # memo slots charged for PUT indices
    frame_end = 0  # where the current frame ends (0: none)
    streak = 0
    while i < n:
        if cost > limit:
            raise budget.error(
                f"the pickle (counting its opcodes up to byte {i})", cost, PickleTooLarge
            )
        if streak >= _RUN_AFTER:
            length, c, delta = _run(data, i, n)
            streak = _RUN_AFTER if length >= _RUN_WINDOW - 1 else 0
            if length:
                cost += c
                depth += delta
                i += length
                continue
        op = data[i]
        c = plain_cost[op]
        i += 1
        if c >= 0:
            cost += c
            depth += plain_delta[op]
            streak += 1
            continue
        if op == 0x28:  # MARK
            nxt = data[i] if i < n else 0
            c = group_cost[nxt]
            if c >= 0:  # an empty group
                cost += c
                depth += group_delta[nxt]
                i += 1
                streak += 1
                continue
            if nxt == 0x28:  # marks in a row: counted at C speed
                match = _MARKS.match(data, i - 1)
                assert match is not None
                count = match.end() - i
                i = match.end() - 1  # the last one may start an empty group
            else:
                count = 1
            marks.extend([depth] * count)
            cost += _MARK * count
            streak = 0
            continue
        streak = 0
        kind = table[op]
        if kind == 0:  # an opcode that pops to a mark, or POP
            fence = marks[-1] if marks else 0
            if op == 0x30:  # POP: an object above the mark, else the mark itself
                if depth > fence:
                    depth -= 1
                elif marks:
                    marks.pop()
                continue
            if not marks:
                break  # "could not find MARK": the unpickler stops here
            marks.pop()
            items = max(depth - fence, 0)
            depth = fence
            if op == 0x74:  # TUPLE
                cost += _TUPLE + 8 * items + _CHECK + _ITEM * items
                depth += 1
            elif op == 0x6C:  # LIST
                cost += _LIST + 8 * items + _CHECK + _ITEM * items
                depth += 1
            elif op == 0x64:  # DICT
                cost += _DICT + _CHECK + _PAIR * (items // 2 + 1)
                depth += 1
            elif op == 0x91:  # FROZENSET
                cost += _SET + _CHECK + _SET_ITEM * items
                depth += 1
            elif op == 0x65:  # APPENDS
                cost += _ITEM * items
            elif op == 0x75:  # SETITEMS
                cost += _PAIR * (items // 2 + 1)
            elif op == 0x90:  # ADDITEMS
                cost += _SET_ITEM * items
            elif op == 0x6F:  # OBJ
                cost += _CALL + _TUPLE + 8 * items
                depth += 1
            # POP_MARK (1) pops the mark and its items
            continue
        if kind > 0:
            if i < frame_end < i + kind:
                raise _straddles(op, i - 1)
            c = fixed_cost[op]
            if c >= 0:
                cost += c
                depth += fixed_delta[op]
            elif op == 0x71:  # BINPUT
                if i < n and data[i] >= put_hi:
                    cost += _MEMO * (data[i] + 1 - put_hi)
                    put_hi = data[i] + 1
            elif op == 0x72:  # LONG_BINPUT
                index = int.from_bytes(data[i : i + 4], "little")
                if index > i + _MEMO_SLACK:
                    raise _memo_refused(index, i - 1, n)
                if index >= put_hi:
                    cost += _MEMO * (index + 1 - put_hi)
                    put_hi = index + 1
            elif op == 0x95:  # FRAME: the unpickler reads the frame into one buffer
                size = int.from_bytes(data[i : i + 8], "little")
                start = i + 8
                if start < frame_end:  # within a frame, a frame must end before it does
                    if start + size > frame_end:
                        raise _straddles(op, i - 1)
                else:
                    frame_end = start + size
                cost += min(size, n - i)
            i += kind
            continue
        if kind == _LINE:
            end = data.find(b"\n", i)
            if end < 0:
                break  # truncated: the unpickler reports it
            if i < frame_end <= end:
                raise _straddles(op, i - 1)
            size = end - i
            if op == 0x70:  # PUT
                try:
                    index = int(data[i:end])
                except ValueError:
                    break  # let the unpickler report it
                if index > i + _MEMO_SLACK:
                    raise _memo_refused(index, i - 1, n)
                if index >= put_hi:
                    cost += _MEMO * (index + 1 - put_hi)
                    put_hi = max(index + 1, 0)
                cost += size
            elif op == 0x49:  # INT: bools and small ints are cached
                cost += _SLOT + size + (_INT + size if size > 2 else 0)
                depth += 1
            elif op == 0x4C:  # LONG
                cost += _SLOT + _INT + 2 * size
                depth += 1
            elif op == 0x46:  # FLOAT
                cost += _SLOT + _FLOAT + size
                depth += 1
            elif op == 0x53:  # STRING: the line, its unescaped bytes and the str
                cost += _SLOT + _STR + 3 * size
                depth += 1
            elif op == 0x56:  # UNICODE (raw-unicode-escape)
                cost += _SLOT + _STR + (1 + _escape_width(data, i, end)) * size
                depth += 1
            else:  # GET
                cost += _SLOT + size
                depth += 1
            i = end + 1
            continue
        if kind == _LINE2:
            first = data.find(b"\n", i)
            end = data.find(b"\n", first + 1) if first >= 0 else -1
            if end < 0:
                break
            if i < frame_end <= first or first + 1 < frame_end <= end:
                raise _straddles(op, i - 1)
            cost += _GLOBAL + 2 * (end - i)
            if op == 0x69:  # INST: a global called on the items above the mark
                if not marks:
                    break
                fence = marks.pop()
                cost += _CALL + _TUPLE + 8 * max(depth - fence, 0)
                depth = fence
            depth += 1
            i = end + 1
            continue
        if kind == _STOP:
            break
        if kind == _FORBIDDEN:
            raise UnsafePickle(
                f"refused pickle opcode {bytes([op])!r} at byte {i - 1}: "
                f"{_FORBIDDEN_TEXT[op]} are not allowed"
            )
        if kind == _UNKNOWN:
            raise WireError(
                f"body is not a valid pickle: unknown opcode {bytes([op])!r} at byte {i - 1}"
            )
        # a length, then that many bytes
        start = i
        if kind == _LEN1:
            if i >= n:
                break
            size = data[i]
            i += 1
        elif kind == _LEN4:
            size = int.from_bytes(data[i : i + 4], "little")
            i += 4
        elif kind == _LEN4S:
            size = int.from_bytes(data[i : i + 4], "little", signed=True)
            if size < 0:
                break  # the unpickler refuses negative sizes
            i += 4
        else:
            size = int.from_bytes(data[i : i + 8], "little")
            i += 8
        if size > n - i:
            raise _truncated(op, start - 1, size, max(n - i, 0))
        if start < frame_end < i or (size and i < frame_end < i + size):
            raise _straddles(op, start - 1)
        # every argument is read into a buffer of its size first, then copied or decoded
        if op in (0x8C, 0x58, 0x8D):  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            cost += _SLOT + _STR + (1 + _utf8_width(data, i, i + size)) * size
        elif op in (0x43, 0x42, 0x8E):  # SHORT_BINBYTES, BINBYTES, BINBYTES8
            cost += _SLOT + _BYTES + 2 * size
        elif op == 0x96:  # BYTEARRAY8
            cost += _SLOT + _BYTEARRAY + 2 * size
        elif op in (0x8A, 0x8B):  # LONG1, LONG4
            cost += _SLOT + _INT + 3 * size
        else:  # SHORT_BINSTRING, BINSTRING: bytes decoded to str
            cost += _SLOT + _STR + 3 * size
        depth += 1
        i += size
    if cost > limit:
        raise budget.error("the pickle", cost, PickleTooLarge)
    budget.charge(cost, "the pickle")


_PLAIN_TYPES: Final = frozenset({str, int, float, bool, type(None), bytes, complex})


def check_tree(
    value: Any, kinds: str, max_depth: int, *, in_place: bool, max_keys: int | None = None
) -> Any:
    """Check a value tree; return it with every array a plain ndarray and every dtype canonical.

    Refuses anything outside the allowed types, arrays with disallowed dtypes, nesting deeper
    than ``max_depth``, self-referencing containers and (with ``max_keys``) more dict keys than
    that in all. Shared sub-values are visited once. With ``in_place``, changed dicts and lists
    are updated rather than copied (for values the caller owns, like a freshly loaded pickle).
    """
    done: dict[int, Any] = {}
    active: set[int] = set()
    plain = _PLAIN_TYPES
    builtin = BUILTIN_DTYPES
    keys_left = [max_keys if max_keys is not None else -1]

    def visit(obj: Any, depth: int) -> Any:
        t = type(obj)
        if t in plain:
            return obj
        if t is np.ndarray:
            dtype: np.dtype[Any] = obj.dtype
            if not (builtin.get(id(dtype)) is dtype and dtype.kind in kinds):
                canonical_dtype(dtype, kinds)
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
                if max_keys is not None:
                    keys_left[0] -= len(obj)
                    if keys_left[0] < 0:
                        raise TooManyKeys(max_keys, what="the body")
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
            canonical_dtype(obj.dtype, kinds)
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
    limits: DecodeLimits | None = None,
    budget: Budget | None = None,
) -> Any:
    """Unpickle ``data`` allowing only numpy arrays, dtypes, scalars and plain values.

    Handles pickle protocols 0 to 5 (protocol 5 with in-band buffers), and the global names of
    numpy 1.x (``numpy.core``) and 2.x (``numpy._core``). Arrays come back as plain
    :class:`numpy.ndarray`; one built from an in-band ``bytes`` buffer may be read-only.

    :param data: the pickle.
    :param array_kinds: the numpy dtype kinds allowed for arrays and scalars
        (:data:`REQUEST_ARRAY_KINDS` or :data:`RESPONSE_ARRAY_KINDS`).
    :param max_depth: the deepest container nesting allowed.
    :param limits: the decode limits (None: :class:`~studioserve.wire.budget.DecodeLimits`'s
        defaults); the budget is ``limits.budget(len(data))``, the key limit ``max_keys``.
    :param budget: the request's budget, when the caller already made one (it wins).
    :raises UnsafePickle: for a forbidden global (the message names it, e.g. ``posix.system``),
        an object or structured dtype, or a pickle built to exhaust memory.
    :raises PickleTooLarge: (413, also an UnsafePickle) for a pickle that would build more than
        its decode budget.
    :raises TooManyKeys: (413) for more dict keys than ``limits.max_keys``.
    :raises WireError: for bytes that are not a valid pickle, data nested too deeply, or an
        array shape that spans more elements than the budget.

    Example::

        >>> safe_loads(pickle.dumps({"x": np.arange(3)}))["x"]
        array([0, 1, 2])
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"safe_loads expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise WireError("body is not a valid pickle: it is empty")
    if limits is None:
        limits = budget.limits if budget is not None else DecodeLimits()
    if budget is None:
        budget = limits.budget(len(data))
    _scan_pickle(data, budget)
    unpickler = _RestrictedUnpickler(io.BytesIO(data), kinds=array_kinds, budget=budget)
    try:
        value = unpickler.load()
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside the unpickler is bad input
        raise WireError(f"body is not a valid pickle: {short_error(e)}") from None
    finally:
        del unpickler  # its stack and memo: freed now, not at the next collection
    return check_tree(value, array_kinds, max_depth, in_place=True, max_keys=limits.max_keys)
