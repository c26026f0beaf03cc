"""The generator's HTTP/1.1 client: just enough to frame responses on keep-alive connections.

The load generator sends prepared request bytes (:meth:`Target.request_bytes
<studioserve.loadgen.target.Target.request_bytes>`) and only needs each response's status and
where it ends, so it parses no more than that: the status line, ``Connection``,
``Content-Length`` and chunked ``Transfer-Encoding``. The generator's CPU time per request is
what limits the load one process can offer, so this is kept small.
"""

from __future__ import annotations

import asyncio
import socket


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case, with its colon) in a lower-cased head."""
    i = head.find(b"\r\n" + name)
    if i < 0:
        return None
    j = head.find(b"\r\n", i + 2)
    return head[i + 2 + len(name) : j if j >= 0 else len(head)].strip()


def parse_response(buf: bytearray) -> tuple[int, int, bool] | None:
    """``(status, bytes used, keep-alive)`` of the complete HTTP/1.1 response at the start of
    ``buf``, or None while it is incomplete (Content-Length or chunked bodies).

    :raises ConnectionError: for a response that is not HTTP.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1.") or len(head) < 12 or not head[9:12].isdigit():
        raise ConnectionError(f"not an HTTP response: {head[:80]!r}")
    status = int(head[9:12])
    connection = _header(head, b"connection:")
    keep_alive = connection is None or b"close" not in connection
    pos = end + 4
    encoding = _header(head, b"transfer-encoding:")
    if encoding is None or b"chunked" not in encoding:
        length = int(_header(head, b"content-length:") or 0)
        return (status, pos + length, keep_alive) if len(buf) >= pos + length else None
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
        if size == 0:
            trailer = buf.find(b"\r\n\r\n", nl)
            return None if trailer < 0 else (status, trailer + 4, keep_alive)
        pos = nl + 2 + size + 2
        if pos > len(buf):
            return None


class AsyncConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection on an event loop (the open loop's connections)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        try:
            parsed = parse_response(self.buf)
        except ConnectionError as e:
            w.set_exception(e)
            return
        if parsed is not None:
            status, used, self.keep_alive = parsed
            del self.buf[:used]
            w.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(str(exc) if exc else "connection closed"))

    def send(self, request: bytes) -> asyncio.Future[int]:
        """Write ``request``; the future is the response's status."""
        self.waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        """Close the transport, if it was ever made."""
        if self.transport is not None:
            self.transport.close()
