"""What to send: the one request every connection of a benchmark sends, prepared up front.

The body is built once, before any load, in one of three ways:

- synthesised for the pickle protocol from the studioserve server's signature (``GET /``
  names the inputs, their shapes and dtypes; a server that declares none gets ``float32[16]``),
  encoded with :func:`studioserve.wire.encode_request`;
- synthesised for the Open Inference Protocol from ``GET /v2/models/{name}`` (so any OIP
  server works with ``--model``), encoded as binary or JSON tensors by
  :func:`studioserve.wire.oip_codec.encode_infer_request`;
- or read from a file (``--body``).

(gRPC's message is built by :mod:`.grpc_load`, from the same synthesised tensors;
:func:`~.prepare.prepare_target` picks one of the two.)

One probe request must then succeed (a 2xx) before any load is sent, so a wrong token, model
name or body fails fast with the server's own message instead of as a table of errors.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .. import wire
from ..config import host_port
from ..errors import ClientError, ConfigError
from ..wire import oip_codec
from .config import BenchConfig


@dataclasses.dataclass(frozen=True)
class Target:
    """A prepared endpoint: the request bytes every connection sends, and what they carry.

    For gRPC (``scheme`` ``"grpc"``) ``path`` is the method's path, ``body`` the serialized
    message and ``headers`` the call's metadata.
    """

    scheme: str
    host: str
    port: int
    path: str
    body: bytes
    headers: dict[str, str]
    description: str
    rows: int

    @property
    def address(self) -> str:
        """``host:port`` (a gRPC target's address)."""
        return host_port(self.host, self.port)

    def request_bytes(self) -> bytes:
        """The whole HTTP/1.1 request (head and body), as sent on a keep-alive connection."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines += [f"Content-Length: {len(self.body)}", "Connection: keep-alive", "", ""]
        return "\r\n".join(lines).encode("latin-1") + self.body


@dataclasses.dataclass(frozen=True)
class _Server:
    """Where the server listens; the one-off requests made while preparing a target."""

    scheme: str
    host: str
    port: int

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        timeout: float,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """``(status, body)`` of one request on a fresh connection.

        :raises ClientError: when the server cannot be reached.
        """
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            raise ClientError(
                f"cannot reach {self.scheme}://{self.host}:{self.port}: {e}; is the server up?"
            ) from e
        finally:
            conn.close()
        return resp.status, data

    def get_json(self, path: str, headers: dict[str, str], timeout: float) -> tuple[int, Any]:
        """``(status, document)`` of ``GET path``; the document is None when it is not JSON."""
        status, body = self.request("GET", path, {"Accept": "application/json", **headers}, timeout)
        return status, _json_or_none(body)

    def target(
        self, path: str, body: bytes, headers: dict[str, str], description: str, rows: int
    ) -> Target:
        return Target(self.scheme, self.host, self.port, path, body, headers, description, rows)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _split_url(url: str) -> tuple[_Server, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"cannot benchmark {url!r}: give an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Server(parts.scheme, parts.hostname, port), path


def _error_text(status: int, doc: Any) -> str:
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    hint = " (pass --token)" if status == 401 else ""
    return f"HTTP {status}{hint}" + (f": {err}" if err else "")


def _refuse_unauthorised(cfg: BenchConfig, status: int, doc: Any) -> None:
    if status == 401:
        raise ClientError(f"{cfg.url} answered {_error_text(status, doc)}", status=401)


def _random(shape: Sequence[int], dtype: np.dtype[Any], rng: np.random.Generator) -> Any:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    arr = np.empty(shape, dtype=object)
    arr.fill(b"studioserve")
    return arr


def tensors_text(tensors: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in tensors.items())


def _pickle_target(cfg: BenchConfig, server: _Server, path: str) -> Target:
    auth = cfg.auth_headers
    status, doc = server.get_json("/", auth, cfg.timeout)
    specs: list[dict[str, Any]] = []
    if status == 200 and isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        specs = list(doc["model"].get("inputs") or [])
    else:
        _refuse_unauthorised(cfg, status, doc)
    rng = np.random.default_rng(cfg.seed)

    def make(spec: dict[str, Any]) -> Any:
        shape = [1 if d is None else int(d) for d in spec.get("shape", [])]
        full = shape if cfg.batch == 1 else [cfg.batch, *shape]
        return _random(full, np.dtype(spec.get("dtype", "float32")), rng)

    if not specs:
        value: Any = _random([16] if cfg.batch == 1 else [cfg.batch, 16], np.dtype("f4"), rng)
        what = f"float32{list(np.shape(value))} (the server declares no signature)"
    elif len(specs) == 1:
        value = make(specs[0])
        what = tensors_text({specs[0]["name"]: value})
    else:
        value = {s["name"]: make(s) for s in specs}
        what = tensors_text(value)
    body, content_type = wire.encode_request({"x": value}, "pickle")
    headers = {"Content-Type": content_type, **auth}
    return server.target(path, body, headers, f"pickle POST {path}, {{'x': {what}}}", cfg.batch)


def _oip_model_name(cfg: BenchConfig, server: _Server) -> str:
    """``cfg.model``, else the experiment a studioserve server says it serves."""
    if cfg.model is not None:
        return cfg.model
    status, doc = server.get_json("/", cfg.auth_headers, cfg.timeout)
    _refuse_unauthorised(cfg, status, doc)
    name = str(doc.get("experiment") or "") if isinstance(doc, dict) else ""
    if not name:
        raise ConfigError(
            f"{cfg.url} did not say which model it serves; pass --model NAME (the OIP model "
            "name, for studioserve the experiment key)"
        )
    return name


def oip_inputs(cfg: BenchConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Random tensors for the inputs in OIP model metadata (a batch of ``cfg.batch``)."""
    rng = np.random.default_rng(cfg.seed)
    inputs: dict[str, Any] = {}
    for t in meta.get("inputs") or []:
        dims = [int(d) for d in t.get("shape", [])]
        shape = [cfg.batch if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(dims)]
        dt = oip_codec.DATATYPES.get(str(t.get("datatype")))
        if dt is None:
            raise ConfigError(
                f"input {t.get('name')!r} has datatype {t.get('datatype')!r}, which studio "
                "bench cannot synthesise; pass --body FILE"
            )
        inputs[str(t["name"])] = _random(shape, dt, rng)
    if not inputs:
        inputs["x"] = _random([cfg.batch, 16], np.dtype("f4"), rng)
    return inputs


def _oip_target(cfg: BenchConfig, server: _Server) -> Target:
    name = _oip_model_name(cfg, server)
    path = f"/v2/models/{name}/infer"
    if cfg.body_file is not None:
        return _file_target(cfg, server, path)
    status, meta = server.get_json(f"/v2/models/{name}", cfg.auth_headers, cfg.timeout)
    if status != 200 or not isinstance(meta, dict):
        raise ClientError(
            f"GET /v2/models/{name} answered {_error_text(status, meta)}; check --model and "
            "that the server speaks the Open Inference Protocol",
            status=status,
        )
    inputs = oip_inputs(cfg, meta)
    body, headers = oip_codec.encode_infer_request(
        inputs, binary=cfg.binary, binary_output=cfg.binary
    )
    kind = "binary" if cfg.binary else "JSON"
    return server.target(
        path,
        body,
        {**headers, **cfg.auth_headers},
        f"OIP POST {path}, {kind} tensors {tensors_text(inputs)}",
        cfg.batch,
    )


def _file_target(cfg: BenchConfig, server: _Server, path: str) -> Target:
    assert cfg.body_file is not None
    try:
        body = cfg.body_file.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read --body {cfg.body_file}: {e}") from e
    suffix = cfg.body_file.suffix.lower()
    content_type = cfg.content_type or {
        ".json": "application/json",
        ".npz": "application/x-npz",
    }.get(suffix, "application/json" if cfg.protocol == "oip" else "application/x-pickle")
    return server.target(
        path,
        body,
        {"Content-Type": content_type, **cfg.auth_headers},
        f"{cfg.protocol} POST {path}, body from {cfg.body_file} ({len(body):,} bytes)",
        cfg.batch,
    )


def http_target(cfg: BenchConfig) -> Target:
    """Build the HTTP request every connection will send, and check one round trip works.

    :raises ClientError: when the server cannot be reached or the probe request fails.
    :raises ConfigError: for a bad URL, body file or missing model name.
    """
    server, path = _split_url(cfg.url)
    if cfg.protocol == "oip":
        target = _oip_target(cfg, server)
    elif cfg.body_file is not None:
        target = _file_target(cfg, server, path)
    else:
        target = _pickle_target(cfg, server, path)
    extra = dict(cfg.headers)
    if extra:
        target = dataclasses.replace(target, headers={**target.headers, **extra})
    _probe(target, cfg.timeout)
    return target


def _probe(target: Target, timeout: float) -> None:
    server = _Server(target.scheme, target.host, target.port)
    status, body = server.request("POST", target.path, target.headers, timeout, target.body)
    if not 200 <= status < 300:
        raise ClientError(
            f"the probe request ({target.description}) answered "
            f"{_error_text(status, _json_or_none(body))}; fix the request before measuring",
            status=status,
        )
