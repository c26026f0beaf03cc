"""``studio serve --cloud``: one deployment, a method per step and one rollback.

The steps (:data:`~studioserve.cloud.base.STEPS`)::

    launch      key pair / security group (EC2), the instance; wait until it runs
    open_port   TCP 22 and the serving port, from --allow-cidr only
    wait_ssh    read the host key from the cloud API, SSH in with retries (host key pinned)
    preflight   the instance's Python (3.11 or newer) and the provider's checks there
                (GCE: may the instance delete itself?)
    upload      the modeldir, the wrapper, the studioserve wheel, a 0600 token file
    install     a virtualenv, the wheel, the model's frameworks; then: does the framework
                see the instance's GPU?
    start       ``studio serve ... --token-file``, detached; when it exits the instance ends
    wait_ready  ``/readyz`` on the instance over SSH, then a short check from here on the port
    extend      the launch lease becomes ``--max-lifetime`` (the boot timer over SSH; GCE's
                maxRunDuration through the API)
    report      record the instance in the local registry; return a :class:`Deployment`

Until ``extend``, the instance ends by itself after the launch lease (the SSH, install and
ready timeouts and a margin), whatever happens to this machine. Any exception, Ctrl-C,
SIGTERM or SIGHUP in any step runs :meth:`Launch.rollback`: it deletes everything created so
far (found both from the launch's own list and from the cloud by tag), shielded from a
first Ctrl-C, and raises :class:`DeploymentFailed` with a summary.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import secrets
import shlex
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..config import DEFAULT_GRPC_PORT, DEFAULT_PORT, ServeConfig, config_dir, host_port
from ..errors import CloudError, ConfigError, DeploymentFailed
from ..store import validate_key
from .base import (
    STEPS,
    CloudOptions,
    InstanceInfo,
    LaunchSpec,
    Overrides,
    Provider,
    Resource,
    StepContext,
    normalize_cidr,
    utcnow,
)
from .network import detect_public_cidr, http_status
from .payload import (
    http_host,
    model_families,
    new_deployment_id,
    probe_command,
    resolve_wrapper,
    scrub,
    serve_args,
    stop_command,
    tar_modeldir,
)
from .plan import DeploymentPlan
from .providers import make_provider
from .registry import InstanceRecord, Registry
from .scripts import (
    GPU_FRAMEWORKS,
    MIN_PYTHON,
    default_end_command,
    default_lifetime_command,
    gpu_check_command,
    install_script,
    parse_python_version,
    python_version_command,
    requirements_for,
    run_script,
)
from .signals import Shield, describe_interruption, launch_signals
from .teardown import teardown
from .wheel import build_wheel

if TYPE_CHECKING:
    from .ssh import KeyPair, SshSession

logger = logging.getLogger(__name__)

STEP_TEXT = {
    "launch": "launching the instance",
    "open_port": "opening the ports",
    "wait_ssh": "waiting for SSH",
    "preflight": "checking the instance",
    "upload": "uploading the model and package",
    "install": "installing studioserve on the instance",
    "start": "starting the server",
    "wait_ready": "waiting for the server to become ready",
    "extend": "extending the instance's lifetime",
    "report": "recording the deployment",
}
#: how long the check from this machine may take once the server is ready on the instance
EXTERNAL_CHECK_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deployment:
    """A running deployment, as :func:`deploy` returns it (the CLI prints it).

    :param url: where to send requests (``http://ADDRESS:PORT``).
    :param grpc_address: where gRPC clients connect (``ADDRESS:PORT``), None without
        ``--grpc-port``.
    :param token: the bearer token (only here: it is in no log, file or registry locally).
    :param gpu: the GPUs the instance's driver reported (``"1x NVIDIA L4"``), None for none.
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
    gpu: str | None
    created_at: _dt.datetime
    expires_at: _dt.datetime
    killafter: float
    remote_dir: str
    log_path: str
    resources: tuple[Resource, ...]
    grpc_address: str | None = None


# -- the deployment -----------------------------------------------------------------------------


class Launch:
    """One deployment: checked when built (nothing created), then :meth:`run` step by step.

    Example::

        launch = Launch(ServeConfig(key="mnist-7", killafter=600), Path("modeldir"),
                        CloudOptions(cloud="ec2", gpus=1))
        print("\\n".join(launch.plan().lines()))   # what it would create
        dep = launch.run()                          # or DeploymentFailed, nothing left

    :param provider: a ready provider (default: built from ``options`` and ``overrides``).
    :param overrides: where a test points the launch (:class:`~studioserve.cloud.base.Overrides`).
    :raises ConfigError: bad options, missing SDK, missing modeldir, a shape not sold.
    :raises CloudError: a read-only lookup failed (credentials, the address lookup).
    """

    def __init__(
        self,
        serve_config: ServeConfig,
        modeldir: Path,
        options: CloudOptions,
        *,
        provider: Provider | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        self.config = serve_config
        self.modeldir = Path(modeldir)
        self.options = options
        self.overrides = overrides or Overrides()
        if not self.modeldir.is_dir():
            raise ConfigError(f"modeldir {self.modeldir} is not a folder")
        if serve_config.no_auth:
            raise ConfigError(
                "--no-auth cannot be used with --cloud: the endpoint is reachable from --allow-cidr"
            )
        validate_key(serve_config.key)
        self.port = serve_config.port or DEFAULT_PORT
        if self.port == 22:
            raise ConfigError("--port 22 is SSH's port on the instance; pick another --port")
        # the firewall opens a port known before the server starts: 0 is Triton's 8001 here
        self.grpc_port = (
            None if serve_config.grpc_port is None else serve_config.grpc_port or DEFAULT_GRPC_PORT
        )
        if self.grpc_port in (22, self.port):
            raise ConfigError(
                f"--grpc-port {self.grpc_port} is the instance's "
                + ("SSH" if self.grpc_port == 22 else "HTTP (--port)")
                + " port; pick another --grpc-port (Triton uses 8001)"
            )
        if serve_config.killafter == 0:
            logger.warning(
                "--killafter 0: the instance ends only at --max-lifetime (%gs) or with "
                "`studio instances stop`",
                options.max_lifetime,
            )
        self.families = model_families(self.modeldir, serve_config.framework)
        self.wrapper_file, self.wrapper_name = resolve_wrapper(serve_config.wrapper)
        self.provider = provider or make_provider(options, self.overrides)
        self.provider.preflight()
        self.allow_cidr = (
            normalize_cidr(options.allow_cidr)
            if options.allow_cidr
            else detect_public_cidr(self.overrides.ip_echo_url)
        )
        self.token = serve_config.token or secrets.token_urlsafe(32)
        self.ssh_user = options.ssh_user or self.provider.default_ssh_user
        self.id = new_deployment_id()
        self.created_at = utcnow().replace(microsecond=0)
        self.expires_at = self.created_at + _dt.timedelta(seconds=options.max_lifetime)
        # filled in by the steps
        self.step = STEPS[0]
        self.resources: list[Resource] = []
        self.instance: InstanceInfo | None = None
        self.session: SshSession | None = None
        self.keys: KeyPair | None = None
        self.spec: LaunchSpec | None = None
        self.record: InstanceRecord | None = None
        self.registry = Registry()
        self.remote_dir = ""
        self.pid: int | None = None
        self.url = ""
        self.gpu: str | None = None
        self.wheel: Path | None = None

    # -- what it would do ---------------------------------------------------------------------

    def _spec(self, public_key: str) -> LaunchSpec:
        return LaunchSpec(
            deployment_id=self.id,
            public_key=public_key,
            ssh_user=self.ssh_user,
            port=self.port,
            allow_cidr=self.allow_cidr,
            created_at=self.created_at,
            expires_at=self.expires_at,
            lease=self.options.lease,
            max_lifetime=self.options.max_lifetime,
            grpc_port=self.grpc_port,
        )

    def requirements(self, wheel: str = "studioserve") -> tuple[str, ...]:
        """The packages the install adds for the model's frameworks."""
        if self.overrides.remote_requirements is not None:
            return self.overrides.remote_requirements
        gpu = self.provider.gpu() is not None
        extras = ("grpc",) if self.grpc_port is not None else ()
        return tuple(requirements_for(self.families, gpu=gpu, wheel=wheel, extras=extras))

    def plan(self) -> DeploymentPlan:
        """What :meth:`run` would create, what it costs and how it ends; creates nothing."""
        return DeploymentPlan(
            plan=self.provider.plan(self._spec("ssh-ed25519 <generated at launch>")),
            experiment=self.config.key,
            port=self.port,
            grpc_port=self.grpc_port,
            allow_cidr=self.allow_cidr,
            frameworks=self.families,
            requirements=self.requirements(),
            killafter=self.config.killafter,
            lease=self.options.lease,
            max_lifetime=self.options.max_lifetime,
        )

    # -- running it ---------------------------------------------------------------------------

    def run(self) -> Deployment:
        """Every step in order; on any failure or interruption, :meth:`rollback`.

        :raises DeploymentFailed: a step failed or the launch was interrupted; everything
            created was deleted and ``summary`` says what.
        """
        from .ssh import generate_keypair

        self.wheel = build_wheel()
        with launch_signals():
            try:
                self.keys = generate_keypair(config_dir() / "keys", self.id, comment=self.ssh_user)
                self._start_record()
                self.add(Resource("local-key", str(self.keys.private_path)))
                self.spec = self._spec(self.keys.public_key)
                for name in STEPS:
                    self._enter(name)
                    getattr(self, name)()
                return self.deployment()
            except BaseException as e:
                self.rollback(e)
            finally:
                if self.session is not None:
                    self.session.close()

    def _enter(self, name: str) -> None:
        self.step = name
        logger.info("[%s] %s", self.id, STEP_TEXT[name])
        context = StepContext(
            step=name,
            deployment_id=self.id,
            cloud=self.options.cloud,
            public_key=self.keys.public_key if self.keys else "",
            ssh_user=self.ssh_user,
            instance=self.instance,
            resources=tuple(self.resources),
        )
        for hook in self.overrides.hooks:
            hook(name, context)

    def _start_record(self) -> None:
        described = self.provider.describe()
        assert self.keys is not None
        self.record = InstanceRecord(
            id=self.id,
            cloud=self.options.cloud,
            state="launching",
            region=described["region"],
            zone=described["zone"],
            project=described["project"],
            endpoint_url=self.overrides.endpoint_url,
            anonymous=self.overrides.anonymous,
            port=self.port,
            ssh_user=self.ssh_user,
            key_path=str(self.keys.private_path),
            experiment=self.config.key,
            created_at=self.created_at.isoformat(),
            expires_at=self.expires_at.isoformat(),
            killafter=self.config.killafter,
            pid=os.getpid(),
            host=socket.gethostname(),
        )

    def add(self, resource: Resource) -> None:
        """Record a created resource (here and in the registry) before anything else runs."""
        if resource not in self.resources:
            self.resources.append(resource)
        assert self.record is not None
        if resource.kind == "instance":
            self.record.instance_id = resource.id
        self._save()

    def forget(self, resource: Resource) -> None:
        """A resource the launch deleted itself (the EC2 key pair after the first login)."""
        self.resources = [r for r in self.resources if r != resource]
        self._save()

    def _save(self) -> None:
        assert self.record is not None
        self.record.resources = list(self.resources)
        self.registry.upsert(self.record)

    @property
    def _session(self) -> SshSession:
        assert self.session is not None, "no SSH session yet"
        return self.session

    # -- the steps ----------------------------------------------------------------------------

    def launch(self) -> None:
        assert self.spec is not None
        assert self.record is not None
        self.instance = self.provider.launch(self.spec, self.add)
        self.record.public_ip = self.instance.public_ip

    def open_port(self) -> None:
        assert self.spec is not None
        assert self.instance is not None
        self.provider.open_ports(self.spec, self.instance, self.add)

    def _host(self) -> str:
        assert self.instance is not None
        host = self.overrides.connect_host or self.instance.public_ip
        if not host:
            raise CloudError(
                f"instance {self.instance.instance_id} has no public address; use a subnet "
                "that assigns one, or reach it through a tunnel"
            )
        return host

    def wait_ssh(self) -> None:
        from .ssh import SshSession

        assert self.instance is not None
        assert self.keys is not None
        assert self.spec is not None
        host = self._host()
        if self.overrides.host_key:
            host_keys = [self.overrides.host_key]
        else:
            host_keys = self.provider.host_keys(self.instance, self.options.ssh_timeout)
        self.session = SshSession.connect(
            host,
            port=self.overrides.ssh_port,
            user=self.ssh_user,
            key_path=self.keys.private_path,
            host_keys=host_keys,
            timeout=self.options.ssh_timeout,
        )
        try:
            for line in self.provider.after_connect(self.spec, self.forget):
                logger.info("%s", line)
        except CloudError as e:  # harmless to keep; it goes with the deployment
            logger.warning("%s", e)

    def preflight(self) -> None:
        """Fail in seconds, not after a long install: the Python, the provider's checks."""
        assert self.instance is not None
        python = self.overrides.remote_python
        result = self._session.run(python_version_command(python), check=False, timeout=120)
        version = parse_python_version(result.stdout)
        need = ".".join(map(str, MIN_PYTHON))
        if version is None:
            raise CloudError(
                f"the image {self.instance.image} has no working {python} "
                f"({(result.stderr or result.stdout).strip()[-300:]}); studioserve needs "
                f"Python {need} or newer on the instance: pass --image with one that has it "
                "(Ubuntu 24.04 or newer; the default images have it)"
            )
        if version < MIN_PYTHON:
            raise CloudError(
                f"the image {self.instance.image} has Python {version[0]}.{version[1]}; "
                f"studioserve needs Python {need} or newer on the instance: pass --image with "
                "one that has it (Ubuntu 24.04 or newer; the default images have it)"
            )
        script = self.provider.remote_preflight()
        if script:
            checked = self._session.run(script, check=False, timeout=300)
            output = (checked.stdout + checked.stderr).strip()[-2000:]
            if checked.status != 0:
                raise CloudError(f"the instance failed a check before the install:\n{output}")
            for line in output.splitlines():  # warnings and notes the checks print
                logger.warning("[%s] %s", self.id, line)

    def upload(self) -> None:
        """Put everything the instance needs under the remote folder (0700; token 0600)."""
        session = self._session
        wheel = self.wheel
        assert wheel is not None
        home = session.run('printf %s "$HOME"').stdout.strip() or "."
        self.remote_dir = remote_dir = self.overrides.remote_dir or f"{home}/studioserve"
        for sub in ("", "/dist", "/upload", "/home"):
            session.makedirs(remote_dir + sub)
        with tempfile.TemporaryDirectory(prefix="studioserve-upload-") as tmp:
            tar_path = Path(tmp) / "modeldir.tar"
            count, size = tar_modeldir(self.modeldir, tar_path)
            logger.info("uploading %d files (%.1f MB) from %s", count, size / 1e6, self.modeldir)
            session.put_file(tar_path, f"{remote_dir}/upload/modeldir.tar")
        session.run(
            f"cd {shlex.quote(remote_dir)}/upload && tar -xf modeldir.tar && rm modeldir.tar"
        )
        wrapper_arg = self.wrapper_name
        if self.wrapper_file is not None:
            session.makedirs(f"{remote_dir}/upload/wrapper")
            wrapper_arg = f"{remote_dir}/upload/wrapper/{self.wrapper_file.name}"
            session.put_file(self.wrapper_file, wrapper_arg)
        session.put_file(wheel, f"{remote_dir}/dist/{wheel.name}")
        session.put_bytes(self.token.encode() + b"\n", f"{remote_dir}/token", mode=0o600)
        run_sh = run_script(
            deployment_id=self.id,
            remote_dir=remote_dir,
            serve_args=serve_args(
                self.config,
                remote_dir=remote_dir,
                port=self.port,
                grpc_port=self.grpc_port,
                wrapper_arg=wrapper_arg,
                bind_host=self.overrides.remote_bind_host,
            ),
            end_command=self.overrides.remote_end_command or default_end_command(),
        )
        ov = self.overrides
        install_sh = install_script(
            remote_dir=remote_dir,
            python=ov.remote_python,
            wheel_name=wheel.name,
            key=self.config.key,
            families=self.families,
            requirements=self.requirements(f"dist/{wheel.name}"),
            venv_args=ov.remote_venv_args,
            pip_args=ov.remote_pip_args,
            site_dirs=ov.remote_site_dirs,
        )
        session.put_bytes(run_sh.encode(), f"{remote_dir}/run.sh", mode=0o700)
        session.put_bytes(install_sh.encode(), f"{remote_dir}/install.sh", mode=0o700)

    def install(self) -> None:
        q = shlex.quote
        self._session.run(
            f"sh {q(self.remote_dir)}/install.sh", timeout=self.options.install_timeout
        )
        self.check_gpu()

    def check_gpu(self) -> None:
        """Does the model's framework see the GPU the instance type has? Fail (or warn with
        --allow-cpu-fallback) when not: TensorFlow and others fall back to the CPU silently."""
        expected = self.provider.gpu()
        family = next((f for f in self.families if f in GPU_FRAMEWORKS), "")
        venv_python = f"{self.remote_dir}/venv/bin/python"
        result = self._session.run(gpu_check_command(venv_python, family), check=False, timeout=600)
        try:
            seen = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            seen = {"gpus": [], "framework": None, "error": result.stderr.strip()[-300:]}
        names = [str(n) for n in seen.get("gpus") or []]
        if names:
            counts = {n: names.count(n) for n in names}
            self.gpu = ", ".join(f"{c}x {n}" for n, c in counts.items())
        if expected is None:
            return
        problem = ""
        if not names:
            problem = "the NVIDIA driver shows no GPU (nvidia-smi is missing or lists none)"
        elif family and not seen.get("framework"):
            detail = f": {seen['error']}" if seen.get("error") else ""
            problem = f"{family} sees none of its {len(names)} GPU(s){detail}"
        if not problem:
            logger.info("[%s] GPU: %s, used by %s", self.id, self.gpu, family or "the model")
            return
        instance_type = self.instance.instance_type if self.instance else "the instance"
        message = (
            f"{instance_type} has {expected}, but {problem}; the model would run on the CPU "
            "at GPU prices"
        )
        if self.options.allow_cpu_fallback:
            logger.warning("WARNING: %s (--allow-cpu-fallback: serving anyway)", message)
            return
        raise CloudError(
            f"{message}. Use an image with the NVIDIA driver and CUDA (the default images have "
            "them), or pass --allow-cpu-fallback to serve on the CPU anyway"
        )

    def start(self) -> None:
        """Start ``run.sh`` detached in its own session (all streams redirected)."""
        q_dir = shlex.quote(self.remote_dir)
        started = self._session.run(
            f"cd {q_dir} && if command -v setsid >/dev/null 2>&1; then S=setsid; else S=; fi; "
            f"$S nohup sh run.sh > serve.log 2>&1 < /dev/null & echo $! > {q_dir}/serve.pid; "
            f"cat {q_dir}/serve.pid"
        )
        self.pid = int(started.stdout.strip().splitlines()[-1])
        self.url = f"http://{http_host(self._host())}:{self.port}"

    def wait_ready(self) -> None:
        """``/readyz`` on the instance itself over SSH (no firewall in the way), then a short
        check from here that names the port when something between blocks it."""
        self._wait_ready_on_instance()
        deadline = time.monotonic() + EXTERNAL_CHECK_TIMEOUT
        while True:
            status, detail = http_status(self.url + "/readyz")
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise CloudError(
                    f"the server is ready on the instance, but {self.url}/readyz does not "
                    f"answer from here ({detail}): something between this machine and the "
                    f"instance blocks TCP port {self.port} (a corporate firewall or proxy?), or "
                    f"--allow-cidr {self.allow_cidr} is not the address you connect from. SSH "
                    f"(port 22) works; try another --port (443 is often open), or "
                    "--allow-cidr with your network's range"
                )
            time.sleep(1.0)
        if self.grpc_port is not None:
            self._wait_grpc_port(self.grpc_port, deadline)

    def _wait_grpc_port(self, port: int, deadline: float) -> None:
        """A TCP connection from here to ``--grpc-port`` (the server listens there once
        ready): one that cannot be made names the port."""
        host = self._host()
        while True:
            try:
                with socket.create_connection((host, port), timeout=3.0):
                    return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise CloudError(
                        f"the server answers on {self.url}, but its gRPC port "
                        f"{host_port(host, port)} cannot be reached from here ({e}): "
                        "something between this machine and the instance blocks TCP port "
                        f"{port}; try another --grpc-port"
                    ) from None
            time.sleep(1.0)

    def _wait_ready_on_instance(self) -> None:
        assert self.pid is not None
        session = self._session
        bind = self.overrides.remote_bind_host
        local = "127.0.0.1" if bind in ("0.0.0.0", "") else ("::1" if bind == "::" else bind)
        probe = probe_command(
            f"{self.remote_dir}/venv/bin/python",
            f"http://{http_host(local)}:{self.port}/readyz",
        )
        q_log = shlex.quote(f"{self.remote_dir}/serve.log")
        deadline = time.monotonic() + self.options.ready_timeout
        last = "no answer yet"
        while True:
            result = session.run(
                f"kill -0 {self.pid} 2>/dev/null || {{ echo exited; exit 0; }}; {probe}",
                check=False,
                timeout=60,
            )
            last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else last
            if last == "200":
                return
            if last == "exited":
                tail = session.run(f"tail -n 40 {q_log}", check=False, timeout=30).stdout
                raise CloudError(
                    "the server on the instance exited before it was ready; its log ends with:\n"
                    + scrub(tail.rstrip(), self.token)
                )
            if time.monotonic() > deadline:
                tail = session.run(f"tail -n 20 {q_log}", check=False, timeout=30).stdout
                raise CloudError(
                    f"the server did not become ready within {self.options.ready_timeout:g}s "
                    f"(on the instance, /readyz: {last}). Server log:\n"
                    + scrub(tail.rstrip(), self.token)
                )
            time.sleep(1.0)

    def extend(self) -> None:
        """The server is ready: the launch lease becomes ``--max-lifetime``."""
        assert self.instance is not None
        assert self.spec is not None
        seconds = int(self.options.max_lifetime)
        template = self.overrides.remote_lifetime_command
        command = (
            template.format(seconds=seconds) if template else default_lifetime_command(seconds)
        )
        self._session.run(command, timeout=120)
        line = self.provider.extend_lifetime(self.instance, self.spec)
        if line:
            logger.info("%s", line)
        logger.info(
            "[%s] the instance ends by %s at the latest (--max-lifetime)",
            self.id,
            self.expires_at.isoformat(),
        )

    def report(self) -> None:
        assert self.record is not None
        self.record.state = "running"
        self.record.url = self.url
        self._save()

    def deployment(self) -> Deployment:
        """The running deployment (after :meth:`report`)."""
        assert self.instance is not None
        assert self.keys is not None
        assert self.record is not None
        logger.info("[%s] ready at %s (ends by %s)", self.id, self.url, self.expires_at.isoformat())
        return Deployment(
            id=self.id,
            cloud=self.options.cloud,
            instance_id=self.instance.instance_id,
            instance_type=self.instance.instance_type,
            image=self.instance.image,
            region=self.record.region,
            zone=self.record.zone,
            project=self.record.project,
            url=self.url,
            token=self.token,
            public_ip=self.instance.public_ip,
            port=self.port,
            ssh_user=self.ssh_user,
            key_path=self.keys.private_path,
            gpu=self.gpu,
            created_at=self.created_at,
            expires_at=self.expires_at,
            killafter=self.config.killafter,
            remote_dir=self.remote_dir,
            log_path=f"{self.remote_dir}/serve.log",
            resources=tuple(r for r in self.resources if r.kind != "local-key"),
            grpc_address=(
                None if self.grpc_port is None else host_port(self._host(), self.grpc_port)
            ),
        )

    # -- the one rollback ---------------------------------------------------------------------

    def rollback(self, error: BaseException) -> NoReturn:
        """Delete everything created so far, shielded from a first Ctrl-C, then raise
        :class:`DeploymentFailed` (or re-raise what is neither an error nor an interrupt)."""
        interrupted = isinstance(error, KeyboardInterrupt)
        reason = (
            f"interrupted ({describe_interruption(error)})"
            if interrupted
            else f"{type(error).__name__}: {error}"
        )
        reason = scrub(reason, self.token)
        with Shield(lambda: [r.describe() for r in self.resources]) as shield:
            logger.error(
                "[%s] failed while %s: %s; removing what was created",
                self.id,
                STEP_TEXT[self.step],
                reason,
            )
            if self.session is not None and self.pid is not None:
                # the instance is about to go anyway; stopping the server first keeps a
                # reused host (connect_host) clean. TERM, then KILL after 5 s.
                try:
                    self.session.run(stop_command(self.pid), check=False, timeout=30)
                except (Exception, KeyboardInterrupt) as e:
                    logger.warning("could not stop the server on the instance: %s", e)
            summary, left = teardown(self.provider, self.id, self.resources, shield=shield)
        if self.record is not None:
            if left:
                self.record.state = "teardown-failed"
                self.record.resources = left
                self.registry.upsert(self.record)
            else:
                self.registry.remove(self.id)
        if not isinstance(error, Exception | KeyboardInterrupt):
            raise error
        message = (
            f"deployment {self.id} failed while {STEP_TEXT[self.step]}: {reason}\n"
            + "\n".join(f"  - {line}" for line in summary)
        )
        raise DeploymentFailed(
            message, step=self.step, summary=summary, interrupted=interrupted
        ) from error


def deploy(
    serve_config: ServeConfig,
    modeldir: Path,
    options: CloudOptions,
    *,
    provider: Provider | None = None,
    overrides: Overrides | None = None,
) -> Deployment:
    """Serve ``modeldir`` on a new cloud instance that ends itself; return where it runs.

    The remote side runs ``studio serve`` with ``serve_config``'s flags plus ``--host
    0.0.0.0``, a token (sent as a 0600 file over SSH, never on a command line) and
    ``--killafter``; when the server exits the instance shuts down and is deleted. Until the
    server is ready it ends by itself after the launch lease, then at ``options.max_lifetime``
    whatever happens. Prints nothing (logging only).

    Example::

        dep = deploy(ServeConfig(key="mnist-7", killafter=600), Path("modeldir"),
                     CloudOptions(cloud="ec2", gpus=1))
        print(dep.url, dep.token, dep.expires_at)

    :raises ConfigError: bad options, missing SDK, missing modeldir, a shape not sold.
    :raises CloudError: before anything was created (credentials, address lookup).
    :raises DeploymentFailed: a step failed or the launch was interrupted (Ctrl-C, SIGTERM,
        SIGHUP); everything created was deleted and ``summary`` says what.
    """
    return Launch(serve_config, modeldir, options, provider=provider, overrides=overrides).run()


def plan_deployment(
    serve_config: ServeConfig,
    modeldir: Path,
    options: CloudOptions,
    *,
    provider: Provider | None = None,
    overrides: Overrides | None = None,
) -> DeploymentPlan:
    """What :func:`deploy` would create and what it would cost (``--dry-run``); creates
    nothing (read-only lookups only: your address, the image)."""
    launch = Launch(serve_config, modeldir, options, provider=provider, overrides=overrides)
    return launch.plan()
