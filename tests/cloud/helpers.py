"""Shared pieces of the cloud tests: a real OpenSSH sshd on loopback standing in for the
instance, the options that point a deployment at it, and small waiting/scanning helpers."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from studioserve.cloud.base import Overrides

SSHD = "/usr/sbin/sshd"

needs_sshd = pytest.mark.skipif(
    not os.path.exists(SSHD), reason="OpenSSH server missing (apt-get install openssh-server)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def new_host_key(directory: Path, name: str = "host_ed25519") -> tuple[Path, str]:
    """An ed25519 key file (0600) and its OpenSSH public line."""
    key = Ed25519PrivateKey.generate()
    path = directory / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return path, public.decode("ascii")


class Sshd:
    """A real sshd on 127.0.0.1 with its own config, host key and authorized_keys file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key_path, self.host_key = new_host_key(self.dir)
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.write_text("")
        self.user = getpass.getuser()
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "sshd.log"

    def authorize(self, public_key: str) -> None:
        """Install a login key, as cloud-init or the guest agent would on an instance."""
        with self.authorized_keys.open("a") as f:
            f.write(public_key.strip() + "\n")

    def _config(self, port: int) -> Path:
        config = self.dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        return config

    def start(self) -> Sshd:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for _ in range(5):
            port = free_port()
            log = self._log.open("ab")
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self._config(port))],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        if s.recv(4).startswith(b"SSH-"):
                            self._proc, self.port = proc, port
                            return self
                except OSError:
                    time.sleep(0.05)
            proc.kill()
            proc.wait()
        raise RuntimeError(f"sshd did not start: {self._log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def local_instance_options(sshd: Sshd) -> dict[str, Any]:
    """CloudOptions fields for a launch onto this machine: the sshd's user, the allowed CIDR
    (no address lookup), short timeouts, and a warning instead of a failure for the missing
    GPU."""
    return {
        "ssh_user": sshd.user,
        "allow_cidr": "198.51.100.7/32",
        "allow_cpu_fallback": True,
        "ssh_timeout": 30.0,
        "ready_timeout": 120.0,
    }


def local_instance_overrides(
    sshd: Sshd, remote_dir: Path, end_marker: Path, **changes: Any
) -> Overrides:
    """Overrides that make this machine the "instance": SSH and HTTP go to 127.0.0.1, the
    virtualenv sees this test environment's packages (no downloads), the server binds
    loopback, "ending the instance" writes ``end_marker`` instead of powering anything off,
    and moving the backstop timer appends its seconds to ``end_marker.lifetime``."""
    site = sysconfig.get_path("purelib")
    lifetime = end_marker.with_name(end_marker.name + ".lifetime")
    fields: dict[str, Any] = {
        "connect_host": "127.0.0.1",
        "ssh_port": sshd.port,
        "remote_python": sys.executable,
        "remote_dir": str(remote_dir),
        "remote_venv_args": ("--without-pip",),
        "remote_pip_args": ("--no-deps", "--no-index"),
        "remote_site_dirs": (site,),
        "remote_requirements": (),
        "remote_end_command": f"echo ended > {end_marker}",
        "remote_lifetime_command": f"echo {{seconds}} >> {lifetime}",
        "remote_bind_host": "127.0.0.1",
        "poll_interval": 0.05,
    }
    fields.update(changes)
    return Overrides(**fields)


def save_model(modeldir: Path, keras_mlp_factory: Any) -> Path:
    modeldir.mkdir(parents=True, exist_ok=True)
    model = keras_mlp_factory()
    model.save(modeldir / "model.keras")
    return modeldir


def post_json(url: str, payload: dict[str, Any], token: str | None) -> tuple[int, Any]:
    """POST JSON to the server (no proxies); returns (status, decoded body)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url + "/", data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def assert_grpc_answers(address: str, token: str) -> None:
    """The deployment's gRPC port serves KServe v2 (tritonclient.grpc): ready without a token,
    the repository index with it only."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        index = client.get_model_repository_index(
            headers={"authorization": f"Bearer {token}"}, as_json=True
        )
        assert index["models"], index
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_repository_index()
        assert "UNAUTHENTICATED" in str(refused.value.status())
    finally:
        client.close()


def files_under(root: Path, skip: Iterable[str] = ()) -> list[Path]:
    skipped = set(skip)
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (set(p.relative_to(root).parts) & skipped)
    ]


def assert_no_secrets(blobs: dict[str, bytes | str], secrets: dict[str, str]) -> None:
    """Fail naming the blob when any secret appears in any of them."""
    found = []
    for where, blob in blobs.items():
        data = blob.encode() if isinstance(blob, str) else blob
        for name, secret in secrets.items():
            if secret and secret.encode() in data:
                found.append(f"{name} in {where}")
    assert not found, f"secrets leaked: {found}"


def private_key_body(path: Path) -> str:
    """The base64 body of an OpenSSH private key file (what must never leave this machine)."""
    lines = path.read_text().strip().splitlines()
    return "".join(line for line in lines if not line.startswith("-----"))[:60]


def kill_leftover(remote_dir: Path) -> None:
    """Stop a server a failed test left running on this machine (its process group)."""
    pid_file = remote_dir / "serve.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text().strip()), 15)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
