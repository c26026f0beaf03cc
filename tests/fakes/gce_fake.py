"""A loopback fake of the Compute Engine REST API, the instance metadata server and the few
IAM / Resource Manager calls studioserve makes, enough for its GCE provider and for the
instance-side scripts (run on this machine against it).

It keeps instances, firewall rules, images, operations, service accounts, custom roles and
project IAM policies in memory, records every request (for the secret scan and for asserting
the calls made), and can inject failures. Point google-cloud-compute at it with
``ClientOptions(api_endpoint=fake.url)``, ``transport="rest"`` and ``AnonymousCredentials()``;
the instance's scripts at ``metadata_url=fake.url`` and ``api_url=fake.url``.

Where it matters it is as strict as the service (and where the real rule is not known, it
models the provider's documented assumption):

* operations start ``PENDING`` and pass through ``RUNNING`` to ``DONE`` over
  :attr:`GceFake.operation_polls` polls (``get`` or ``wait``), so a client must loop;
* instances pass through ``PROVISIONING`` and ``STAGING`` to ``RUNNING`` over ``get`` calls;
* an instance with GPUs (guest accelerators, or a g2/a2/a3/a4/g4 machine) must have
  ``onHostMaintenance=TERMINATE``; a3-highgpu-1g/2g/4g are refused with the STANDARD
  provisioning model; Spot and flex-start need ``automaticRestart=false`` and TERMINATE;
  flex-start needs ``instanceTerminationAction=DELETE``, a maxRunDuration of at most 7 days and
  ``reservationAffinity NO_RESERVATION``; a maxRunDuration must be 30 s to 120 days;
* the boot disk may not be smaller than its image's ``diskSizeGb``, and the image must exist;
* a dedicated account (``...@PROJECT.iam.gserviceaccount.com``) must exist to be attached;
* ``instances.setScheduling`` is refused on a running instance (the API reference: "can only
  be called on a stopped instance"); ``instances.update`` needs the current fingerprint and
  is refused when its change needs more than ``mostDisruptiveAllowedAction`` (a new
  maxRunDuration is modelled as needing REFRESH; a new machine type a RESTART);
* requests made with an instance's metadata token are checked against that instance's
  account: the default compute account may do anything (an Editor) unless
  :meth:`GceFake.deny` says otherwise; a dedicated account only what its role grants (an IAM
  condition mentioning ``studioserve-`` limits it to ``studioserve-*`` resources).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

_PREFIX = "/compute/v1/projects/"
_IAM_PREFIX = "/v1/projects/"
_METADATA_PREFIX = "/computeMetadata/v1/"
PROJECT_NUMBER = "123456789012"
DEFAULT_ACCOUNT = f"{PROJECT_NUMBER}-compute@developer.gserviceaccount.com"
MAX_RUN = 120 * 24 * 3600
FLEX_START_MAX_RUN = 7 * 24 * 3600
GPU_PREFIXES = ("g2-", "a2-", "a3-", "a4-", "g4-")
NOT_ON_DEMAND = ("a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g")
#: the permissions of the predefined roles the fake knows (a prefix ending in ".": all of it)
PREDEFINED_ROLES: dict[str, tuple[str, ...]] = {
    "roles/owner": ("compute.", "iam.", "resourcemanager."),
    "roles/editor": ("compute.",),
    "roles/compute.instanceAdmin.v1": ("compute.instances.", "compute.disks."),
    "roles/compute.securityAdmin": ("compute.firewalls.", "compute.networks.updatePolicy"),
}
#: update actions from least to most disruptive
ACTIONS = ("NO_EFFECT", "REFRESH", "RESTART")

Payload = dict[str, Any] | str


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: str
    authorization: str = ""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who an instance's metadata token stands for."""

    project: str
    zone: str
    instance: str
    email: str


@dataclasses.dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    message: str
    reason: str
    times: int
    in_operation: bool


def _seconds(duration: Any) -> int | None:
    if not isinstance(duration, dict) or "seconds" not in duration:
        return None
    return int(duration["seconds"])


def _clean(value: Any) -> Any:
    """``value`` without empty lists/dicts and with durations as ints (to compare bodies)."""
    if isinstance(value, dict):
        if set(value) <= {"seconds", "nanos"} and "seconds" in value:
            return int(value["seconds"])
        out = {k: _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ([], {}, None)}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class GceFake:
    """The fake API and metadata server (a context manager); ``url`` is its endpoint."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.firewalls: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        #: {(project, image name): image}, {(project, family): image name}
        self.images: dict[tuple[str, str], dict[str, Any]] = {}
        self.families: dict[tuple[str, str], str] = {}
        self.service_accounts: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, dict[str, Any]] = {}
        #: OpenSSH public key lines the "guest agent" publishes for every instance
        self.host_keys: list[str] = []
        #: publish host keys as guest attributes (else 404: only the serial console has them)
        self.guest_attributes = True
        #: polls (get/wait) an operation takes to be DONE; RUNNING before that
        self.operation_polls = 3
        #: the instance the metadata server answers for (default: the last one created)
        self.metadata_instance: str | None = None
        #: how many inserts a newly created account stays unknown to (IAM propagation)
        self.new_account_hidden_inserts = 0
        #: instances an update restarted
        self.restarts: list[str] = []
        self._denied: set[str] = set()
        self._tokens: dict[str, Identity] = {}
        self._last_instance: tuple[str, str, str] | None = None
        self._ids = itertools.count(1000)
        self._failures: list[_Failure] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8") if length else ""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload = fake.handle(self.command, self.path, body, headers)
                if isinstance(payload, str):
                    data, kind = payload.encode(), "text/plain"
                else:
                    data, kind = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                if self.path.startswith(_METADATA_PREFIX):
                    self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="gce-fake", daemon=True
        )
        self.add_image(
            "deeplearning-platform-release",
            "common-cu129-ubuntu-2404-nvidia-580-v20250801",
            disk_gb=50,
            family="common-cu129-ubuntu-2404-nvidia-580",
        )
        self.add_image(
            "ubuntu-os-cloud",
            "ubuntu-2404-noble-amd64-v20250805",
            disk_gb=10,
            family="ubuntu-2404-lts-amd64",
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

    def deny(self, *permissions: str) -> None:
        """Take ``permissions`` (``compute.instances.delete``) from every instance's account,
        as an organisation policy stripping the default account would."""
        with self.lock:
            self._denied.update(permissions)

    def add_image(
        self, project: str, name: str, *, disk_gb: int, family: str | None = None
    ) -> None:
        """Serve an image (and make it its family's newest)."""
        with self.lock:
            self.images[(project, name)] = {
                "kind": "compute#image",
                "id": str(next(self._ids)),
                "name": name,
                "family": family or "",
                "diskSizeGb": str(disk_gb),
                "status": "READY",
                "selfLink": f"{self.url}{_PREFIX}{project}/global/images/{name}",
            }
            if family:
                self.families[(project, family)] = name

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

    def operation_statuses(self) -> dict[str, list[str]]:
        """Each operation's statuses as the client saw them, in order (creation first)."""
        with self.lock:
            return {name: list(op["_seen"]) for name, op in self.operations.items()}

    # -- plumbing ---------------------------------------------------------------------------

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
            "status": "PENDING",
            "progress": 0,
            "selfLink": f"{base}/{'zones/' + zone if zone else 'global'}/operations/{name}",
            "_polls": 0,
            "_seen": ["PENDING"],
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
        op["_polls"] += 1
        if op["_polls"] >= self.operation_polls:
            op["status"] = "DONE"
            op["progress"] = 100
            if "_error" in op:
                op["error"] = op["_error"]
        else:
            op["status"] = "RUNNING"
            op["progress"] = 50
        op["_seen"].append(op["status"])
        return 200, {k: v for k, v in op.items() if not k.startswith("_")}

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.times > 0 and failure.method == method and failure.pattern.search(path):
                failure.times -= 1
                return failure
        return None

    def _caller(self, headers: dict[str, str]) -> Identity | None:
        auth = headers.get("authorization", "")
        return self._tokens.get(auth.removeprefix("Bearer ").strip()) if auth else None

    def _role_permissions(self, role: str) -> tuple[str, ...]:
        if role in PREDEFINED_ROLES:
            return PREDEFINED_ROLES[role]
        custom = self.roles.get(role)
        if custom is None or custom.get("deleted"):
            return ()
        return tuple(custom.get("includedPermissions", []))

    def _may(self, caller: Identity | None, permission: str, resource: str) -> bool:
        """Whether ``caller`` (None: the user running studioserve) holds ``permission`` on
        ``resource`` (``projects/P/zones/Z/instances/NAME``, ``projects/P/global/...``)."""
        if caller is None:
            return True
        if permission in self._denied:
            return False
        email = caller.email
        if not email.endswith(f"@{caller.project}.iam.gserviceaccount.com"):
            return True  # the default compute account (an Editor) or another project's
        member = "serviceAccount:" + email
        name = resource.rsplit("/", 1)[-1]
        for binding in self.policies.get(caller.project, {}).get("bindings", []):
            if member not in binding.get("members", []):
                continue
            granted = self._role_permissions(binding["role"])
            if not any(
                permission == p or (p.endswith(".") and permission.startswith(p)) for p in granted
            ):
                continue
            condition = binding.get("condition")
            if condition is None:
                return True
            if "studioserve-" in condition.get("expression", "") and (
                name.startswith("studioserve-") or "/networks/" in resource
            ):
                return True
        return False

    def handle(
        self, method: str, raw_path: str, body: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Payload]:
        parsed = urlparse(raw_path)
        path, query = unquote(parsed.path), parse_qs(parsed.query)
        headers = headers or {}
        with self.lock:
            self.requests.append(
                RecordedRequest(method, path, query, body, headers.get("authorization", ""))
            )
            if path.startswith(_METADATA_PREFIX):
                return self._metadata(path[len(_METADATA_PREFIX) :], headers)
            failure = self._take_failure(method, path)
            if failure is not None and not failure.in_operation:
                return self._error(failure.status, failure.message, failure.reason)
            try:
                if path.startswith(_IAM_PREFIX):
                    return self._iam(method, path[len(_IAM_PREFIX) :], query, body)
                if not path.startswith(_PREFIX):
                    return self._error(404, f"unknown path {path}", "notFound")
                parts = path[len(_PREFIX) :].split("/")
                caller = self._caller(headers)
                return self._route(method, parts[0], parts[1:], query, body, failure, caller)
            except (KeyError, ValueError, TypeError) as e:
                return self._error(400, f"bad request: {e!r}", "invalid")

    # -- the metadata server ----------------------------------------------------------------

    def _metadata(self, path: str, headers: dict[str, str]) -> tuple[int, Payload]:
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing required header: Metadata-Flavor: Google\n"
        key = self._last_instance
        if self.metadata_instance is not None:
            key = next((k for k in self.instances if k[2] == self.metadata_instance), None)
        inst = self.instances.get(key) if key else None
        if key is None or inst is None:
            return 404, "no instance\n"
        project, zone, name = key
        accounts = inst.get("serviceAccounts") or []
        email = accounts[0]["email"] if accounts else None
        if email == "default":
            email = DEFAULT_ACCOUNT
        if path.startswith("instance/service-accounts/default/"):
            if email is None:
                return 404, "Not Found\n"
            if path.endswith("/token"):
                token = f"fake-metadata-token-{next(self._ids)}"
                self._tokens[token] = Identity(project, zone, name, email)
                return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
            if path.endswith("/email"):
                return 200, email
        values = {
            "project/project-id": project,
            "project/numeric-project-id": PROJECT_NUMBER,
            "instance/name": name,
            "instance/zone": f"projects/{PROJECT_NUMBER}/zones/{zone}",
            "instance/id": inst["id"],
        }
        if path in values:
            return 200, values[path]
        return 404, "Not Found\n"

    # -- IAM and Resource Manager -----------------------------------------------------------

    def _iam(
        self, method: str, rest: str, query: dict[str, list[str]], body: str
    ) -> tuple[int, dict[str, Any]]:
        data = json.loads(body) if body else {}
        project, _, tail = rest.partition("/")
        if ":" in project and not tail:
            project, verb = project.split(":", 1)
            return self._policy(project, verb, data)
        parts = tail.split("/")
        if parts[0] == "serviceAccounts":
            if len(parts) == 1 and method == "POST":
                email = f"{data['accountId']}@{project}.iam.gserviceaccount.com"
                if email in self.service_accounts:
                    return self._error(409, f"Service account {email} already exists", "conflict")
                account = {
                    "name": f"projects/{project}/serviceAccounts/{email}",
                    "projectId": project,
                    "uniqueId": str(next(self._ids)),
                    "email": email,
                    **data.get("serviceAccount", {}),
                    "_hidden": self.new_account_hidden_inserts,
                }
                self.service_accounts[email] = account
                return 200, {k: v for k, v in account.items() if not k.startswith("_")}
            if len(parts) == 2 and method == "GET":
                account = self.service_accounts.get(parts[1])
                if account is None:
                    return self._error(404, f"Unknown service account {parts[1]}", "notFound")
                return 200, {k: v for k, v in account.items() if not k.startswith("_")}
        if parts[0] == "roles":
            if len(parts) == 1 and method == "POST":
                name = f"projects/{project}/roles/{data['roleId']}"
                if name in self.roles:
                    return self._error(409, f"Role {name} already exists", "conflict")
                self.roles[name] = {**data["role"], "name": name, "etag": "BwR1"}
                return 200, self.roles[name]
            role_id, _, verb = parts[1].partition(":")
            name = f"projects/{project}/roles/{role_id}"
            role = self.roles.get(name)
            if role is None:
                return self._error(404, f"Role {name} not found", "notFound")
            if method == "GET":
                return 200, role
            if data.get("etag") and data["etag"] != role["etag"]:
                return self._error(409, "etag mismatch", "aborted")
            if method == "POST" and verb == "undelete":
                role.pop("deleted", None)
            elif method == "PATCH":
                for field in query.get("updateMask", [""])[0].split(","):
                    role[field] = data[field]
            else:
                return self._error(404, f"unsupported {method} {rest}", "notFound")
            role["etag"] = f"BwR{next(self._ids)}"
            return 200, role
        return self._error(404, f"unsupported {method} {rest}", "notFound")

    def _policy(self, project: str, verb: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        policy = self.policies.setdefault(
            project,
            {
                "version": 1,
                "etag": "BwP0",
                "bindings": [{"role": "roles/owner", "members": ["user:owner@example.com"]}],
            },
        )
        if verb == "getIamPolicy":
            return 200, copy.deepcopy(policy)
        if verb != "setIamPolicy":
            return self._error(404, f"unsupported :{verb}", "notFound")
        new = data["policy"]
        if new.get("etag") != policy["etag"]:
            return self._error(409, "There were concurrent policy changes", "aborted")
        for binding in new.get("bindings", []):
            if binding.get("condition") and new.get("version") != 3:
                return self._error(400, "a policy with conditions must be version 3", "invalid")
            for member in binding.get("members", []):
                email = member.removeprefix("serviceAccount:")
                if (
                    member.startswith("serviceAccount:")
                    and email.endswith(f"@{project}.iam.gserviceaccount.com")
                    and email not in self.service_accounts
                ):
                    return self._error(400, f"Service account {email} does not exist.", "invalid")
        stored = copy.deepcopy(new)
        stored["etag"] = f"BwP{next(self._ids)}"
        self.policies[project] = stored
        return 200, copy.deepcopy(stored)

    # -- Compute Engine ---------------------------------------------------------------------

    def _image(self, source: str) -> dict[str, Any] | None:
        match = re.search(r"projects/([^/]+)/global/images/(family/)?([^/]+)$", source)
        if not match:
            return None
        project, family, name = match.groups()
        if family:
            name = self.families.get((project, name), "")
        return self.images.get((project, name))

    def _check_scheduling(
        self, machine: str, resource: dict[str, Any], zone: str
    ) -> tuple[int, dict[str, Any]] | None:
        """The insert's (or update's) scheduling as the service checks it; None when fine."""
        sched = resource.get("scheduling") or {}
        gpu = bool(resource.get("guestAccelerators")) or machine.startswith(GPU_PREFIXES)
        maintenance = sched.get("onHostMaintenance", "MIGRATE")
        model = sched.get("provisioningModel", "STANDARD")
        if gpu and maintenance != "TERMINATE":
            return self._error(
                400,
                "Instances with guest accelerators do not support live migration: set "
                "scheduling.onHostMaintenance to TERMINATE.",
                "invalid",
            )
        if machine in NOT_ON_DEMAND and model == "STANDARD":
            return self._error(
                400,
                f"Machine type {machine} is not available in zone {zone} with the STANDARD "
                "provisioning model; use SPOT or FLEX_START.",
                "invalid",
            )
        if model in ("SPOT", "FLEX_START") and (
            maintenance != "TERMINATE" or sched.get("automaticRestart", True)
        ):
            return self._error(
                400,
                f"{model} VMs need onHostMaintenance TERMINATE and automaticRestart false.",
                "invalid",
            )
        seconds = _seconds(sched.get("maxRunDuration"))
        if seconds is not None:
            if not 30 <= seconds <= MAX_RUN:
                return self._error(
                    400, f"maxRunDuration {seconds}s is outside [30s, 120d].", "invalid"
                )
            if not sched.get("instanceTerminationAction"):
                return self._error(
                    400, "maxRunDuration needs an instanceTerminationAction.", "invalid"
                )
        if model == "FLEX_START":
            affinity = (resource.get("reservationAffinity") or {}).get("consumeReservationType")
            if seconds is None or seconds > FLEX_START_MAX_RUN:
                return self._error(
                    400, "FLEX_START VMs need a maxRunDuration of at most 7 days.", "invalid"
                )
            if sched.get("instanceTerminationAction") != "DELETE":
                return self._error(
                    400, "FLEX_START VMs need instanceTerminationAction DELETE.", "invalid"
                )
            if affinity != "NO_RESERVATION":
                return self._error(
                    400, "FLEX_START VMs need reservationAffinity NO_RESERVATION.", "invalid"
                )
        return None

    def _insert_instance(
        self,
        project: str,
        zone: str,
        body: str,
        failure: _Failure | None,
    ) -> tuple[int, dict[str, Any]]:
        base = f"{self.url}{_PREFIX}{project}"
        resource = json.loads(body)
        name = resource["name"]
        for field in ("machineType", "disks", "networkInterfaces"):
            if field not in resource:
                return self._error(400, f"missing {field}", "required")
        if (project, zone, name) in self.instances:
            return self._error(409, f"instance {name} already exists", "alreadyExists")
        machine = resource["machineType"].rsplit("/", 1)[-1]
        refused = self._check_scheduling(machine, resource, zone)
        if refused is not None:
            return refused
        for disk in resource["disks"]:
            params = disk.get("initializeParams") or {}
            source = params.get("sourceImage", "")
            image = self._image(source)
            if image is None:
                return self._error(404, f"The resource '{source}' was not found", "notFound")
            size = int(params.get("diskSizeGb") or image["diskSizeGb"])
            if size < int(image["diskSizeGb"]):
                return self._error(
                    400,
                    f"Requested disk size cannot be smaller than the image size "
                    f"({image['diskSizeGb']} GB)",
                    "invalid",
                )
        for account in resource.get("serviceAccounts") or []:
            email = account.get("email", "")
            if email.endswith(f"@{project}.iam.gserviceaccount.com"):
                known = self.service_accounts.get(email)
                if known is None or known["_hidden"] > 0:
                    if known is not None:
                        known["_hidden"] -= 1
                    return self._error(400, f"Service account {email} does not exist.", "invalid")
        link = f"{base}/zones/{zone}/instances/{name}"
        if failure is None:
            n = next(self._ids) % 250 + 2
            stored = copy.deepcopy(resource)
            stored.update(
                id=str(next(self._ids)),
                status="PROVISIONING",
                selfLink=link,
                zone=f"{base}/zones/{zone}",
                fingerprint=f"fp-{next(self._ids)}",
            )
            for nic in stored["networkInterfaces"]:
                nic["networkIP"] = f"10.128.0.{n}"
                for access in nic.get("accessConfigs", []):
                    access["natIP"] = f"203.0.113.{n}"
            self.instances[(project, zone, name)] = stored
            self._last_instance = (project, zone, name)
        return 200, self._operation(project, zone, "insert", link, failure)

    def _update_instance(
        self,
        project: str,
        zone: str,
        inst: dict[str, Any],
        query: dict[str, list[str]],
        body: str,
    ) -> tuple[int, dict[str, Any]]:
        """``instances.update`` (PUT): fingerprint, then the action the change needs."""
        resource = json.loads(body)
        if resource.get("fingerprint") != inst["fingerprint"]:
            return self._error(
                412,
                "Supplied fingerprint does not match current metadata fingerprint.",
                "conditionNotMet",
            )
        allowed = query.get("mostDisruptiveAllowedAction", ["RESTART"])[0]
        if allowed not in ACTIONS:
            return self._error(400, f"invalid mostDisruptiveAllowedAction {allowed}", "invalid")
        needed = "NO_EFFECT"
        old_sched = _clean(inst.get("scheduling") or {})
        new_sched = _clean(resource.get("scheduling") or {})
        for key in set(old_sched) | set(new_sched):
            if old_sched.get(key) != new_sched.get(key):
                action = "RESTART" if key == "provisioningModel" else "REFRESH"
                needed = max(needed, action, key=ACTIONS.index)
        for key in ("machineType", "guestAccelerators"):
            if _clean(inst.get(key)) != _clean(resource.get(key)):
                needed = "RESTART"
        running = inst["status"] in ("PROVISIONING", "STAGING", "RUNNING")
        if running and ACTIONS.index(needed) > ACTIONS.index(allowed):
            return self._error(
                400,
                f"The update needs a {needed}, more disruptive than "
                f"mostDisruptiveAllowedAction {allowed}.",
                "invalid",
            )
        machine = resource.get("machineType", inst["machineType"]).rsplit("/", 1)[-1]
        refused = self._check_scheduling(machine, {**inst, **resource}, zone)
        if refused is not None:
            return refused
        if running and needed == "RESTART":
            self.restarts.append(inst["name"])
        for key in ("scheduling", "machineType", "guestAccelerators"):
            if key in resource:
                inst[key] = resource[key]
        inst["fingerprint"] = f"fp-{next(self._ids)}"
        return 200, self._operation(project, zone, "update", inst["selfLink"], None)

    def _test_permissions(
        self, caller: Identity | None, resource: str, body: str
    ) -> tuple[int, dict[str, Any]]:
        asked = json.loads(body or "{}").get("permissions", [])
        granted = [p for p in asked if self._may(caller, p, resource)]
        return 200, ({"permissions": granted} if granted else {})

    def _route(
        self,
        method: str,
        project: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: str,
        failure: _Failure | None,
        caller: Identity | None,
    ) -> tuple[int, dict[str, Any]]:
        # zones/{zone}/operations/{op}[/wait]
        if len(rest) >= 4 and rest[0] == "zones" and rest[2] == "operations":
            return self._poll_operation(rest[3])
        if len(rest) >= 3 and rest[0] == "global" and rest[1] == "operations":
            return self._poll_operation(rest[2])
        if len(rest) >= 3 and rest[:2] == ["global", "images"] and method == "GET":
            image = (
                self.images.get((project, self.families.get((project, rest[3]), "")))
                if rest[2] == "family" and len(rest) == 4
                else self.images.get((project, rest[2]))
            )
            if image is None:
                what = "/".join(rest[2:])
                return self._error(
                    404,
                    f"The resource 'projects/{project}/global/images/{what}' was not found",
                    "notFound",
                )
            return 200, image
        if len(rest) >= 3 and rest[0] == "zones" and rest[2] == "instances":
            zone = rest[1]
            if len(rest) == 3 and method == "POST":
                return self._insert_instance(project, zone, body, failure)
            if len(rest) == 3 and method == "GET":
                items = [v for k, v in self.instances.items() if k[:2] == (project, zone)]
                return 200, {"kind": "compute#instanceList", "items": items}
            name = rest[3]
            inst = self.instances.get((project, zone, name))
            resource = f"projects/{project}/zones/{zone}/instances/{name}"
            if inst is None:
                return self._error(
                    404, f"The resource 'instances/{name}' was not found", "notFound"
                )
            if len(rest) == 4 and method == "GET":
                shown = copy.deepcopy(inst)
                following = {"PROVISIONING": "STAGING", "STAGING": "RUNNING"}
                inst["status"] = following.get(inst["status"], inst["status"])
                return 200, shown
            if len(rest) == 4 and method == "DELETE":
                if not self._may(caller, "compute.instances.delete", resource):
                    return self._error(
                        403,
                        f"Required 'compute.instances.delete' permission for '{resource}'",
                        "forbidden",
                    )
                if failure is None:
                    del self.instances[(project, zone, name)]
                return 200, self._operation(project, zone, "delete", inst["selfLink"], failure)
            if len(rest) == 4 and method == "PUT":
                return self._update_instance(project, zone, inst, query, body)
            if len(rest) == 5 and rest[4] == "setScheduling" and method == "POST":
                if inst["status"] not in ("TERMINATED", "STOPPED"):
                    return self._error(
                        400,
                        f"The instance '{name}' is {inst['status']}: setScheduling can only "
                        "be called on a stopped instance.",
                        "resourceNotReady",
                    )
                inst["scheduling"] = json.loads(body)
                inst["fingerprint"] = f"fp-{next(self._ids)}"
                return 200, self._operation(project, zone, "setScheduling", resource, None)
            if len(rest) == 5 and rest[4] == "testIamPermissions" and method == "POST":
                return self._test_permissions(caller, resource, body)
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
            base = f"{self.url}{_PREFIX}{project}"
            if len(rest) == 2 and method == "POST":
                resource_body = json.loads(body)
                name = resource_body["name"]
                if (project, name) in self.firewalls:
                    return self._error(409, f"firewall {name} already exists", "alreadyExists")
                link = f"{base}/global/firewalls/{name}"
                if failure is None:
                    stored = copy.deepcopy(resource_body)
                    stored.update(id=str(next(self._ids)), selfLink=link)
                    self.firewalls[(project, name)] = stored
                return 200, self._operation(project, None, "insert", link, failure)
            if len(rest) == 2 and method == "GET":
                items = [v for k, v in self.firewalls.items() if k[0] == project]
                return 200, {"kind": "compute#firewallList", "items": items}
            name = rest[2]
            rule = self.firewalls.get((project, name))
            resource = f"projects/{project}/global/firewalls/{name}"
            if rule is None:
                return self._error(
                    404, f"The resource 'firewalls/{name}' was not found", "notFound"
                )
            if len(rest) == 4 and rest[3] == "testIamPermissions" and method == "POST":
                return self._test_permissions(caller, resource, body)
            if method == "GET":
                return 200, rule
            if method == "DELETE":
                if not self._may(caller, "compute.firewalls.delete", resource):
                    return self._error(
                        403,
                        f"Required 'compute.firewalls.delete' permission for '{resource}'",
                        "forbidden",
                    )
                if failure is None:
                    del self.firewalls[(project, name)]
                return 200, self._operation(project, None, "delete", rule["selfLink"], failure)
        return self._error(404, f"unsupported {method} {'/'.join(rest)}", "notFound")


# -- the provider's side, for the tests ---------------------------------------------------------

TEST_PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeLoginKeyForTheGceTestsOnly00000000000000"
)


def fake_provider(
    fake: GceFake, *, project: str, zone: str, poll_interval: float = 0.01, **options: Any
) -> Any:
    """A :class:`~studioserve.cloud.gce.GceProvider` pointed at ``fake`` (API and metadata
    server), with anonymous credentials and a short poll interval."""
    from studioserve.cloud.base import CloudOptions, Overrides
    from studioserve.cloud.gce import GceProvider

    overrides = Overrides(
        endpoint_url=fake.url,
        anonymous=True,
        metadata_url=fake.url,
        poll_interval=poll_interval,
        remote_python=sys.executable,
    )
    return GceProvider(
        CloudOptions(cloud="gcloud", project=project, zone=zone, **options), overrides
    )


def launch_spec(deployment_id: str, *, lease: float = 900.0, max_lifetime: float = 7200.0) -> Any:
    """A :class:`~studioserve.cloud.base.LaunchSpec` for a provider-level launch."""
    from studioserve.cloud.base import LaunchSpec, utcnow

    now = utcnow()
    return LaunchSpec(
        deployment_id=deployment_id,
        public_key=TEST_PUBLIC_KEY,
        ssh_user="studioserve",
        port=5000,
        allow_cidr="198.51.100.7/32",
        created_at=now,
        expires_at=now,
        lease=lease,
        max_lifetime=max_lifetime,
    )


def run_script(script: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run an instance-side shell script on this machine (``sh -c``), capturing its output."""
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=timeout, check=False
    )
