"""The fast path for the common pickled body: a dict of str keys to numpy arrays or scalars.

:func:`fast_loads` reads the exact opcode sequences ``pickle.dumps`` writes for such a dict
with protocols 2 to 5 (in-band buffers), with numpy 1.x (``numpy.core``) or 2.x
(``numpy._core``) names, and builds the arrays with :func:`numpy.frombuffer` from the body's
own bytes. No unpickler runs and no global is ever looked up, imported or called: a global's
name is only compared with the six this parser knows (``_reconstruct``, ``ndarray``, ``dtype``,
``scalar``, ``_frombuffer``, ``_codecs.encode``). Whatever it does not recognise exactly (any
other opcode, value or name, a memo index out of order, a frame boundary where no pickler puts
one, bytes after ``STOP``) makes it return None, and the caller runs the general path,
:func:`~studioserve.wire.safe_pickle.safe_loads`.

Its rules are the general path's, so that a body gets the same answer on either:

- the same values: numeric dtypes only (the type strings and states numpy writes for them),
  shapes checked with :func:`~studioserve.wire._checks.check_extent`, str keys, at most
  ``max_keys`` of them;
- the same decode budget: the parser adds up, opcode by opcode, exactly what the general path's
  pre-scan and stand-ins would charge for the body (the same costs,
  :mod:`studioserve.wire.safe_pickle`'s), refuses the body with
  :class:`~studioserve.errors.PickleTooLarge` as soon as the pre-scan would, and charges that
  total before it builds an array (what it builds is less);
- an error only where the general path is certain to raise the same one (the pre-scan's
  budget, a shape past the budget, too many keys); in every other case of doubt, None.

What it returns equals the general path's result: plain arrays, writable copies in the general
path's layout and byte order (protocols 2-4 give native byte order, as numpy's
``__setstate__`` does; protocol 5 keeps the pickled one), read-only copies where protocol 5
pickled a read-only buffer; numpy scalars as numpy builds them.

Two things make it fast. The byte sequences protocols 4-5 write the same way in every body (a
global, a dtype's call and state, an array's head) are taken at once, as *runs* learnt at
import by reading each with the parser's own methods. And the parser never looks into the data
of an array or scalar, only at its length, so a body whose bytes outside its data equal those
of a body parsed lately (its *skeleton*: same keys, dtypes, shapes, protocol) decodes the same
way: its data is read, the rest is not parsed again (:class:`_Skeleton`; a few dozen are
kept). A body that reads data back through the memo, or whose data is text (protocol 2), makes
no skeleton.

Example::

    budget = DecodeLimits().budget(len(body))
    data = fast_loads(body, REQUEST_ARRAY_KINDS, budget)
    if data is None:                       # not a common body: the general path decides
        data = safe_loads(body, budget=budget)
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from ..errors import PickleTooLarge, TooManyKeys
from ._checks import check_extent
from .budget import Budget
from .safe_pickle import (
    _ARRAY,
    _BYTEARRAY,
    _BYTES,
    _CALL,
    _CHECK,
    _DICT,
    _GLOBAL,
    _INT,
    _ITEM,
    _MARK,
    _MEMO,
    _PAIR,
    _SLOT,
    _STR,
    _TUPLE,
    REQUEST_ARRAY_KINDS,
)

__all__ = ["fast_loads"]

# What the general path charges for each opcode this parser reads (its pre-scan's costs), and
# what its stand-ins charge when the pickle calls them.
_C_STR: Final = _SLOT + _STR  # then (1 + width) per byte of UTF-8
_C_BYTES: Final = _SLOT + _BYTES  # then 2 per byte
_C_BYTEARRAY: Final = _SLOT + _BYTEARRAY  # then 2 per byte
_C_WIDE_INT: Final = _SLOT + _INT  # BININT2, BININT
_C_TUPLE: Final = (0, _TUPLE + 8 + _CHECK, _TUPLE + 16 + _CHECK, _TUPLE + 24 + _CHECK)
_C_MARKED_TUPLE: Final = _TUPLE + _CHECK  # then 8 + _ITEM per item
_C_DTYPE_CALL: Final = _GLOBAL  # numpy.dtype(...)
_C_RECONSTRUCT_CALL: Final = _ARRAY  # _reconstruct(ndarray, (0,), b"b"): its 0 bytes of data
_C_FROMBUFFER_CALL: Final = 3 * _ARRAY
_C_SCALAR_CALL: Final = _ARRAY  # then its bytes
_C_ENCODE_CALL: Final = _BYTES  # then its characters
_NOWHERE: Final = 1 << 62  # where the current frame ends when there is none


class _Miss(Exception):
    """The body is not one the fast path knows. Never leaves this module."""


class _Global:
    """One of the globals this parser knows, by name only: never the real object."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<global {self.name}>"


_RECONSTRUCT: Final = _Global("numpy.core.multiarray._reconstruct")
_NDARRAY: Final = _Global("numpy.ndarray")
_DTYPE: Final = _Global("numpy.dtype")
_SCALAR: Final = _Global("numpy.core.multiarray.scalar")
_FROMBUFFER: Final = _Global("numpy.core.numeric._frombuffer")
_ENCODE: Final = _Global("_codecs.encode")
_GLOBALS: Final[dict[tuple[str, str], _Global]] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("_codecs", "encode"): _ENCODE,
}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x, 2.x
    _GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _GLOBALS[(f"{_core}.multiarray", "scalar")] = _SCALAR
    _GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _FROMBUFFER
#: The same, as the GLOBAL opcode (protocols 2-3) spells them: ``module\nname``.
_GLOBAL_LINES: Final[dict[bytes, _Global]] = {
    f"{module}\n{name}".encode(): g for (module, name), g in _GLOBALS.items()
}


class _Dtype:
    """A dtype as numpy pickles it: the dtype each path makes of its type string and byte
    order (``dtype``), and the native-order one numpy's ``__setstate__`` turns arrays into."""

    __slots__ = ("dtype", "itemsize", "kind", "native", "swapped")

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = np.dtype(dtype.str)
        self.native = np.dtype(dtype.newbyteorder("=").str)
        self.swapped = self.dtype != self.native
        self.itemsize = dtype.itemsize
        self.kind = dtype.kind


_PLAIN_STATE: Final = (None, None, None, -1, -1, 0)  # a plain dtype's state after its order


def _dtype_table() -> dict[tuple[str, str], _Dtype]:
    """``(type string, byte order)`` -> :class:`_Dtype`, for every numeric dtype in both byte
    orders, from what this numpy writes (numpy 1.x writes the same)."""
    table: dict[tuple[str, str], _Dtype] = {}
    for char in "?bBhHiIlLqQefdgFDG":
        base = np.dtype(char)
        for dtype in (base, base.newbyteorder()) if base.itemsize > 1 else (base,):
            reduced: Any = dtype.__reduce__()
            (typestr, align, copy), state = reduced[1], reduced[2]
            if (align, copy) == (False, True) and state == (3, state[1], *_PLAIN_STATE):
                table[(typestr, state[1])] = _Dtype(dtype)
    return table


# (key, rebuilt, dtype, shape, data, order, writable, axes, hole) of one array
_ArrayRecord = tuple[str, bool, "_Dtype", tuple[int, ...], Any, str, bool, Any, int]
_DTYPES: Final = _dtype_table()
_ORDERS: Final = frozenset({"C", "F", "K"})


class _Parser:
    """One pass over one body. ``cost`` follows the general path's pre-scan, ``extra`` what its
    stand-ins would charge; ``memo`` holds what the unpickler's memo would: strs, bytes (as
    views of the body), the known globals, finished dtypes and scalars, and an opaque marker
    for everything this parser never takes back out (tuples, arrays, bytearrays, the dict)."""

    __slots__ = (
        "arrays",
        "cacheable",
        "cost",
        "data",
        "extra",
        "frame_end",
        "holes",
        "kinds",
        "last",
        "memo",
        "memoize",
        "n",
        "pos",
        "scalars",
        "view",
    )

    def __init__(self, data: bytes, kinds: str) -> None:
        self.data = data
        self.view = memoryview(data)
        self.n = len(data)
        self.kinds = kinds
        self.pos = 2
        self.cost = 0
        self.extra = 0
        self.memo: list[Any] = []
        # protocols 4-5 memoize with MEMOIZE and may frame; 2-3 with BINPUT and do not
        self.memoize = data[1] >= 4
        self.frame_end = 2 if self.memoize else _NOWHERE
        # (key, rebuilt, dtype, shape, data, order, writable, axes, hole) of each array
        self.arrays: list[_ArrayRecord] = []
        # (key, dtype, hole) of each scalar
        self.scalars: list[tuple[str, _Dtype, int]] = []
        # where the data of arrays and scalars lies: what may differ in a body of the same
        # skeleton (see _Skeleton); the last bytes read; whether the body may make a skeleton
        self.holes: list[tuple[int, int]] = []
        self.last: tuple[int, int] | None = None
        self.cacheable = True

    # ----------------------------------------------------------------------------------------
    # framing and the memo

    def _at(self) -> int:
        """The position of the next object, past a frame boundary if one is here. Picklers
        start a new frame only where an object starts (or after a large buffer, written outside
        any frame); a frame that ends anywhere else is not one this parser reads."""
        pos = self.pos
        if pos >= self.frame_end:
            pos = self._next_frame(pos)
        return pos

    def _next_frame(self, pos: int) -> int:
        """At the end of a frame: the next FRAME, or the rest of the body read unframed."""
        if pos != self.frame_end:
            raise _Miss
        data = self.data
        if pos < self.n and data[pos] == 0x95:  # FRAME
            start = pos + 9
            size = int.from_bytes(data[pos + 1 : start], "little")
            if start + size > self.n:
                raise _Miss
            self.cost += size
            self.frame_end = start + size
            self.pos = pos = start
        else:
            self.frame_end = _NOWHERE
        return pos

    def _put(self, value: Any) -> bool:
        """Read the memo store that may follow an object: MEMOIZE (protocols 4-5) or BINPUT /
        LONG_BINPUT of the next index (2-3), as picklers write them; a writer that needs no
        memo (``pickletools.optimize``, say) writes none. Whether ``value`` was stored."""
        data = self.data
        pos = self.pos
        op = data[pos]
        memo = self.memo
        if self.memoize and op == 0x94:
            self.pos = pos + 1
        elif self.memoize:
            if op == 0x70 or op == 0x71 or op == 0x72:
                raise _Miss  # a store of another protocol's
            return False
        elif op == 0x71 and data[pos + 1] == len(memo):  # BINPUT
            self.pos = pos + 2
        elif op == 0x72 and int.from_bytes(data[pos + 1 : pos + 5], "little") == len(memo):
            self.pos = pos + 5  # LONG_BINPUT
        elif op == 0x70 or op == 0x71 or op == 0x72 or op == 0x94:
            raise _Miss  # an index out of order, or a store of another protocol's
        else:
            return False
        memo.append(value)
        self.cost += _MEMO
        return True

    def _get(self, op: int, pos: int) -> Any:
        """What BINGET or LONG_BINGET at ``pos`` fetches."""
        data = self.data
        if op == 0x68:
            index = data[pos + 1]
            self.pos = pos + 2
        else:
            if pos + 5 > self.n:
                raise _Miss
            index = int.from_bytes(data[pos + 1 : pos + 5], "little")
            self.pos = pos + 5
        if index >= len(self.memo):
            raise _Miss
        self.cost += _SLOT
        return self.memo[index]

    def _take(self, run: _Run) -> Any:
        """Read a run this parser knows by heart (see :func:`_learn`): what reading it the long
        way would do, at once."""
        self.memo.extend(run.memo)
        self.cost += run.cost
        self.extra += run.extra
        self.pos += run.size
        return run.value

    def _fits(self, run: _Run | None) -> bool:
        """Whether ``run`` may be taken here: protocols 4-5, within the current frame."""
        return run is not None and self.memoize and self.pos + run.size <= self.frame_end

    def _op(self, op: int, cost: int) -> None:
        """Read one opcode that takes no argument."""
        pos = self.pos
        if self.data[pos] != op:
            raise _Miss
        self.pos = pos + 1
        self.cost += cost

    def _payload(self, start: int, size: int) -> int:
        """Read an argument of ``size`` bytes at ``start``: the end of the body and of the
        frame are checked, and a new frame may follow (picklers write a large argument, and its
        opcode, outside any frame)."""
        end = start + size
        if end > self.frame_end or end > self.n:
            raise _Miss  # the frame (or the body) ends inside the argument
        self.pos = end
        if self.frame_end == _NOWHERE and self.memoize and end < self.n and self.data[end] == 0x95:
            self.frame_end = end
            self._next_frame(end)
        return end

    # ----------------------------------------------------------------------------------------
    # plain objects

    def _str(self) -> str:
        """A str (SHORT_BINUNICODE, BINUNICODE, BINUNICODE8), or a memoized one."""
        pos = self._at()
        data = self.data
        op = data[pos]
        if op == 0x8C:  # SHORT_BINUNICODE
            start = pos + 2
            size = data[pos + 1]
        elif op == 0x58:  # BINUNICODE
            start = pos + 5
            size = int.from_bytes(data[pos + 1 : start], "little")
        elif op == 0x8D:  # BINUNICODE8
            start = pos + 9
            size = int.from_bytes(data[pos + 1 : start], "little")
        elif op == 0x68 or op == 0x6A:
            value = self._get(op, pos)
            if type(value) is not str:
                raise _Miss
            return value
        else:
            raise _Miss
        end = self._payload(start, size)
        text = str(data[start:end], "utf-8", "surrogatepass")
        if text.isascii():
            width = 1
        else:  # the pre-scan's width, from the UTF-8 lead bytes: 3- or 4-byte characters
            top = ord(max(text))
            width = 4 if top > 0xFFFF else 2 if top > 0x7FF else 1
        if self.memoize and data[end] == 0x94 and end < self.frame_end:
            self.memo.append(text)
            self.pos = end + 1
            self.cost += _C_STR + (1 + width) * size + _MEMO
            return text
        self.cost += _C_STR + (1 + width) * size
        self._put(text)
        return text

    def _int(self) -> int:
        """An int: BININT1, BININT2, BININT or LONG1 (shapes past 2**31)."""
        pos = self._at()
        data = self.data
        op = data[pos]
        if op == 0x4B:  # BININT1
            self.pos = pos + 2
            self.cost += _SLOT
            return data[pos + 1]
        if pos + 5 > self.n:
            raise _Miss
        if op == 0x4D:  # BININT2
            self.pos = pos + 3
            self.cost += _C_WIDE_INT
            return data[pos + 1] | data[pos + 2] << 8
        if op == 0x4A:  # BININT
            self.pos = pos + 5
            self.cost += _C_WIDE_INT
            return int.from_bytes(data[pos + 1 : pos + 5], "little", signed=True)
        if op == 0x8A:  # LONG1
            size = data[pos + 1]
            end = pos + 2 + size
            if end > self.n:
                raise _Miss
            self.pos = end
            self.cost += _SLOT + _INT + 3 * size
            return int.from_bytes(data[pos + 2 : end], "little", signed=True)
        raise _Miss

    def _const(self, op: int) -> None:
        """Read an object written as one opcode: NONE, NEWTRUE, NEWFALSE."""
        pos = self._at()
        if self.data[pos] != op:
            raise _Miss
        self.pos = pos + 1
        self.cost += _SLOT

    def _bool(self) -> bool:
        """NEWTRUE or NEWFALSE."""
        pos = self._at()
        op = self.data[pos]
        if op != 0x88 and op != 0x89:
            raise _Miss
        self.pos = pos + 1
        self.cost += _SLOT
        return op == 0x88

    def _shape(self) -> tuple[int, ...]:
        """A tuple of non-negative ints, as a shape or an axis order is written."""
        pos = self._at()
        data = self.data
        op = data[pos]
        if op == 0x4B and self.memoize and pos + 6 <= self.frame_end:  # the common shapes
            if data[pos + 2] == 0x85 and data[pos + 3] == 0x94:  # (n,)
                self.memo.append(_OPAQUE)
                self.pos = pos + 4
                self.cost += _SLOT + _C_TUPLE[1] + _MEMO
                return (data[pos + 1],)
            if data[pos + 2] == 0x4B and data[pos + 4] == 0x86 and data[pos + 5] == 0x94:
                self.memo.append(_OPAQUE)
                self.pos = pos + 6
                self.cost += 2 * _SLOT + _C_TUPLE[2] + _MEMO
                return (data[pos + 1], data[pos + 3])
        if op == 0x29:  # EMPTY_TUPLE: not memoized
            self.pos = pos + 1
            self.cost += _SLOT
            return ()
        if op == 0x28:  # MARK, the ints, TUPLE
            self.pos = pos + 1
            self.cost += _MARK
            items: list[int] = []
            while True:
                pos = self._at()
                if data[pos] == 0x74:
                    break
                if len(items) == 64:
                    raise _Miss
                items.append(self._int())
            if not items:
                raise _Miss
            self.pos = pos + 1
            self.cost += _C_MARKED_TUPLE + (8 + _ITEM) * len(items)
            shape = tuple(items)
        else:  # one to three ints, TUPLE1-3
            first = self._int()
            if data[self.pos] == 0x85:
                shape = (first,)
            else:
                second = self._int()
                if data[self.pos] == 0x86:
                    shape = (first, second)
                else:
                    shape = (first, second, self._int())
                    if data[self.pos] != 0x87:
                        raise _Miss
            self.pos += 1
            self.cost += _C_TUPLE[len(shape)]
        for n in shape:
            if n < 0:
                raise _Miss
        self._put(_OPAQUE)
        return shape

    def _lead(self) -> Any:
        """An object that may be memoized (then it is fetched) or a global (whose module name
        may be memoized): what a dtype, a value or protocol 2's bytes start with."""
        pos = self._at()
        data = self.data
        op = data[pos]
        if op == 0x68 or op == 0x6A:
            value = self._get(op, pos)
            return self._stack_global(value) if type(value) is str else value
        if op == 0x63:  # GLOBAL: module and name lines
            first = data.find(b"\n", pos + 1, pos + 64)
            end = data.find(b"\n", first + 1, first + 64) if first > 0 else -1
            g = _GLOBAL_LINES.get(data[pos + 1 : end]) if end > 0 else None
            if g is None or end >= self.frame_end:
                raise _Miss
            self.cost += _GLOBAL + 2 * (end - pos - 1)
            self.pos = end + 1
            self._put(g)
            return g
        if op == 0x8C and self.memoize:  # a whole STACK_GLOBAL, as picklers write it
            second = pos + data[pos + 1] + 3
            if data[second] == 0x8C:
                end = second + data[second + 1] + 5
                run = _GLOBAL_RUNS.get(data[pos:end])
                if run is not None and end <= self.frame_end:
                    return self._take(run)
        return self._stack_global(self._str())

    def _stack_global(self, module: str) -> _Global:
        """The rest of a STACK_GLOBAL whose module name was just read."""
        pos = self._at()
        data = self.data
        if data[pos] == 0x8C and self.memoize:
            end = pos + data[pos + 1] + 5
            run = _NAME_RUNS.get((module, data[pos:end]))
            if run is not None and end <= self.frame_end:
                result: _Global = self._take(run)
                return result
        g = _GLOBALS.get((module, self._str()))
        if g is None:
            raise _Miss
        self._op(0x93, _GLOBAL)
        self._put(g)
        return g

    def _global(self) -> _Global:
        """One of the known globals, or a miss."""
        g = self._lead()
        if type(g) is not _Global:
            raise _Miss
        return g

    def _bytes(self) -> memoryview:
        """Bytes, as a view of the body (or, for protocol 2, of what ``_codecs.encode`` makes)."""
        pos = self._at()
        data = self.data
        op = data[pos]
        if op == 0x43:  # SHORT_BINBYTES
            start = pos + 2
            size = data[pos + 1]
        elif op == 0x42:  # BINBYTES
            start = pos + 5
            size = int.from_bytes(data[pos + 1 : start], "little")
        elif op == 0x8E:  # BINBYTES8
            start = pos + 9
            size = int.from_bytes(data[pos + 1 : start], "little")
        else:
            self.last = None
            value = self._lead()
            if type(value) is memoryview:
                return value
            if type(value) is _Data:  # the data of an array or scalar: the parse now depends
                self.cacheable = False  # on what it holds
                return value.view
            if value is not _ENCODE:
                raise _Miss
            return self._encoded()
        end = self._payload(start, size)
        self.last = (start, end)
        value = self.view[start:end]
        if self.memoize and data[self.pos] == 0x94 and self.pos < self.frame_end:
            self.memo.append(value)
            self.pos += 1
            self.cost += _C_BYTES + 2 * size + _MEMO
            return value
        self.cost += _C_BYTES + 2 * size
        self._put(value)
        return value

    def _encoded(self) -> memoryview:
        """The rest of ``_codecs.encode(text, "latin1")``, protocol 2's bytes."""
        self.cacheable = False  # its data is text, decoded: not a hole
        text = self._str()
        if self._str() != "latin1":
            raise _Miss
        self._op(0x86, _C_TUPLE[2])
        self._put(_OPAQUE)
        self._op(0x52, _CALL)
        self.extra += _C_ENCODE_CALL + len(text)
        value = memoryview(text.encode("latin1"))
        self._put(value)
        return value

    # ----------------------------------------------------------------------------------------
    # numpy

    def _dtype(self) -> _Dtype:
        """``numpy.dtype(typestr, False, True)`` and its state, or a memoized one."""
        lead = self._lead()
        if type(lead) is _Dtype:
            return lead
        if lead is not _DTYPE:
            raise _Miss
        pos = self.pos
        data = self.data
        if data[pos] == 0x8C:  # the whole call, as numpy writes it
            run = _DTYPE_CALLS.get(data[pos : pos + data[pos + 1] + _DTYPE_CALL_SIZE])
            if self._fits(run):
                assert run is not None
                info: _Dtype = run.value
                if info.kind not in self.kinds:
                    raise _Miss
                self._take(run)
                return info
        return self._dtype_call()

    def _dtype_call(self) -> _Dtype:
        """The call's arguments, REDUCE and state, the long way."""
        typestr, index = self._dtype_args()
        info = _DTYPES.get((typestr, self._str()))
        if info is None or info.kind not in self.kinds:
            raise _Miss
        if self._fits(_DTYPE_TAIL) and self.data.startswith(_DTYPE_TAIL.code, self.pos):
            self._take(_DTYPE_TAIL)
        else:
            self._dtype_tail()
        self.extra += _C_DTYPE_CALL
        if index >= 0:
            self.memo[index] = info
        return info

    def _dtype_args(self) -> tuple[str, int]:
        """``(typestr, False, True)``, REDUCE, and the state's MARK and version: the type
        string, and the dtype's memo index (-1: not memoized)."""
        pos = self.pos
        data = self.data
        if data[pos] == 0x8C:
            run = _DTYPE_ARGS.get(data[pos : pos + data[pos + 1] + _DTYPE_ARGS_SIZE])
            if self._fits(run):
                assert run is not None
                self._take(run)
                typestr: str = run.value[0]
                return typestr, len(self.memo) - 1
        typestr = self._str()
        self._const(0x89)
        self._const(0x88)
        self._op(0x87, _C_TUPLE[3])
        self._put(_OPAQUE)
        self._op(0x52, _CALL)
        stored = self._put(_OPAQUE)  # the dtype, unfinished until BUILD
        index = len(self.memo) - 1 if stored else -1
        self._at()
        self._op(0x28, _MARK)
        if self._int() != 3:
            raise _Miss
        return typestr, index

    def _dtype_tail(self) -> None:
        """The rest of the state after the byte order, and BUILD."""
        self._const(0x4E)
        self._const(0x4E)
        self._const(0x4E)
        if self._int() != -1 or self._int() != -1 or self._int() != 0:
            raise _Miss
        self._op(0x74, _C_MARKED_TUPLE + 8 * (8 + _ITEM))
        self._put(_OPAQUE)
        self._op(0x62, _CALL)

    def _reconstruct(self, key: str) -> None:
        """``_reconstruct(ndarray, (0,), b"b")`` then its state: protocols 2-4 (and 5, for an
        array that is neither C- nor Fortran-contiguous)."""
        data = self.data
        pos = self.pos
        if self._fits(_RECONSTRUCT_HEAD) and data.startswith(_RECONSTRUCT_HEAD.code, pos):
            self._take(_RECONSTRUCT_HEAD)  # the first array's
        elif (  # a later array's: ndarray and b"b" memoized
            self._fits(_RECONSTRUCT_AGAIN)
            and data[pos] == 0x68
            and data[pos + 2 : pos + 7] == b"K\x00\x85\x94h"
            and data[pos + 8 : pos + 15] == b"\x87\x94R\x94(K\x01"
            and self.memo[data[pos + 1]] is _NDARRAY
            and _is_typecode(self.memo[data[pos + 7]])
        ):
            self._take(_RECONSTRUCT_AGAIN)
        else:
            self._reconstruct_head()
        shape = self._shape()
        info = self._dtype()
        fortran = self._bool()
        raw = self._bytes()
        hole = self._hole(raw)
        if self._fits(_RECONSTRUCT_TAIL) and self.data.startswith(_RECONSTRUCT_TAIL.code, self.pos):
            self._take(_RECONSTRUCT_TAIL)
        else:
            self._reconstruct_tail()
        self.extra += _C_RECONSTRUCT_CALL + len(raw)
        order = "F" if fortran else "C"
        self.arrays.append((key, True, info, shape, raw, order, True, None, hole))

    def _reconstruct_head(self) -> None:
        """``ndarray, (0,), b"b"``, REDUCE, and the state's MARK and version."""
        if self._global() is not _NDARRAY or self._shape() != (0,):
            raise _Miss
        if not _is_typecode(self._bytes()):
            raise _Miss
        self._op(0x87, _C_TUPLE[3])
        self._put(_OPAQUE)
        self._op(0x52, _CALL)
        self._put(_OPAQUE)
        self._at()
        self._op(0x28, _MARK)
        if self._int() != 1:
            raise _Miss

    def _reconstruct_tail(self) -> None:
        """The state's TUPLE, and BUILD."""
        self._op(0x74, _C_MARKED_TUPLE + 5 * (8 + _ITEM))
        self._put(_OPAQUE)
        self._op(0x62, _CALL)

    def _frombuffer(self, key: str) -> None:
        """``_frombuffer(buffer, dtype, shape, order[, axis_order])``: protocol 5."""
        self._at()
        self._op(0x28, _MARK)
        pos = self._at()
        data = self.data
        if data[pos] == 0x96:  # BYTEARRAY8: a writable buffer
            start = pos + 9
            size = int.from_bytes(data[pos + 1 : start], "little")
            end = self._payload(start, size)
            self.cost += _C_BYTEARRAY + 2 * size
            raw = self.view[start:end]
            self._put(_OPAQUE)  # a bytearray: shared by whoever takes it back
            self.last = (start, end)
            writable = True
        else:  # bytes: a read-only buffer
            raw = self._bytes()
            writable = False
        hole = self._hole(raw)
        info = self._dtype()
        shape = self._shape()
        order = self._str()
        if order not in _ORDERS:
            raise _Miss
        axes = None
        if order == "K" and self.data[self._at()] != 0x74:
            axes = self._shape()
            if sorted(axes) != list(range(len(shape))):
                raise _Miss
            self._frombuffer_tail(5)
        elif self._fits(_FROMBUFFER_TAIL) and self.data.startswith(_FROMBUFFER_TAIL.code, self.pos):
            self._take(_FROMBUFFER_TAIL)
        else:
            self._frombuffer_tail(4)
        self.arrays.append((key, False, info, shape, raw, order, writable, axes, hole))

    def _frombuffer_tail(self, items: int) -> None:
        """The arguments' TUPLE, REDUCE."""
        self._op(0x74, _C_MARKED_TUPLE + items * (8 + _ITEM))
        self._put(_OPAQUE)
        self._op(0x52, _CALL)
        self._put(_OPAQUE)
        self.extra += _C_FROMBUFFER_CALL

    def _hole(self, raw: memoryview) -> int:
        """Take ``raw``, the bytes just read, as an array's or a scalar's data: where it lies is
        a hole in the body's skeleton, and its memo entry is marked, so that the body may make
        a skeleton only if nothing the parser does depends on what data holds. -1: no hole (no
        data, or memoized bytes)."""
        if not raw:
            return -1
        last = self.last
        if last is None:
            self.cacheable = False
            return -1
        if self.memo and self.memo[-1] is raw:
            self.memo[-1] = _Data(raw)
        self.holes.append(last)
        return len(self.holes) - 1

    def _scalar(self, key: str) -> Any:
        """``scalar(dtype, data)``: a numpy scalar, built now (it is memoized)."""
        info = self._dtype()
        raw = self._bytes()
        if len(raw) != info.itemsize:
            raise _Miss
        self.scalars.append((key, info, self._hole(raw)))
        self._op(0x86, _C_TUPLE[2])
        self._put(_OPAQUE)
        self._op(0x52, _CALL)
        self.extra += _C_SCALAR_CALL + len(raw)
        value = np.frombuffer(raw, dtype=info.dtype)[0]
        self._put(value)
        return value

    # ----------------------------------------------------------------------------------------
    # the body

    def _item(self, out: dict[str, Any]) -> None:
        """One key and its value."""
        key = self._str()
        if key in out:
            raise _Miss
        g = self._lead()
        if g is _RECONSTRUCT:
            self._reconstruct(key)
            out[key] = None  # its place, filled once built
        elif g is _FROMBUFFER:
            self._frombuffer(key)
            out[key] = None
        elif g is _SCALAR:
            out[key] = self._scalar(key)
        elif isinstance(g, np.generic):  # a memoized scalar (of the memoized values, only
            out[key] = g  # a numpy scalar is taken back as a value)
            self.cacheable = False
        else:
            raise _Miss

    def parse(self, budget: Budget) -> dict[str, Any]:
        """The body's dict, arrays still unbuilt (None), and ``cost`` and ``extra`` counted.

        :raises PickleTooLarge: as soon as the pre-scan would.
        """
        self._at()
        self._op(0x7D, _DICT + _SLOT + _CHECK)  # EMPTY_DICT
        self._put(_OPAQUE)
        out: dict[str, Any] = {}
        data = self.data
        left = budget.left
        while True:
            pos = self._at()
            op = data[pos]
            if op == 0x28 and data[pos + 1] == 0x75:  # MARK, SETITEMS: an empty group, free
                self.pos = pos + 2
            elif op == 0x28:  # MARK, pairs, SETITEMS
                self.pos = pos + 1
                self.cost += _MARK
                pairs = 0
                while data[self._at()] != 0x75:
                    self._item(out)
                    pairs += 1
                    if self.cost > left:
                        raise self._too_large(budget)
                if not pairs:
                    raise _Miss
                self._op(0x75, _PAIR * (pairs + 1))
            elif op == 0x2E:  # STOP
                if pos + 1 != self.n:
                    raise _Miss  # the general path ignores what follows; this one does not
                return out
            else:  # a pair, SETITEM
                self._item(out)
                self._op(0x73, _PAIR)
            if self.cost > left:
                raise self._too_large(budget)

    def _too_large(self, budget: Budget) -> PickleTooLarge:
        """The pre-scan's error: it counts the same opcodes, so it refuses the body too."""
        error = budget.error(
            f"the pickle (counting its opcodes up to byte {self.pos})", self.cost, PickleTooLarge
        )
        assert isinstance(error, PickleTooLarge)
        return error


_OPAQUE: Final = object()  # a memoized value this parser never takes back out


class _Data:
    """The memo entry of an array's or a scalar's data: bytes like any other, except that a
    body that reads it back cannot make a skeleton."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view


def _is_typecode(value: Any) -> bool:
    """Whether ``value`` is ``b"b"``, the type code numpy pickles ``_reconstruct`` with."""
    return type(value) is memoryview and len(value) == 1 and value[0] == 0x62


# --------------------------------------------------------------------------------------------
# runs: the byte sequences picklers write for every body, read at once


class _Run:
    """A byte sequence protocols 4-5 write the same way in every body (MEMOIZE stores are
    implicit: nothing in it depends on where it is), with what reading it does: the memo
    entries it adds, what it charges, and what it yields. Learnt at import by reading it with
    the parser's own methods, so taking a run and reading it the long way cannot differ."""

    __slots__ = ("code", "cost", "extra", "memo", "size", "value")

    def __init__(self, code: bytes, memo: list[Any], cost: int, extra: int, value: Any) -> None:
        self.code = code
        self.size = len(code)
        self.memo = tuple(memo)
        self.cost = cost
        self.extra = extra
        self.value = value


def _learn(code: bytes, read: Any, memo: tuple[Any, ...] = ()) -> _Run:
    """The run of ``code``, read by ``read(parser)`` after ``memo``."""
    parser = _Parser(b"\x80\x05" + code + b".", REQUEST_ARRAY_KINDS)
    parser.frame_end = _NOWHERE
    parser.memo.extend(memo)
    value = read(parser)
    if parser.pos != 2 + len(code):
        raise AssertionError(f"the run {code!r} was not read whole")
    return _Run(code, parser.memo[len(memo) :], parser.cost, parser.extra, value)


def _short(text: str) -> bytes:
    """SHORT_BINUNICODE and MEMOIZE, as protocols 4-5 write a short str."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw + b"\x94"


# Each dict is filled only once every run of it is learnt (the long way).
_GLOBAL_RUNS: Final[dict[bytes, _Run]] = {}
_NAME_RUNS: Final[dict[tuple[str, bytes], _Run]] = {}
_DTYPE_CALLS: Final[dict[bytes, _Run]] = {}
_DTYPE_ARGS: Final[dict[bytes, _Run]] = {}
_DTYPE_STATE: Final = b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b"
_DTYPE_ARGS_CODE: Final = b"\x89\x88\x87\x94R\x94(K\x03"
#: The size of a dtype call's run (of its arguments' run) past its type string's length.
_DTYPE_CALL_SIZE: Final = 3 + len(_DTYPE_ARGS_CODE) + 4 + len(_DTYPE_STATE)
_DTYPE_ARGS_SIZE: Final = 3 + len(_DTYPE_ARGS_CODE)


def _learn_runs() -> None:
    """Learn the runs of every known global (whole, and after a memoized module name) and of
    every dtype's call (whole, and its arguments alone)."""
    global_runs = {}
    name_runs = {}
    for module, name in _GLOBALS:
        code = _short(module) + _short(name) + b"\x93\x94"
        global_runs[code] = _learn(code, lambda p: p._lead())
        tail = _short(name) + b"\x93\x94"
        name_runs[(module, tail)] = _learn(tail, lambda p, m=module: p._stack_global(m))
    dtype_calls = {}
    dtype_args = {}
    for (typestr, order), info in _DTYPES.items():
        args = _short(typestr) + _DTYPE_ARGS_CODE
        dtype_args[args] = _learn(args, lambda p: p._dtype_args())
        call = args + _short(order) + _DTYPE_STATE
        run = _learn(call, lambda p: p._dtype_call())
        assert run.value is info
        dtype_calls[call] = run
    _GLOBAL_RUNS.update(global_runs)
    _NAME_RUNS.update(name_runs)
    _DTYPE_CALLS.update(dtype_calls)
    _DTYPE_ARGS.update(dtype_args)


_DTYPE_TAIL: Final = _learn(_DTYPE_STATE, lambda p: p._dtype_tail())
_learn_runs()
_RECONSTRUCT_HEAD: Final = _learn(
    _short("numpy") + _short("ndarray") + b"\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01",
    lambda p: p._reconstruct_head(),
)
_RECONSTRUCT_AGAIN: Final = _learn(
    b"h\x00K\x00\x85\x94h\x01\x87\x94R\x94(K\x01",
    lambda p: p._reconstruct_head(),
    (_NDARRAY, memoryview(b"b")),
)
_RECONSTRUCT_TAIL: Final = _learn(b"t\x94b", lambda p: p._reconstruct_tail())
_FROMBUFFER_TAIL: Final = _learn(b"t\x94R\x94", lambda p: p._frombuffer_tail(4))


class _Skeleton:
    """What a body's parse depends on, and what it found. The parser never looks into the data
    of an array or scalar (the holes): only at their lengths, which the bytes around them
    spell. So a body of the same length whose bytes outside the holes are the same parses the
    same way, and only its data need be read: a server's requests mostly share a few."""

    __slots__ = ("arrays", "checks", "cost", "extra", "holes", "keys", "scalars")

    def __init__(self, body: bytes, parser: _Parser, keys: list[str]) -> None:
        checks = []
        prev = 0
        for start, end in parser.holes:
            if start > prev:
                checks.append((prev, body[prev:start]))
            prev = end
        if prev < len(body):
            checks.append((prev, body[prev:]))
        self.checks = tuple(checks)
        self.holes = tuple(parser.holes)
        self.keys = tuple(keys)
        self.arrays = tuple((*record[:4], None, *record[5:]) for record in parser.arrays)
        self.scalars = tuple(parser.scalars)
        self.cost = parser.cost
        self.extra = parser.extra

    def matches(self, body: bytes) -> bool:
        """Whether ``body`` (of the same length) has the same bytes outside the holes."""
        return all(body.startswith(fixed, at) for at, fixed in self.checks)

    def replay(self, body: bytes) -> tuple[dict[str, Any], list[_ArrayRecord]]:
        """What parsing ``body`` (which :meth:`matches`) finds."""
        view = memoryview(body)
        holes = self.holes
        out: dict[str, Any] = dict.fromkeys(self.keys)
        for key, info, hole in self.scalars:
            start, end = holes[hole]
            out[key] = np.frombuffer(view[start:end], dtype=info.dtype)[0]
        arrays = []
        for key, rebuilt, info, shape, _, order, writable, axes, hole in self.arrays:
            raw = view[holes[hole][0] : holes[hole][1]] if hole >= 0 else view[:0]
            arrays.append((key, rebuilt, info, shape, raw, order, writable, axes, hole))
        return out, arrays


#: Skeletons of bodies decoded lately, by body length and dtype kinds.
_SKELETONS: Final[dict[tuple[int, str], _Skeleton]] = {}
_MAX_SKELETONS: Final = 64
_MAX_FIXED: Final = 16 << 10  # the most bytes a skeleton keeps
_MAX_HOLES: Final = 64


def fast_loads(body: bytes, kinds: str, budget: Budget) -> dict[str, Any] | None:
    """Decode ``body`` if it is a common pickle, a dict of str keys to numpy arrays and
    scalars; None for any other body (then :func:`~studioserve.wire.safe_pickle.safe_loads`
    decides).

    :param body: the pickle.
    :param kinds: the numpy dtype kinds allowed
        (:data:`~studioserve.wire.safe_pickle.REQUEST_ARRAY_KINDS`; only numeric ones are
        read here).
    :param budget: the body's decode budget; charged what the general path would charge.
    :raises PickleTooLarge: (413) for a body the general path's pre-scan refuses for its
        budget.
    :raises UnsafePickle: (400) for an array shape that spans more elements than the budget.
    :raises TooManyKeys: (413) for more keys than ``budget.limits.max_keys``.
    """
    if type(body) is not bytes:
        body = bytes(body)
    if len(body) < 4 or body[0] != 0x80 or not 2 <= body[1] <= 5:
        return None
    key = (len(body), kinds)
    skeleton = _SKELETONS.get(key)
    if skeleton is not None and skeleton.matches(body):
        if skeleton.cost > budget.left:  # the parse would refuse it at some pair
            raise budget.error("the pickle", skeleton.cost, PickleTooLarge)
        out, arrays = skeleton.replay(body)
        return _finish(out, arrays, skeleton.cost + skeleton.extra, budget)
    parser = _Parser(body, kinds)
    try:
        out = parser.parse(budget)
    except (_Miss, IndexError, UnicodeError):
        return None
    keys = list(out)
    value = _finish(out, parser.arrays, parser.cost + parser.extra, budget)
    holes = parser.holes
    if (
        value is not None
        and parser.cacheable
        and len(holes) <= _MAX_HOLES
        and len(body) - sum(end - start for start, end in holes) <= _MAX_FIXED
    ):
        if len(_SKELETONS) >= _MAX_SKELETONS:
            _SKELETONS.clear()
        _SKELETONS[key] = _Skeleton(body, parser, keys)
    return value


def _finish(
    out: dict[str, Any], arrays: list[_ArrayRecord], total: int, budget: Budget
) -> dict[str, Any] | None:
    """Check what a parse found as the general path would, charge it, and build the arrays."""
    # The general path charges the pre-scan first, then each stand-in as it is called, and
    # checks each array's shape (then its size) when the array is built: with the whole charge
    # within the budget, the first refused shape is the first error it raises.
    if total > budget.left:
        return None  # the general path refuses it at some stand-in's charge, or sooner
    for _, _, info, shape, raw, _, _, _, _ in arrays:
        check_extent(shape, budget.limit)
        if len(raw) != math.prod(shape) * info.itemsize:
            return None
    max_keys = budget.limits.max_keys
    if len(out) > max_keys:
        raise TooManyKeys(max_keys, what="the body")
    budget.charge(total, "the pickle")
    for key, rebuilt, info, shape, raw, order, writable, axes, _ in arrays:
        flat = np.frombuffer(raw, dtype=info.dtype)
        if rebuilt:  # as numpy's __setstate__ does: a copy, in native byte order
            flat = flat.astype(info.native) if info.swapped else flat.copy()
        elif writable:
            flat = flat.copy()
        else:  # read-only, as the general path's: its own (aligned) bytes, not the body's
            flat = np.frombuffer(bytes(raw), dtype=info.dtype)
        if axes is not None:
            out[key] = flat.reshape(shape).transpose(axes)
        else:
            out[key] = flat.reshape(shape, order="F" if order == "F" else "C")
    return out
