"""SSH to a deployed instance: key pairs, pinned host keys, retries, commands and SFTP.

The only module that imports paramiko. Host keys are never trusted on first use: the caller
passes the keys the instance reported through the cloud API (its console or guest
attributes), and a server presenting any other key is refused (:class:`HostKeyMismatch`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import CloudError, HostKeyMismatch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A deployment's SSH key pair: the private key file (0600) and the public key line."""

    private_path: Path
    public_key: str

    @property
    def public_path(self) -> Path:
        return self.private_path.with_suffix(".pub")

    def delete(self) -> list[Path]:
        """Remove both files; returns the paths removed."""
        removed = []
        for path in (self.private_path, self.public_path):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed


def generate_keypair(directory: Path, name: str, *, comment: str = "studioserve") -> KeyPair:
    """Write a fresh ed25519 key pair as ``directory/name`` (0600) and ``name.pub``.

    The folder is created 0700. The private key file is created with 0600 from the start
    (never world-readable, not even briefly).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_line = f"{public.decode('ascii')} {comment}"
    path.with_suffix(".pub").write_text(public_line + "\n", encoding="ascii")
    return KeyPair(private_path=path, public_key=public_line)


def host_key_fingerprint(line: str) -> str:
    """The ``SHA256:...`` fingerprint of an OpenSSH public key line (as ssh-keygen -l shows)."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError(f"not an OpenSSH public key line: {line!r}")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _pkey(line: str) -> paramiko.PKey:
    parts = line.split()
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (IndexError, ValueError, paramiko.SSHException) as e:
        raise CloudError(f"cannot parse SSH host key {line[:40]!r}...: {e}") from e


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """Fail closed: a host key type we were not told about is refused."""

    def __init__(self, expected: Sequence[str]) -> None:
        self._expected = [host_key_fingerprint(k) for k in expected]

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise HostKeyMismatch(
            f"SSH host {hostname} presented a {key.get_name()} key "
            f"(SHA256:{key.fingerprint.split(':', 1)[-1]}) that the instance's console did not "
            f"report (expected {', '.join(self._expected)}); refusing to connect. The instance "
            "is being removed; launch again, and if this repeats, check the network path"
        )


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a remote command returned."""

    status: int
    stdout: str
    stderr: str


class SshSession:
    """One authenticated SSH connection with a pinned host key (a context manager).

    Build it with :meth:`connect`.
    """

    def __init__(self, client: paramiko.SSHClient, host: str, port: int, user: str) -> None:
        self._client = client
        self.host = host
        self.port = port
        self.user = user
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def connect(
        cls,
        host: str,
        *,
        port: int = 22,
        user: str,
        key_path: Path,
        host_keys: Sequence[str],
        timeout: float = 600.0,
        attempt_timeout: float = 20.0,
        max_backoff: float = 10.0,
    ) -> SshSession:
        """Connect and log in, retrying with backoff until ``timeout`` seconds have passed.

        Refused connections, timeouts, banner errors and failed logins (the key may not be
        installed yet while the instance boots) are retried; a wrong host key is not.

        :param host_keys: OpenSSH public key lines the server must present one of.
        :raises HostKeyMismatch: the server presented another key.
        :raises CloudError: no login within ``timeout``.
        """
        if not host_keys:
            raise CloudError("no SSH host key to verify the instance against; refusing to connect")
        pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        known = paramiko.HostKeys()
        name = host if port == 22 else f"[{host}]:{port}"
        for line in host_keys:
            key = _pkey(line)
            known.add(name, key.get_name(), key)
        deadline = time.monotonic() + timeout
        delay = 1.0
        attempt = 0
        while True:
            attempt += 1
            client = paramiko.SSHClient()
            for hostname, entries in known.items():
                for keytype, key in entries.items():
                    client.get_host_keys().add(hostname, keytype, key)
            client.set_missing_host_key_policy(_RefuseUnknown(host_keys))
            remaining = deadline - time.monotonic()
            per_try = max(1.0, min(attempt_timeout, remaining))
            try:
                client.connect(
                    host,
                    port=port,
                    username=user,
                    pkey=pkey,
                    timeout=per_try,
                    banner_timeout=per_try,
                    auth_timeout=per_try,
                    allow_agent=False,
                    look_for_keys=False,
                )
            except HostKeyMismatch:
                client.close()
                raise
            except paramiko.BadHostKeyException as e:
                client.close()
                raise HostKeyMismatch(
                    f"SSH host {host}:{port} presented host key "
                    f"SHA256:{e.key.fingerprint.split(':', 1)[-1]}, but the instance reported "
                    f"{', '.join(host_key_fingerprint(k) for k in host_keys)}; refusing to "
                    "connect (fail closed)"
                ) from e
            except (paramiko.SSHException, OSError, EOFError) as e:
                client.close()
                if time.monotonic() + delay >= deadline:
                    raise CloudError(
                        f"could not log in to {user}@{host}:{port} over SSH within {timeout:g}s "
                        f"({attempt} attempts; last error: {type(e).__name__}: {e}); check "
                        "that the firewall allows port 22 from your address (--allow-cidr)"
                    ) from e
                logger.debug(
                    "SSH to %s:%d not ready (%s: %s); retrying", host, port, type(e).__name__, e
                )
                time.sleep(delay)
                delay = min(max_backoff, delay * 2)
                continue
            logger.info("SSH login to %s@%s:%d (host key verified)", user, host, port)
            return cls(client, host, port, user)

    # -- commands ---------------------------------------------------------------------------

    def run(self, command: str, *, timeout: float = 600.0, check: bool = True) -> CommandResult:
        """Run ``command`` through the login shell and wait for it.

        Commands never carry secrets (tokens travel as 0600 files over SFTP), so they are
        logged at debug level.

        :raises CloudError: when ``check`` and it exits non-zero, or on timeout.
        """
        logger.debug("remote$ %s", command)
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise CloudError(f"the SSH connection to {self.host} was closed")
        channel = transport.open_session(timeout=timeout)
        try:
            channel.settimeout(timeout)
            channel.exec_command(command)
            stdin = channel.makefile_stdin("wb")
            stdin.close()
            channel.shutdown_write()
            out_chunks: list[bytes] = []
            err_chunks: list[bytes] = []
            deadline = time.monotonic() + timeout
            while True:
                if channel.recv_ready():
                    out_chunks.append(channel.recv(65536))
                    continue
                if channel.recv_stderr_ready():
                    err_chunks.append(channel.recv_stderr(65536))
                    continue
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                if time.monotonic() > deadline:
                    raise CloudError(
                        f"remote command timed out after {timeout:g}s: {command[:200]}"
                    )
                channel.status_event.wait(0.05)
            # drain what arrived between the last read and the exit status
            while channel.recv_ready():
                out_chunks.append(channel.recv(65536))
            while channel.recv_stderr_ready():
                err_chunks.append(channel.recv_stderr(65536))
            status = channel.recv_exit_status()
        except TimeoutError as e:
            raise CloudError(f"remote command timed out after {timeout:g}s: {command[:200]}") from e
        finally:
            channel.close()
        result = CommandResult(
            status=status,
            stdout=b"".join(out_chunks).decode("utf-8", "replace"),
            stderr=b"".join(err_chunks).decode("utf-8", "replace"),
        )
        if check and status != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise CloudError(f"remote command failed with status {status}: {command[:200]}\n{tail}")
        return result

    # -- files ------------------------------------------------------------------------------

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
        return self._sftp

    def makedirs(self, remote_dir: str, mode: int = 0o700) -> None:
        """``mkdir -p`` over SFTP (new folders get ``mode``)."""
        path = ""
        for part in remote_dir.split("/"):
            if not part:
                path = path or "/"
                continue
            path = f"{path.rstrip('/')}/{part}" if path else part
            try:
                self.sftp.stat(path)
            except FileNotFoundError:
                self.sftp.mkdir(path, mode)

    def put_bytes(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``remote_path``, restricting the mode *before* writing."""
        with self.sftp.file(remote_path, "wb") as f:
            f.chmod(mode)
            f.write(data)

    def put_file(self, local: Path, remote_path: str, *, mode: int | None = None) -> int:
        """Upload one file; returns its size."""
        attrs = self.sftp.put(str(local), remote_path)
        if mode is not None:
            self.sftp.chmod(remote_path, mode)
        return int(attrs.st_size or 0)

    def is_file(self, remote_path: str) -> bool:
        try:
            return stat.S_ISREG(self.sftp.stat(remote_path).st_mode or 0)
        except FileNotFoundError:
            return False

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            finally:
                self._sftp = None
        self._client.close()

    def __enter__(self) -> SshSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
