"""What parsing a JSON body will allocate, bounded before it is parsed.

Private to :mod:`studioserve.wire`. Python's json module cannot be stopped halfway, so
:func:`charge_json` bounds what it (and the conversion of lists to arrays after it) will build
from the body's structural characters, counted at C speed, and charges that to the request's
:class:`~studioserve.wire.budget.Budget`; it also refuses bodies with more object keys than
``max_keys``, counting keys exactly (colons outside strings). Both happen before a single value
is built.

The bound, for a body of ``n`` bytes with ``c`` commas, ``l`` ``[``, ``d`` ``{`` and ``k``
keys (every value is followed by a comma or closes its container, so there are at most
``c + l + d + 1`` values)::

    w * n                         string contents (w = 1, or 4 when non-ASCII text or \\u
                                  escapes may make a string UCS-4)
    + 24 * values                 a list slot with its growth, and an array element
    + 64 * objects                a float, int or str object, with parsing temporaries
                                  (objects <= values, and <= the floats, the 3-digit runs and
                                  the strings the body can spell)
    + 96 * l + 512 * d + 320 * k  lists, objects (parsed, then copied once), keys

It was measured against tracemalloc's peak, in bytes per byte of body: flat lists of numbers
cost 2.6-11 (bounded at 5-24), rows of floats 2.6-14 (bounded at 5-31), lists of tiny or empty
rows 24-48 (bounded at 36-56), key-heavy objects 12-32 (bounded at 33-67). Lists of strings are
charged separately, when they are seen, for the array numpy would make of them (4 bytes per
character of the longest string, per string).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

import numpy as np

from ..errors import TooManyKeys
from .budget import Budget

_VALUE: Final = 24
_OBJECT: Final = 64
_LIST: Final = 96
_DICT: Final = 512
_KEY: Final = 320
_CHUNK: Final = 1 << 18
_SMALL: Final = 4096  # a body this small is counted without numpy
_STRINGS: Final = re.compile(rb'"[^"]*(?:"|\Z)')


class JsonShape(NamedTuple):
    """What :func:`charge_json` learnt of a body: its keys (exact unless strings hold escaped
    quotes) and how many string values it may hold (0: none at all)."""

    keys: int
    exact: bool
    strings: int


def _byte_counts(body: bytes) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
    """How often each byte value occurs in ``body`` (one pass, a chunk at a time)."""
    arr = np.frombuffer(body, np.uint8)
    total = np.zeros(256, dtype=np.int64)
    for start in range(0, len(arr), _CHUNK):
        total += np.bincount(arr[start : start + _CHUNK], minlength=256)
    return total


def _structural_colons(body: bytes, budget: Budget) -> int:
    """The colons outside strings (one per key), for a body without escaped quotes: a chunk at
    a time, each colon inside a string when an odd number of quotes comes before it. Charges
    its scratch memory (a chunk's byte mask and the positions of its quotes and colons). A
    small body is counted with one regex pass instead: numpy's fixed costs would dominate."""
    if len(body) <= _SMALL:
        # each string, or the unclosed rest, removed: the colons left are outside strings
        return _STRINGS.sub(b"", body).count(b":")
    arr = np.frombuffer(body, np.uint8)
    scratch = 2 * _CHUNK + 16 * 2 * _CHUNK // 4
    budget.charge(scratch, "counting the JSON body's keys")
    outside = 0
    parity = 0
    for start in range(0, len(arr), _CHUNK):
        chunk = arr[start : start + _CHUNK]
        quotes = np.flatnonzero(chunk == 0x22)
        colons = np.flatnonzero(chunk == 0x3A)
        inside = (np.searchsorted(quotes, colons) + parity) & 1
        outside += len(colons) - int(np.count_nonzero(inside))
        parity = (parity + len(quotes)) & 1
    budget.refund(scratch)
    return outside


def charge_json(body: bytes, budget: Budget, *, max_keys: int, what: str) -> JsonShape:
    """Charge ``budget`` what parsing ``body`` will build.

    :raises TooManyKeys: (413) for more keys than ``max_keys``.
    :raises DecodedTooLarge: (413) when the budget cannot pay.
    """
    n = len(body)
    scratch = 8 * min(n, _CHUNK) + 8192  # numpy counts a chunk as 8-byte ints
    budget.charge(scratch, "counting the JSON body")
    counts = _byte_counts(body).tolist()
    budget.refund(scratch)
    quotes, colons = counts[0x22], counts[0x3A]
    if quotes == 0:
        shape = JsonShape(0, True, 0)
    elif b'\\"' not in body:
        keys = _structural_colons(body, budget) if colons else 0
        shape = JsonShape(keys, True, max(quotes // 2 - keys, 0))
    else:
        shape = JsonShape(colons, False, quotes // 2)
    if shape.exact and shape.keys > max_keys:
        raise TooManyKeys(max_keys, shape.keys, what=what)
    lists, dicts = counts[0x5B], counts[0x7B]
    values = counts[0x2C] + lists + dicts + 1
    spelled = (
        counts[0x2E]  # .
        + counts[0x65]  # e
        + counts[0x45]  # E
        + sum(counts[0x30:0x3A]) // 3  # runs of 3 digits: ints too big to be cached
        + shape.strings
    )
    wide = 1 if body.isascii() and b"\\u" not in body else 4
    cost = (
        wide * n
        + _VALUE * values
        + _OBJECT * min(values, spelled)
        + _LIST * lists
        + _DICT * dicts
        + _KEY * shape.keys
    )
    budget.charge(cost, what)
    return shape
