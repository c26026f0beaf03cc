"""Google Compute Engine: the only module that imports google-cloud-compute.

What one deployment creates (names ``studioserve-<hex>``, label ``studioserve=<id>``):

* the instance, with the network tag ``studioserve-<hex>``, the deployment's *public* SSH key
  in its ``ssh-keys`` metadata, a boot disk that is deleted with it (``autoDelete``), a
  scheduling rule that deletes it after ``--max-lifetime`` (``maxRunDuration`` with
  ``instanceTerminationAction=DELETE``), and a startup script (no secrets) whose end command
  deletes the instance and its firewall rule through the API with the instance's own service
  account (a token from the metadata server, never a user credential);
* a firewall rule ``studioserve-<hex>`` on the instance's network, allowing TCP 22 and the
  serving port from ``--allow-cidr`` only, to instances with that network tag only.

API calls go through the REST transport; long-running operations are awaited with explicit
``ZoneOperationsClient.wait`` / ``GlobalOperationsClient.wait`` calls (``operation.result()``
polls through a client that ignores a custom API endpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import google.api_core.exceptions as gexc
import google.auth
import google.auth.credentials
import google.auth.exceptions
from google.api_core.client_options import ClientOptions
from google.cloud import compute_v1

from ..errors import CloudError, ConfigError
from .base import (
    TAG_KEY,
    CloudOptions,
    InstanceInfo,
    LaunchSpec,
    Provider,
    Resource,
    boot_script,
    parse_host_keys,
)

logger = logging.getLogger(__name__)

DEFAULT_ZONE = "us-central1-a"
GPU_IMAGE = (
    "projects/deeplearning-platform-release/global/images/family/"
    "common-cu129-ubuntu-2404-nvidia-580"
)
CPU_IMAGE = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"
CPU_MACHINE_TYPE = "n2-standard-4"
DEFAULT_ACCELERATOR = "nvidia-l4"
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"

#: accelerator-optimized families: the GPUs come with the machine type
BUILT_IN_GPUS: dict[str, dict[int, str]] = {
    "nvidia-l4": {
        1: "g2-standard-4",
        2: "g2-standard-24",
        4: "g2-standard-48",
        8: "g2-standard-96",
    },
    "nvidia-tesla-a100": {
        1: "a2-highgpu-1g",
        2: "a2-highgpu-2g",
        4: "a2-highgpu-4g",
        8: "a2-highgpu-8g",
        16: "a2-megagpu-16g",
    },
    "nvidia-a100-80gb": {
        1: "a2-ultragpu-1g",
        2: "a2-ultragpu-2g",
        4: "a2-ultragpu-4g",
        8: "a2-ultragpu-8g",
    },
    "nvidia-h100-80gb": {
        1: "a3-highgpu-1g",
        2: "a3-highgpu-2g",
        4: "a3-highgpu-4g",
        8: "a3-highgpu-8g",
    },
}
#: GPUs attached to an N1 machine: {GPUs: machine type}
N1_ATTACHED: dict[int, str] = {
    1: "n1-standard-8",
    2: "n1-standard-16",
    4: "n1-standard-32",
    8: "n1-standard-64",
}
N1_ACCELERATORS = ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p4", "nvidia-tesla-p100")
_BUILT_IN_PREFIXES = ("g2-", "a2-", "a3-", "a4-", "g4-")

#: the end command: delete the firewall rule and the instance through the API with the
#: instance's own service account, then power off (if the API call failed, the VM at least
#: stops and the max-run-duration rule or ``studio instances list`` deletes it)
END_BODY = r"""python3 - <<'PY' || true
import json, urllib.request
md = "http://metadata.google.internal/computeMetadata/v1/"
def get(path):
    req = urllib.request.Request(md + path, headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(req, timeout=10).read().decode()
token = json.loads(get("instance/service-accounts/default/token"))["access_token"]
auth = {"Authorization": "Bearer " + token}
base = "https://compute.googleapis.com/compute/v1/projects/" + get("project/project-id")
name = get("instance/name")
zone = get("instance/zone").rsplit("/", 1)[-1]
for url in (base + "/global/firewalls/" + name, base + "/zones/" + zone + "/instances/" + name):
    try:
        req = urllib.request.Request(url, method="DELETE", headers=auth)
        urllib.request.urlopen(req, timeout=30).read()
    except Exception as e:
        print("studioserve: DELETE", url, "failed:", e)
PY
sleep 120
shutdown -h now "studioserve: ending"
"""


def choose_machine(
    gpus: int, accelerator: str | None = None, machine_type: str | None = None
) -> tuple[str, str | None, int]:
    """``(machine type, attached accelerator type or None, attached count)`` for ``gpus``.

    G2/A2/A3 machine types include their GPUs; N1 machines get T4/V100/... attached.

    :raises ConfigError: no machine of that kind has that many GPUs.
    """
    acc = accelerator.lower() if accelerator else None
    if machine_type:
        if gpus > 0 and machine_type.startswith("n1-"):
            return machine_type, acc or "nvidia-tesla-t4", gpus
        return machine_type, None, 0
    if gpus == 0:
        return CPU_MACHINE_TYPE, None, 0
    acc = acc or DEFAULT_ACCELERATOR
    if acc in BUILT_IN_GPUS:
        table, attached = BUILT_IN_GPUS[acc], False
    elif acc in N1_ACCELERATORS:
        table, attached = N1_ATTACHED, True
    else:
        raise ConfigError(
            f"unknown GCE accelerator {accelerator!r}; use one of "
            f"{', '.join([*BUILT_IN_GPUS, *N1_ACCELERATORS])} or pass --machine-type"
        )
    for count in sorted(table):
        if count >= gpus:
            if count != gpus:
                logger.info("no %s machine has exactly %d GPUs; using %d", acc, gpus, count)
            return (table[count], acc, count) if attached else (table[count], None, 0)
    raise ConfigError(f"no {acc} machine has {gpus} GPUs (at most {max(table)}); use fewer --gpus")


def _hint(text: str) -> str:
    upper = text.upper()
    if "QUOTA" in upper:
        return (
            "; the project's quota is exhausted: request more (IAM & Admin > Quotas), "
            "or try another --zone"
        )
    if "RESOURCE_POOL_EXHAUSTED" in upper or "DOES NOT HAVE ENOUGH RESOURCES" in upper:
        return "; the zone has no capacity for this machine now: try another --zone"
    return ""


def _cloud_error(action: str, e: Exception) -> CloudError:
    text = str(e)
    hint = _hint(text)
    if isinstance(e, google.auth.exceptions.DefaultCredentialsError):
        hint = "; run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
    elif not hint and isinstance(e, gexc.Forbidden):
        hint = (
            "; check that the Compute Engine API is enabled and your account may create instances"
        )
    return CloudError(f"GCE {action} failed: {text}{hint}")


def _status(op: Any) -> str:
    status = op.status
    return str(getattr(status, "name", status))


class GceProvider(Provider):
    """Compute Engine in one project and zone."""

    cloud = "gcloud"
    default_ssh_user = "studioserve"

    def __init__(self, options: CloudOptions, *, poll_interval: float = 5.0) -> None:
        self._options = options
        self._poll = poll_interval
        credentials: google.auth.credentials.Credentials | None
        project = options.project
        if options.anonymous:
            credentials = google.auth.credentials.AnonymousCredentials()  # type: ignore[no-untyped-call]
        else:
            try:
                credentials, default_project = google.auth.default(  # type: ignore[no-untyped-call]
                    scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
            except google.auth.exceptions.DefaultCredentialsError as e:
                raise _cloud_error("authentication", e) from e
            project = project or default_project
        if not project:
            raise ConfigError(
                "no GCE project: pass --project or set one with `gcloud config set project`"
            )
        self.project: str = project
        self.zone: str = options.zone or DEFAULT_ZONE
        kwargs: dict[str, Any] = {"credentials": credentials, "transport": "rest"}
        if options.endpoint_url:
            kwargs["client_options"] = ClientOptions(api_endpoint=options.endpoint_url)
        self.instances = compute_v1.InstancesClient(**kwargs)
        self.firewalls = compute_v1.FirewallsClient(**kwargs)
        self.zone_ops = compute_v1.ZoneOperationsClient(**kwargs)
        self.global_ops = compute_v1.GlobalOperationsClient(**kwargs)

    @property
    def location(self) -> str:
        return self.zone

    def describe(self) -> dict[str, str | None]:
        return {"region": self.zone.rsplit("-", 1)[0], "zone": self.zone, "project": self.project}

    @staticmethod
    def resource_name(deployment_id: str) -> str:
        """Instance, firewall rule and network tag name for a deployment."""
        return "studioserve-" + deployment_id.removeprefix("ss-")

    # -- operations -------------------------------------------------------------------------

    def _wait(self, operation: Any, *, zonal: bool, timeout: float = 900.0) -> None:
        name = operation.name
        deadline = time.monotonic() + timeout
        while True:
            if zonal:
                op = self.zone_ops.wait(project=self.project, zone=self.zone, operation=name)
            else:
                op = self.global_ops.wait(project=self.project, operation=name)
            if _status(op) == "DONE":
                if op.error and op.error.errors:
                    messages = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
                    raise CloudError(f"operation {name} failed: {messages}{_hint(messages)}")
                return
            if time.monotonic() > deadline:
                raise CloudError(f"operation {name} did not finish within {timeout:g}s")

    # -- launch -----------------------------------------------------------------------------

    def machine(self) -> tuple[str, str | None, int]:
        return choose_machine(
            self._options.gpus, self._options.accelerator, self._options.machine_type
        )

    def image(self) -> str:
        if self._options.image:
            return self._options.image
        return GPU_IMAGE if self._options.gpus > 0 else CPU_IMAGE

    def launch(self, spec: LaunchSpec, record: Callable[[Resource], None]) -> InstanceInfo:
        name = self.resource_name(spec.deployment_id)
        machine_type, accelerator, count = self.machine()
        has_gpu = self._options.gpus > 0 or machine_type.startswith(_BUILT_IN_PREFIXES)
        image = self.image()
        labels = {TAG_KEY: spec.deployment_id}
        script = boot_script(
            deployment_id=spec.deployment_id, expires_at=spec.expires_at, end_body=END_BODY
        )
        metadata = {
            "ssh-keys": f"{spec.ssh_user}:{spec.public_key}",
            "startup-script": script,
            "enable-guest-attributes": "TRUE",
            "enable-oslogin": "FALSE",
            "block-project-ssh-keys": "TRUE",
        }
        if has_gpu:
            metadata["install-nvidia-driver"] = "True"
        lifetime = max(30, int((spec.expires_at - spec.created_at).total_seconds()))
        network = self._options.network
        instance = compute_v1.Instance(
            name=name,
            description=f"studioserve deployment {spec.deployment_id} (deletes itself)",
            machine_type=f"zones/{self.zone}/machineTypes/{machine_type}",
            labels=labels,
            tags=compute_v1.Tags(items=[name]),
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=image, disk_size_gb=self._options.disk_gb, labels=labels
                    ),
                )
            ],
            network_interfaces=[
                compute_v1.NetworkInterface(
                    network=network if "/" in network else f"global/networks/{network}",
                    access_configs=[
                        compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
                    ],
                )
            ],
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key=k, value=v) for k, v in metadata.items()]
            ),
            scheduling=compute_v1.Scheduling(
                on_host_maintenance="TERMINATE" if has_gpu else "MIGRATE",
                automatic_restart=False,
                provisioning_model="STANDARD",
                instance_termination_action="DELETE",
                max_run_duration=compute_v1.Duration(seconds=lifetime),
            ),
        )
        if accelerator:
            instance.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_count=count,
                    accelerator_type=f"projects/{self.project}/zones/{self.zone}/acceleratorTypes/{accelerator}",
                )
            ]
        if self._options.service_account != "none":
            instance.service_accounts = [
                compute_v1.ServiceAccount(
                    email=self._options.service_account, scopes=[COMPUTE_SCOPE]
                )
            ]
        try:
            op = self.instances.insert(
                project=self.project, zone=self.zone, instance_resource=instance
            )
            record(Resource("instance", name, self.zone))
            logger.info("launching GCE %s %s (%s) in %s", machine_type, name, image, self.zone)
            self._wait(op, zonal=True)
            got = self._wait_running(name)
        except gexc.GoogleAPICallError as e:
            raise _cloud_error("launch", e) from e
        nic = got.network_interfaces[0] if got.network_interfaces else None
        public = None
        if nic is not None and nic.access_configs:
            public = nic.access_configs[0].nat_i_p or None
        return InstanceInfo(
            instance_id=name,
            name=name,
            public_ip=public,
            private_ip=(nic.network_i_p or None) if nic is not None else None,
            location=self.zone,
            instance_type=machine_type + (f" + {count}x {accelerator}" if accelerator else ""),
            image=image,
        )

    def _wait_running(self, name: str, timeout: float = 900.0) -> compute_v1.Instance:
        deadline = time.monotonic() + timeout
        while True:
            got = self.instances.get(project=self.project, zone=self.zone, instance=name)
            status = _status(got)
            if status == "RUNNING":
                return got
            if status in {"STOPPING", "STOPPED", "TERMINATED", "SUSPENDED"}:
                raise CloudError(
                    f"GCE instance {name} is {status} instead of running: {got.status_message}"
                )
            if time.monotonic() > deadline:
                raise CloudError(f"GCE instance {name} did not start within {timeout:g}s")
            time.sleep(self._poll)

    def open_ports(
        self, spec: LaunchSpec, instance: InstanceInfo, record: Callable[[Resource], None]
    ) -> None:
        name = self.resource_name(spec.deployment_id)
        network = self._options.network
        rule = compute_v1.Firewall(
            name=name,
            description=f"studioserve deployment {spec.deployment_id}: SSH and port {spec.port}",
            network=network if "/" in network else f"global/networks/{network}",
            direction="INGRESS",
            priority=1000,
            source_ranges=[spec.allow_cidr],
            target_tags=[name],
            allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22", str(spec.port)])],
        )
        try:
            op = self.firewalls.insert(project=self.project, firewall_resource=rule)
            record(Resource("firewall", name, ""))
            self._wait(op, zonal=False)
        except gexc.GoogleAPICallError as e:
            raise _cloud_error("creating the firewall rule", e) from e
        logger.info("firewall rule %s: TCP 22 and %d from %s", name, spec.port, spec.allow_cidr)

    def host_keys(self, instance: InstanceInfo, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            keys: list[str] = []
            try:
                attrs = self.instances.get_guest_attributes(
                    request=compute_v1.GetGuestAttributesInstanceRequest(
                        project=self.project,
                        zone=self.zone,
                        instance=instance.instance_id,
                        query_path="hostkeys/",
                    )
                )
                for item in attrs.query_value.items:
                    value = item.value.strip()
                    keys.append(value if value.startswith(item.key) else f"{item.key} {value}")
            except gexc.NotFound:
                pass  # the guest agent has not written them yet
            except gexc.GoogleAPICallError as e:
                raise _cloud_error("reading the instance's host keys", e) from e
            if not keys:
                try:
                    serial = self.instances.get_serial_port_output(
                        project=self.project, zone=self.zone, instance=instance.instance_id
                    )
                    keys = parse_host_keys(serial.contents)
                except gexc.NotFound:
                    pass
                except gexc.GoogleAPICallError as e:
                    raise _cloud_error("reading the serial console", e) from e
            if keys:
                return keys
            if time.monotonic() + self._poll > deadline:
                raise CloudError(
                    f"instance {instance.instance_id} did not publish its SSH host keys (guest "
                    f"attributes or serial console) within {timeout:g}s, so its identity cannot "
                    "be verified; it is being removed"
                )
            time.sleep(self._poll)

    # -- inventory and teardown -------------------------------------------------------------

    def find(self, deployment_id: str) -> list[Resource]:
        name = self.resource_name(deployment_id)
        found: list[Resource] = []
        try:
            try:
                got = self.instances.get(project=self.project, zone=self.zone, instance=name)
                if got.labels.get(TAG_KEY) == deployment_id:
                    found.append(Resource("instance", name, self.zone))
            except gexc.NotFound:
                pass
            try:
                self.firewalls.get(project=self.project, firewall=name)
                found.append(Resource("firewall", name, ""))
            except gexc.NotFound:
                pass
        except gexc.GoogleAPICallError as e:
            raise _cloud_error("listing resources", e) from e
        return found

    def delete(self, resource: Resource) -> str:
        try:
            if resource.kind == "instance":
                op = self.instances.delete(
                    project=self.project, zone=self.zone, instance=resource.id
                )
                self._wait(op, zonal=True)
                return f"deleted GCE instance {resource.id} in {self.zone} (and its boot disk)"
            if resource.kind == "firewall":
                op = self.firewalls.delete(project=self.project, firewall=resource.id)
                self._wait(op, zonal=False)
                return f"deleted firewall rule {resource.id} in project {self.project}"
        except gexc.NotFound:
            return f"{resource.describe()} was already gone"
        except gexc.GoogleAPICallError as e:
            raise _cloud_error(f"deleting {resource.describe()}", e) from e
        raise ValueError(f"GCE cannot delete a {resource.kind}")

    def instance_state(self, instance_id: str) -> str:
        try:
            got = self.instances.get(project=self.project, zone=self.zone, instance=instance_id)
        except gexc.NotFound:
            return "gone"
        except gexc.GoogleAPICallError as e:
            raise _cloud_error("describing the instance", e) from e
        return {
            "PROVISIONING": "pending",
            "STAGING": "pending",
            "RUNNING": "running",
            "STOPPING": "stopping",
            "SUSPENDING": "stopping",
            "REPAIRING": "running",
            "STOPPED": "stopped",
            "SUSPENDED": "stopped",
            "TERMINATED": "stopped",
        }.get(_status(got), "running")
