"""The wire layer: every body studioserve reads or writes, as pure codecs.

- :mod:`.formats`: the ``POST /`` formats (pickle, JSON, npz), content negotiation and the
  JSON error body, for the server and :class:`studioserve.Client` alike.
- :mod:`.safe_pickle`: the restricted unpickler, the security boundary every pickled body
  (request or response) crosses; nothing in studioserve calls :func:`pickle.loads`.
- :mod:`.fast_pickle`: its fast path for the common pickle (a dict of arrays): a parser of the
  exact opcodes, no unpickler, the same rules; any other body goes to :mod:`.safe_pickle`.
- :mod:`.oip_codec`: the Open Inference Protocol (KServe v2) bodies, JSON and binary tensors.
- :mod:`.budget`: the decode budget every decoder charges what it builds to
  (:class:`DecodeLimits`: ``--max-body`` and ``--max-keys``): a body of ``B`` bytes may build
  at most ``8 MiB + min(32 * B, 8 * max_body)``, refused with 413 before it is built.

**No IO here**: no Flask, no sockets, no threads, no files. Functions take bytes and header
values and return values (or raise a :class:`~studioserve.errors.WireError` or
:class:`~studioserve.errors.RequestFailed` that says what is wrong); the HTTP layer and the
client do the reading and writing.

The names below are the ``POST /`` API, used as ``wire.X``::

    from studioserve import wire

    body, content_type = wire.encode_request({"x": np.ones((2, 8), np.float32)})
    data, fmt = wire.decode_request(body, content_type)
    data, fmt = wire.decode_request(body, content_type, limits=wire.DecodeLimits(max_body=1 << 20))
"""

from __future__ import annotations

from ..errors import (
    DecodedTooLarge,
    NotAcceptable,
    PickleTooLarge,
    TooManyKeys,
    UnencodableResponse,
    UnsafePickle,
    UnsupportedMediaType,
    WireError,
)
from .budget import DEFAULT_MAX_KEYS, Budget, DecodeLimits
from .formats import (
    CONTENT_TYPES,
    FORMATS,
    JSON,
    MAX_DECODED_BYTES,
    NPZ,
    OCTET_STREAM,
    PICKLE,
    PICKLE_PROTOCOL,
    REQUEST_FORMATS,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error_body,
    media_type,
    parse_error_body,
    request_format,
    response_format,
)
from .safe_pickle import MAX_DEPTH, REQUEST_ARRAY_KINDS, RESPONSE_ARRAY_KINDS, safe_loads

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_KEYS",
    "FORMATS",
    "JSON",
    "MAX_DECODED_BYTES",
    "MAX_DEPTH",
    "NPZ",
    "OCTET_STREAM",
    "PICKLE",
    "PICKLE_PROTOCOL",
    "REQUEST_ARRAY_KINDS",
    "REQUEST_FORMATS",
    "RESPONSE_ARRAY_KINDS",
    "Budget",
    "DecodeLimits",
    "DecodedTooLarge",
    "NotAcceptable",
    "PickleTooLarge",
    "TooManyKeys",
    "UnencodableResponse",
    "UnsafePickle",
    "UnsupportedMediaType",
    "WireError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_body",
    "media_type",
    "parse_error_body",
    "request_format",
    "response_format",
    "safe_loads",
]
