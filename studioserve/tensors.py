"""Tensor signatures and the one dtype rule every model input follows.

:class:`TensorSpec` describes one model input or output (name, per-example shape, dtype) for
every kind of model; :func:`converts_safely` is the single rule for which request dtypes a
model input accepts. Request validation (:func:`check_example`) uses both, once per key, before
anything is queued for the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidInput

__all__ = [
    "TensorSpec",
    "as_numeric_array",
    "check_dtype",
    "check_example",
    "converts_safely",
    "dtype_name",
    "zeros_for",
]

# Dtype kinds a model input of a given kind accepts, converted with a plain ``astype``: ints
# and unsigned ints become floats, float64 becomes float32; never bools, complex numbers,
# strings or objects into a numeric input.
_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "u", "b": "b", "c": "fiuc"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, per-example shape (None: any size) and dtype.

    :param name: the input or output name.
    :param shape: the shape of one example, without the batch axis.
    :param dtype: a numpy dtype name (``"float32"``), or a framework's name for a type numpy
        does not have (``"string"``).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    @property
    def numpy_dtype(self) -> np.dtype[Any] | None:
        """The dtype as numpy's, or None when numpy has no such type."""
        try:
            return np.dtype(self.dtype)
        except TypeError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def dtype_name(dtype: Any) -> str:
    """A framework dtype (numpy, TensorFlow, Keras) as numpy's name where numpy has one."""
    name = getattr(dtype, "name", None) or str(dtype)
    try:
        return np.dtype(name).name
    except TypeError:
        return str(name)


def converts_safely(got: np.dtype[Any], want: np.dtype[Any]) -> bool:
    """Whether values of dtype ``got`` may be cast to a model input of dtype ``want``.

    The one rule for every model input: ints and unsigned ints into floats, float64 into
    float32, signed into wider or narrower signed ints, unsigned into any int, any number into
    complex; never a bool into a number or a number into a bool, never a signed int into an
    unsigned one, never a float into an int.

    >>> converts_safely(np.dtype("int64"), np.dtype("float32"))
    True
    >>> converts_safely(np.dtype("float32"), np.dtype("int32"))
    False
    """
    if got == want:
        return True
    return got.kind in _ACCEPTED_KINDS.get(want.kind, want.kind)


def _holds_text(value: Any) -> bool:
    """Whether nested lists or tuples hold a str or bytes anywhere: numpy would turn every
    other element into a string as long as the longest one (``[0] * 10**6 + ["x" * 10**5]``
    asks for 400 GB)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, (str, bytes, bytearray)):
            return True
    return False


def as_numeric_array(key: str, value: Any) -> np.ndarray[Any, Any]:
    """``value`` as a numeric or bool array.

    :raises InvalidInput: when it is not one (ragged lists, strings, objects).
    """
    if isinstance(value, (list, tuple)) and _holds_text(value):
        raise InvalidInput(
            f"key {key!r}: expected a numeric or bool array, got a list holding strings",
            key=key,
            stage="validate",
        )
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"key {key!r}: not an array: {e}", key=key, stage="validate") from e
    if arr.dtype.kind not in "biufc":
        raise InvalidInput(
            f"key {key!r}: expected a numeric or bool array, got dtype {arr.dtype}",
            key=key,
            stage="validate",
        )
    return arr


def check_dtype(key: str, spec: TensorSpec, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``arr`` converted to ``spec``'s dtype by :func:`converts_safely`.

    :raises InvalidInput: when the conversion is not safe.
    """
    want = spec.numpy_dtype
    got = arr.dtype
    if want is None or got == want:
        return arr
    if not converts_safely(got, want):
        raise InvalidInput(
            f"key {key!r}: input {spec.name!r} expects {want.name} values, got {got.name}",
            key=key,
            stage="validate",
        )
    try:
        return arr.astype(want, copy=False)
    except ValueError as e:  # an empty array whose other dimensions numpy cannot address
        raise InvalidInput(
            f"key {key!r}: input {spec.name!r} cannot take an array of shape {arr.shape} as "
            f"{want.name}: {e}",
            key=key,
            stage="validate",
        ) from None


def _fits(want: tuple[int | None, ...], shape: tuple[int, ...]) -> bool:
    if len(shape) != len(want):
        return False
    return all(w is None or w == g for w, g in zip(want, shape, strict=True))


def example_rows(key: str, spec: TensorSpec, arr: np.ndarray[Any, Any]) -> int | None:
    """None when ``arr`` is one example of ``spec``, else its number of examples.

    :raises InvalidInput: when it is neither one example nor ``n >= 1`` of them.
    """
    want = spec.shape
    if _fits(want, arr.shape):
        return None
    if arr.ndim == len(want) + 1 and _fits(want, arr.shape[1:]):
        if arr.shape[0] == 0:
            raise InvalidInput(
                f"key {key!r}: input {spec.name!r} has 0 examples (shape {arr.shape})",
                key=key,
                stage="validate",
            )
        return int(arr.shape[0])
    one = (
        "("
        + ", ".join("n" if d is None else str(d) for d in want)
        + ("," if len(want) == 1 else "")
        + ")"
    )
    many = "(n, " + ", ".join("?" if d is None else str(d) for d in want) + ")"
    raise InvalidInput(
        f"key {key!r}: input {spec.name!r} expects shape {one} for one example or {many} "
        f"for n examples, got {tuple(arr.shape)}",
        key=key,
        stage="validate",
    )


def check_example(key: str, specs: Sequence[TensorSpec], value: Any) -> tuple[Any, bool]:
    """Validate one request key's value against a model's inputs, once.

    A single-input model takes an array of one example (``spec.shape``) or of n examples
    (``(n, *spec.shape)``); a multi-input model a dict mapping each input name to such an
    array, all with the same number of examples.

    :returns: ``(item, squeeze)``: the item to compute (always with a leading batch axis; a
        dict of arrays for a multi-input model) and whether it was one example (so its single
        output row is unwrapped).
    :raises InvalidInput: when it does not fit the model.
    """
    if not specs:
        return value, False
    if len(specs) == 1:
        spec = specs[0]
        arr = check_dtype(key, spec, as_numeric_array(key, value))
        rows = example_rows(key, spec, arr)
        return (arr[np.newaxis] if rows is None else arr), rows is None
    if not isinstance(value, dict):
        names = ", ".join(s.name for s in specs)
        raise InvalidInput(
            f"key {key!r}: the model has {len(specs)} inputs ({names}); send a dict "
            "mapping each input name to its array",
            key=key,
            stage="validate",
        )
    missing = [s.name for s in specs if s.name not in value]
    if missing:
        raise InvalidInput(
            f"key {key!r}: missing input(s) {', '.join(missing)}", key=key, stage="validate"
        )
    item: dict[str, np.ndarray[Any, Any]] = {}
    counts: set[int | None] = set()
    for spec in specs:
        arr = check_dtype(key, spec, as_numeric_array(key, value[spec.name]))
        counts.add(example_rows(key, spec, arr))
        item[spec.name] = arr
    if len(counts) != 1:
        raise InvalidInput(
            f"key {key!r}: inputs disagree on the number of examples", key=key, stage="validate"
        )
    squeeze = counts == {None}
    if squeeze:
        item = {k: v[np.newaxis] for k, v in item.items()}
    return item, squeeze


def zeros_for(specs: Sequence[TensorSpec], rows: int = 1) -> Any:
    """A batch of ``rows`` rows of zeros for ``specs`` (unknown dimensions set to 1): an array
    for one input, a dict by input name for several."""
    arrays = {
        s.name: np.zeros((rows, *[d or 1 for d in s.shape]), dtype=s.numpy_dtype or "float32")
        for s in specs
    }
    if len(specs) == 1:
        return next(iter(arrays.values()))
    return arrays
