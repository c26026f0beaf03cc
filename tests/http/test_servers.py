"""The embedded HTTP servers: a real request through each, the granian fallback, url_for, ports."""

from __future__ import annotations

import http.client
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from typing import Any

import pytest

from studioserve.errors import ConfigError
from studioserve.http import servers
from studioserve.http.servers import (
    HTTP_SERVERS,
    HttpServer,
    check_granian,
    make_http_server,
    reset_granian_check,
    url_for,
)
from tests.helpers import time_wait_on


def tiny_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = b"hello " + environ.get("PATH_INFO", "").encode("latin-1")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def get(server: HttpServer, path: str = "/ping") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def fresh_granian_check() -> Iterator[None]:
    """Each test checks granian afresh, and leaves no failed check cached for later tests."""
    reset_granian_check()
    yield
    reset_granian_check()


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == servers.__name__
    ]


@pytest.mark.parametrize("kind", sorted(HTTP_SERVERS))
def test_each_server_answers_a_real_request(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    server = make_http_server(tiny_app, "127.0.0.1", 0, 4, kind)
    try:
        assert server.kind == kind  # the installed granian passes the check: no fallback
        assert server.port > 0
        server.start()
        assert get(server, "/ping") == (200, b"hello /ping")
        assert get(server, "/again") == (200, b"hello /again")
    finally:
        server.stop()
    assert fallback_warnings(caplog) == []


def test_the_installed_granian_passes_the_check() -> None:
    check = check_granian()
    assert check.ok, check.problems
    assert check_granian() is check  # cached: once per process


def _break_check_gil(monkeypatch: pytest.MonkeyPatch) -> str:
    from granian.server.mt import MTServer

    monkeypatch.delattr(MTServer, "_check_gil")
    return "MTServer._check_gil"


def _break_set_main_signals(monkeypatch: pytest.MonkeyPatch) -> str:
    import granian.server.common

    monkeypatch.delattr(granian.server.common, "set_main_signals")
    return "set_main_signals"


def _break_constructor(monkeypatch: pytest.MonkeyPatch) -> str:
    from granian.server.mt import MTServer

    def narrower_init(self: Any, target: str, address: str = "127.0.0.1") -> None:
        raise AssertionError("the check must not construct a server")

    monkeypatch.setattr(MTServer, "__init__", narrower_init)
    return "MTServer() does not accept our arguments"


def _break_import(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(sys.modules, "granian.server.mt", None)  # import raises ImportError
    return "cannot be imported"


@pytest.mark.parametrize(
    "breakage",
    [_break_check_gil, _break_set_main_signals, _break_constructor, _break_import],
    ids=["no-_check_gil", "no-set_main_signals", "constructor-changed", "import-fails"],
)
def test_changed_granian_internals_fall_back_to_waitress_with_one_warning(
    breakage: Callable[[pytest.MonkeyPatch], str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    what = breakage(monkeypatch)
    reset_granian_check()
    caplog.set_level(logging.WARNING)
    server = make_http_server(tiny_app, "127.0.0.1", 0, 2, "granian")
    try:
        assert server.kind == "waitress"
        assert isinstance(server, servers.WaitressServer)
        server.start()
        assert get(server) == (200, b"hello /ping")
    finally:
        server.stop()
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert what in message
    assert message.startswith(f"granian {version('granian')} cannot be embedded")
    assert message.endswith("; waitress serves HTTP instead")
    assert not check_granian().ok  # the failed check is cached


def test_asking_for_waitress_never_checks_granian(monkeypatch: pytest.MonkeyPatch) -> None:
    _break_import(monkeypatch)
    server = make_http_server(tiny_app, "127.0.0.1", 0, 2, "waitress")
    try:
        assert server.kind == "waitress"
    finally:
        server.stop()
    assert check_granian.cache_info().currsize == 0


def test_an_unknown_server_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown HTTP server 'nginx'; choose one of"):
        make_http_server(tiny_app, "127.0.0.1", 0, 2, "nginx")


def _assert_in_use_error(info: pytest.ExceptionInfo[ConfigError], port: int) -> None:
    message = str(info.value)
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert f"Port {port} may be in use by another program" in message
    assert "--port (0 picks a free one)" in message


@pytest.mark.parametrize("kind", sorted(HTTP_SERVERS))
def test_a_port_in_use_is_a_clear_config_error(kind: str) -> None:
    for reuse in (False, True):  # a listener with SO_REUSEADDR holds its port all the same
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            if reuse:
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError) as info:
                make_http_server(tiny_app, "127.0.0.1", port, 2, kind)
        _assert_in_use_error(info, port)


@pytest.mark.parametrize("holder", sorted(HTTP_SERVERS))
@pytest.mark.parametrize("kind", sorted(HTTP_SERVERS))
def test_a_port_a_running_server_listens_on_is_refused(holder: str, kind: str) -> None:
    """granian sets SO_REUSEPORT on its listener; the bind probe (without it) keeps a second
    server off the port rather than sharing it."""
    first = make_http_server(tiny_app, "127.0.0.1", 0, 2, holder)
    try:
        first.start()
        with pytest.raises(ConfigError) as info:
            make_http_server(tiny_app, "127.0.0.1", first.port, 2, kind)
        _assert_in_use_error(info, first.port)
        assert get(first) == (200, b"hello /ping")  # the first one still serves alone
    finally:
        first.stop()


def keep_alive_load(
    port: int, clients: int, seconds: float
) -> tuple[list[int], threading.Event, threading.Event]:
    """``clients`` threads, each sending GETs on one kept-alive connection for ``seconds`` (or
    until the server goes, or ``idle`` is set), then holding it open, idle, until ``release``
    is set; each appends its count on going idle. Returns (counts, idle, release)."""
    idle, release = threading.Event(), threading.Event()
    counts: list[int] = []
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        n = 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        deadline = time.monotonic() + seconds
        ready.wait(10)
        try:
            while not idle.is_set() and time.monotonic() < deadline:
                conn.request("GET", "/ping")
                resp = conn.getresponse()
                resp.read()
                n += 1
                if resp.will_close:  # the server is stopping
                    break
        except (OSError, http.client.HTTPException):
            pass  # the server stopped under us
        counts.append(n)
        release.wait(seconds + 10)
        conn.close()

    for _ in range(clients):
        threading.Thread(target=client, daemon=True).start()
    ready.wait(10)
    return counts, idle, release


@pytest.mark.parametrize("kind", sorted(HTTP_SERVERS))
def test_a_stopped_servers_port_can_be_listened_on_again_at_once(kind: str) -> None:
    """A server stopped after keep-alive load closes its clients' open connections, which
    leaves them in TIME-WAIT on its port for a minute; the next server binds it at once
    (SO_REUSEADDR) instead of failing with 'Address already in use'."""
    server = make_http_server(tiny_app, "127.0.0.1", 0, 4, kind)
    server.start()
    port = server.port
    counts, idle, release = keep_alive_load(port, clients=8, seconds=5.0)
    try:
        time.sleep(0.5)
        idle.set()
        deadline = time.monotonic() + 10
        while len(counts) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(counts) == 8, counts
        assert min(counts) > 0, counts
        server.stop()  # it closes the 8 kept-alive connections first: TIME-WAIT on its side
    finally:
        release.set()
    waiting = time_wait_on(port)
    assert waiting is None or waiting >= 8, "no TIME-WAIT on the port: the test proves nothing"
    again = make_http_server(tiny_app, "127.0.0.1", port, 2, kind)
    try:
        again.start()
        assert get(again) == (200, b"hello /ping")
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8080, "http://127.0.0.1:8080"),
        ("0.0.0.0", 80, "http://127.0.0.1:80"),
        ("", 5000, "http://127.0.0.1:5000"),
        ("::1", 8080, "http://[::1]:8080"),
        ("::", 8080, "http://[::]:8080"),
        ("example.test", 443, "http://example.test:443"),
    ],
)
def test_url_for(host: str, port: int, url: str) -> None:
    assert url_for(host, port) == url
