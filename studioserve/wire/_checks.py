"""The dtype, shape and message checks that the pickle and npz decoders share.

Private to :mod:`studioserve.wire`. A dtype that arrives in a body, however it was built, is
only used once :func:`canonical_dtype` has rebuilt it from its type string; a shape only once
:func:`check_shape` has seen that it is a short tuple of non-negative ints. Messages quote
what a hostile body sent, so they go through :func:`short_repr`.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from ..errors import UnsafePickle

_MAX_NDIM: Final = 64

#: numpy's builtin dtype instances (immortal singletons), by id: an array whose dtype is one of
#: them needs no further checks.
BUILTIN_DTYPES: Final[dict[int, np.dtype[Any]]] = {
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


def refuse_dtype(dtype: Any, kinds: str, why: str = "") -> UnsafePickle:
    reason = f" ({why})" if why else ""
    return UnsafePickle(
        f"refused numpy dtype {_dtype_name(dtype)}{reason}: only {_kinds_text(kinds)} arrays "
        "are allowed (never object or structured dtypes); convert the value with "
        "np.asarray(value, dtype=np.float32) or similar before sending"
    )


def canonical_dtype(dtype: Any, kinds: str) -> np.dtype[Any]:
    """The plain numpy dtype equal to ``dtype``, or :class:`UnsafePickle`.

    A dtype's ``__setstate__`` can forge its flags (a float64 that claims to hold objects).
    Pickles never reach it (see :class:`.safe_pickle._DtypeProxy`), but values from elsewhere
    might: the canonical dtype is rebuilt from the type string, and any mismatch is refused.
    """
    if not isinstance(dtype, np.dtype):
        raise UnsafePickle(f"expected a numpy dtype, got {type(dtype).__name__}")
    if BUILTIN_DTYPES.get(id(dtype)) is dtype and dtype.kind in kinds:
        # numpy's own builtin instance: never handed to a pickle, so it cannot be forged.
        return dtype
    if dtype.kind not in kinds:
        raise refuse_dtype(dtype, kinds)
    if dtype.names is not None or dtype.subdtype is not None:
        raise refuse_dtype(dtype, kinds, "structured")
    if dtype.hasobject:
        raise refuse_dtype(dtype, kinds, "forged: claims to hold objects")
    try:
        canonical = np.dtype(dtype.str)
    except (TypeError, ValueError):
        raise refuse_dtype(dtype, kinds, "forged size") from None
    if (
        canonical.kind != dtype.kind
        or canonical.itemsize != dtype.itemsize
        or canonical.alignment != dtype.alignment
        or canonical.flags != dtype.flags
        or canonical.hasobject
    ):
        raise refuse_dtype(dtype, kinds, "forged flags or size")
    return canonical


def check_shape(shape: Any) -> tuple[int, ...]:
    """An array shape as a tuple of non-negative ints (an int is a 1-d shape), or
    :class:`UnsafePickle`."""
    if type(shape) is int:
        shape = (shape,)
    if type(shape) not in (tuple, list) or len(shape) > _MAX_NDIM:
        raise UnsafePickle(
            f"refused array shape {short_repr(shape)}: expected a tuple of at most 64 ints"
        )
    out = []
    for n in shape:
        if type(n) is not int or n < 0:
            raise UnsafePickle(
                f"refused array shape {short_repr(shape)}: expected non-negative ints"
            )
        out.append(n)
    return tuple(out)


def check_extent(shape: tuple[int, ...], limit: int) -> None:
    """Refuse a shape whose dimensions, zeros counted as 1, span more than ``limit`` elements.

    An array's memory is paid for by the body, except an empty one's: ``(0, 2**62)`` holds no
    data, yet converting it to another dtype, or stacking it with others, asks numpy for more
    than it can address. Any shape real data could have (at most one element per byte of the
    decode budget, ``limit``) passes.

    :raises UnsafePickle: (400, like every refused shape or dtype) for one that spans more.
    """
    extent = 1
    for n in shape:
        extent *= n or 1
        if extent > limit:
            raise UnsafePickle(
                f"refused array shape {short_repr(shape)}: counting its zero dimensions as 1 it "
                f"spans more than {limit} elements, more than this body's decode budget could "
                "hold; send a shape whose dimensions fit the data"
            )


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: messages may quote what a hostile body sent (even an int
    too long for ``repr``)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits(), or one inside a container
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_error(e: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` of an exception, cut short."""
    try:
        message = str(e)
    except ValueError:  # its argument is an int too long for str()
        message = ""
    text = f"{type(e).__name__}: {message}" if message else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
