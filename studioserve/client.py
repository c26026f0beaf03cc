"""A Python client for ``studio serve``: ``Client(url, token).predict({"x": array})``.

It speaks the wire format of :mod:`studioserve.wire` (pickle by default), keeps one
keep-alive HTTP connection per thread, and raises :class:`~studioserve.errors.ClientError`
carrying the server's message, status, error type and per-key messages for every failure.
Responses are decoded with the same restricted unpickler the server uses, so a hostile
server cannot run code on the client. Only the standard library and numpy are used.

Example::

    import numpy as np
    from studioserve import Client

    with Client("http://127.0.0.1:5000") as client:
        client.wait_ready(timeout=60)
        out = client.predict({"x": np.zeros((2, 8), np.float32)})
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from . import wire
from ._version import __version__
from .errors import ClientError, WireError

logger = logging.getLogger(__name__)

# Errors that mean a reused keep-alive connection was closed by the server before it read our
# request: the request was not processed, so sending it once more on a new connection is safe.
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


class Client:
    """A client for one studioserve server. Thread-safe; one connection per thread.

    :param url: the server's base URL, e.g. ``http://127.0.0.1:5000`` or
        ``https://host:8443/prefix``. Never put the token in the URL.
    :param token: the bearer token the server printed at startup, if auth is on. It is sent
        as ``Authorization: Bearer <token>`` and never logged.
    :param timeout: seconds to wait for a connection and for each response.
    :param format: the request format: ``"pickle"`` (default), ``"json"`` or ``"npz"``.
        Responses come back in the same format.
    :param ssl_context: for ``https`` URLs, the TLS settings (default: the system's trusted
        CAs with hostname checks).
    :raises ValueError: for a URL that is not ``http(s)://host[:port][/path]``, one with
        credentials or a query, an unknown format or a non-positive timeout.

    Example::

        client = Client("http://127.0.0.1:5000")
        client.predict({"x": np.ones((1, 8), np.float32)})  # {"x": array([[...]])}
        client.close()
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        format: str = "pickle",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {url!r}: use http:// or https://")
        if parts.username is not None or parts.password is not None:
            raise ValueError("do not put credentials in the URL: pass Client(url, token=...)")
        if parts.query or parts.fragment:
            raise ValueError(f"the server URL {url!r} must not have a query or fragment")
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}: use http://HOST:PORT")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad port in URL {url!r}: {e}") from None
        if format not in wire.FORMATS:
            raise ValueError(f"unknown format {format!r}: use one of {', '.join(wire.FORMATS)}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._scheme = scheme
        self._host = parts.hostname
        self._port = port or (443 if scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        host_text = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"{scheme}://{host_text}:{self._port}{self._prefix}"
        self.timeout = float(timeout)
        self.format = format
        # one context for all connections: building one loads the CA store
        self._ssl_context: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl_context = ssl_context or ssl.create_default_context()
        self._token = token
        self._content_type = wire.CONTENT_TYPES[format]
        self._local = threading.local()
        self._lock = threading.Lock()
        # (owner thread, connection) for every connection we opened, so close() reaches all.
        self._connections: list[tuple[threading.Thread, http.client.HTTPConnection]] = []

    def __repr__(self) -> str:
        auth = "on" if self._token else "off"
        return f"Client({self.url!r}, auth={auth}, format={self.format!r})"

    # -- public API ---------------------------------------------------------------------------

    def predict(self, data: dict[str, Any]) -> dict[str, Any]:
        """Send ``data`` (a dict of str keys to arrays or plain values) and return the results.

        :raises ClientError: with the server's message, ``status``, ``error_type`` and
            ``keys`` for an error reply; with ``status=0`` when the server cannot be reached.
        :raises TypeError: when ``data`` is not a dict.
        """
        if not isinstance(data, dict):
            raise TypeError(f"predict() takes a dict of str keys, got {type(data).__name__}")
        try:
            body, content_type = wire.encode_request(data, self.format)
        except WireError as e:
            raise ClientError(str(e), status=0, error_type=e.error_type) from e
        headers = {"Content-Type": content_type, "Accept": content_type}
        status, reason, resp_headers, resp_body = self._request("POST", "/", body, headers)
        if status != 200:
            raise self._error(status, reason, resp_body)
        try:
            return wire.decode_response(resp_body, resp_headers.get("content-type"))
        except WireError as e:
            raise ClientError(
                f"the response from {self.url} could not be decoded: {e}",
                status=status,
                error_type=e.error_type,
            ) from e

    def healthy(self) -> bool:
        """True when ``GET /healthz`` answers 200 (the server process is up)."""
        return self._probe("/healthz", self.timeout)[0] == 200

    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200 (the model is loaded and warm)."""
        return self._probe("/readyz", self.timeout)[0] == 200

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``GET /readyz`` with backoff until it answers 200.

        :raises ClientError: when the server is not ready within ``timeout`` seconds; the
            message says what the last attempt got.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            remaining = deadline - time.monotonic()
            status, last = self._probe("/readyz", max(0.05, min(self.timeout, remaining)))
            if status == 200:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    f"the server at {self.url} was not ready after {timeout:g} s; "
                    f"last answer: {last}",
                    status=status,
                    error_type="not_ready",
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def close(self) -> None:
        """Close every open connection. The client reconnects if it is used again."""
        with self._lock:
            connections = [conn for _, conn in self._connections]
            self._connections.clear()
            self._local = threading.local()
        for conn in connections:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- HTTP ---------------------------------------------------------------------------------

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._ssl_context is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl_context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _connection(self) -> http.client.HTTPConnection:
        local = self._local
        conn: http.client.HTTPConnection | None = getattr(local, "conn", None)
        if conn is None:
            conn = self._new_connection(self.timeout)
            with self._lock:
                # Close what threads that have ended left behind, then track this one.
                alive = []
                for owner, other in self._connections:
                    if owner.is_alive():
                        alive.append((owner, other))
                    else:
                        other.close()
                alive.append((threading.current_thread(), conn))
                self._connections = alive
                local = self._local  # close() may have replaced it meanwhile
            local.conn = conn
        return conn

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        headers = {"User-Agent": f"studioserve-client/{__version__}", **extra}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, str, dict[str, str], bytes]:
        """Send one request on this thread's connection; retry once on a stale keep-alive."""
        conn = self._connection()
        full_path = self._prefix + path
        all_headers = self._headers(headers)
        for attempt in (1, 2):
            reused = conn.sock is not None
            try:
                conn.request(method, full_path, body=body, headers=all_headers)
                response = conn.getresponse()
            except _STALE_CONNECTION_ERRORS as e:
                conn.close()
                if reused and attempt == 1:
                    logger.debug(
                        "%s: kept-alive connection was closed (%s); reconnecting", self.url, e
                    )
                    continue
                raise self._unreachable(e) from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise self._unreachable(e) from e
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise self._unreachable(e, "while reading the response") from e
            logger.debug(
                "%s %s%s -> %d (%d bytes)", method, self.url, path, response.status, len(data)
            )
            resp_headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, response.reason, resp_headers, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _probe(self, path: str, timeout: float) -> tuple[int, str]:
        """``(status, description)`` of one GET on a fresh connection; status 0 if unreachable."""
        conn = self._new_connection(timeout)
        try:
            conn.request("GET", self._prefix + path, headers=self._headers({}))
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            return 0, str(self._unreachable(e))
        finally:
            conn.close()
        if response.status == 200:
            return 200, "200 OK"
        return response.status, str(self._error(response.status, response.reason, data))

    def _unreachable(self, e: BaseException, when: str = "") -> ClientError:
        if isinstance(e, (socket.timeout, TimeoutError)):
            what = f"timed out after {self.timeout:g} s"
            if when:
                what += f" {when}"
            return ClientError(
                f"request to {self.url} {what}; the server may be overloaded: retry, or pass "
                "a larger timeout to Client()",
                status=0,
                error_type="timeout",
            )
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if when:
            reason += f" ({when})"
        hint = ""
        if isinstance(e, ConnectionRefusedError):
            hint = "; is 'studio serve' running there? check the host and port"
        return ClientError(
            f"cannot reach the studioserve server at {self.url}: {reason}{hint}",
            status=0,
            error_type="connection",
        )

    def _error(self, status: int, reason: str, body: bytes) -> ClientError:
        parsed = wire.parse_error_body(body)
        if parsed is not None:
            error_type, message, keys = parsed
            return ClientError(message, status=status, error_type=error_type, keys=keys)
        snippet = body[:200].decode("utf-8", "replace").strip()
        message = f"the server at {self.url} answered HTTP {status} {reason}"
        if snippet:
            message += f": {snippet}"
        return ClientError(message, status=status, error_type="http_error")
