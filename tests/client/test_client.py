"""studioserve.Client against a small real HTTP server that speaks the wire contract."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import logging
import os
import pickle
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve import Client, wire
from studioserve.errors import ClientError, WireError

TOKEN = "s3cret-token-value"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


class WireServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP/1.1 server that decodes requests with the wire module and adds 1.

    Special keys in a request choose an error reply: ``fail`` (422 with per-key messages),
    ``overload`` (503), ``html`` (502 with an HTML body), ``evil`` (a hostile pickle reply),
    ``block`` (wait for ``release`` before answering).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.token: str | None = None
        self.mode = "normal"  # or "close_after" (drop keep-alive silently) or "drop"
        self.ready_after = 0
        self.ready_polls = 0
        self.marker: Path | None = None
        self.release = threading.Event()
        self.blocked = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WireServer
    timeout = 30

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers.items())))

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, error_type: str, message: str, **kw: Any) -> None:
        keys = kw.pop("keys", None)
        self._send(status, wire.error_body(error_type, message, keys), "application/json", **kw)

    def do_GET(self) -> None:
        self._record()
        srv = self.server
        if self.path.endswith("/healthz"):
            self._send(200, b'{"status": "ok"}', "application/json")
        elif self.path.endswith("/readyz"):
            with srv.lock:
                srv.ready_polls += 1
                ready = srv.ready_polls > srv.ready_after
            if ready:
                self._send(200, b'{"status": "ready"}', "application/json")
            else:
                self._error(503, "not_ready", "the model is not loaded yet", Retry_After="1")
        else:
            self._error(404, "not_found", "no such page")

    def do_POST(self) -> None:
        self._record()
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if srv.mode == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if srv.token and self.headers.get("Authorization") != f"Bearer {srv.token}":
            self._error(401, "unauthorized", "missing or wrong bearer token; pass token=")
            return
        try:
            data, fmt = wire.decode_request(body, self.headers.get("Content-Type"))
        except WireError as e:
            self._error(e.http_status, e.error_type, str(e))
            return
        if "fail" in data:
            self._error(
                422,
                "invalid_input",
                "1 of 2 keys failed: fail has shape (3,), expected (8,)",
                keys={"fail": "shape (3,), expected (8,)"},
            )
        elif "overload" in data:
            self._error(503, "overloaded", "the input queue is full; retry", Retry_After="2")
        elif "html" in data:
            self._send(502, b"<html><body>Bad Gateway</body></html>", "text/html")
        elif "evil" in data:
            assert srv.marker is not None
            self._send(200, pickle.dumps({"y": _Evil(srv.marker)}), wire.PICKLE)
        else:
            if "block" in data:
                srv.blocked.set()
                srv.release.wait(30)
            out = {k: v + 1 for k, v in data.items()}
            fmt_out = wire.response_format(self.headers.get("Accept"), fmt)
            payload, content_type = wire.encode_response(out, fmt_out)
            self._send(200, payload, content_type)
        if srv.mode == "close_after":
            # close without telling the client (no "Connection: close"): a stale keep-alive
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[WireServer]:
    srv = WireServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), name="test-wire-server")
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(10)


@pytest.fixture
def make_client(server: WireServer) -> Iterator[Callable[..., Client]]:
    """A factory of clients for ``server``, all closed before the server stops."""
    clients: list[Client] = []

    def make(url: str | None = None, **kw: Any) -> Client:
        client = Client(url or server.url, **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pickle", "json", "npz"])
def test_predict_round_trip(make_client: Callable[..., Client], fmt: str) -> None:
    client = make_client(format=fmt)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = client.predict({"x": x, "y": np.array([1, 2])})
    assert np.array_equal(out["x"], x + 1)
    assert out["x"].dtype == (np.float32 if fmt != "json" else np.float64)
    assert out["y"].tolist() == [2, 3]


def test_requests_carry_format_headers_and_path(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    make_client(format="json").predict({"x": np.zeros(2)})
    method, path, headers = server.requests[-1]
    assert (method, path) == ("POST", "/")
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"].startswith("studioserve-client/")
    assert "Authorization" not in headers


def test_url_path_prefix(server: WireServer, make_client: Callable[..., Client]) -> None:
    client = make_client(server.url + "/api/v1/")
    assert client.url == server.url + "/api/v1"
    client.predict({"x": np.zeros(1)})
    assert client.healthy()
    assert [p for _, p, _ in server.requests] == ["/api/v1/", "/api/v1/healthz"]


def test_keep_alive_reuses_one_connection(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    client = make_client()
    for i in range(5):
        assert client.predict({"x": np.array([i])})["x"].tolist() == [i + 1]
    assert server.connections == 1


def test_reconnects_once_when_the_server_dropped_a_kept_alive_connection(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    server.mode = "close_after"
    client = make_client()
    for i in range(3):
        assert client.predict({"x": np.array([i])})["x"].tolist() == [i + 1]
    assert server.connections == 3
    assert len(server.requests) == 3  # each request reached the server exactly once


def test_a_fresh_connection_that_fails_is_not_retried(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    server.mode = "drop"
    client = make_client()
    with pytest.raises(ClientError) as info:
        client.predict({"x": np.zeros(1)})
    assert info.value.status == 0
    assert info.value.error_type == "connection"
    assert server.url in str(info.value)
    assert server.connections == 1
    assert len(server.requests) == 1


def test_many_threads_share_one_client(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    client = make_client()

    def work(i: int) -> list[int]:
        return [int(client.predict({"x": np.array([i, j])})["x"][1]) for j in range(10)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(16)))
    assert results == [[j + 1 for j in range(10)]] * 16
    assert server.connections <= 8  # one keep-alive connection per thread
    assert len(server.requests) == 160


def test_error_reply_carries_the_server_message_status_type_and_keys(
    make_client: Callable[..., Client],
) -> None:
    client = make_client()
    with pytest.raises(ClientError) as info:
        client.predict({"fail": np.zeros(3), "ok": np.zeros(8)})
    err = info.value
    assert str(err) == "1 of 2 keys failed: fail has shape (3,), expected (8,)"
    assert err.status == 422
    assert err.http_status == 422
    assert err.error_type == "invalid_input"
    assert err.keys == {"fail": "shape (3,), expected (8,)"}
    # the connection is still good after an error reply
    assert client.predict({"x": np.zeros(1)})["x"].tolist() == [1.0]


def test_overloaded_and_non_json_errors(make_client: Callable[..., Client]) -> None:
    client = make_client()
    with pytest.raises(ClientError) as info:
        client.predict({"overload": np.zeros(1)})
    assert (info.value.status, info.value.error_type) == (503, "overloaded")
    with pytest.raises(ClientError) as info:
        client.predict({"html": np.zeros(1)})
    assert info.value.status == 502
    assert info.value.error_type == "http_error"
    assert "HTTP 502" in str(info.value)
    assert "Bad Gateway" in str(info.value)


def test_server_side_wire_errors_come_back_as_client_errors(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    # a value the client itself refuses never leaves the machine
    client = make_client()
    with pytest.raises(ClientError, match="refused numpy dtype object") as info:
        client.predict({"x": np.array([1, None])})
    assert info.value.status == 0
    assert server.requests == []


def test_token_is_sent_as_a_bearer_header_and_never_in_the_url_or_logs(
    server: WireServer, make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    server.token = TOKEN
    caplog.set_level(logging.DEBUG, logger="studioserve")
    with pytest.raises(ClientError) as info:
        make_client().predict({"x": np.zeros(1)})
    assert (info.value.status, info.value.error_type) == (401, "unauthorized")
    client = make_client(token=TOKEN)
    assert client.predict({"x": np.zeros(1)})["x"].tolist() == [1.0]
    assert client.ready()
    _, path, headers = server.requests[-2]
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert all(TOKEN not in p for _, p, _ in server.requests)
    assert TOKEN not in repr(client)
    assert TOKEN not in client.url
    assert caplog.records  # the client did log at debug level
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_credentials_or_query_in_the_url_are_refused() -> None:
    with pytest.raises(ValueError, match="token="):
        Client("http://user:pw@127.0.0.1:5000")
    with pytest.raises(ValueError, match="query"):
        Client(f"http://127.0.0.1:5000/?token={TOKEN}")
    with pytest.raises(ValueError, match="scheme"):
        Client("ftp://127.0.0.1")
    with pytest.raises(ValueError, match="format"):
        Client("http://127.0.0.1", format="xml")
    with pytest.raises(TypeError, match="dict"):
        Client("http://127.0.0.1").predict([1, 2])  # type: ignore[arg-type]


def test_url_defaults() -> None:
    assert Client("127.0.0.1:5000").url == "http://127.0.0.1:5000"
    assert Client("http://127.0.0.1").url == "http://127.0.0.1:80"
    assert Client("https://127.0.0.1/").url == "https://127.0.0.1:443"
    assert Client("http://[::1]:8080").url == "http://[::1]:8080"


def test_connection_refused_names_the_url() -> None:
    port = _refused_port()
    with Client(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(ClientError) as info:
            client.predict({"x": np.zeros(1)})
        assert info.value.status == 0
        assert info.value.error_type == "connection"
        assert f"http://127.0.0.1:{port}" in str(info.value)
        assert "ConnectionRefusedError" in str(info.value)
        assert not client.healthy()
        assert not client.ready()


def test_timeout_is_a_client_error(server: WireServer, make_client: Callable[..., Client]) -> None:
    client = make_client(timeout=0.3)
    # the server holds the request until the test releases it, so the client must time out
    with pytest.raises(ClientError) as info:
        client.predict({"block": np.zeros(1)})
    assert server.blocked.is_set()
    assert (info.value.status, info.value.error_type) == (0, "timeout")
    assert "timed out" in str(info.value)
    server.release.set()


def test_hostile_response_does_not_run_code_on_the_client(
    server: WireServer, make_client: Callable[..., Client], tmp_path: Path
) -> None:
    server.marker = tmp_path / "client-pwned"
    with pytest.raises(ClientError, match=r"could not be decoded: refused to unpickle \w+\.system"):
        make_client().predict({"evil": np.zeros(1)})
    assert not server.marker.exists()


def test_health_ready_and_wait_ready(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    client = make_client()
    assert client.healthy()
    server.ready_after = 3
    assert not client.ready()  # poll 1
    client.wait_ready(timeout=30)  # polls 2, 3 (503) and 4 (200)
    assert server.ready_polls == 4
    assert client.ready()


def test_wait_ready_times_out_with_the_last_answer(
    server: WireServer, make_client: Callable[..., Client]
) -> None:
    server.ready_after = 10**9
    with pytest.raises(ClientError) as info:
        make_client().wait_ready(timeout=0.2)
    assert info.value.status == 503
    assert info.value.error_type == "not_ready"
    assert "not ready after 0.2 s" in str(info.value)
    assert "the model is not loaded yet" in str(info.value)


def test_wait_ready_on_a_closed_port() -> None:
    with pytest.raises(ClientError, match="not ready after .*ConnectionRefusedError"):
        Client(f"http://127.0.0.1:{_refused_port()}").wait_ready(timeout=0.2)


def test_close_and_context_manager(server: WireServer) -> None:
    with Client(server.url) as client:
        client.predict({"x": np.zeros(1)})
    assert client._connections == []
    # usable again after close: it reconnects
    assert client.predict({"x": np.zeros(1)})["x"].tolist() == [1.0]
    client.close()
    assert server.connections == 2


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    srv = WireServer()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), name="test-wire-server-tls")
    thread.start()
    try:
        port = srv.server_address[1]
        client_ctx = ssl.create_default_context(cafile=str(cert))
        with Client(f"https://127.0.0.1:{port}", ssl_context=client_ctx) as client:
            assert client.predict({"x": np.arange(3)})["x"].tolist() == [1, 2, 3]
            assert client.predict({"x": np.arange(3)})["x"].tolist() == [1, 2, 3]
            assert client.healthy()
        assert srv.connections == 2  # one keep-alive for predict, one for the probe
        # without trusting the certificate, the client refuses the server
        with Client(f"https://127.0.0.1:{port}") as untrusting:
            with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"):
                untrusting.predict({"x": np.zeros(1)})
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)
