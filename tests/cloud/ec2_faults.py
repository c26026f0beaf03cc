"""moto's server for the EC2 tests, and an error-injecting HTTP proxy in front of it.

moto never answers RunInstances with InsufficientInstanceCapacity or Unsupported, never
refuses a quota, never holds a security group with DependencyViolation and never reports an
instance as still ``pending``. :class:`FaultProxy` forwards every request to moto unchanged,
except the EC2 (or SSM) actions a test picks: those get a real EC2 XML error body with the
status EC2 uses, a canned reply, or moto's own reply rewritten. Everything else stays real.

Point the provider at ``proxy.url`` (``Overrides(endpoint_url=proxy.url)``) and keep the
test's own boto3 clients on moto's URL, so what the test checks is moto's state.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import email.message
import http.client
import http.server
import json
import re
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3

#: the SSM parameter the tests publish their AMI under (``--image ssm:...``)
AMI_PARAMETER = "/studioserve-test/dlami"
#: an Ubuntu AMI in moto's built-in list
MOTO_UBUNTU = "ubuntu/images/hvm-ssd/ubuntu-xenial-16.04-amd64-server-20170721"

_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's threaded server on loopback; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset_account(moto_url: str) -> dict[str, Any]:
    """A clean moto account with an AMI published under :data:`AMI_PARAMETER`; returns the
    URL, EC2 and SSM clients (on moto directly) and the AMI id."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    opener.open(urllib.request.Request(moto_url + "/moto-api/reset", method="POST")).close()
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name="us-east-1")
    ssm = boto3.client("ssm", endpoint_url=moto_url, region_name="us-east-1")
    ami = ec2.describe_images(Filters=[{"Name": "name", "Values": [MOTO_UBUNTU]}])["Images"][0][
        "ImageId"
    ]
    ssm.put_parameter(Name=AMI_PARAMETER, Value=ami, Type="String")
    return {"url": moto_url, "ec2": ec2, "ssm": ssm, "ami": ami}


def leftovers(ec2: Any) -> dict[str, list[str]]:
    """Everything studioserve-made that still exists (terminated instances do not count)."""
    instances = [
        i["InstanceId"]
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    groups = [
        g["GroupId"]
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if g["GroupName"].startswith("studioserve")
        or any(t["Key"] == "studioserve" for t in g.get("Tags", []))
    ]
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]]
    volumes = [v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]]
    found = {
        "instances": instances,
        "security_groups": groups,
        "key_pairs": keys,
        "volumes": volumes,
    }
    return {k: v for k, v in found.items() if v}


@dataclasses.dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, body and content type."""

    status: int
    body: bytes
    content_type: str = "text/xml;charset=UTF-8"

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclasses.dataclass
class Call:
    """One request the proxy saw.

    :param service: the signing name (``ec2``, ``ssm``, ...).
    :param action: the API action (``RunInstances``, ``GetParameter``).
    :param params: EC2: the query parameters (``InstanceType``, ``SubnetId``, ``Latest``);
        JSON services: the request's JSON object.
    :param faulted: a rule answered it (moto never saw it, or its reply was changed).
    """

    service: str
    action: str
    params: dict[str, Any]
    faulted: bool = False


#: a rule gets the call and a function that forwards it to moto (at most once), and returns
#: the reply to send, or None to forward the call unchanged
Rule = Callable[[Call, Callable[[], Reply]], Reply | None]


def ec2_error(code: str, message: str, status: int = 400) -> Reply:
    """An EC2 Query API error exactly as EC2 writes it."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{_xml(message)}</Message>"
        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    )
    return Reply(status, body.encode())


def json_error(error_type: str, message: str, status: int = 400) -> Reply:
    """An error of an AWS JSON protocol service (SSM)."""
    body = json.dumps({"__type": error_type, "message": message}).encode()
    return Reply(status, body, "application/x-amz-json-1.1")


def ec2_reply(action: str, inner: str) -> Reply:
    """A successful EC2 reply: ``<{action}Response>`` around ``inner``."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<{action}Response xmlns="{_NS}"><requestId>{uuid.uuid4()}</requestId>{inner}'
        f"</{action}Response>"
    )
    return Reply(200, body.encode())


def ssm_parameter(name: str, value: str) -> Reply:
    """SSM GetParameter's reply for a String parameter (as the public AMI parameters are)."""
    body = {
        "Parameter": {
            "Name": name,
            "Type": "String",
            "Value": value,
            "Version": 1,
            "LastModifiedDate": 1_700_000_000.0,
            "ARN": f"arn:aws:ssm:us-east-1::parameter{name}",
            "DataType": "text",
        }
    }
    return Reply(200, json.dumps(body).encode(), "application/x-amz-json-1.1")


def console_reply(instance_id: str, text: str) -> Reply:
    """GetConsoleOutput's reply holding ``text`` (base64, as EC2 sends it)."""
    encoded = base64.b64encode(text.encode()).decode()
    return ec2_reply(
        "GetConsoleOutput",
        f"<instanceId>{instance_id}</instanceId><timestamp>2025-01-01T00:00:00.000Z</timestamp>"
        f"<output>{encoded}</output>",
    )


def host_key_console(*keys: str) -> str:
    """A boot console with cloud-init's SSH host key block."""
    lines = ["[   12.3] cloud-init[811]: Cloud-init v. 24.1 running 'modules:final'"]
    lines.append("-----BEGIN SSH HOST KEY KEYS-----")
    lines += list(keys)
    lines.append("-----END SSH HOST KEY KEYS-----")
    return "\n".join(lines) + "\n"


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _service(headers: email.message.Message) -> str:
    match = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", headers.get("Authorization", ""))
    return match.group(1) if match else ""


class FaultProxy:
    """A ThreadingHTTPServer on loopback that forwards to ``upstream`` (moto) except where a
    rule answers. Rules are tried in the order added; the first reply wins."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy._handle(self)

            def do_GET(self) -> None:
                proxy._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rules ---------------------------------------------------------------------------------

    def add(self, rule: Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.calls.clear()

    def on(
        self,
        action: str,
        answer: Callable[[Call, Callable[[], Reply]], Reply | None],
        *,
        when: Callable[[dict[str, Any]], bool] | None = None,
        times: int | None = None,
    ) -> None:
        """Let ``answer`` reply to ``action`` (where ``when(params)`` holds), at most ``times``
        times; it may return None to forward unchanged."""
        used = [0]

        def rule(call: Call, forward: Callable[[], Reply]) -> Reply | None:
            if call.action != action or (when is not None and not when(call.params)):
                return None
            if times is not None and used[0] >= times:
                return None
            reply = answer(call, forward)
            if reply is not None:
                used[0] += 1
            return reply

        self.add(rule)

    def fail(
        self,
        action: str,
        code: str,
        message: str,
        *,
        status: int = 400,
        when: Callable[[dict[str, Any]], bool] | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``action`` with EC2's error ``code`` (moto never sees the call)."""
        self.on(action, lambda c, f: ec2_error(code, message, status), when=when, times=times)

    def rewrite(
        self,
        action: str,
        change: Callable[[str], str],
        *,
        when: Callable[[dict[str, Any]], bool] | None = None,
        times: int | None = None,
    ) -> None:
        """Forward ``action`` to moto and pass its reply body through ``change``."""

        def answer(call: Call, forward: Callable[[], Reply]) -> Reply:
            reply = forward()
            return Reply(reply.status, change(reply.text).encode(), reply.content_type)

        self.on(action, answer, when=when, times=times)

    # -- what happened -------------------------------------------------------------------------

    def seen(self, action: str, **params: str) -> list[Call]:
        """The calls of ``action`` whose parameters include ``params``."""
        with self._lock:
            return [
                c
                for c in self.calls
                if c.action == action and all(c.params.get(k) == v for k, v in params.items())
            ]

    # -- the proxying --------------------------------------------------------------------------

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        call = self._parse(request, body)
        forwarded: list[Reply] = []

        def forward() -> Reply:
            if not forwarded:
                forwarded.append(self._forward(request, body))
            return forwarded[0]

        with self._lock:
            self.calls.append(call)
            rules = list(self._rules)
        reply: Reply | None = None
        for rule in rules:
            reply = rule(call, forward)
            if reply is not None:
                call.faulted = True
                break
        if reply is None:
            reply = forward()
        request.send_response(reply.status)
        request.send_header("Content-Type", reply.content_type)
        request.send_header("Content-Length", str(len(reply.body)))
        request.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        request.end_headers()
        request.wfile.write(reply.body)

    @staticmethod
    def _parse(request: http.server.BaseHTTPRequestHandler, body: bytes) -> Call:
        service = _service(request.headers)
        target = request.headers.get("X-Amz-Target", "")
        if target:
            try:
                params = json.loads(body or b"{}")
            except ValueError:
                params = {}
            return Call(service, target.rsplit(".", 1)[-1], params)
        query = urllib.parse.urlsplit(request.path).query
        fields = urllib.parse.parse_qs(query + "&" + body.decode("utf-8", "replace"))
        params = {k: v[0] for k, v in fields.items()}
        return Call(service, str(params.get("Action", "")), params)

    def _forward(self, request: http.server.BaseHTTPRequestHandler, body: bytes) -> Reply:
        connection = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() not in {"host", "connection", "content-length", "expect"}
            }
            headers["Content-Length"] = str(len(body))
            connection.request(request.command, request.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return Reply(response.status, data, response.getheader("Content-Type") or "text/xml")
        finally:
            connection.close()
