"""The request and response formats of ``POST /``: media types, content negotiation, codecs.

A body is a dict of string keys to values in one of three formats:

- ``pickle``: Content-Type ``application/x-pickle``, ``application/octet-stream`` or none
  (Studio.ML's clients send none); any pickle protocol, 0 to 5, never read with an unrestricted
  unpickler: the common bodies (a dict of arrays, as ``pickle.dumps`` writes it) with
  :func:`~studioserve.wire.fast_pickle.fast_loads`, every other with
  :func:`~studioserve.wire.safe_pickle.safe_loads`, under the same rules.
- ``json``: ``application/json``, an object of nested lists (``{"x": [[1, 2], [3, 4]]}``).
- ``npz``: ``application/x-npz``, the output of :func:`numpy.savez` (no pickled members).

Every decoder charges what it builds to one :class:`~studioserve.wire.budget.Budget` per body,
from the :class:`~studioserve.wire.budget.DecodeLimits` the caller passes (``--max-body``,
``--max-keys``): a body that would build more than its budget is refused with 413 before it is
built (see :mod:`studioserve.wire.budget`).

Both sides use this module: the server (``decode_request``, ``response_format``,
``encode_response``, ``error_body``) and :class:`studioserve.Client` (``encode_request``,
``decode_response``, ``parse_error_body``). Decoding a response is just as restricted as
decoding a request: a hostile server cannot run code on a client. What is encoded is checked as
the other side will check it, so that a body this side sends is one the other side accepts.

Example::

    body, content_type = encode_request({"x": np.ones((2, 8), np.float32)})
    data, fmt = decode_request(body, content_type)          # ({"x": array}, "pickle")
    body, content_type = encode_response({"y": data["x"] + 1}, response_format(None, fmt))
"""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from ..errors import (
    NotAcceptable,
    TooManyKeys,
    UnencodableResponse,
    UnsupportedMediaType,
    WireError,
)
from ._checks import canonical_dtype, check_extent, check_shape, short_error, short_repr
from ._json import charge_json
from .budget import Budget, DecodeLimits
from .fast_encode import dumps_arrays
from .fast_pickle import fast_loads
from .safe_pickle import (
    MAX_DEPTH,
    REQUEST_ARRAY_KINDS,
    RESPONSE_ARRAY_KINDS,
    check_tree,
    safe_loads,
)

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
#: The pickle protocol of responses (and of the client's requests): 5, with in-band buffers.
PICKLE_PROTOCOL: Final = 5
#: Deprecated: the fixed cap npz bodies once had. Every decoder now follows the decode budget
#: (:class:`~studioserve.wire.budget.DecodeLimits`); ``max_decoded_bytes=`` only lowers it.
MAX_DECODED_BYTES: Final = 1 << 30
# What zipfile keeps per member of the directory (a ZipInfo and its strings), from above.
_ZIP_ENTRY: Final = 1024
# Scratch for one member being read, beyond one chunk: zipfile's buffers and zlib's state.
_MEMBER_SCRATCH: Final = 1 << 16
_CHUNK: Final = 1 << 16
# The most a deflate stream can expand: 1032 to 1.
_DEFLATE_RATIO: Final = 1032


# --------------------------------------------------------------------------------------------
# JSON and npz


class _JsonContext:
    """What converting one parsed JSON body needs: its budget, its key limit, and whether its
    lists may hold strings (then each list's leaves are looked at before numpy sees it)."""

    __slots__ = ("budget", "keys_left", "max_keys", "string_arrays", "strings")

    def __init__(self, budget: Budget, max_keys: int, strings: bool, string_arrays: bool):
        self.budget = budget
        self.max_keys = max_keys
        self.keys_left = max_keys
        self.strings = strings
        self.string_arrays = string_arrays


def _json_value(value: Any, where: str, ctx: _JsonContext, depth: int) -> Any:
    """A JSON value as the server sees it: lists of numbers become arrays, lists of strings
    stay lists (or become str arrays in responses), scalars stay Python values."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise WireError(f"body is nested deeper than {MAX_DEPTH} levels; send flatter data")
        ctx.keys_left -= len(value)
        if ctx.keys_left < 0:
            raise TooManyKeys(ctx.max_keys, what="the JSON body")
        return {
            k: _json_value(v, f"{where}[{short_repr(k)}]", ctx, depth + 1) for k, v in value.items()
        }
    if not isinstance(value, list):
        return value
    if ctx.strings:
        _charge_strings(value, where, ctx.budget)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise WireError(
            f"value for {where} is not a rectangular list of numbers ({short_error(e, 120)}); "
            "every row must have the same length"
        ) from None
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind == "U" and _all_leaves(value, str):
        return arr if ctx.string_arrays else value
    if arr.dtype.kind == "O" and _all_leaves(value, int):
        raise WireError(f"value for {where} holds an integer outside the int64 range")
    raise _mixed(where)


def _mixed(where: str) -> WireError:
    return WireError(
        f"value for {where} mixes numbers, strings, nulls or objects; send a list of numbers "
        "(nested to any depth) or a list of strings"
    )


def _charge_strings(value: list[Any], where: str, budget: Budget) -> None:
    """Before numpy sees a list that may hold strings: refuse a mix of strings and other values
    (numpy would turn every number into a string as long as the longest), and charge a list of
    strings for the array numpy makes of it (4 bytes per character of the longest, each)."""
    count = 0
    longest = 0
    others = False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            count += 1
            longest = max(longest, len(item))
        else:
            others = True
    if count and others:
        raise _mixed(where)
    if count:
        budget.charge(count * (4 * longest + 8), f"the list of strings for {where}")


def _all_leaves(value: Any, kind: type) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, kind) or isinstance(item, bool) != (kind is bool):
            return False
    return True


def _json_loads(
    body: bytes, string_arrays: bool, budget: Budget | None = None, max_keys: int | None = None
) -> Any:
    if budget is None:
        budget = DecodeLimits().budget(len(body))
    if max_keys is None:
        max_keys = budget.limits.max_keys
    shape = charge_json(body, budget, max_keys=max_keys, what="the JSON body")
    try:
        value = json.loads(body)
    except RecursionError:
        raise WireError("body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:
        raise WireError(f"body is not valid JSON: {short_error(e)}") from None
    if isinstance(value, dict):
        ctx = _JsonContext(budget, max_keys, shape.strings > 0, string_arrays)
        try:
            return {k: _json_value(v, short_repr(k), ctx, 1) for k, v in _top(value, ctx)}
        except RecursionError:
            raise WireError("body is not valid JSON: it is nested too deeply") from None
    return value


def _top(value: dict[str, Any], ctx: _JsonContext) -> Any:
    ctx.keys_left -= len(value)
    if ctx.keys_left < 0:
        raise TooManyKeys(ctx.max_keys, len(value), what="the JSON body")
    return value.items()


def _npz_loads(body: bytes, kinds: str, budget: Budget, max_keys: int) -> dict[str, Any]:
    """An npz body's members as arrays. The zip directory's sizes are never trusted: each
    member is decompressed as a stream, charged to ``budget`` as it grows, and stops at the
    first byte over it."""
    entries = body.count(b"PK\x01\x02")  # each directory entry starts with one
    budget.charge(len(body) + _ZIP_ENTRY * entries, "the npz body's zip directory")
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
        infos = zf.infolist()
    except Exception as e:  # noqa: BLE001 - any failure of the zip parser is bad input
        raise WireError(f"body is not a valid npz file: {short_error(e)}") from None
    with zf:
        if len(infos) > max_keys:
            raise TooManyKeys(max_keys, len(infos), what="the npz body")
        out: dict[str, Any] = {}
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            buf = _npz_member(zf, info, budget, len(body))
            out[key] = _npy_array(memoryview(buf), info.filename, kinds, budget)
        return out


def _npz_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget, body_length: int
) -> bytearray:
    """One member's bytes, read as a stream within ``budget``. A deflated member is inflated
    twice: first only to count its bytes (a chunk at a time, stopping at the first byte over
    the budget, so a zip bomb costs one chunk of memory), then into a buffer of that size."""
    name = short_repr(info.filename)
    if info.compress_type == zipfile.ZIP_STORED:
        bound = min(info.compress_size, body_length)
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        bound = _DEFLATE_RATIO * min(info.compress_size, body_length) + 1024
    else:
        raise WireError(
            f"npz member {name} uses zip compression method {info.compress_type}; only "
            "stored and deflate members (numpy.savez, numpy.savez_compressed) are allowed"
        )
    scratch = _MEMBER_SCRATCH + min(info.file_size, bound, _CHUNK)
    budget.charge(scratch, f"reading npz member {name}")
    try:
        # room for what it can hold: never more than its compressed data can expand to, nor
        # than the budget; a deflated member is measured first
        size = max(min(info.file_size, bound, budget.left), 0)
        if info.compress_type == zipfile.ZIP_DEFLATED:
            size = _member_size(zf, info, size, budget)
        budget.charge(size, f"npz member {name}")
        buf = bytearray(size)
        got = 0
        with zf.open(info) as f, memoryview(buf) as view:
            while True:
                chunk = f.read(min(_CHUNK, size - got) if got < size else 1)
                if not chunk:
                    break
                if got + len(chunk) > size:
                    raise budget.error(f"the npz body (member {name})")
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the zip reader is bad input
        raise WireError(f"npz member {name} is damaged: {short_error(e)}") from None
    budget.refund(scratch + size - got)
    if got < size:
        del buf[got:]
    return buf


def _member_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo, room: int, budget: Budget) -> int:
    """How many bytes a deflated member inflates to, counted a chunk at a time and never kept;
    refused at the first byte beyond ``room``."""
    total = 0
    with zf.open(info) as f:
        while chunk := f.read(_CHUNK):
            total += len(chunk)
            if total > room:
                raise budget.error(f"the npz body (member {short_repr(info.filename)})")
    return total


def _npy_array(buf: memoryview, name: str, kinds: str, budget: Budget) -> np.ndarray[Any, Any]:
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
        raise WireError(
            f"npz member {short_repr(name)} is not a valid .npy array: {short_error(e)}"
        ) from None
    dtype = canonical_dtype(dtype, kinds)
    shape = check_shape(shape)
    offset = stream.tell()
    count = math.prod(shape)
    if len(buf) - offset != count * dtype.itemsize:
        raise WireError(
            f"npz member {short_repr(name)} holds {len(buf) - offset} bytes of data, but its "
            f"header says {count * dtype.itemsize} (shape {shape}, dtype {dtype})"
        )
    check_extent(shape, budget.limit)
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
            f"unsupported Content-Type {short_repr(content_type)}: send a pickled dict as "
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
                f"{type(key).__name__} key {short_repr(key)}"
            )
    return value


def _decode(
    body: bytes,
    fmt: str,
    kinds: str,
    limits: DecodeLimits,
    max_decoded_bytes: int | None,
    string_arrays: bool,
    what: str,
) -> dict[str, Any]:
    limit = limits.budget_for(len(body))
    if max_decoded_bytes is not None:
        limit = min(limit, max_decoded_bytes)
    budget = Budget(limit, len(body), limits)
    if fmt == "pickle":
        # the common bodies (a dict of arrays) without an unpickler; any other, the general path
        value = fast_loads(body, kinds, budget)
        if value is None:
            value = safe_loads(body, array_kinds=kinds, budget=budget)
    elif fmt == "json":
        value = _json_loads(body, string_arrays, budget, limits.max_keys)
    else:
        value = _npz_loads(body, kinds, budget, limits.max_keys)
    return _check_top(value, what)


def decode_request(
    body: bytes,
    content_type: str | None,
    *,
    limits: DecodeLimits | None = None,
    max_decoded_bytes: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Decode a ``POST /`` body into ``(data, format)``.

    ``format`` is ``"pickle"``, ``"json"`` or ``"npz"``. Pickles go through
    :func:`~studioserve.wire.fast_pickle.fast_loads` if they are common bodies, else
    :func:`safe_loads`. JSON lists of numbers become arrays (``int64`` when every number is an
    int, ``float64`` when any is a float, ``bool`` for all-bool lists; the server casts to the
    model's dtype), lists of strings stay lists, scalars stay Python values. npz members are
    read with no pickle, each decompressed as a stream within the budget.

    Every decoder charges what it builds to one budget, ``limits.budget(len(body))``
    (:mod:`studioserve.wire.budget`), before building it.

    :param body: the request body.
    :param content_type: the ``Content-Type`` header, parameters allowed (``; charset=utf-8``).
    :param limits: the server's limits (``--max-body``, ``--max-keys``); None: the defaults.
    :param max_decoded_bytes: deprecated: a lower cap on the budget, in bytes.
    :raises UnsupportedMediaType: for an unknown content type (HTTP 415).
    :raises UnsafePickle: for a pickle that asks for anything but data (HTTP 400).
    :raises DecodedTooLarge: for a body that would build more than its budget (HTTP 413).
    :raises TooManyKeys: for more dict keys than ``limits.max_keys`` (HTTP 413).
    :raises WireError: for an empty, damaged or non-dict body, or an array shape that spans
        more elements than the budget (HTTP 400).
    """
    fmt = request_format(content_type)
    if not body:
        raise WireError(
            "empty request body: POST a pickled dict of numpy arrays, e.g. "
            "pickle.dumps({'x': np.zeros((1, 8), np.float32)}), or a JSON object"
        )
    limits = limits or DecodeLimits()
    data = _decode(body, fmt, REQUEST_ARRAY_KINDS, limits, max_decoded_bytes, False, "the request")
    return data, fmt


#: The media types an ``Accept`` header (or a response's Content-Type) may name: the same as
#: those of requests.
_ACCEPT_FORMATS: Final = REQUEST_FORMATS


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
            raise error(f"cannot encode as JSON: {short_error(e)}; ask for {PICKLE}") from None
        return text.encode("utf-8"), JSON
    if fmt == "npz":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in data.items():
                try:
                    arr = np.asarray(value)
                except (ValueError, TypeError) as e:
                    raise error(
                        f"npz cannot carry the {type(value).__name__} under {short_repr(key)} "
                        f"({short_error(e, 80)}); ask for {PICKLE} instead"
                    ) from None
                if arr.dtype.hasobject or arr.dtype.kind not in RESPONSE_ARRAY_KINDS:
                    raise error(
                        f"npz can only carry arrays of numbers or strings, not the "
                        f"{type(value).__name__} under {short_repr(key)}; ask for {PICKLE} instead"
                    )
                try:
                    member = zf.open(f"{key}.npy", "w", force_zip64=True)
                except UnicodeEncodeError:  # a lone surrogate: no zip name can hold it
                    raise error(
                        f"npz cannot carry the key {short_repr(key)}; ask for {PICKLE} instead"
                    ) from None
                with member as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
        return buf.getvalue(), NPZ
    raise ValueError(f"unknown wire format {fmt!r}: use one of {', '.join(FORMATS)}")


def _check_outgoing(data: Any, kinds: str, error: type[WireError], what: str) -> dict[str, Any]:
    """``data`` checked as :func:`safe_loads` would check it on the other side, with array
    subclasses turned into plain arrays (a copy where needed: ``data`` is not changed)."""
    if type(data) is not dict or not all(type(k) is str for k in data):
        raise error(f"{what} must be a dict of str keys, got {type(data).__name__}")
    try:
        out: dict[str, Any] = check_tree(data, kinds, MAX_DEPTH, in_place=False)
    except WireError as e:
        raise error(f"{what} cannot be sent: {e}") from None
    return out


def encode_response(data: dict[str, Any], fmt: str) -> tuple[bytes, str]:
    """Encode a response dict as ``(body, content_type)`` in ``fmt``.

    Pickles use protocol 5 with in-band buffers (a dict of plain numeric arrays is written by
    :func:`~studioserve.wire.fast_encode.dumps_arrays`, any other by :func:`pickle.dumps`);
    JSON turns arrays into nested lists and numpy scalars into Python numbers (non-finite
    floats are written ``NaN``/``Infinity``, as Python's json module reads them); npz writes
    each key as an ``.npy`` member without pickle.

    :raises UnencodableResponse: when a value is not data (an object array, a custom class).
    :raises NotAcceptable: when ``fmt`` cannot carry a value (complex numbers or bytes in
        JSON, nested dicts in npz).
    """
    if fmt == "pickle" and type(data) is dict:
        # the common response (str keys, plain numeric arrays) needs neither check nor Pickler
        body = dumps_arrays(data)
        if body is not None:
            return body, PICKLE
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
    limits: DecodeLimits | None = None,
    max_decoded_bytes: int | None = None,
) -> dict[str, Any]:
    """Decode a successful response body; the client side of :func:`encode_response`.

    As restricted as :func:`decode_request` (a hostile server cannot run code on the client,
    nor make it allocate more than the budget for the response's size), but arrays of
    fixed-width strings are allowed (class labels). JSON lists become arrays.

    :param limits: None: :meth:`DecodeLimits.for_response` (the budget's formula, with a cap
        and key limit that follow the response's size).
    :raises WireError: for a body that is not a dict in a known format.
    """
    media = media_type(content_type)
    fmt = _ACCEPT_FORMATS.get(media, "pickle" if not media else "")
    if not fmt:
        raise WireError(
            f"the server answered with unsupported Content-Type {short_repr(content_type)}"
        )
    if not body:
        raise WireError("the server answered with an empty body")
    limits = limits or DecodeLimits.for_response(len(body))
    return _decode(body, fmt, RESPONSE_ARRAY_KINDS, limits, max_decoded_bytes, True, "the response")


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
