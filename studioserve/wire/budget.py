"""The decode budget: how much memory one body may make the decoders allocate.

Every decoder (the restricted unpickler, JSON, npz, the Open Inference Protocol's JSON and binary
tensors, gzip/deflate) charges what it is about to build to one :class:`Budget` per request,
*before* building it, and stops at the first charge over the limit. For a body of ``B`` bytes
the budget is::

    budget(B) = constant + min(body_multiple * B, cap_multiple * max_body)
              = 8 MiB + min(32 * B, 8 * --max-body)           (the defaults)

so a body may build at most 32 times its size (plus 8 MiB, enough for any small request), and
no body, whatever its size, more than 8 times ``--max-body`` plus 8 MiB (520 MiB at the
default 64 MiB; a 1 MiB body: 40 MiB). What is charged is what is actually created,
estimated from above:

- pickles: every opcode that makes an object (containers, strings, bytes, ints, floats, memo
  entries, marks, stack slots, the entries of lists, dicts and sets, the globals' calls) is
  charged its CPython size by an opcode pre-scan before the unpickler runs; what numpy arrays
  and our stand-ins copy is charged while unpickling;
- JSON: the values, lists, objects and keys the parser and the array conversion will create,
  bounded from the body's structural characters before parsing;
- npz: the zip directory, then every member as it is decompressed (member sizes in the zip
  directory are never trusted: decompression streams and stops at the first byte over);
- OIP: the JSON part as above and each binary tensor, and a gzip/deflate body as it expands.

Measured (tracemalloc's peak, and what is charged, per byte of body), a legitimate body fits:

============================================  ========  =========
body                                          peak      charged
============================================  ========  =========
pickle of float32 arrays, protocol 4-5        1         2-3
pickle of float32 arrays, protocol 2 / 0      3 / 4     3.3 / 4.9
npz, stored or compressed                     1-1.4     2
OIP binary tensors / OIP JSON                 0 / 2.6   1 / 6
JSON rows of floats (256 or 4 per row)        2.6-2.9   5-6
JSON flat list of small ints (``1,1,...``)    8.5       24
JSON lists of tiny rows (``[1,2],``)          24        36
============================================  ========  =========

so everything fits up to the cap, except JSON spelled with one or two characters per number,
which is charged 24-36 times its size and refused past ~20 MiB at the default ``--max-body``
(send those as npz or pickle). A compressed OIP body's budget follows its compressed size.
Past the budget a body is refused with :class:`~studioserve.errors.DecodedTooLarge` (HTTP 413)
within milliseconds, and what it touched is freed. Separately, a body may hold at most
``max_keys`` dict keys in all (4096 by default: ``--max-keys``), refused with
:class:`~studioserve.errors.TooManyKeys` (HTTP 413); and no array may claim a shape whose
dimensions, zeros counted as 1, span more elements than the budget holds bytes (HTTP 400: an
empty ``(0, 2**62)`` array holds nothing, but converting it to a model's dtype would ask numpy
for more than it can address).

Example::

    limits = DecodeLimits(max_body=64 << 20, max_keys=4096)
    budget = limits.budget(len(body))
    budget.charge(1024, "a list of 128 floats")      # raises DecodedTooLarge when over
"""

from __future__ import annotations

import dataclasses
from typing import Final

from ..config import DEFAULT_MAX_BODY, DEFAULT_MAX_KEYS
from ..errors import DecodedTooLarge

__all__ = [
    "BODY_MULTIPLE",
    "CAP_MULTIPLE",
    "CONSTANT",
    "DEFAULT_MAX_KEYS",
    "Budget",
    "DecodeLimits",
]

#: How many bytes a decoder may build per body byte (``k``).
BODY_MULTIPLE: Final = 32
#: The absolute cap, in multiples of ``max_body`` (``m``).
CAP_MULTIPLE: Final = 8
#: What any body may build on top (``C``): 8 MiB.
CONSTANT: Final = 8 << 20
#: The most dict keys a body may hold, in all (``--max-keys``).


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """The limits every decoder of one server applies (``--max-body``, ``--max-keys``).

    :param max_body: the largest body in bytes (``--max-body``); the budget's cap follows it.
    :param max_keys: the most dict keys a body may hold, in all (``--max-keys``).
    :param body_multiple: the bytes a decoder may build per body byte.
    :param cap_multiple: the cap on what any body may build, in multiples of ``max_body``.
    :param constant: the bytes any body may build on top.
    """

    max_body: int = DEFAULT_MAX_BODY
    max_keys: int = DEFAULT_MAX_KEYS
    body_multiple: int = BODY_MULTIPLE
    cap_multiple: int = CAP_MULTIPLE
    constant: int = CONSTANT

    def __post_init__(self) -> None:
        for name in ("max_body", "max_keys", "body_multiple", "cap_multiple"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be an int >= 1, not {value!r}")
        if type(self.constant) is not int or self.constant < 0:
            raise ValueError(f"DecodeLimits.constant must be an int >= 0, not {self.constant!r}")

    @classmethod
    def for_response(cls, length: int) -> DecodeLimits:
        """The limits a client decodes a response of ``length`` bytes with: the budget's
        formula, with a cap and a key limit that follow the response rather than a server's
        options (a client has no ``--max-body``)."""
        return cls(max_body=max(length, DEFAULT_MAX_BODY), max_keys=max(length, DEFAULT_MAX_KEYS))

    def budget_for(self, length: int) -> int:
        """The decode budget in bytes for a body of ``length`` bytes."""
        grow = min(self.body_multiple * max(length, 0), self.cap_multiple * self.max_body)
        return self.constant + grow

    def budget(self, length: int) -> Budget:
        """A fresh :class:`Budget` for one body of ``length`` bytes."""
        return Budget(self.budget_for(length), length, self)

    def rule(self) -> str:
        """The formula, in words, for messages."""
        return (
            f"{_size(self.constant)} + min({self.body_multiple} x body, "
            f"{self.cap_multiple} x --max-body of {_size(self.max_body)})"
        )


class Budget:
    """What is left of one body's decode budget; decoders :meth:`charge` it before they build.

    :param limit: the budget in bytes.
    :param length: the body's size in bytes (for messages).
    :param limits: the limits it came from (for messages and ``max_keys``).
    """

    __slots__ = ("left", "length", "limit", "limits")

    def __init__(self, limit: int, length: int, limits: DecodeLimits) -> None:
        self.limit = limit
        self.left = limit
        self.length = length
        self.limits = limits

    @property
    def used(self) -> int:
        """The bytes charged so far."""
        return self.limit - self.left

    def charge(self, nbytes: int, what: str) -> None:
        """Charge ``nbytes`` about to be built for ``what``.

        :raises DecodedTooLarge: (413) when the budget cannot pay for it.
        """
        self.left -= nbytes
        if self.left < 0:
            raise self.error(what, self.limit - self.left)

    def refund(self, nbytes: int) -> None:
        """Give back ``nbytes`` charged for a temporary that is now freed."""
        self.left = min(self.limit, self.left + nbytes)

    def error(
        self, what: str, needed: int | None = None, cls: type[DecodedTooLarge] = DecodedTooLarge
    ) -> DecodedTooLarge:
        """The 413 for ``what`` (which needs ``needed`` bytes in all, when known)."""
        amount = (
            f"would build {needed} bytes once decoded, more than"
            if needed is not None
            else "expands to more than"
        )
        return cls(
            f"{what} {amount} the decode budget of {self.limit} bytes for a body of "
            f"{self.length} bytes (budget = {self.limits.rule()}); send fewer "
            "examples per request, send arrays as npz or pickle rather than JSON lists, or "
            "start the server with a larger --max-body",
            limit=self.limit,
            length=self.length,
        )


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
