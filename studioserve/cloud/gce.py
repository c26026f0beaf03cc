"""Google Compute Engine: the only module that imports google-cloud-compute and google-auth.

What one deployment creates (names ``studioserve-<hex>``, label ``studioserve=<id>``):

* the instance, with the network tag ``studioserve-<hex>``, the deployment's *public* SSH key
  in its ``ssh-keys`` metadata, a boot disk of ``max(--disk-gb, the image's own size)`` GB
  (``pd-balanced``; ``hyperdisk-balanced`` on series without Persistent Disk) that is deleted
  with it (``autoDelete``), a scheduling rule that deletes it after its run limit
  (``maxRunDuration`` with ``instanceTerminationAction=DELETE``: the launch lease at first,
  ``--max-lifetime`` once the server is ready), and a startup script (no secrets) whose end
  command deletes the instance and its firewall rule through the API with the instance's own
  service account (a token from the metadata server, never a user credential);
* a firewall rule ``studioserve-<hex>`` on the instance's network, allowing TCP 22 and the
  serving port from ``--allow-cidr`` only, to instances with that network tag only;
* with ``--service-account create``, once per project and kept: the account
  ``studioserve-self-delete@PROJECT.iam.gserviceaccount.com``, a custom role and a conditional
  grant (:mod:`.gce_iam`).

The service account (``--service-account``) and its trade-off: the instance needs an account
to delete itself, and any code the model runs can use that account's token too.

* ``default``: the project's default compute account with the compute scope. Nothing to set
  up, but in most projects that account is an Editor, so the model's code can create, change
  and delete any Compute Engine resource in the project. Some organisations strip it of
  ``compute.instances.delete``: the check before the upload then fails the launch.
* ``create``: a dedicated account whose only rights are deleting ``studioserve-*``
  instances, disks and firewall rules (an IAM condition on the names). The model's code can
  at most end studioserve deployments. Creating it needs IAM admin rights once per project.
* an email: that account (it needs ``compute.instances.delete`` on the instance, and
  ``compute.firewalls.delete``; you need ``iam.serviceAccounts.actAs`` on it).
* ``none``: no account, no token on the instance; it cannot delete itself (see below).

How an instance ends: (1) when the server exits, the end command DELETEs the firewall rule and
the instance (retrying network errors, 429 and 5xx with backoff; a 403 is logged with the role
to grant), then powers off; (2) the boot timer runs that end command after the launch lease,
then after ``--max-lifetime``; (3) Compute Engine's maxRunDuration DELETEs the instance while
it *runs*, even when the instance cannot reach the API; (4) ``studio instances list`` and
``studio instances stop`` delete what is left. A VM that powered off because its own
deletion failed is *stopped*, and a stopped VM's termination time is cleared, so (3) never
deletes it: only (4) does, and its disk is billed until then. Hence the check over SSH before
the upload (:meth:`GceProvider.remote_preflight`: ``instances.testIamPermissions`` with the
instance's token).

Provisioning models (``--provisioning-model``): ``standard`` (on demand), ``spot``
(``provisioningModel=SPOT``, ``instanceTerminationAction=DELETE``: a preemption deletes it)
and ``flex-start`` (``provisioningModel=FLEX_START``, ``instanceTerminationAction=DELETE``,
a maxRunDuration of at most 7 days, no automatic restart, ``onHostMaintenance=TERMINATE``,
and ``reservationAffinity NO_RESERVATION``, as the flex-start VM docs ask). The A3 High shapes
with 1, 2 or 4 H100s are assumed to be sold only as Spot or Flex-start; a3-highgpu-8g is sold
on demand (:data:`.gce_catalog.NOT_ON_DEMAND`; what is sold how, and the machine tables, are in
:mod:`.gce_catalog`).

Moving the run limit on a running VM: the API reference says ``instances.setScheduling`` "can
only be called on a stopped instance", so :meth:`GceProvider.extend_lifetime` uses
``instances.update`` (PUT of the instance as just read, with its fingerprint and the new
``scheduling.maxRunDuration``) with ``mostDisruptiveAllowedAction=REFRESH``: the assumption
is that Compute Engine applies a new run duration to a running VM without restarting it (the
"limit VM runtime" page says the run time of existing VMs can be changed); should it need a
restart, the call fails instead of restarting the server, and the instance still ends at
the end of the launch lease. The duration counts from the VM's start, as the boot timer does.

API calls go through the REST transport; long-running operations are awaited with explicit
``ZoneOperationsClient.wait`` / ``GlobalOperationsClient.wait`` calls (``operation.result()``
polls through a client that ignores a custom API endpoint), looping while they are PENDING or
RUNNING (``wait`` returns after at most two minutes even when not done).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import google.api_core.exceptions as gexc
import google.auth
import google.auth.credentials
import google.auth.exceptions
from google.api_core.client_options import ClientOptions
from google.auth.transport.requests import AuthorizedSession
from google.cloud import compute_v1

from ..errors import CloudError, ConfigError
from .base import (
    TAG_KEY,
    CloudOptions,
    InstanceInfo,
    LaunchSpec,
    Overrides,
    Plan,
    Provider,
    Resource,
    parse_host_keys,
)
from .gce_catalog import (
    API_PROVISIONING,
    CPU_IMAGE,
    CREDENTIALS_HINT,
    DEFAULT_ZONE,
    FORBIDDEN_HINT,
    GPU_IMAGE,
    INSTANCE_STATES,
    PROVISIONING_NOTES,
    ImageDetails,
    check_run_duration,
    check_sold,
    choose_machine,
    disk_type_for,
    error_hint,
    format_duration,
    gpu_description,
    host_maintenance,
    parse_image,
    price_note,
    price_per_hour,
)
from .gce_iam import CRM_URL, IAM_URL, IamClient, account_email
from .gce_scripts import (
    DEFAULT_API_URL,
    DEFAULT_METADATA_URL,
    end_body,
    no_account_note,
    note_script,
    preflight_script,
)
from .scripts import boot_script

logger = logging.getLogger(__name__)

#: the OAuth scope the instance's service account gets
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
#: how long the instance's check waits for a grant made moments ago to take effect
#: (IAM changes usually take effect within minutes); stays under the check's SSH timeout
FRESH_GRANT_WAIT = 240.0
#: the end command's body with the real metadata server and API (what a launch installs
#: unless ``Overrides`` point elsewhere; :func:`~studioserve.cloud.gce_scripts.end_body`)
END_BODY = end_body()
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")


def _cloud_error(action: str, e: Exception) -> CloudError:
    text = str(e)
    hint = error_hint(text)
    if isinstance(e, google.auth.exceptions.DefaultCredentialsError):
        hint = CREDENTIALS_HINT
    elif not hint and isinstance(e, gexc.Forbidden):
        hint = FORBIDDEN_HINT
    return CloudError(f"GCE {action} failed: {text}{hint}")


def _status(op: Any) -> str:
    status = op.status
    return str(getattr(status, "name", status))


class GceProvider(Provider):
    """Compute Engine in one project and zone.

    :param overrides: ``endpoint_url`` and ``anonymous`` point the API clients (and the
        instance's own scripts) elsewhere; ``metadata_url`` the instance's scripts' metadata
        server; ``poll_interval`` the seconds between polls; ``remote_python`` the Python the
        check on the instance runs with.
    """

    cloud = "gcloud"
    default_ssh_user = "studioserve"

    def __init__(self, options: CloudOptions, overrides: Overrides | None = None) -> None:
        self._options = options
        self._overrides = overrides or Overrides()
        self._poll = self._overrides.poll_interval
        credentials: google.auth.credentials.Credentials | None
        project = options.project
        if self._overrides.anonymous:
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
        self._credentials = credentials
        endpoint = self._overrides.endpoint_url
        kwargs: dict[str, Any] = {"credentials": credentials, "transport": "rest"}
        if endpoint:
            kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
        self.instances = compute_v1.InstancesClient(**kwargs)
        self.firewalls = compute_v1.FirewallsClient(**kwargs)
        self.images = compute_v1.ImagesClient(**kwargs)
        self.zone_ops = compute_v1.ZoneOperationsClient(**kwargs)
        self.global_ops = compute_v1.GlobalOperationsClient(**kwargs)
        self._iam_url = endpoint or IAM_URL
        self._crm_url = endpoint or CRM_URL
        #: what the instance's scripts call (the same API, seen from the instance)
        self._api_url = endpoint or DEFAULT_API_URL
        self._metadata_url = self._overrides.metadata_url or DEFAULT_METADATA_URL
        self._image: ImageDetails | None = None
        self._checked = False
        #: the dedicated account's grant was made by this launch (it may still propagate)
        self._fresh_grant = False

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
        """Wait until ``operation`` is DONE (``wait`` may answer PENDING or RUNNING first).

        :raises CloudError: it finished with an error, or not within ``timeout`` seconds.
        """
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
                    hint = error_hint(messages)
                    raise CloudError(f"operation {name} failed: {messages}{hint}")
                return
            if time.monotonic() > deadline:
                raise CloudError(f"operation {name} did not finish within {timeout:g}s")
            time.sleep(min(self._poll, 1.0))

    # -- choices ----------------------------------------------------------------------------

    def machine(self) -> tuple[str, str | None, int]:
        """``(machine type, attached accelerator or None, attached count)``."""
        return choose_machine(
            self._options.gpus, self._options.accelerator, self._options.machine_type
        )

    def provisioning(self) -> str:
        """``standard``, ``spot`` or ``flex-start``."""
        return self._options.provisioning_model or "standard"

    def gpu(self) -> str | None:
        machine_type, accelerator, count = self.machine()
        return gpu_description(machine_type, accelerator, count)

    def image(self) -> str:
        """The image (or image family) URL the instance boots."""
        if self._options.image:
            return self._options.image
        return GPU_IMAGE if self.gpu() is not None else CPU_IMAGE

    def image_details(self) -> ImageDetails:
        """The image's name and size, looked up once (``images.get`` /
        ``images.getFromFamily``).

        :raises ConfigError: there is no such image.
        """
        if self._image is not None:
            return self._image
        ref = self.image()
        project, family, name = parse_image(ref, self.project)
        try:
            if family:
                got = self.images.get_from_family(project=project, family=family)
            else:
                got = self.images.get(project=project, image=name)
        except gexc.NotFound as e:
            raise ConfigError(
                f"GCE image {ref} not found ({e.message}); check --image (a family is "
                "projects/PROJECT/global/images/family/FAMILY)"
            ) from e
        except gexc.GoogleAPICallError as e:
            raise _cloud_error(f"looking up the image {ref}", e) from e
        self._image = ImageDetails(ref=ref, name=got.name, disk_size_gb=int(got.disk_size_gb))
        return self._image

    def disk_gb(self) -> int:
        """The boot disk's size: ``--disk-gb``, or the image's own size when it is larger."""
        size = self.image_details().disk_size_gb
        if size > self._options.disk_gb:
            logger.info(
                "the image %s needs a %d GB disk; using that instead of %d GB",
                self.image_details().name,
                size,
                self._options.disk_gb,
            )
        return max(self._options.disk_gb, size)

    def _account_choice(self) -> str:
        account = self._options.service_account
        if account in ("default", "create", "none") or _EMAIL.fullmatch(account):
            return account
        raise ConfigError(
            f"--service-account {account!r}: use default, create, none or an account's email"
        )

    def preflight(self) -> None:
        """Refuse what GCE would not sell or accept, before anything is created: the machine
        and the provisioning model, the run limits (30 s to 120 days; flex-start 7 days), the
        service account choice, and the image (read-only lookup).

        :raises ConfigError: with the fix.
        """
        machine_type, _, _ = self.machine()
        provisioning = self.provisioning()
        check_sold(machine_type, provisioning)
        check_run_duration(self._options.lease, "the launch lease", provisioning)
        check_run_duration(self._options.max_lifetime, "--max-lifetime", provisioning)
        if self._account_choice() == "none":
            logger.warning("%s", no_account_note())
        self.image_details()
        self._checked = True

    def plan(self, spec: LaunchSpec) -> Plan:
        if not self._checked:
            self.preflight()
        name = self.resource_name(spec.deployment_id)
        machine_type, accelerator, count = self.machine()
        provisioning = self.provisioning()
        lease = check_run_duration(spec.lease, "the launch lease", provisioning)
        lifetime = check_run_duration(spec.max_lifetime, "--max-lifetime", provisioning)
        image = self.image_details()
        gpu = self.gpu()
        attached = f" + {count}x {accelerator}" if accelerator else ""
        account = self._account_choice()
        email = {
            "default": "the project's default compute account",
            "create": account_email(self.project),
            "none": "no service account",
        }.get(account, account)
        scheduling = (
            f"provisioning {API_PROVISIONING[provisioning]}, maxRunDuration {lease}s "
            f"(then {lifetime}s once ready) then DELETE, onHostMaintenance "
            f"{host_maintenance(bool(gpu), provisioning)}"
        )
        creates = [
            f"instance {name} in {self.zone}: {machine_type}{attached}, {self.disk_gb()} GB "
            f"{disk_type_for(machine_type)} boot disk (deleted with it), {scheduling}; "
            f"service account: {email}" + (" (compute scope)" if account != "none" else ""),
            f"firewall rule {name} on network {self._options.network}: INGRESS TCP 22 and "
            f"{spec.ports_text} from {spec.allow_cidr} only, to instances tagged {name}",
        ]
        notes: list[str] = []
        if account == "create":
            exists = self._iam().exists()
            if exists is not True:
                creates.append(
                    f"once per project (kept for later deployments): service account "
                    f"{account_email(self.project)}, custom role "
                    f"projects/{self.project}/roles/studioserveSelfDelete (delete instances, "
                    "disks and firewall rules), granted on the project for studioserve-* "
                    "resources only"
                    + (" (could not tell whether they exist)" if exists is None else "")
                )
        elif account == "default":
            notes.append(
                "the default compute account is an Editor in most projects: the model's code "
                "can use its token; --service-account create limits it to self-deletion"
            )
        backstops = [
            "when the server exits: the instance DELETEs its firewall rule and itself through "
            "the API (retried), else powers off",
            f"boot timer: ends the instance {format_duration(lease)} after its first boot, "
            f"{format_duration(lifetime)} once the server is ready (--max-lifetime)",
            f"GCE maxRunDuration: Compute Engine DELETEs the running instance after "
            f"{format_duration(lease)}, then {format_duration(lifetime)} (even if it cannot "
            "reach the API; not once it is stopped)",
            "`studio instances list` / `studio instances stop` delete what is left (a stopped "
            "instance, its disk, the firewall rule)",
        ]
        if account == "none":
            notes.append(no_account_note().removeprefix("studioserve: "))
        if provisioning in PROVISIONING_NOTES:
            notes.append(PROVISIONING_NOTES[provisioning])
        price = price_per_hour(machine_type, accelerator, count, provisioning)
        notes.append(price_note(self.disk_gb() if price is not None else None))
        return Plan(
            cloud=self.cloud,
            location=self.zone,
            instance_type=machine_type + attached,
            gpu=gpu,
            image=f"{image.ref} ({image.name}, {image.disk_size_gb} GB)",
            price_per_hour=price,
            creates=tuple(creates),
            backstops=tuple(backstops),
            notes=tuple(notes),
        )

    # -- service account --------------------------------------------------------------------

    def _iam(self) -> IamClient:
        session = AuthorizedSession(self._credentials)  # type: ignore[no-untyped-call]
        return IamClient(
            session, self.project, iam_url=self._iam_url, crm_url=self._crm_url, backoff=self._poll
        )

    def _service_account(self) -> tuple[str | None, bool]:
        """``(email or None, created just now)``; ``create`` makes what is missing."""
        account = self._account_choice()
        if account == "none":
            return None, False
        if account != "create":
            return account, False
        made = self._iam().ensure()
        self._fresh_grant = bool(made.created)
        return made.email, "service account" in made.created

    # -- launch -----------------------------------------------------------------------------

    def _scheduling(self, seconds: int, gpu: bool) -> compute_v1.Scheduling:
        provisioning = self.provisioning()
        return compute_v1.Scheduling(
            on_host_maintenance=host_maintenance(gpu, provisioning),
            automatic_restart=False,
            provisioning_model=API_PROVISIONING[provisioning],
            instance_termination_action="DELETE",
            max_run_duration=compute_v1.Duration(seconds=seconds),
        )

    def launch(self, spec: LaunchSpec, record: Callable[[Resource], None]) -> InstanceInfo:
        name = self.resource_name(spec.deployment_id)
        machine_type, accelerator, count = self.machine()
        provisioning = self.provisioning()
        check_sold(machine_type, provisioning)
        lease = check_run_duration(spec.lease, "the launch lease", provisioning)
        has_gpu = self.gpu() is not None
        image = self.image_details()
        disk_gb = self.disk_gb()
        labels = {TAG_KEY: spec.deployment_id}
        script = boot_script(
            deployment_id=spec.deployment_id,
            lease=spec.lease,
            end_body=end_body(metadata_url=self._metadata_url, api_url=self._api_url),
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
                        source_image=image.ref,
                        disk_size_gb=disk_gb,
                        disk_type=f"zones/{self.zone}/diskTypes/{disk_type_for(machine_type)}",
                        labels=labels,
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
            scheduling=self._scheduling(lease, has_gpu),
        )
        if provisioning == "flex-start":
            instance.reservation_affinity = compute_v1.ReservationAffinity(
                consume_reservation_type="NO_RESERVATION"
            )
        if accelerator:
            instance.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_count=count,
                    accelerator_type=f"projects/{self.project}/zones/{self.zone}/acceleratorTypes/{accelerator}",
                )
            ]
        email, new_account = self._service_account()
        if email is not None:
            instance.service_accounts = [
                compute_v1.ServiceAccount(email=email, scopes=[COMPUTE_SCOPE])
            ]
        try:
            op = self._insert(instance, email if new_account else None)
            record(Resource("instance", name, self.zone))
            logger.info(
                "launching GCE %s %s (%s, %s) in %s",
                machine_type,
                name,
                image.name,
                API_PROVISIONING[provisioning],
                self.zone,
            )
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
            image=image.ref,
        )

    def _insert(self, instance: compute_v1.Instance, new_account: str | None) -> Any:
        """``instances.insert``; with an account created moments ago, retried while the API
        does not know it yet (400/404 naming it)."""
        attempts = 6 if new_account else 1
        for attempt in range(attempts):
            try:
                return self.instances.insert(
                    project=self.project, zone=self.zone, instance_resource=instance
                )
            except (gexc.BadRequest, gexc.NotFound) as e:
                if new_account is None or new_account not in str(e) or attempt + 1 == attempts:
                    raise
                delay = self._poll * 2**attempt
                logger.info("the new service account is not visible yet; retrying in %gs", delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

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

    def remote_preflight(self) -> str:
        """The check over SSH: may the instance's account delete the instance (and its
        firewall rule)? See :func:`~studioserve.cloud.gce_scripts.preflight_script`. With
        ``--service-account none`` it only says how the instance still ends."""
        if self._account_choice() == "none":
            return note_script(no_account_note())
        return preflight_script(
            metadata_url=self._metadata_url,
            api_url=self._api_url,
            wait=FRESH_GRANT_WAIT if self._fresh_grant else 0.0,
            backoff=min(self._poll, 2.0),
            python=self._overrides.remote_python,
        )

    def extend_lifetime(self, instance: InstanceInfo, spec: LaunchSpec) -> str | None:
        """Move maxRunDuration from ``spec.lease`` to ``spec.max_lifetime`` on the running
        instance: ``instances.update`` with ``mostDisruptiveAllowedAction=REFRESH`` (never a
        restart; see the module docstring for why not ``setScheduling``).

        :raises CloudError: the API refused (the instance then ends after the lease).
        """
        seconds = check_run_duration(spec.max_lifetime, "--max-lifetime", self.provisioning())
        name = instance.instance_id
        before = int(spec.lease)
        try:
            got = self.instances.get(project=self.project, zone=self.zone, instance=name)
            before = int(got.scheduling.max_run_duration.seconds) or before
            if before == seconds:
                return None
            got.scheduling.max_run_duration = compute_v1.Duration(seconds=seconds)
            op = self.instances.update(
                request=compute_v1.UpdateInstanceRequest(
                    project=self.project,
                    zone=self.zone,
                    instance=name,
                    instance_resource=got,
                    most_disruptive_allowed_action="REFRESH",
                )
            )
            self._wait(op, zonal=True)
        except gexc.GoogleAPICallError as e:
            raise _cloud_error(
                f"extending the max run duration of {name} to {seconds}s (it still ends "
                f"{before}s after its start)",
                e,
            ) from e
        return (
            f"GCE maxRunDuration of {name}: {format_duration(before)} -> "
            f"{format_duration(seconds)} after its start (then Compute Engine deletes it)"
        )

    def open_ports(
        self, spec: LaunchSpec, instance: InstanceInfo, record: Callable[[Resource], None]
    ) -> None:
        name = self.resource_name(spec.deployment_id)
        network = self._options.network
        rule = compute_v1.Firewall(
            name=name,
            description=(
                f"studioserve deployment {spec.deployment_id}: SSH and port {spec.ports_text}"
            ),
            network=network if "/" in network else f"global/networks/{network}",
            direction="INGRESS",
            priority=1000,
            source_ranges=[spec.allow_cidr],
            target_tags=[name],
            allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22", *map(str, spec.ports)])],
        )
        try:
            op = self.firewalls.insert(project=self.project, firewall_resource=rule)
            record(Resource("firewall", name, ""))
            self._wait(op, zonal=False)
        except gexc.GoogleAPICallError as e:
            raise _cloud_error("creating the firewall rule", e) from e
        logger.info(
            "firewall rule %s: TCP 22 and %s from %s", name, spec.ports_text, spec.allow_cidr
        )

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

    def delete(self, resource: Resource, *, wait: bool = True) -> str:
        """Delete an instance (with its boot disk) or a firewall rule; with ``wait=False``
        only issue the call."""
        try:
            if resource.kind == "instance":
                op = self.instances.delete(
                    project=self.project, zone=self.zone, instance=resource.id
                )
                if not wait:
                    return f"deleting GCE instance {resource.id} in {self.zone} (not waited for)"
                self._wait(op, zonal=True)
                return f"deleted GCE instance {resource.id} in {self.zone} (and its boot disk)"
            if resource.kind == "firewall":
                op = self.firewalls.delete(project=self.project, firewall=resource.id)
                if not wait:
                    return f"deleting firewall rule {resource.id} (not waited for)"
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
        return INSTANCE_STATES.get(_status(got), "running")
