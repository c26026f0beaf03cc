"""A global the fuzzed pickles try to reach (``tests.wire.sentinel.trip``): if a decoder ever
called it, :data:`CALLS` would say so. Nothing else imports or calls it."""

from __future__ import annotations

from typing import Any

#: Every call of :func:`trip`, with its arguments.
CALLS: list[tuple[Any, ...]] = []


def trip(*args: Any) -> str:
    CALLS.append(args)
    return "tripped"


class Trip:
    """A class the fuzzed pickles try to instantiate (INST, OBJ, NEWOBJ)."""

    def __init__(self, *args: Any) -> None:
        CALLS.append(("Trip", *args))

    def __setstate__(self, state: Any) -> None:
        CALLS.append(("Trip.__setstate__", state))
