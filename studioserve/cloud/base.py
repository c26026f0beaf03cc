"""The small interface every cloud provider implements, and the records ``deploy`` keeps.

Nothing here imports a cloud SDK: :mod:`.ec2` is the only module importing boto3, :mod:`.gce`
the only one importing google-cloud-compute and :mod:`.ssh` the only one importing paramiko.

A provider creates resources and reports each one through a ``record`` callback *as soon as
the API call that made it returns*, so :mod:`.deploy` can always delete everything created so
far. Every resource also carries the deployment's id as a tag or label (``studioserve=<id>``),
so :meth:`Provider.find` can rediscover what a crashed launch left behind.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as _dt
import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError

#: the values ``CloudOptions.cloud`` accepts (the CLI's ``--cloud`` choices)
CLOUDS = ("ec2", "gcloud")
#: the steps of a deployment, in order; hooks are called before each one
STEPS = (
    "launch",
    "open_port",
    "wait_ssh",
    "preflight",
    "upload",
    "install",
    "start",
    "wait_ready",
    "extend",
    "report",
)
#: GCE provisioning models (``--provisioning-model``)
PROVISIONING_MODELS = ("standard", "spot", "flex-start")
#: the tag (EC2) / label (GCE) key on everything studioserve creates; the value is the id
TAG_KEY = "studioserve"
#: the default hard limit on an instance's life
DEFAULT_MAX_LIFETIME = 24 * 3600.0
#: how long ``deploy`` waits for ``/readyz`` after starting the server
DEFAULT_READY_TIMEOUT = 1800.0
#: how long ``deploy`` waits for the instance's host key and for sshd to accept the key
DEFAULT_SSH_TIMEOUT = 900.0
#: how long the remote install (virtualenv, wheel, framework) may take
DEFAULT_INSTALL_TIMEOUT = 3600.0
#: added to the launch lease for the upload and the steps between the timed ones
LEASE_MARGIN = 600.0
#: the shortest and longest run duration Compute Engine accepts (maxRunDuration)
GCE_MIN_RUN_DURATION = 30.0
GCE_MAX_RUN_DURATION = 120 * 24 * 3600.0
#: where the boot script installs the command that ends the instance
END_SCRIPT = "/usr/local/sbin/studioserve-end"
#: where the boot script installs the command that moves the backstop timer
#: (``studioserve-lifetime SECONDS``: end SECONDS after the first boot)
LIFETIME_SCRIPT = "/usr/local/sbin/studioserve-lifetime"

#: resource kinds, in the order they are deleted
KIND_ORDER = ("instance", "firewall", "security-group", "key-pair", "local-key")

_DEPLOYMENT_ID = re.compile(r"ss-[0-9a-f]{8,16}")


def is_deployment_id(value: str) -> bool:
    """True for ids that :func:`new_deployment_id` makes (``ss-`` and hex digits)."""
    return bool(_DEPLOYMENT_ID.fullmatch(value))


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclasses.dataclass(frozen=True)
class Resource:
    """One thing a deployment created.

    :param kind: one of :data:`KIND_ORDER`.
    :param id: the provider's id (instance id or name, group id, key name, local path).
    :param location: region or zone ("" for global resources and local files).
    """

    kind: str
    id: str
    location: str = ""

    def describe(self) -> str:
        where = f" in {self.location}" if self.location else ""
        return f"{self.kind} {self.id}{where}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id, "location": self.location}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resource:
        return cls(
            kind=str(data["kind"]), id=str(data["id"]), location=str(data.get("location", ""))
        )


def deletion_order(resources: Sequence[Resource]) -> list[Resource]:
    """The resources in the order they can be deleted: instances first, local files last."""
    unique = list(dict.fromkeys(resources))
    return sorted(
        unique,
        key=lambda r: KIND_ORDER.index(r.kind) if r.kind in KIND_ORDER else len(KIND_ORDER),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstanceInfo:
    """A launched instance as the provider reports it.

    :param instance_id: EC2 instance id or GCE instance name.
    :param public_ip: its public address (None when it has none).
    :param location: its region (EC2) or zone (GCE).
    """

    instance_id: str
    name: str
    public_ip: str | None
    private_ip: str | None
    location: str
    instance_type: str
    image: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """What the provider needs to launch one deployment (built by :mod:`.deploy`)."""

    deployment_id: str
    public_key: str
    ssh_user: str
    port: int
    allow_cidr: str
    created_at: _dt.datetime
    expires_at: _dt.datetime
    #: seconds the instance may run before the server is ready (the launch lease); the boot
    #: timer and GCE's maxRunDuration start with it and are extended to ``max_lifetime``
    #: only once the server answers /readyz
    lease: float = DEFAULT_SSH_TIMEOUT + DEFAULT_INSTALL_TIMEOUT + DEFAULT_READY_TIMEOUT
    #: seconds the instance may run at all (``--max-lifetime``)
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    #: the gRPC port (``--grpc-port``), opened beside ``port``; None: no gRPC
    grpc_port: int | None = None

    @property
    def ports(self) -> tuple[int, ...]:
        """The serving ports the firewall opens (SSH's 22 besides): HTTP, then gRPC."""
        return (self.port,) if self.grpc_port is None else (self.port, self.grpc_port)

    @property
    def ports_text(self) -> str:
        """``5000`` or ``5000 and 8001``: the serving ports, as the logs and plans say them."""
        return " and ".join(map(str, self.ports))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What a deployment would create and what it costs (``--dry-run``; :meth:`Provider.plan`).

    :param instance_type: the type or machine (with attached GPUs, on GCE).
    :param gpu: the GPUs it has (``"1x NVIDIA L4"``), None for a CPU instance.
    :param price_per_hour: on-demand USD per hour when known (None: unknown; see the
        provider's price page).
    :param creates: one line per resource that would be created.
    :param backstops: one line per way the instance ends without you.
    :param notes: anything else worth checking before paying.
    """

    cloud: str
    location: str
    instance_type: str
    gpu: str | None
    image: str
    price_per_hour: float | None
    creates: tuple[str, ...]
    backstops: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepContext:
    """What a hook sees before each step (for tests and progress reporting).

    :param step: the step about to run (one of :data:`STEPS`).
    :param resources: what exists so far, in creation order.
    """

    step: str
    deployment_id: str
    cloud: str
    public_key: str
    ssh_user: str
    instance: InstanceInfo | None
    resources: tuple[Resource, ...]


#: a hook is called as ``hook(step, context)`` before each step; raising stops the deployment
Hook = Callable[[str, StepContext], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Overrides:
    """Where a deployment goes instead of a real cloud and a real instance: the one place
    tests (and people with unusual networks) point it elsewhere. Production code never reads
    these from the environment; callers pass them (``deploy(..., overrides=...)``, or the
    CLI's ``obj={"cloud_overrides": ...}``).

    :param connect_host: the address SSH and HTTP connect to instead of the instance's public
        address (an SSH tunnel, a bastion; tests map it to 127.0.0.1).
    :param ssh_port: the SSH port to connect to.
    :param host_key: an OpenSSH public host key line to pin instead of reading it from the
        instance's console.
    :param endpoint_url: the cloud API endpoint (tests: moto or the GCE fake).
    :param anonymous: GCE only: anonymous credentials (for a fake API endpoint).
    :param metadata_url: GCE only: the metadata server the instance's own scripts ask for
        its token, name and zone (default ``http://metadata.google.internal``); the scripts
        call the API at ``endpoint_url`` when it is set.
    :param ip_echo_url: where the public address is looked up (default: checkip.amazonaws.com).
    :param remote_python: the instance's Python that creates the virtualenv.
    :param remote_dir: where everything goes on the instance (default ``~/studioserve``).
    :param remote_venv_args: extra ``python -m venv`` arguments.
    :param remote_pip_args: extra ``pip install`` arguments for the studioserve wheel.
    :param remote_site_dirs: extra site-packages folders the virtualenv should see.
    :param remote_requirements: packages installed for the model's framework (None: what the
        modeldir's framework and the instance's GPU call for; ``()``: none).
    :param remote_end_command: the shell command run when the server exits (default: the
        boot script's ``studioserve-end``, which shuts the instance down and deletes it).
    :param remote_lifetime_command: the command that moves the backstop timer, a template
        whose ``{seconds}`` is the new lifetime counted from the first boot (default: the boot
        script's ``studioserve-lifetime SECONDS`` as root).
    :param remote_bind_host: the address the server binds on the instance.
    :param hooks: called before each step as ``hook(step, context)``.
    :param poll_interval: seconds between the provider's polls of the cloud API.
    """

    connect_host: str | None = None
    ssh_port: int = 22
    host_key: str | None = None
    endpoint_url: str | None = None
    anonymous: bool = False
    metadata_url: str | None = None
    ip_echo_url: str | None = None
    remote_python: str = "python3"
    remote_dir: str | None = None
    remote_venv_args: tuple[str, ...] = ()
    remote_pip_args: tuple[str, ...] = ()
    remote_site_dirs: tuple[str, ...] = ()
    remote_requirements: tuple[str, ...] | None = None
    remote_end_command: str | None = None
    remote_lifetime_command: str | None = None
    remote_bind_host: str = "0.0.0.0"
    hooks: tuple[Hook, ...] = ()
    poll_interval: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.ssh_port <= 65535:
            raise ConfigError(f"SSH port {self.ssh_port} is out of range")
        if self.poll_interval <= 0:
            raise ConfigError("the poll interval must be > 0 seconds")

    def replace(self, **changes: Any) -> Overrides:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CloudOptions:
    """Where and how ``studio serve --cloud`` runs (every field is a CLI option).

    :param cloud: ``"ec2"`` or ``"gcloud"``.
    :param gpus: GPUs wanted (0: a CPU instance); picks the instance/machine type.
    :param instance_type: EC2 instance type, overriding the choice from ``gpus``; a
        comma-separated list (``g6.xlarge,g5.xlarge``) allows the later ones when EC2 has no
        capacity for the earlier ones.
    :param machine_type: GCE machine type, overriding the choice from ``gpus``.
    :param accelerator: the GPU model: GCE accelerator type (``nvidia-l4``,
        ``nvidia-tesla-a100``, ``nvidia-h100-80gb``, ``nvidia-tesla-t4``, ...) or, on EC2, a
        family hint (``l4``, ``a10g``, ``l40s``, ``a100``, ``h100``).
    :param provisioning_model: GCE only: ``standard`` (on demand, the default), ``spot`` or
        ``flex-start``; some GPU shapes are sold only as spot or flex-start.
    :param region: EC2 region (default: the AWS configuration's, else us-east-1).
    :param subnet: EC2 subnet id to launch in; the security group goes into its VPC and the
        instance gets a public address there (default: the region's default VPC).
    :param zone: GCE zone (default: us-central1-a).
    :param project: GCE project (default: the application-default credentials' project).
    :param image: an AMI id or ``ssm:/PARAMETER`` (EC2), or an image / image family URL (GCE),
        instead of the lookup. Its Python must be 3.11 or newer (checked over SSH first).
    :param allow_cidr: who may reach the serving port and SSH; default: your own public
        address (a /32), discovered over HTTPS. Never defaults to the whole internet.
    :param max_lifetime: seconds after which the instance ends itself whatever happens.
    :param ssh_user: the login user (default: ``ubuntu`` on EC2, ``studioserve`` on GCE).
    :param disk_gb: boot disk size at least (the image's own size wins when it is larger).
    :param network: GCE network for the instance and its firewall rule.
    :param service_account: GCE service account the instance uses to delete itself
        (``"default"``: the project's default compute account; ``"create"``: a dedicated
        least-privilege account studioserve creates once per project; an email: that
        account; ``"none"``: no account, so the instance cannot delete itself: when the
        server exits it powers off, and a stopped VM is deleted only by ``studio instances
        list|stop``; maxRunDuration still deletes it while it runs).
    :param allow_cpu_fallback: on a GPU instance, warn instead of failing the launch when the
        framework sees no GPU after the install.
    :param ready_timeout: seconds to wait for ``/readyz`` after starting the server.
    :param ssh_timeout: seconds to wait for the host key and a working SSH login.
    :param install_timeout: seconds the remote install may take.
    """

    cloud: str
    gpus: int = 1
    instance_type: str | None = None
    machine_type: str | None = None
    accelerator: str | None = None
    provisioning_model: str | None = None
    region: str | None = None
    subnet: str | None = None
    zone: str | None = None
    project: str | None = None
    image: str | None = None
    allow_cidr: str | None = None
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    ssh_user: str | None = None
    disk_gb: int = 100
    network: str = "default"
    service_account: str = "default"
    allow_cpu_fallback: bool = False
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    ssh_timeout: float = DEFAULT_SSH_TIMEOUT
    install_timeout: float = DEFAULT_INSTALL_TIMEOUT

    def __post_init__(self) -> None:
        if self.cloud not in CLOUDS:
            raise ConfigError(f"unknown cloud {self.cloud!r}; use one of: {', '.join(CLOUDS)}")
        if self.gpus < 0:
            raise ConfigError("--gpus must be >= 0 (0 means a CPU instance)")
        if self.max_lifetime <= 0:
            raise ConfigError("--max-lifetime must be > 0 seconds")
        if self.disk_gb < 10:
            raise ConfigError("the boot disk must be at least 10 GB")
        if self.ready_timeout <= 0 or self.ssh_timeout <= 0 or self.install_timeout <= 0:
            raise ConfigError("timeouts must be > 0 seconds")
        if self.allow_cidr is not None:
            normalize_cidr(self.allow_cidr)
        if self.subnet is not None:
            if self.cloud != "ec2":
                raise ConfigError("--subnet is for --cloud ec2 (a GCE instance uses its network)")
            if not re.fullmatch(r"subnet-[0-9a-f]{8,17}", self.subnet):
                raise ConfigError(
                    f"--subnet {self.subnet!r} is not an EC2 subnet id (subnet-0123456789abcdef0)"
                )
        if self.provisioning_model is not None:
            if self.cloud != "gcloud":
                raise ConfigError("--provisioning-model is for --cloud gcloud")
            if self.provisioning_model not in PROVISIONING_MODELS:
                raise ConfigError(
                    f"--provisioning-model {self.provisioning_model!r}: use one of "
                    + ", ".join(PROVISIONING_MODELS)
                )
        if self.ssh_user is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", self.ssh_user):
            raise ConfigError(f"invalid SSH user name {self.ssh_user!r}")

    @property
    def lease(self) -> float:
        """Seconds the instance may run before the server is ready: the SSH, install and
        ready timeouts and a margin, never more than ``max_lifetime``."""
        total = self.ssh_timeout + self.install_timeout + self.ready_timeout + LEASE_MARGIN
        return min(total, self.max_lifetime)

    def replace(self, **changes: Any) -> CloudOptions:
        return dataclasses.replace(self, **changes)


def normalize_cidr(value: str) -> str:
    """``value`` as a canonical CIDR (a bare address becomes /32 or /128).

    :raises ConfigError: when it is not an address or network.
    """
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as e:
        raise ConfigError(
            f"--allow-cidr {value!r} is not an IP network; write e.g. 203.0.113.7/32"
        ) from e
    return str(net)


def parse_host_keys(text: str) -> list[str]:
    """The SSH host public keys a boot console printed (cloud-init's key block).

    Returns OpenSSH lines ``"TYPE BASE64"``; an empty list when the block is not there (yet).
    """
    keys: list[str] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if "BEGIN SSH HOST KEY KEYS" in line:
            inside = True
            keys = []
            continue
        if "END SSH HOST KEY KEYS" in line:
            inside = False
            continue
        if not inside:
            continue
        # cloud-init may prefix console lines ("ec2: ssh-ed25519 AAAA... root@host")
        match = re.search(r"((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+)\s+([A-Za-z0-9+/]+={0,3})", line)
        if match:
            keys.append(f"{match.group(1)} {match.group(2)}")
    return keys


class Provider(abc.ABC):
    """One cloud: launch an instance, open its ports, find its host key, delete resources.

    Methods that create resources call ``record(resource)`` right after each creation so the
    caller can roll back. Deletions are idempotent: deleting what is already gone is fine.
    """

    #: ``"ec2"`` or ``"gcloud"``
    cloud: str = ""
    #: the default login user of the images this provider picks
    default_ssh_user: str = "ubuntu"

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The region (EC2) or zone (GCE) this provider works in."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str | None]:
        """What :func:`~studioserve.cloud.instances.list_instances` needs to rebuild this provider:
        ``region``, ``zone``, ``project``."""

    def preflight(self) -> None:
        """Check the choices before anything is created (read-only API calls at most).

        :raises ConfigError: a combination the cloud does not sell or accept, with the fix.
        :raises CloudError: the cloud refused a read-only lookup (credentials, region).
        """
        return None

    @abc.abstractmethod
    def plan(self, spec: LaunchSpec) -> Plan:
        """What :meth:`launch` and :meth:`open_ports` would create for ``spec`` (``--dry-run``);
        read-only API calls at most (the image lookup)."""

    @abc.abstractmethod
    def gpu(self) -> str | None:
        """The GPUs of the chosen instance type as ``"COUNTx MODEL"`` (``"1x NVIDIA L4"``),
        None for a CPU-only type. Derived from the type, not from ``--gpus``."""

    @abc.abstractmethod
    def launch(self, spec: LaunchSpec, record: Callable[[Resource], None]) -> InstanceInfo:
        """Create the instance (and whatever must exist before it); wait until it runs.

        The boot script (:func:`~studioserve.cloud.scripts.boot_script`) gets ``spec.lease``,
        and any cloud-side run limit (GCE maxRunDuration) starts at ``spec.lease`` too.
        """

    def remote_preflight(self) -> str:
        """A shell script run on the instance over SSH before the upload; a non-zero exit
        fails the launch with its output (GCE: the instance may delete itself). "" for none."""
        return ""

    def extend_lifetime(self, instance: InstanceInfo, spec: LaunchSpec) -> str | None:
        """Once the server is ready: move any cloud-side run limit from ``spec.lease`` to
        ``spec.max_lifetime`` (the boot timer is moved over SSH by the caller). Returns a
        summary line, or None when the cloud has no such limit."""
        return None

    @abc.abstractmethod
    def open_ports(
        self, spec: LaunchSpec, instance: InstanceInfo, record: Callable[[Resource], None]
    ) -> None:
        """Allow TCP 22 and ``spec.ports`` from ``spec.allow_cidr`` only."""

    @abc.abstractmethod
    def host_keys(self, instance: InstanceInfo, timeout: float) -> list[str]:
        """The instance's SSH host public keys, as it reported them (console / guest
        attributes), waiting up to ``timeout`` seconds.

        :raises CloudError: when none appeared in time.
        """

    def after_connect(self, spec: LaunchSpec, forget: Callable[[Resource], None]) -> list[str]:
        """Delete what is only needed until the first SSH login; returns summary lines."""
        return []

    @abc.abstractmethod
    def find(self, deployment_id: str) -> list[Resource]:
        """Every live resource tagged with ``deployment_id``."""

    @abc.abstractmethod
    def delete(self, resource: Resource, *, wait: bool = True) -> str:
        """Delete ``resource``; returns a summary line.

        :param wait: wait until it is gone (and retry while a dependency still holds it).
            ``False`` only issues the call (an abandoned rollback): the resource may remain,
            and the caller records it as left.
        """

    @abc.abstractmethod
    def instance_state(self, instance_id: str) -> str:
        """``"pending"``, ``"running"``, ``"stopping"``, ``"stopped"`` or ``"gone"``."""
