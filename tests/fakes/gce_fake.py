"""A loopback fake of the Compute Engine REST API, enough for studioserve's GCE provider.

It keeps instances, firewall rules and operations in memory, records every request (for the
secret scan and for asserting the calls made), and can inject failures. Point
google-cloud-compute at it with ``ClientOptions(api_endpoint=fake.url)``, ``transport="rest"``
and ``AnonymousCredentials()``.

Operations start ``RUNNING`` and turn ``DONE`` when polled (``get`` or ``wait``), so the
client must poll them explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlparse

_PREFIX = "/compute/v1/projects/"


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: str


@dataclasses.dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    message: str
    reason: str
    times: int
    in_operation: bool


class GceFake:
    """The fake API server (a context manager); ``url`` is its endpoint."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.firewalls: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        #: OpenSSH public key lines the "guest agent" publishes for every instance
        self.host_keys: list[str] = []
        #: publish host keys as guest attributes (else 404: only the serial console has them)
        self.guest_attributes = True
        self._ids = itertools.count(1000)
        self._failures: list[_Failure] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8") if length else ""
                status, payload = fake.handle(self.command, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="gce-fake", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> GceFake:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> GceFake:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- test controls ----------------------------------------------------------------------

    def fail(
        self,
        method: str,
        path_regex: str,
        *,
        status: int = 403,
        message: str = "injected failure",
        reason: str = "forbidden",
        times: int = 1,
        in_operation: bool = False,
    ) -> None:
        """Make the next ``times`` matching requests fail (HTTP ``status``), or, with
        ``in_operation``, accept them but finish their operation with an error."""
        with self.lock:
            self._failures.append(
                _Failure(
                    method.upper(),
                    re.compile(path_regex),
                    status,
                    message,
                    reason,
                    times,
                    in_operation,
                )
            )

    def set_status(self, name: str, status: str) -> None:
        with self.lock:
            for key, inst in self.instances.items():
                if key[2] == name:
                    inst["status"] = status

    def remove_instance(self, name: str) -> None:
        """Delete an instance the way its own end script would (not through a client)."""
        with self.lock:
            for key in [k for k in self.instances if k[2] == name]:
                del self.instances[key]

    def all_instances(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(list(self.instances.values()))

    def all_firewalls(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(list(self.firewalls.values()))

    def request_log(self) -> list[RecordedRequest]:
        with self.lock:
            return list(self.requests)

    # -- the API ----------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, message: str, reason: str) -> tuple[int, dict[str, Any]]:
        return status, {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}],
            }
        }

    def _operation(
        self, project: str, zone: str | None, kind: str, target: str, error: _Failure | None
    ) -> dict[str, Any]:
        n = next(self._ids)
        name = f"operation-{n}"
        base = f"{self.url}{_PREFIX}{project}"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(n),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "selfLink": f"{base}/{'zones/' + zone if zone else 'global'}/operations/{name}",
        }
        if zone:
            op["zone"] = f"{base}/zones/{zone}"
        if error is not None:
            op["_error"] = {"errors": [{"code": error.reason.upper(), "message": error.message}]}
        self.operations[name] = op
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _poll_operation(self, name: str) -> tuple[int, dict[str, Any]]:
        op = self.operations.get(name)
        if op is None:
            return self._error(404, f"operation {name} not found", "notFound")
        op["status"] = "DONE"
        op["progress"] = 100
        if "_error" in op:
            op["error"] = op["_error"]
        return 200, {k: v for k, v in op.items() if not k.startswith("_")}

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.times > 0 and failure.method == method and failure.pattern.search(path):
                failure.times -= 1
                return failure
        return None

    def handle(self, method: str, raw_path: str, body: str) -> tuple[int, dict[str, Any]]:
        parsed = urlparse(raw_path)
        path, query = parsed.path, parse_qs(parsed.query)
        with self.lock:
            self.requests.append(RecordedRequest(method, path, query, body))
            failure = self._take_failure(method, path)
            if failure is not None and not failure.in_operation:
                return self._error(failure.status, failure.message, failure.reason)
            if not path.startswith(_PREFIX):
                return self._error(404, f"unknown path {path}", "notFound")
            parts = path[len(_PREFIX) :].split("/")
            project = parts[0]
            rest = parts[1:]
            try:
                return self._route(method, project, rest, query, body, failure)
            except (KeyError, ValueError) as e:
                return self._error(400, f"bad request: {e}", "invalid")

    def _route(
        self,
        method: str,
        project: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: str,
        failure: _Failure | None,
    ) -> tuple[int, dict[str, Any]]:
        base = f"{self.url}{_PREFIX}{project}"
        # zones/{zone}/operations/{op}[/wait]
        if len(rest) >= 4 and rest[0] == "zones" and rest[2] == "operations":
            return self._poll_operation(rest[3])
        if len(rest) >= 3 and rest[0] == "global" and rest[1] == "operations":
            return self._poll_operation(rest[2])
        if len(rest) >= 3 and rest[0] == "zones" and rest[2] == "instances":
            zone = rest[1]
            if len(rest) == 3 and method == "POST":
                resource = json.loads(body)
                name = resource["name"]
                for field in ("machineType", "disks", "networkInterfaces"):
                    if field not in resource:
                        return self._error(400, f"missing {field}", "required")
                if (project, zone, name) in self.instances:
                    return self._error(409, f"instance {name} already exists", "alreadyExists")
                link = f"{base}/zones/{zone}/instances/{name}"
                if failure is None:
                    n = next(self._ids) % 250 + 2
                    stored = copy.deepcopy(resource)
                    stored.update(
                        id=str(next(self._ids)),
                        status="RUNNING",
                        selfLink=link,
                        zone=f"{base}/zones/{zone}",
                    )
                    for nic in stored["networkInterfaces"]:
                        nic["networkIP"] = f"10.128.0.{n}"
                        for access in nic.get("accessConfigs", []):
                            access["natIP"] = f"203.0.113.{n}"
                    self.instances[(project, zone, name)] = stored
                return 200, self._operation(project, zone, "insert", link, failure)
            if len(rest) == 3 and method == "GET":
                items = [v for k, v in self.instances.items() if k[:2] == (project, zone)]
                return 200, {"kind": "compute#instanceList", "items": items}
            name = rest[3]
            inst = self.instances.get((project, zone, name))
            if inst is None:
                return self._error(
                    404, f"The resource 'instances/{name}' was not found", "notFound"
                )
            if len(rest) == 4 and method == "GET":
                return 200, inst
            if len(rest) == 4 and method == "DELETE":
                if failure is None:
                    del self.instances[(project, zone, name)]
                return 200, self._operation(project, zone, "delete", inst["selfLink"], failure)
            if len(rest) == 5 and rest[4] == "getGuestAttributes":
                if not self.guest_attributes or not self.host_keys:
                    return self._error(
                        404, "The resource 'guestAttributes' was not found", "notFound"
                    )
                items = [
                    {"namespace": "hostkeys", "key": line.split()[0], "value": line.split()[1]}
                    for line in self.host_keys
                ]
                return 200, {
                    "kind": "compute#guestAttributes",
                    "queryPath": query.get("queryPath", [""])[0],
                    "queryValue": {"items": items},
                }
            if len(rest) == 5 and rest[4] == "serialPort":
                lines = ["[    0.000000] Linux version 6.8.0-gcp", "cloud-init: booting"]
                if self.host_keys:
                    lines.append("-----BEGIN SSH HOST KEY KEYS-----")
                    lines += [f"{k} root@{name}" for k in self.host_keys]
                    lines.append("-----END SSH HOST KEY KEYS-----")
                text = "\n".join(lines) + "\n"
                return 200, {
                    "kind": "compute#serialPortOutput",
                    "contents": text,
                    "next": str(len(text)),
                }
        if len(rest) >= 2 and rest[0] == "global" and rest[1] == "firewalls":
            if len(rest) == 2 and method == "POST":
                resource = json.loads(body)
                name = resource["name"]
                if (project, name) in self.firewalls:
                    return self._error(409, f"firewall {name} already exists", "alreadyExists")
                link = f"{base}/global/firewalls/{name}"
                if failure is None:
                    stored = copy.deepcopy(resource)
                    stored.update(id=str(next(self._ids)), selfLink=link)
                    self.firewalls[(project, name)] = stored
                return 200, self._operation(project, None, "insert", link, failure)
            if len(rest) == 2 and method == "GET":
                items = [v for k, v in self.firewalls.items() if k[0] == project]
                return 200, {"kind": "compute#firewallList", "items": items}
            name = rest[2]
            rule = self.firewalls.get((project, name))
            if rule is None:
                return self._error(
                    404, f"The resource 'firewalls/{name}' was not found", "notFound"
                )
            if method == "GET":
                return 200, rule
            if method == "DELETE":
                if failure is None:
                    del self.firewalls[(project, name)]
                return 200, self._operation(project, None, "delete", rule["selfLink"], failure)
        return self._error(404, f"unsupported {method} {'/'.join(rest)}", "notFound")
