"""The restricted unpickler: the one place a pickled body turns into Python values.

**Pickles are never loaded with** :func:`pickle.loads`. :func:`safe_loads` uses a restricted
unpickler that builds only numpy arrays (numeric or bool dtypes, never object), numpy dtypes and
scalars, and plain values and containers (dict, list, tuple, set, frozenset, str, bytes,
bytearray, int, float, complex, bool, None). Any other global is refused with
:class:`~studioserve.errors.UnsafePickle`; so are object arrays however the pickle tries to build
them, forged dtypes, out-of-band buffers, memo indices that would allocate memory the body does
not pay for, and values nested deeper than :data:`MAX_DEPTH`.

Everything here is one security boundary, and reads best together:

- an opcode pre-scan (:func:`_scan_pickle`) refuses persistent ids, extension codes,
  out-of-band buffers and memo indices the body cannot need, before the C unpickler runs;
- :class:`_RestrictedUnpickler` hands out checking stand-ins (:class:`_SafeGlobal`) for the few
  globals numpy and the standard library pickle data with, and never a real type;
- ``numpy.dtype`` yields a :class:`_DtypeProxy` and arrays are :class:`_GuardedArray`, so a
  pickle's ``BUILD`` never reaches numpy's trusting ``__setstate__``;
- a :class:`_Budget` keeps what those stand-ins copy proportional to the body;
- :func:`check_tree` walks the result and returns only plain, checked values. The encoders in
  :mod:`studioserve.wire.formats` use it too, so that nothing is sent that this side would
  refuse on the other.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from ..errors import UnsafePickle, WireError
from ._checks import (
    BUILTIN_DTYPES,
    canonical_dtype,
    check_shape,
    refuse_dtype,
    short_error,
    short_repr,
)

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
# array checks and the allocation budget


def _check_array(arr: np.ndarray[Any, Any], kinds: str) -> np.ndarray[Any, Any]:
    """``arr`` as a plain :class:`numpy.ndarray` with an allowed dtype, or an error."""
    canonical_dtype(arr.dtype, kinds)
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
        shape = check_shape(shape)
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
            raise refuse_dtype(dtype, self._kinds)
        if dtype.names is not None or dtype.subdtype is not None:
            raise refuse_dtype(dtype, self._kinds, "structured")
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
        shape = check_shape(shape)
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


def check_tree(value: Any, kinds: str, max_depth: int, *, in_place: bool) -> Any:
    """Check a value tree; return it with every array a plain ndarray and every dtype canonical.

    Refuses anything outside the allowed types, arrays with disallowed dtypes, nesting deeper
    than ``max_depth`` and self-referencing containers. Shared sub-values are visited once.
    With ``in_place``, changed dicts and lists are updated rather than copied (for values the
    caller owns, like a freshly loaded pickle).
    """
    done: dict[int, Any] = {}
    active: set[int] = set()
    plain = _PLAIN_TYPES
    builtin = BUILTIN_DTYPES

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
        raise WireError(f"body is not a valid pickle: {short_error(e)}") from None
    return check_tree(value, array_kinds, max_depth, in_place=True)
