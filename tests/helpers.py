"""Helpers shared by the server tests: real servers on loopback, raw HTTP requests."""

from __future__ import annotations

import http.client
import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from studioserve.config import ServeConfig
from studioserve.lifecycle import ModelServer
from studioserve.loader import LoadedModel


@contextmanager
def running_server(
    key: str = "exp",
    *,
    model: LoadedModel | None = None,
    http_server: str = "granian",
    **config: Any,
) -> Iterator[ModelServer]:
    """A real studioserve server on 127.0.0.1, an ephemeral port, stopped and joined after."""
    cfg = ServeConfig(key=key, port=0, killafter=config.pop("killafter", 0), **config)
    server = ModelServer(cfg, model=model, http_server=http_server)
    server.start()
    try:
        yield server
    finally:
        server.close()


def raw_post(
    url: str,
    body: bytes | None,
    headers: dict[str, str] | None = None,
    path: str = "/",
    method: str = "POST",
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns (status, headers, body)."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_pickle(url: str, data: Any, headers: dict[str, str] | None = None) -> Any:
    return raw_post(url, pickle.dumps(data), headers)


def error_of(body: bytes) -> dict[str, Any]:
    """The ``error`` object of a JSON error body."""
    err: dict[str, Any] = json.loads(body)["error"]
    return err
