"""Bodies without a Content-Length (``Transfer-Encoding: chunked``) against --max-body.

On both servers, for pickle, JSON and the Open Inference Protocol: a chunked body under the
limit is answered, one over it gets 413 with the protocol's error body as soon as the limit is
crossed, and the part read is never decoded (werkzeug's own limit handed the first max_body
bytes on as the body: 400 "not a valid pickle"). The rest of a refused body is dropped, so a
client that sends all before it reads still gets the 413, and the connection stays usable.
"""

from __future__ import annotations

import http.client
import io
import json
import pickle
from collections.abc import Iterator

import numpy as np
import pytest

from studioserve.errors import TooLarge
from studioserve.http.responses import READ_CHUNK, read_unsized
from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import decode_infer_response, encode_infer_request
from tests.helpers import running_server

MAX_BODY = 4096
PICKLE = {"Content-Type": "application/x-pickle"}
JSON = {"Content-Type": "application/json", "Accept": "application/json"}
TOO_LARGE = f"larger than the limit of {MAX_BODY} bytes"


def _model() -> PipeModel:
    pipe = ModelPipe(name="plus-one")
    pipe.add(lambda x: x + 1, max_batch_size=16, name="plus")
    return PipeModel(
        pipe,
        source="chunked-test",
        inputs=[TensorSpec("x", (4,), "float32")],
        outputs=[TensorSpec("x", (4,), "float32")],
    )


@pytest.fixture(params=["granian", "waitress"], scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[ModelServer]:
    with running_server(
        "tiny", model=_model(), http_server=request.param, max_body=MAX_BODY
    ) as server:
        assert server.http is not None
        assert server.http.kind == request.param
        yield server


def _pieces(body: bytes, size: int = 64) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def post_chunked(
    conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` as ``Transfer-Encoding: chunked`` (no Content-Length) on ``conn``."""
    conn.request(
        "POST",
        path,
        body=_pieces(body),
        headers={**headers, "Transfer-Encoding": "chunked"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


@pytest.fixture
def conn(server: ModelServer) -> Iterator[http.client.HTTPConnection]:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        yield c
    finally:
        c.close()


def _x(rows: int) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


def _pickle_body(rows: int) -> bytes:
    return pickle.dumps({"x": _x(rows)})


def _json_body(rows: int) -> bytes:
    return json.dumps({"x": _x(rows).tolist()}).encode()


def _oip_body(rows: int) -> bytes:
    body, headers = encode_infer_request({"x": _x(rows)}, binary=False, binary_output=False)
    assert "Inference-Header-Content-Length" not in headers
    return body


def _check_pickle(body: bytes, rows: int) -> None:
    np.testing.assert_array_equal(pickle.loads(body)["x"], _x(rows) + 1)


def _check_json(body: bytes, rows: int) -> None:
    np.testing.assert_array_equal(json.loads(body)["x"], _x(rows) + 1)


def _check_oip(body: bytes, rows: int) -> None:
    np.testing.assert_array_equal(decode_infer_response(body)["outputs"]["x"], _x(rows) + 1)


def _studio_error(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert error["type"] == "too_large"
    assert error["keys"] == {}
    return str(error["message"])


def _oip_error(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert isinstance(error, str)
    return error


PROTOCOLS = {
    "pickle": ("/", PICKLE, _pickle_body, _check_pickle, _studio_error),
    "json": ("/", JSON, _json_body, _check_json, _studio_error),
    "oip": ("/v2/models/tiny/infer", JSON, _oip_body, _check_oip, _oip_error),
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_chunked_body_under_the_limit_is_answered(
    server: ModelServer, conn: http.client.HTTPConnection, protocol: str
) -> None:
    path, headers, make, check, _ = PROTOCOLS[protocol]
    body = make(3)
    assert 64 < len(body) < MAX_BODY  # more than one chunk
    status, _, answer = post_chunked(conn, path, body, headers)
    assert status == 200, answer
    check(answer, 3)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_chunked_body_over_the_limit_gets_413_and_the_connection_stays_usable(
    server: ModelServer, conn: http.client.HTTPConnection, protocol: str
) -> None:
    path, headers, make, check, error_of = PROTOCOLS[protocol]
    big = make(1000)
    assert len(big) > 2 * MAX_BODY
    status, resp_headers, answer = post_chunked(conn, path, big, headers)
    assert status == 413, answer
    assert resp_headers["content-type"].startswith("application/json")
    assert TOO_LARGE in error_of(answer)
    # the rest of the body was dropped, not left to be read as the next request
    status, _, answer = post_chunked(conn, path, make(2), headers)
    assert status == 200, answer
    check(answer, 2)


@pytest.mark.parametrize("protocol", ["json", "oip"])
def test_the_part_under_the_limit_is_never_decoded(
    server: ModelServer, conn: http.client.HTTPConnection, protocol: str
) -> None:
    """A body whose first max_body bytes are a complete, valid request, padded past the limit
    with JSON whitespace: cut at the limit it would decode and succeed; it must get 413."""
    path, headers, make, _, error_of = PROTOCOLS[protocol]
    valid = make(2)
    status, _, answer = post_chunked(conn, path, valid.ljust(MAX_BODY, b" "), headers)
    assert status == 200, answer  # exactly at the limit: answered
    status, _, answer = post_chunked(conn, path, valid.ljust(MAX_BODY + 1, b" "), headers)
    assert status == 413, answer
    assert TOO_LARGE in error_of(answer)


def test_a_large_chunked_body_gets_413_not_a_reset(
    server: ModelServer, conn: http.client.HTTPConnection
) -> None:
    """Far past the limit (and past what the socket buffers hold): still a 413 to read."""
    big = b"\x80\x05" + b"\x00" * (900 * 1024)
    status, _, answer = post_chunked(conn, "/", big, PICKLE)
    assert status == 413, answer[:200]
    assert TOO_LARGE in _studio_error(answer)


@pytest.mark.parametrize("kind", ["granian", "waitress"])
def test_a_large_body_over_the_limit_gets_413_not_a_reset(kind: str) -> None:
    """Past the limit and past what the loopback socket buffers absorb (granian closed such a
    connection with the body unread, and the client saw a broken pipe, not the 413)."""
    limit = 2 * 1024 * 1024
    with running_server("tiny", model=_model(), http_server=kind, max_body=limit) as server:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for n in (limit + 1, 2 * limit - 4096):
                body = b"\x80\x05" + b"\x00" * (n - 2)
                c.request("POST", "/", body=body, headers=PICKLE)  # Content-Length: refused unread
                resp = c.getresponse()
                answer = resp.read()
                assert resp.status == 413, answer[:200]
                assert f"of {n} bytes is larger than the limit" in _studio_error(answer)
                status, _, answer = post_chunked(c, "/", body, PICKLE)  # chunked: cut at the limit
                assert status == 413, answer[:200]
                assert f"larger than the limit of {limit} bytes" in _studio_error(answer)
            c.request("POST", "/", body=_pickle_body(2), headers=PICKLE)
            resp = c.getresponse()
            assert resp.status == 200
            _check_pickle(resp.read(), 2)
        finally:
            c.close()


# -- read_unsized, without a server ------------------------------------------------------------


class _Counting(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, n: int | None = -1) -> bytes:
        assert n is not None
        assert 0 < n <= READ_CHUNK
        self.asked.append(n)
        return super().read(n)


@pytest.mark.parametrize("size", [0, 1, 999, 1000])
def test_read_unsized_reads_a_body_up_to_the_limit(size: int) -> None:
    data = bytes(range(256)) * 4
    assert read_unsized(_Counting(data[:size]), 1000) == data[:size]


def test_read_unsized_stops_at_the_first_byte_over_the_limit() -> None:
    limit = 3 * READ_CHUNK + 5
    stream = _Counting(b"a" * (limit + 1) + b"b" * (10 * 1024 * 1024))
    with pytest.raises(TooLarge, match=f"larger than the limit of {limit} bytes"):
        read_unsized(stream, limit)
    kept_reads = stream.asked[:4]
    assert sum(kept_reads) == limit + 1  # the last read asks for one byte past the limit
    # then at most max(limit, 1 MiB) more are read and dropped: not the whole 10 MiB stream
    assert stream.tell() == limit + 1 + 1024 * 1024
