"""``studio serve --cloud``: launch an instance, deploy the server over SSH, never leak it.

The steps (:data:`~studioserve.cloud.base.STEPS`)::

    launch      key pair / security group (EC2), the instance; wait until it runs
    open_port   TCP 22 and the serving port, from --allow-cidr only
    wait_ssh    read the host key from the cloud API, SSH in with retries (host key pinned)
    upload      the modeldir, the wrapper, the studioserve wheel, a 0600 token file
    install     a virtualenv (seeing the image's TensorFlow/CUDA), the wheel, the experiment
    start       ``studio serve ... --token-file``, detached; when it exits the instance ends
    wait_ready  poll ``/readyz`` over HTTP
    report      record the instance in the local registry; return a :class:`Deployment`

Any exception or Ctrl-C in any step deletes everything created so far (found both from the
deployment's own list and from the cloud by tag) and raises :class:`DeploymentFailed` with a
summary. The local registry (``<config_dir>/instances.json``) backs ``studio instances
list|stop``.

Test seams (environment variables read when the matching :class:`CloudOptions` field is left
at its default; for subprocess tests): ``STUDIOSERVE_CONNECT_HOST``, ``STUDIOSERVE_SSH_PORT``,
``STUDIOSERVE_HOST_KEY``, ``STUDIOSERVE_CLOUD_ENDPOINT``, ``STUDIOSERVE_GCE_ANONYMOUS=1``,
``STUDIOSERVE_REMOTE_PYTHON``, ``STUDIOSERVE_REMOTE_DIR``, ``STUDIOSERVE_REMOTE_SITE_DIRS``
(``os.pathsep``-separated), ``STUDIOSERVE_REMOTE_VENV_ARGS`` / ``_PIP_ARGS`` (shell words),
``STUDIOSERVE_REMOTE_REQUIREMENTS`` (shell words; empty: none),
``STUDIOSERVE_REMOTE_END_COMMAND``, ``STUDIOSERVE_REMOTE_BIND_HOST``, and
``STUDIOSERVE_IP_ECHO_URL`` for the address lookup.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import shlex
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from .._version import __version__
from ..config import DEFAULT_PORT, ServeConfig, cache_dir, config_dir
from ..errors import CloudError, ConfigError, DeploymentFailed
from ..store import validate_key
from .base import (
    END_SCRIPT,
    STEPS,
    CloudOptions,
    Hook,
    InstanceInfo,
    LaunchSpec,
    Provider,
    Resource,
    StepContext,
    deletion_order,
    is_deployment_id,
    normalize_cidr,
    run_script,
    utcnow,
)

if TYPE_CHECKING:
    from .ssh import SshSession

logger = logging.getLogger(__name__)

#: where your public address is looked up when --allow-cidr is not given
IP_ECHO_URL = "https://checkip.amazonaws.com"
#: hooks run by every :func:`deploy` (a test seam for in-process CLI tests)
DEFAULT_HOOKS: list[Hook] = []

_STEP_TEXT = {
    "launch": "launching the instance",
    "open_port": "opening the ports",
    "wait_ssh": "waiting for SSH",
    "upload": "uploading the model and package",
    "install": "installing studioserve on the instance",
    "start": "starting the server",
    "wait_ready": "waiting for the server to become ready",
    "report": "recording the deployment",
}


# -- records ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deployment:
    """A running deployment, as :func:`deploy` returns it (the CLI prints it).

    :param url: where to send requests (``http://ADDRESS:PORT``).
    :param token: the bearer token (only here: it is in no log, file or registry locally).
    :param expires_at: when the instance ends at the latest (``--max-lifetime``); it ends
        earlier when the server exits after ``killafter`` seconds without inference requests.
    """

    id: str
    cloud: str
    instance_id: str
    instance_type: str
    image: str
    region: str | None
    zone: str | None
    project: str | None
    url: str
    token: str = dataclasses.field(repr=False)
    public_ip: str | None
    port: int
    ssh_user: str
    key_path: Path
    created_at: _dt.datetime
    expires_at: _dt.datetime
    killafter: float
    remote_dir: str
    log_path: str
    resources: tuple[Resource, ...]


@dataclasses.dataclass(kw_only=True)
class InstanceRecord:
    """One deployment in the local registry (what ``studio instances list`` shows).

    :param state: ``launching``, ``running``, ``pending``, ``stopping``, ``stopped``,
        ``unknown`` (the cloud could not be asked) or ``teardown-failed``.
    """

    id: str
    cloud: str
    state: str
    instance_id: str = ""
    region: str | None = None
    zone: str | None = None
    project: str | None = None
    endpoint_url: str | None = None
    anonymous: bool = False
    url: str = ""
    public_ip: str | None = None
    port: int = 0
    ssh_user: str = ""
    key_path: str = ""
    experiment: str = ""
    created_at: str = ""
    expires_at: str = ""
    killafter: float = 0.0
    pid: int = 0
    host: str = ""
    resources: list[Resource] = dataclasses.field(default_factory=list)

    @property
    def location(self) -> str:
        return self.zone or self.region or ""

    @property
    def age(self) -> _dt.timedelta:
        if not self.created_at:
            return _dt.timedelta(0)
        return utcnow() - _dt.datetime.fromisoformat(self.created_at)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["resources"] = [r.to_json() for r in self.resources]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["resources"] = [Resource.from_json(r) for r in data.get("resources", [])]
        return cls(**values)


def registry_path() -> Path:
    """The local registry of launched instances."""
    return config_dir() / "instances.json"


class _Registry:
    """``instances.json`` under a file lock (several ``studio`` processes may share it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or registry_path()

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=60):
            yield

    def _read(self) -> list[InstanceRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise CloudError(
                f"cannot read the instance registry {self.path}: {e}; fix or move it away "
                "(check your cloud console for instances tagged 'studioserve')"
            ) from e
        return [InstanceRecord.from_json(item) for item in data.get("instances", [])]

    def _write(self, records: list[InstanceRecord]) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "instances": [r.to_json() for r in records]}, f, indent=2)
        os.replace(tmp, self.path)

    def load(self) -> list[InstanceRecord]:
        with self._locked():
            return self._read()

    def upsert(self, record: InstanceRecord) -> None:
        with self._locked():
            records = [r for r in self._read() if r.id != record.id]
            records.append(record)
            self._write(records)

    def remove(self, deployment_id: str) -> None:
        with self._locked():
            records = self._read()
            kept = [r for r in records if r.id != deployment_id]
            if len(kept) != len(records):
                self._write(kept)


# -- helpers ----------------------------------------------------------------------------------


def new_deployment_id() -> str:
    """A fresh deployment id: ``ss-`` and 8 hex digits."""
    return "ss-" + secrets.token_hex(4)


def make_provider(options: CloudOptions) -> Provider:
    """The provider for ``options.cloud`` (imports its SDK here, lazily).

    :raises ConfigError: the SDK is not installed.
    """
    if options.cloud == "ec2":
        try:
            from .ec2 import Ec2Provider
        except ImportError as e:
            raise ConfigError(
                f"--cloud ec2 needs boto3 and paramiko ({e}); pip install 'studioserve[aws]'"
            ) from e
        return Ec2Provider(options)
    try:
        from .gce import GceProvider
    except ImportError as e:
        raise ConfigError(
            f"--cloud gcloud needs google-cloud-compute and paramiko ({e}); "
            "pip install 'studioserve[gcp]'"
        ) from e
    return GceProvider(options)


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def detect_public_cidr(url: str | None = None, timeout: float = 10.0) -> str:
    """Your public address as a one-address CIDR (``/32`` or ``/128``), asked over HTTPS.

    :raises CloudError: when it cannot be found (pass ``--allow-cidr`` then).
    """
    url = url or os.environ.get("STUDIOSERVE_IP_ECHO_URL") or IP_ECHO_URL
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(64).decode("ascii", "replace").strip()
        address = ipaddress.ip_address(text)
    except (OSError, ValueError) as e:
        raise CloudError(
            f"could not find your public IP address at {url} ({e}), which limits who may reach "
            "the instance; pass --allow-cidr with your address (e.g. 203.0.113.7/32) or your "
            "network's range"
        ) from e
    cidr = f"{address}/{address.max_prefixlen}"
    logger.info("allowing access from your public address %s only (--allow-cidr)", cidr)
    return cidr


def _split_words(value: str) -> tuple[str, ...]:
    return tuple(shlex.split(value))


def apply_env_overrides(options: CloudOptions) -> CloudOptions:
    """Fill test-only settings from ``STUDIOSERVE_*`` variables (see the module docstring)."""
    env = os.environ
    changes: dict[str, Any] = {}
    defaults = CloudOptions(cloud=options.cloud)

    def take(field: str, var: str, convert: Any = str) -> None:
        value = env.get(var)
        if value is not None and getattr(options, field) == getattr(defaults, field):
            changes[field] = convert(value)

    take("connect_host", "STUDIOSERVE_CONNECT_HOST")
    take("ssh_port", "STUDIOSERVE_SSH_PORT", int)
    take("host_key", "STUDIOSERVE_HOST_KEY")
    take("endpoint_url", "STUDIOSERVE_CLOUD_ENDPOINT")
    take("anonymous", "STUDIOSERVE_GCE_ANONYMOUS", lambda v: v == "1")
    take("remote_python", "STUDIOSERVE_REMOTE_PYTHON")
    take("remote_dir", "STUDIOSERVE_REMOTE_DIR")
    take("remote_site_dirs", "STUDIOSERVE_REMOTE_SITE_DIRS", lambda v: tuple(v.split(os.pathsep)))
    take("remote_venv_args", "STUDIOSERVE_REMOTE_VENV_ARGS", _split_words)
    take("remote_pip_args", "STUDIOSERVE_REMOTE_PIP_ARGS", _split_words)
    take("remote_requirements", "STUDIOSERVE_REMOTE_REQUIREMENTS", _split_words)
    take("remote_end_command", "STUDIOSERVE_REMOTE_END_COMMAND")
    take("remote_bind_host", "STUDIOSERVE_REMOTE_BIND_HOST")
    return options.replace(**changes) if changes else options


# -- the wheel --------------------------------------------------------------------------------


def _package_files(pkg_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in pkg_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
    )


def _project_metadata(pkg_dir: Path) -> tuple[str, list[str], str]:
    """(summary, core dependencies, requires-python) of the studioserve being run."""
    pyproject = pkg_dir.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib

            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except (ImportError, OSError, ValueError):
            project = {}
        if project.get("name") == "studioserve":
            return (
                str(project.get("description", "")),
                [str(d) for d in project.get("dependencies", [])],
                str(project.get("requires-python", "")),
            )
    try:
        meta = importlib.metadata.metadata("studioserve")
        requires = importlib.metadata.requires("studioserve") or []
    except importlib.metadata.PackageNotFoundError:
        return "", [], ""
    core = [r for r in requires if "extra ==" not in r]
    summary = (meta.get_all("Summary") or [""])[0]
    requires_python = (meta.get_all("Requires-Python") or [""])[0]
    return str(summary), core, str(requires_python)


def build_wheel(dest_dir: Path | None = None) -> Path:
    """A wheel of the studioserve package this process runs (cached by content).

    Built straight from the imported package's files, so it works the same for a source
    checkout, an editable install or an installed wheel, needs no build backend and no
    network. The version gets a local label with a content hash (``0.1.0+g1a2b3c4d5e``) so
    the instance runs exactly these files.
    """
    pkg_dir = Path(__file__).resolve().parents[1]
    files = _package_files(pkg_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(pkg_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    base_version = __version__.split("+", 1)[0]
    version = f"{base_version}+g{digest.hexdigest()[:12]}"
    dest = dest_dir or cache_dir() / "wheels"
    wheel = dest / f"studioserve-{version}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    summary, requires, requires_python = _project_metadata(pkg_dir)
    dist_info = f"studioserve-{version}.dist-info"
    metadata_lines = ["Metadata-Version: 2.1", "Name: studioserve", f"Version: {version}"]
    if summary:
        metadata_lines.append(f"Summary: {summary}")
    if requires_python:
        metadata_lines.append(f"Requires-Python: {requires_python}")
    metadata_lines += [f"Requires-Dist: {r}" for r in requires]
    generated = {
        f"{dist_info}/METADATA": ("\n".join(metadata_lines) + "\n").encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: studioserve.cloud\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": b"[console_scripts]\nstudio = studioserve.cli:main\n",
        f"{dist_info}/top_level.txt": b"studioserve\n",
    }
    entries: list[tuple[str, bytes]] = [
        (f"studioserve/{p.relative_to(pkg_dir).as_posix()}", p.read_bytes()) for p in files
    ]
    entries += list(generated.items())
    record_lines = []
    for name, data in entries:
        hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{name},sha256={hashed},{len(data)}")
    record_lines.append(f"{dist_info}/RECORD,,")
    entries.append((f"{dist_info}/RECORD", ("\n".join(record_lines) + "\n").encode()))
    tmp = wheel.with_suffix(f".{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    os.replace(tmp, wheel)
    logger.info("built %s", wheel)
    return wheel


# -- the remote side --------------------------------------------------------------------------


def _resolve_wrapper(wrapper: str | None) -> tuple[Path | None, str | None]:
    """``(local file to upload, name to pass through)`` for ``--wrapper``."""
    if not wrapper:
        return None, None
    path = Path(wrapper).expanduser()
    if path.is_file():
        return path.resolve(), None
    try:
        spec = importlib.util.find_spec(wrapper)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin), None
    logger.warning(
        "wrapper %r is not a local file or module; passing the name through: it must be "
        "importable on the instance",
        wrapper,
    )
    return None, wrapper


def _default_requirements(gpus: int) -> tuple[str, ...]:
    if gpus > 0:
        return ("tensorflow[and-cuda]>=2.16", "keras>=3")
    return ("tensorflow-cpu>=2.16", "keras>=3")


def _install_script(*, remote_dir: str, options: CloudOptions, wheel_name: str, key: str) -> str:
    q = shlex.quote
    venv_args = " ".join(q(a) for a in options.remote_venv_args)
    pip_args = " ".join(q(a) for a in options.remote_pip_args)
    requirements = (
        _default_requirements(options.gpus)
        if options.remote_requirements is None
        else options.remote_requirements
    )
    py = q(options.remote_python)
    lines = [
        "set -eu",
        f"cd {q(remote_dir)}",
        f"export STUDIO_HOME={q(remote_dir + '/home')} PIP_DISABLE_PIP_VERSION_CHECK=1",
        "export PIP_NO_INPUT=1",
        "if [ ! -x venv/bin/python ]; then",
        f"  {py} -m venv --system-site-packages {venv_args} venv || {{",
        "    sudo -n apt-get -o DPkg::Lock::Timeout=600 install -y -q python3-venv >/dev/null",
        f"    {py} -m venv --system-site-packages {venv_args} venv",
        "  }",
        "fi",
    ]
    if options.remote_site_dirs:
        write_pth = (
            "import sys, sysconfig; "
            "open(sysconfig.get_path('purelib') + '/studioserve-extra-site.pth', 'w')"
            ".write(''.join(d + chr(10) for d in sys.argv[1:]))"
        )
        dirs = " ".join(q(d) for d in options.remote_site_dirs)
        lines.append(f"venv/bin/python -c {q(write_pth)} {dirs}")
    lines.append(f"venv/bin/python -m pip install -q {pip_args} {q('dist/' + wheel_name)}")
    if requirements:
        reqs = " ".join(q(r) for r in requirements)
        lines += [
            "venv/bin/python -c 'import importlib.util as u, sys; "
            'sys.exit(0 if u.find_spec("tensorflow") and u.find_spec("keras") else 1)\' '
            f"|| venv/bin/python -m pip install -q {reqs}",
        ]
    lines.append(f"venv/bin/studio experiments add {q(key)} upload/modeldir --store store --quiet")
    return "\n".join(lines) + "\n"


def _serve_args(
    config: ServeConfig, *, remote_dir: str, port: int, wrapper_arg: str | None, bind_host: str
) -> list[str]:
    defaults = ServeConfig(key=config.key)
    args = [
        f"{remote_dir}/venv/bin/studio",
        "serve",
        config.key,
        "--store",
        f"{remote_dir}/store",
        "--host",
        bind_host,
        "--port",
        str(port),
        "--killafter",
        f"{config.killafter:g}",
        "--token-file",
        f"{remote_dir}/token",
        "--max-batch-size",
        str(config.max_batch_size),
        "--max-delay-ms",
        f"{config.max_delay_ms:g}",
        "--quiet",
    ]
    if wrapper_arg:
        args += ["--wrapper", wrapper_arg]
    if config.max_body != defaults.max_body:
        args += ["--max-body", str(config.max_body)]
    if config.threads != defaults.threads:
        args += ["--threads", str(config.threads)]
    if config.request_timeout != defaults.request_timeout:
        args += ["--request-timeout", f"{config.request_timeout:g}"]
    if config.verbose:
        args.append("--verbose")
    return args


def _default_end_command() -> str:
    return (
        'if [ "$(id -u)" = 0 ]; then S=; else S="sudo -n"; fi\n'
        f'$S {END_SCRIPT} "server exited" || $S shutdown -h now "studioserve: server exited"'
    )


def _tar_modeldir(modeldir: Path, dest: Path) -> tuple[int, int]:
    """Write ``modeldir`` as ``modeldir/...`` into the tar file ``dest``; (files, bytes)."""
    count = size = 0
    with tarfile.open(dest, "w", dereference=True) as tar:
        tar.add(modeldir, arcname="modeldir", recursive=False)
        for path in sorted(modeldir.rglob("*")):
            tar.add(
                path, arcname=f"modeldir/{path.relative_to(modeldir).as_posix()}", recursive=False
            )
            if path.is_file():
                count += 1
                size += path.stat().st_size
    return count, size


def _http_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<token>") if secret else text


# -- deploy -----------------------------------------------------------------------------------


class _Launch:
    """The state of one deployment in progress: what exists, mirrored into the registry."""

    def __init__(self, registry: _Registry, record: InstanceRecord) -> None:
        self.registry = registry
        self.record = record
        self.resources: list[Resource] = []
        self.instance: InstanceInfo | None = None

    def add(self, resource: Resource) -> None:
        if resource not in self.resources:
            self.resources.append(resource)
        if resource.kind == "instance":
            self.record.instance_id = resource.id
        self.save()

    def forget(self, resource: Resource) -> None:
        self.resources = [r for r in self.resources if r != resource]
        self.save()

    def save(self) -> None:
        self.record.resources = list(self.resources)
        self.registry.upsert(self.record)


def _delete_one(provider: Provider, resource: Resource) -> str:
    if resource.kind == "local-key":
        removed = []
        for path in (Path(resource.id), Path(resource.id).with_suffix(".pub")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
        return (
            f"deleted the local SSH key {resource.id}"
            if removed
            else f"{resource.id} was already gone"
        )
    return provider.delete(resource)


def _teardown(
    provider: Provider, deployment_id: str, known: Iterable[Resource]
) -> tuple[list[str], list[Resource]]:
    """Delete ``known`` plus whatever the cloud still has tagged with the id.

    Returns (summary lines, resources left behind). Never raises for one resource's failure;
    a Ctrl-C skips the resource it interrupted and carries on with the rest.
    """
    resources = list(known)
    try:
        resources += [r for r in provider.find(deployment_id) if r not in resources]
    except Exception as e:  # the known list still gets deleted
        logger.warning("could not list the resources of %s by tag: %s", deployment_id, e)
    lines: list[str] = []
    left: list[Resource] = []
    for resource in deletion_order(resources):
        try:
            line = _delete_one(provider, resource)
        except KeyboardInterrupt:
            left.append(resource)
            line = f"NOT deleted (interrupted): {resource.describe()}"
        except Exception as e:
            left.append(resource)
            line = f"NOT deleted: {resource.describe()}: {e}"
        logger.info("%s", line)
        lines.append(line)
    if left:
        lines.append(
            f"run `studio instances stop {deployment_id}` to retry, or delete the resources "
            f"tagged studioserve={deployment_id} in the cloud console"
        )
    return lines, left


def deploy(
    serve_config: ServeConfig,
    modeldir: Path,
    options: CloudOptions,
    *,
    provider: Provider | None = None,
) -> Deployment:
    """Serve ``modeldir`` on a new cloud instance that ends itself; return where it runs.

    The remote side runs ``studio serve`` with ``serve_config``'s flags plus ``--host
    0.0.0.0``, a token (sent as a 0600 file over SSH, never on a command line) and
    ``--killafter``; when the server exits the instance shuts down and is deleted, and
    ``options.max_lifetime`` ends it whatever happens. Prints nothing (logging only).

    Example::

        dep = deploy(ServeConfig(key="mnist-7", killafter=600), Path("modeldir"),
                     CloudOptions(cloud="ec2", gpus=1))
        print(dep.url, dep.token, dep.expires_at)

    :param provider: a ready provider (default: built from ``options``).
    :raises ConfigError: bad options, missing SDK, missing modeldir.
    :raises CloudError: before anything was created (credentials, address lookup).
    :raises DeploymentFailed: a step failed or Ctrl-C was pressed; everything created was
        deleted and ``summary`` says what.
    """
    options = apply_env_overrides(options)
    modeldir = Path(modeldir)
    if not modeldir.is_dir():
        raise ConfigError(f"modeldir {modeldir} is not a folder")
    if serve_config.no_auth:
        raise ConfigError(
            "--no-auth cannot be used with --cloud: the endpoint is reachable from --allow-cidr"
        )
    validate_key(serve_config.key)
    port = serve_config.port or DEFAULT_PORT
    if port == 22:
        raise ConfigError("--port 22 is SSH's port on the instance; pick another --port")
    if serve_config.killafter == 0:
        logger.warning(
            "--killafter 0: the instance ends only at --max-lifetime (%gs) or with "
            "`studio instances stop`",
            options.max_lifetime,
        )
    token = serve_config.token or secrets.token_urlsafe(32)
    allow_cidr = normalize_cidr(options.allow_cidr) if options.allow_cidr else detect_public_cidr()
    wrapper_file, wrapper_name = _resolve_wrapper(serve_config.wrapper)
    wheel = build_wheel()
    if provider is None:
        provider = make_provider(options)
    deployment_id = new_deployment_id()
    created_at = utcnow().replace(microsecond=0)
    expires_at = created_at + _dt.timedelta(seconds=options.max_lifetime)
    ssh_user = options.ssh_user or provider.default_ssh_user
    from .ssh import SshSession, generate_keypair

    keys = generate_keypair(config_dir() / "keys", deployment_id, comment=ssh_user)
    described = provider.describe()
    registry = _Registry()
    launch = _Launch(
        registry,
        InstanceRecord(
            id=deployment_id,
            cloud=options.cloud,
            state="launching",
            region=described["region"],
            zone=described["zone"],
            project=described["project"],
            endpoint_url=options.endpoint_url,
            anonymous=options.anonymous,
            port=port,
            ssh_user=ssh_user,
            key_path=str(keys.private_path),
            experiment=serve_config.key,
            created_at=created_at.isoformat(),
            expires_at=expires_at.isoformat(),
            killafter=serve_config.killafter,
            pid=os.getpid(),
            host=socket.gethostname(),
        ),
    )
    launch.add(Resource("local-key", str(keys.private_path)))
    spec = LaunchSpec(
        deployment_id=deployment_id,
        public_key=keys.public_key,
        ssh_user=ssh_user,
        port=port,
        allow_cidr=allow_cidr,
        created_at=created_at,
        expires_at=expires_at,
    )
    hooks = [*options.hooks, *DEFAULT_HOOKS]
    session: SshSession | None = None
    pid: int | None = None
    step = STEPS[0]

    def enter(name: str) -> None:
        nonlocal step
        step = name
        logger.info("[%s] %s", deployment_id, _STEP_TEXT[name])
        context = StepContext(
            step=name,
            deployment_id=deployment_id,
            cloud=options.cloud,
            public_key=keys.public_key,
            ssh_user=ssh_user,
            instance=launch.instance,
            resources=tuple(launch.resources),
        )
        for hook in hooks:
            hook(name, context)

    try:
        enter("launch")
        instance = provider.launch(spec, launch.add)
        launch.instance = instance
        launch.record.public_ip = instance.public_ip
        enter("open_port")
        provider.open_ports(spec, instance, launch.add)
        enter("wait_ssh")
        host = options.connect_host or instance.public_ip
        if not host:
            raise CloudError(
                f"instance {instance.instance_id} has no public address; use a subnet that "
                "assigns one, or reach it through a tunnel and pass its address as connect_host"
            )
        if options.host_key:
            host_keys = [options.host_key]
        else:
            host_keys = provider.host_keys(instance, options.ssh_timeout)
        session = SshSession.connect(
            host,
            port=options.ssh_port,
            user=ssh_user,
            key_path=keys.private_path,
            host_keys=host_keys,
            timeout=options.ssh_timeout,
        )
        try:
            for line in provider.after_connect(spec, launch.forget):
                logger.info("%s", line)
        except CloudError as e:  # harmless to keep; it goes with the deployment
            logger.warning("%s", e)
        enter("upload")
        home = session.run('printf %s "$HOME"').stdout.strip() or "."
        remote_dir = options.remote_dir or f"{home}/studioserve"
        _upload(
            session,
            remote_dir,
            modeldir=modeldir,
            wrapper_file=wrapper_file,
            wheel=wheel,
            token=token,
            run_sh=run_script(
                deployment_id=deployment_id,
                remote_dir=remote_dir,
                serve_args=_serve_args(
                    serve_config,
                    remote_dir=remote_dir,
                    port=port,
                    wrapper_arg=(
                        f"{remote_dir}/upload/wrapper/{wrapper_file.name}"
                        if wrapper_file is not None
                        else wrapper_name
                    ),
                    bind_host=options.remote_bind_host,
                ),
                end_command=options.remote_end_command or _default_end_command(),
            ),
            install_sh=_install_script(
                remote_dir=remote_dir, options=options, wheel_name=wheel.name, key=serve_config.key
            ),
        )
        enter("install")
        session.run(f"sh {shlex.quote(remote_dir)}/install.sh", timeout=3600)
        enter("start")
        pid = _start(session, remote_dir)
        log_path = f"{remote_dir}/serve.log"
        url = f"http://{_http_host(host)}:{port}"
        enter("wait_ready")
        _wait_ready(url, session, pid, log_path, token, options.ready_timeout)
        enter("report")
        launch.record.state = "running"
        launch.record.url = url
        launch.save()
        deployment = Deployment(
            id=deployment_id,
            cloud=options.cloud,
            instance_id=instance.instance_id,
            instance_type=instance.instance_type,
            image=instance.image,
            region=described["region"],
            zone=described["zone"],
            project=described["project"],
            url=url,
            token=token,
            public_ip=instance.public_ip,
            port=port,
            ssh_user=ssh_user,
            key_path=keys.private_path,
            created_at=created_at,
            expires_at=expires_at,
            killafter=serve_config.killafter,
            remote_dir=remote_dir,
            log_path=log_path,
            resources=tuple(r for r in launch.resources if r.kind != "local-key"),
        )
        logger.info("[%s] ready at %s (ends by %s)", deployment_id, url, expires_at.isoformat())
        return deployment
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C)" if interrupted else f"{type(e).__name__}: {e}"
        logger.error(
            "[%s] failed while %s: %s; removing what was created",
            deployment_id,
            _STEP_TEXT[step],
            _scrub(reason, token),
        )
        if session is not None and pid is not None:
            # the instance is about to go anyway; stopping the server first keeps a reused
            # host (connect_host) clean. TERM, then KILL after 5 s.
            with contextlib.suppress(Exception):
                session.run(_stop_command(pid), check=False, timeout=30)
        summary, left = _teardown(provider, deployment_id, launch.resources)
        if left:
            launch.record.state = "teardown-failed"
            launch.record.resources = left
            registry.upsert(launch.record)
        else:
            registry.remove(deployment_id)
        if not isinstance(e, Exception | KeyboardInterrupt):
            raise
        message = (
            f"deployment {deployment_id} failed while {_STEP_TEXT[step]}: {_scrub(reason, token)}\n"
            + "\n".join(f"  - {line}" for line in summary)
        )
        raise DeploymentFailed(message, step=step, summary=summary, interrupted=interrupted) from e
    finally:
        if session is not None:
            session.close()


def _upload(
    session: SshSession,
    remote_dir: str,
    *,
    modeldir: Path,
    wrapper_file: Path | None,
    wheel: Path,
    token: str,
    run_sh: str,
    install_sh: str,
) -> None:
    """Put everything the instance needs under ``remote_dir`` (folders 0700, token 0600)."""
    for sub in ("", "/dist", "/upload", "/home"):
        session.makedirs(remote_dir + sub)
    with tempfile.TemporaryDirectory(prefix="studioserve-upload-") as tmp:
        tar_path = Path(tmp) / "modeldir.tar"
        count, size = _tar_modeldir(modeldir, tar_path)
        logger.info("uploading %d files (%.1f MB) from %s", count, size / 1e6, modeldir)
        session.put_file(tar_path, f"{remote_dir}/upload/modeldir.tar")
    session.run(f"cd {shlex.quote(remote_dir)}/upload && tar -xf modeldir.tar && rm modeldir.tar")
    if wrapper_file is not None:
        session.makedirs(f"{remote_dir}/upload/wrapper")
        session.put_file(wrapper_file, f"{remote_dir}/upload/wrapper/{wrapper_file.name}")
    session.put_file(wheel, f"{remote_dir}/dist/{wheel.name}")
    session.put_bytes(token.encode() + b"\n", f"{remote_dir}/token", mode=0o600)
    session.put_bytes(run_sh.encode(), f"{remote_dir}/run.sh", mode=0o700)
    session.put_bytes(install_sh.encode(), f"{remote_dir}/install.sh", mode=0o700)


def _start(session: SshSession, remote_dir: str) -> int:
    """Start ``run.sh`` detached in its own session (all streams redirected); its pid."""
    q_dir = shlex.quote(remote_dir)
    started = session.run(
        f"cd {q_dir} && if command -v setsid >/dev/null 2>&1; then S=setsid; else S=; fi; "
        f"$S nohup sh run.sh > serve.log 2>&1 < /dev/null & echo $! > {q_dir}/serve.pid; "
        f"cat {q_dir}/serve.pid"
    )
    return int(started.stdout.strip().splitlines()[-1])


def _stop_command(pid: int) -> str:
    group = f"-- -{pid}"
    return (
        f"kill -TERM {group} 2>/dev/null || kill -TERM {pid} 2>/dev/null; "
        f"for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 {group} 2>/dev/null || exit 0; "
        f"sleep 0.5; done; kill -KILL {group} 2>/dev/null; exit 0"
    )


def _wait_ready(
    url: str, session: SshSession, pid: int, log_path: str, token: str, timeout: float
) -> None:
    """Poll ``url/readyz`` until 200; fail early when the remote process exited."""
    opener = _no_proxy_opener()
    deadline = time.monotonic() + timeout
    next_alive_check = 0.0
    last_error = "no answer yet"
    q_log = shlex.quote(log_path)
    while True:
        try:
            with opener.open(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last_error = str(e)
        now = time.monotonic()
        if now >= next_alive_check:
            next_alive_check = now + 3.0
            alive = session.run(f"kill -0 {pid}", check=False, timeout=30).status == 0
            if not alive:
                tail = session.run(f"tail -n 40 {q_log}", check=False, timeout=30).stdout
                raise CloudError(
                    "the server on the instance exited before it was ready; its log ends with:\n"
                    + _scrub(tail.rstrip(), token)
                )
        if now > deadline:
            tail = session.run(f"tail -n 20 {q_log}", check=False, timeout=30).stdout
            raise CloudError(
                f"{url}/readyz did not answer 200 within {timeout:g}s (last: {last_error}); "
                "check that --allow-cidr covers your address. Server log:\n"
                + _scrub(tail.rstrip(), token)
            )
        time.sleep(1.0)


# -- studio instances -------------------------------------------------------------------------


def _provider_key(record: InstanceRecord) -> tuple[Any, ...]:
    return (
        record.cloud,
        record.region,
        record.zone,
        record.project,
        record.endpoint_url,
        record.anonymous,
    )


def _provider_for(record: InstanceRecord, cache: dict[tuple[Any, ...], Provider]) -> Provider:
    key = _provider_key(record)
    if key not in cache:
        cache[key] = make_provider(
            CloudOptions(
                cloud=record.cloud,
                gpus=0,
                region=record.region,
                zone=record.zone,
                project=record.project,
                endpoint_url=record.endpoint_url,
                anonymous=record.anonymous,
            )
        )
    return cache[key]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_instances(cloud: str | None = None, *, refresh: bool = True) -> list[InstanceRecord]:
    """The instances studioserve launched from this machine, oldest first.

    With ``refresh`` each one's state is asked from its cloud, and deployments whose instance
    has ended (the normal end: the server exited, the instance deleted itself) are cleaned up:
    leftover firewall rules / security groups and local keys are deleted and the record
    dropped. A GCE instance found stopped instead of deleted is deleted. Launches whose
    ``studio`` process died mid-way are rolled back.

    :param cloud: only this cloud (``"ec2"`` or ``"gcloud"``).
    """
    registry = _Registry()
    records = [r for r in registry.load() if cloud is None or r.cloud == cloud]
    if not refresh:
        return sorted(records, key=lambda r: r.created_at)
    providers: dict[tuple[Any, ...], Provider] = {}
    kept: list[InstanceRecord] = []
    here = socket.gethostname()
    for record in records:
        if record.state == "launching" and (record.host != here or _pid_alive(record.pid)):
            kept.append(record)  # a studio process (maybe elsewhere) is launching it now
            continue
        try:
            provider = _provider_for(record, providers)
            state = provider.instance_state(record.instance_id) if record.instance_id else "gone"
        except Exception as e:  # no credentials, no network, no SDK: show it as unknown
            logger.warning("cannot ask %s about %s: %s", record.cloud, record.id, e)
            record.state = "unknown"
            kept.append(record)
            continue
        ended = state == "gone"
        stopped_gce = state == "stopped" and record.cloud == "gcloud"
        stale_launch = record.state in {"launching", "teardown-failed"}
        if ended or stopped_gce or stale_launch:
            why = (
                "ended"
                if ended
                else "stopped but not deleted"
                if stopped_gce
                else "an unfinished launch"
            )
            log = logger.warning if stopped_gce or stale_launch else logger.info
            log("%s (%s) is %s; removing what is left of it", record.id, record.instance_id, why)
            _, left = _teardown(provider, record.id, record.resources)
            if left:
                record.state = "teardown-failed"
                record.resources = left
                registry.upsert(record)
                kept.append(record)
            else:
                registry.remove(record.id)
            continue
        record.state = state
        kept.append(record)
    return sorted(kept, key=lambda r: r.created_at)


def stop_instances(ids: Sequence[str] | None = None, all: bool = False) -> list[str]:
    """Delete the given deployments (ids or instance ids), or all of them; summary lines.

    :raises ConfigError: neither ids nor ``all``, or an id that is not in the registry.
    """
    registry = _Registry()
    records = registry.load()
    if all:
        chosen = records
    elif ids:
        chosen = []
        for ident in ids:
            match = [r for r in records if ident in (r.id, r.instance_id)]
            if not match:
                known = ", ".join(r.id for r in records) or "none"
                raise ConfigError(
                    f"no studioserve instance {ident!r} in {registry.path} (known: {known}); "
                    "see `studio instances list`"
                )
            chosen += [r for r in match if r not in chosen]
    else:
        raise ConfigError("name the instances to stop, or pass --all")
    providers: dict[tuple[Any, ...], Provider] = {}
    lines: list[str] = []
    for record in chosen:
        provider = _provider_for(record, providers)
        summary, left = _teardown(provider, record.id, record.resources)
        lines += [f"{record.id}: {line}" for line in summary]
        if left:
            record.state = "teardown-failed"
            record.resources = left
            registry.upsert(record)
        else:
            registry.remove(record.id)
    return lines


__all__ = [
    "DEFAULT_HOOKS",
    "Deployment",
    "InstanceRecord",
    "apply_env_overrides",
    "build_wheel",
    "deploy",
    "detect_public_cidr",
    "is_deployment_id",
    "list_instances",
    "make_provider",
    "new_deployment_id",
    "registry_path",
    "stop_instances",
]
