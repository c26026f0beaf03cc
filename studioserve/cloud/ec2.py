"""Amazon EC2: the only module that imports boto3. It makes the calls, retries and waits;
what it knows without asking EC2 (instance types, prices, error codes, hints, request bodies)
is in :mod:`.ec2_catalog`.

What one deployment creates (each tagged ``studioserve=<id>``):

* a key pair ``studioserve-<id>`` holding the deployment's *public* key; deleted as soon as
  the first SSH login works (running instances keep the key; it is no longer needed);
* a security group ``studioserve-<id>`` in the default VPC (or ``--subnet``'s VPC), allowing
  TCP 22 and the serving port from ``--allow-cidr`` only;
* the instance, with ``InstanceInitiatedShutdownBehavior=terminate`` (a shutdown from inside
  deletes it), its root volume (``--disk-gb`` or the image's own size, whichever is larger)
  set to ``DeleteOnTermination``, IMDSv2 required, and user data that only installs the end
  command and the boot timer (:func:`~studioserve.cloud.scripts.boot_script`: the launch
  lease from the first boot, moved to ``--max-lifetime`` once the server is ready; no
  secrets).

Where the instance goes: ``--instance-type`` may list several types (``g6.xlarge,g5.xlarge``),
tried in order. In the default VPC each type is tried in every availability zone that offers
it (its default subnet there) until EC2 has capacity; with ``--subnet`` the zone is fixed.
Each refusal is logged, and when none succeeds the error says per attempt what EC2 answered
and what to do: AWS capacity (InsufficientInstanceCapacity: not your quota), a type not
offered in a zone (Unsupported), or your account's vCPU quota, named as Service Quotas names
it for that type's family.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions

from ..errors import CloudError
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
from .ec2_catalog import (
    CAPACITY_CODES,
    CPU_AMI_PARAMETERS,
    GPU_AMI_PARAMETERS,
    GROUP_BUSY_CODES,
    NOT_FOUND,
    PERMISSION_CODES,
    QUOTA_CODES,
    STATE_NAMES,
    UNKNOWN_IMAGE_CODES,
    UNKNOWN_TYPE_CODES,
    Attempt,
    ami_search,
    check_architecture,
    check_gpus,
    check_known,
    check_offered,
    check_subnet_zone,
    choose_instance_type,
    gpus_of,
    hint,
    ingress_permissions,
    instance_params,
    launch_failed,
    network_params,
    no_default_ami,
    no_default_vpc,
    no_host_keys,
    parse_instance_types,
    plan_of,
    root_volume,
    skipped,
    tags,
    trying,
    unknown_image,
)
from .scripts import boot_script

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import FilterTypeDef
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"


def _error_code(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _error_message(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        return str(e.response.get("Error", {}).get("Message", "")) or str(e)
    return str(e)


def _cloud_error(action: str, e: Exception) -> CloudError:
    code = _error_code(e)
    fix = ""
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        fix = "; configure AWS credentials (aws configure, AWS_PROFILE or AWS_ACCESS_KEY_ID)"
    elif code in PERMISSION_CODES:
        fix = "; the AWS identity in use lacks permission for this (see the README's IAM list)"
    return CloudError(f"EC2 {action} failed: {e}{fix}")


class _Denied(CloudError):
    """A read-only lookup the AWS identity may not make (the preflight skips that check)."""


class Ec2Provider(Provider):
    """EC2 in one region. Construction makes no API call."""

    cloud = "ec2"
    default_ssh_user = "ubuntu"
    #: seconds :meth:`delete` waits for an instance to reach ``terminated``
    terminate_timeout = 900.0
    #: seconds :meth:`delete` retries a security group that is still in use
    group_delete_timeout = 300.0
    #: seconds :meth:`launch` waits for the instance to reach ``running``
    running_timeout = 900.0

    def __init__(self, options: CloudOptions, overrides: Overrides | None = None) -> None:
        overrides = overrides or Overrides()
        session = boto3.session.Session(region_name=options.region)
        region = options.region or session.region_name or DEFAULT_REGION
        self._region = region
        self._options = options
        self._poll = overrides.poll_interval
        kwargs: dict[str, Any] = {"region_name": region}
        if overrides.endpoint_url:
            kwargs["endpoint_url"] = overrides.endpoint_url
        self.ec2: EC2Client = session.client("ec2", **kwargs)
        self.ssm: SSMClient = session.client("ssm", **kwargs)
        self._image: str | None = None
        self._image_info: dict[str, Any] | None = None
        self._type_info: dict[str, dict[str, Any] | None] = {}
        self._zones: dict[str, list[str] | None] = {}
        self._subnet_info: dict[str, Any] | None = None
        self._launched_type: str | None = None
        #: False once GetConsoleOutput refused Latest=true (Xen instances)
        self._console_latest = True

    @property
    def location(self) -> str:
        return self._region

    def describe(self) -> dict[str, str | None]:
        return {"region": self._region, "zone": None, "project": None}

    # -- choices ----------------------------------------------------------------------------

    def instance_types(self) -> list[str]:
        """The types to try, in order: ``--instance-type`` (one or a comma-separated list),
        else the one ``--gpus`` and ``--accelerator`` pick."""
        if self._options.instance_type:
            return parse_instance_types(self._options.instance_type)
        return [choose_instance_type(self._options.gpus, self._options.accelerator)]

    def instance_type(self) -> str:
        """The launched type once :meth:`launch` succeeded, else the first to try."""
        return self._launched_type or self.instance_types()[0]

    def gpu(self) -> str | None:
        """The GPUs of :meth:`instance_type` (``"1x NVIDIA L4"``), None for a CPU type; from
        :data:`.ec2_catalog.KNOWN_GPUS`, else from ``describe_instance_types``."""
        return self._gpu_of(self.instance_type())

    def _gpu_of(self, instance_type: str) -> str | None:
        return gpus_of(instance_type, self._describe_type)

    def _describe_type(self, instance_type: str) -> dict[str, Any] | None:
        """``describe_instance_types`` for one type (cached); None where EC2 does not know it.

        :raises CloudError: the call failed for another reason.
        """
        if instance_type not in self._type_info:
            try:
                found = self.ec2.describe_instance_types(
                    InstanceTypes=[instance_type]  # type: ignore[list-item]
                )["InstanceTypes"]
            except botocore.exceptions.ClientError as e:
                action = f"describing instance type {instance_type}"
                if _error_code(e) in PERMISSION_CODES:
                    raise _Denied(str(_cloud_error(action, e))) from e
                if _error_code(e) not in UNKNOWN_TYPE_CODES:
                    raise _cloud_error(action, e) from e
                found = []
            except botocore.exceptions.BotoCoreError as e:
                raise _cloud_error(f"describing instance type {instance_type}", e) from e
            self._type_info[instance_type] = dict(found[0]) if found else None
        return self._type_info[instance_type]

    def _architectures(self, instance_type: str, default: str) -> list[str]:
        """The CPU architectures ``instance_type`` runs (``[default]`` when not reported)."""
        info = self._describe_type(instance_type) or {}
        found = info.get("ProcessorInfo", {}).get("SupportedArchitectures") or [default]
        return [str(a) for a in found]

    def _zones_offering(self, instance_type: str) -> list[str] | None:
        """The availability zones of the region that offer ``instance_type`` (sorted; cached);
        None when the lookup is not allowed."""
        if instance_type not in self._zones:
            zones: list[str] | None = []
            try:
                pages = self.ec2.get_paginator("describe_instance_type_offerings").paginate(
                    LocationType="availability-zone",
                    Filters=[{"Name": "instance-type", "Values": [instance_type]}],
                )
                zones = sorted(
                    {o["Location"] for page in pages for o in page["InstanceTypeOfferings"]}
                )
            except botocore.exceptions.ClientError as e:
                if _error_code(e) not in PERMISSION_CODES:
                    raise _cloud_error("listing the zones that offer an instance type", e) from e
                logger.warning(
                    "cannot list the zones that offer %s (%s); letting EC2 choose the zone",
                    instance_type,
                    _error_code(e),
                )
                zones = None
            except botocore.exceptions.BotoCoreError as e:
                raise _cloud_error("listing the zones that offer an instance type", e) from e
            self._zones[instance_type] = zones
        return self._zones[instance_type]

    def _wants_gpu_image(self) -> bool:
        """Whether any type to try has a GPU (then the Deep Learning AMI, which also runs on
        CPU types; ``--gpus`` does not decide it)."""
        return any(self._gpu_of(t) is not None for t in self.instance_types())

    def image(self) -> str:
        """The AMI: ``--image`` (an AMI id, or ``ssm:/NAME`` for the one an SSM parameter
        holds), else the newest Ubuntu 24.04 Deep Learning Base GPU AMI (plain Ubuntu 24.04
        for CPU types) from its public SSM parameter, else from ``describe_images``."""
        if self._image is None:
            self._image = self._find_image()
        return self._image

    def _find_image(self) -> str:
        image = self._options.image
        if image and not image.startswith("ssm:"):
            return image
        gpu = self._wants_gpu_image()
        if image:
            parameters: tuple[str, ...] = (image.removeprefix("ssm:"),)
        else:
            parameters = GPU_AMI_PARAMETERS if gpu else CPU_AMI_PARAMETERS
        for name in parameters:
            try:
                value = self.ssm.get_parameter(Name=name)["Parameter"].get("Value", "")
            except botocore.exceptions.ClientError as e:
                logger.debug("SSM parameter %s: %s", name, _error_code(e))
                continue
            except botocore.exceptions.BotoCoreError as e:
                raise _cloud_error("looking up the machine image", e) from e
            if value.startswith("ami-"):
                logger.info("AMI %s (from SSM parameter %s)", value, name)
                return value
        if image:
            raise CloudError(f"SSM parameter {image[4:]} holds no AMI id in {self._region}")
        try:
            images = self.ec2.describe_images(**ami_search(gpu))["Images"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("looking up the machine image", e) from e
        if not images:
            raise no_default_ami(gpu, self._region)
        newest = max(images, key=lambda i: i.get("CreationDate", ""))
        logger.info("AMI %s (%s)", newest["ImageId"], newest.get("Name", ""))
        return newest["ImageId"]

    def _describe_image(self) -> dict[str, Any]:
        """The chosen AMI as ``describe_images`` reports it ({} when it reports nothing)."""
        if self._image_info is None:
            image = self.image()
            try:
                found = self.ec2.describe_images(ImageIds=[image])["Images"]
            except botocore.exceptions.ClientError as e:
                if _error_code(e) in UNKNOWN_IMAGE_CODES:
                    raise unknown_image(image, self._region) from e
                raise _cloud_error("describing the machine image", e) from e
            except botocore.exceptions.BotoCoreError as e:
                raise _cloud_error("describing the machine image", e) from e
            self._image_info = dict(found[0]) if found else {}
        return self._image_info

    def root_disk(self) -> tuple[str, int]:
        """(root device name, size in GB): ``--disk-gb``, or the image's root snapshot when
        that is larger (EC2 refuses a root volume smaller than its snapshot)."""
        return root_volume(self._describe_image(), self._options.disk_gb)

    # -- checks and plan --------------------------------------------------------------------

    def preflight(self) -> None:
        """Check the types, subnet, VPC and image before anything is created (read-only).

        :raises ConfigError: an unknown type, a type offered nowhere here (or not in the
            subnet's zone), an image of another architecture.
        :raises CloudError: a lookup failed (credentials, region, no default VPC).
        """
        types = self.instance_types()
        try:
            unknown = [t for t in types if self._describe_type(t) is None]
        except _Denied as e:
            logger.warning("skipping the instance type checks: %s", e)
            unknown, checked_types = [], False
        else:
            checked_types = True
        check_known(unknown, self._region)
        offered = {t: self._zones_offering(t) for t in types}
        check_offered(offered, self._region)
        if self._options.subnet is not None:
            zone = self._subnet()["AvailabilityZone"]
            check_subnet_zone(offered, self._options.subnet, zone)
        else:
            self._vpc()
        arch = self._describe_image().get("Architecture")
        if arch and checked_types:
            runs = {t: self._architectures(t, default=str(arch)) for t in types}
            check_architecture(self.image(), str(arch), runs)
        check_gpus(types[0], self._options)

    def plan(self, spec: LaunchSpec) -> Plan:
        """What :meth:`launch` and :meth:`open_ports` would create (read-only lookups: the
        image, its root size, the VPC)."""
        types = self.instance_types()
        image = self.image()
        _, disk_gb = self.root_disk()
        gpu = self._gpu_of(types[0])
        vpc = self._vpc()
        subnet = self._subnet() if self._options.subnet is not None else None
        return plan_of(
            spec,
            self._region,
            types=types,
            image=image,
            disk_gb=disk_gb,
            gpu=gpu,
            vpc=vpc,
            subnet=subnet,
        )

    # -- launch -----------------------------------------------------------------------------

    def _subnet(self) -> dict[str, Any]:
        """``--subnet`` as ``describe_subnets`` reports it.

        :raises CloudError: it does not exist in this region.
        """
        if self._subnet_info is not None:
            return self._subnet_info
        subnet = self._options.subnet
        try:
            found = self.ec2.describe_subnets(SubnetIds=[str(subnet)])["Subnets"]
        except botocore.exceptions.ClientError as e:
            if "NotFound" not in _error_code(e):
                raise _cloud_error("describing the subnet", e) from e
            found = []
        except botocore.exceptions.BotoCoreError as e:
            raise _cloud_error("describing the subnet", e) from e
        if not found:
            raise CloudError(f"subnet {subnet} does not exist in region {self._region}")
        self._subnet_info = dict(found[0])
        return self._subnet_info

    def _vpc(self) -> str:
        """The VPC the instance goes into: ``--subnet``'s, else the region's default VPC."""
        if self._options.subnet is not None:
            return str(self._subnet()["VpcId"])
        try:
            vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])[
                "Vpcs"
            ]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("looking up the default VPC", e) from e
        if not vpcs:
            raise no_default_vpc(self._region)
        return vpcs[0]["VpcId"]

    def _placements(self, instance_type: str, vpc: str) -> list[tuple[str | None, str | None]]:
        """(zone, subnet) pairs to try ``instance_type`` in: ``--subnet``'s zone, else the
        default subnet of each zone that offers the type; ``[(None, None)]`` (EC2 chooses)
        when the offerings cannot be listed; ``[]`` when no zone here offers it."""
        zones = self._zones_offering(instance_type)
        if self._options.subnet is not None:
            subnet = self._subnet()
            zone = str(subnet["AvailabilityZone"])
            if zones is not None and zone not in zones:
                return []
            return [(zone, str(subnet["SubnetId"]))]
        if zones is None:
            return [(None, None)]
        try:
            subnets = self.ec2.describe_subnets(
                Filters=[
                    {"Name": "vpc-id", "Values": [vpc]},
                    {"Name": "default-for-az", "Values": ["true"]},
                ]
            )["Subnets"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("listing the default VPC's subnets", e) from e
        by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets}
        missing = [z for z in zones if z not in by_zone]
        if missing:
            logger.debug("the default VPC has no subnet in %s", ", ".join(missing))
        return [(z, by_zone[z]) for z in zones if z in by_zone]

    def _skipped(self, instance_type: str) -> Attempt:
        """Why ``instance_type`` got no placement at all (not offered where it could go)."""
        zones = self._zones_offering(instance_type) or []
        zone = self._subnet()["AvailabilityZone"] if self._options.subnet is not None else None
        return skipped(instance_type, zones, zone, self._region)

    def _hint(self, attempt: Attempt) -> str:
        """What to do about one refusal (:func:`.ec2_catalog.hint`)."""
        return hint(
            attempt,
            region=self._region,
            subnet=self._options.subnet,
            types=self.instance_types,
            zones=self._zones_offering,
            describe_type=self._describe_type,
        )

    def _run_instance(
        self, params: dict[str, Any], vpc: str, group: str, record: Callable[[Resource], None]
    ) -> tuple[str, str]:
        """RunInstances with each type in turn, in each zone that offers it, until one
        succeeds; records the instance at once. Returns (instance id, type).

        :raises CloudError: every attempt was refused (a line and a hint per refusal).
        """
        attempts: list[Attempt] = []
        types = self.instance_types()
        for index, instance_type in enumerate(types):
            following = f"the next type, {types[index + 1]}" if index + 1 < len(types) else ""
            placements = self._placements(instance_type, vpc)
            if not placements:
                attempts.append(self._skipped(instance_type))
                logger.warning("EC2: %s%s", attempts[-1].describe(), trying(following))
                continue
            for position, (zone, subnet) in enumerate(placements):
                network = network_params(
                    group, subnet, given_subnet=self._options.subnet is not None
                )
                try:
                    reservation = self.ec2.run_instances(
                        InstanceType=instance_type,  # type: ignore[arg-type]
                        **params,
                        **network,
                    )
                except botocore.exceptions.ClientError as e:
                    code = _error_code(e)
                    if code not in CAPACITY_CODES | QUOTA_CODES:
                        raise
                    attempts.append(Attempt(instance_type, zone, code, _error_message(e)))
                    last = code in QUOTA_CODES or position + 1 == len(placements)
                    nxt = following if last else f"{instance_type} in {placements[position + 1][0]}"
                    logger.warning("EC2 refused %s%s", attempts[-1].describe(), trying(nxt))
                    if code in QUOTA_CODES:  # the same quota in every zone
                        break
                    continue
                instance_id = reservation["Instances"][0]["InstanceId"]
                record(Resource("instance", instance_id, self._region))
                if attempts:
                    logger.info(
                        "EC2 launched %s in %s after %d refusal(s)",
                        instance_type,
                        zone or "the zone it chose",
                        len(attempts),
                    )
                return instance_id, instance_type
        raise launch_failed(self.instance_types(), self._region, attempts, self._hint)

    def launch(self, spec: LaunchSpec, record: Callable[[Resource], None]) -> InstanceInfo:
        name = f"studioserve-{spec.deployment_id}"
        try:
            image = self.image()
            root_device, disk_gb = self.root_disk()
            vpc = self._vpc()
            self.ec2.import_key_pair(
                KeyName=name,
                PublicKeyMaterial=spec.public_key.encode("ascii"),
                TagSpecifications=tags(spec, "key-pair"),
            )
            record(Resource("key-pair", name, self._region))
            group = self.ec2.create_security_group(
                GroupName=name,
                Description=f"studioserve {spec.deployment_id}: SSH and port {spec.ports_text}",
                VpcId=vpc,
                TagSpecifications=tags(spec, "security-group"),
            )["GroupId"]
            record(Resource("security-group", group, self._region))
            user_data = boot_script(
                deployment_id=spec.deployment_id,
                lease=spec.lease,
                end_body='shutdown -h now "studioserve: ending"',
            )
            params = instance_params(
                spec, image=image, root_device=root_device, disk_gb=disk_gb, user_data=user_data
            )
            instance_id, instance_type = self._run_instance(params, vpc, group, record)
            self._launched_type = instance_type
            inst = self._wait_running(instance_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("launch", e) from e
        zone = inst.get("Placement", {}).get("AvailabilityZone", "")
        logger.info(
            "launched EC2 %s %s (%s) in %s", instance_type, instance_id, image, zone or self._region
        )
        return InstanceInfo(
            instance_id=instance_id,
            name=name,
            public_ip=inst.get("PublicIpAddress"),
            private_ip=inst.get("PrivateIpAddress"),
            location=self._region,
            instance_type=instance_type,
            image=image,
        )

    def _describe_instance(self, instance_id: str) -> dict[str, Any] | None:
        """The instance as ``describe_instances`` reports it; None when EC2 no longer knows
        it (or does not know it yet)."""
        try:
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except botocore.exceptions.ClientError as e:
            if _error_code(e) in NOT_FOUND["instance"]:
                return None
            raise
        for reservation in reservations:
            for inst in reservation["Instances"]:
                return dict(inst)
        return None

    def _wait_running(self, instance_id: str) -> dict[str, Any]:
        """Poll until the instance runs.

        :raises CloudError: it ended instead (with EC2's reason) or did not start in time.
        """
        deadline = time.monotonic() + self.running_timeout
        state = "pending"
        while True:
            inst = self._describe_instance(instance_id)  # None: not visible yet
            if inst is not None:
                state = inst.get("State", {}).get("Name", "")
                if state == "running":
                    return inst
                if state in {"shutting-down", "terminated", "stopping", "stopped"}:
                    reason = inst.get("StateReason", {}).get("Message", "") or "no reason given"
                    raise CloudError(
                        f"EC2 instance {instance_id} went to '{state}' instead of running: {reason}"
                    )
            if time.monotonic() > deadline:
                raise CloudError(
                    f"EC2 instance {instance_id} did not reach 'running' within "
                    f"{self.running_timeout:g}s (still '{state}')"
                )
            time.sleep(self._poll)

    def open_ports(
        self, spec: LaunchSpec, instance: InstanceInfo, record: Callable[[Resource], None]
    ) -> None:
        group = f"studioserve-{spec.deployment_id}"
        try:
            groups = self.ec2.describe_security_groups(
                Filters=[
                    {"Name": "group-name", "Values": [group]},
                    {"Name": f"tag:{TAG_KEY}", "Values": [spec.deployment_id]},
                ]
            )["SecurityGroups"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("finding the security group", e) from e
        if not groups:
            raise CloudError(f"security group {group} disappeared during the launch")
        try:
            self.ec2.authorize_security_group_ingress(
                GroupId=groups[0]["GroupId"],
                IpPermissions=ingress_permissions(spec.allow_cidr, spec.port, spec.grpc_port),
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("opening ports", e) from e
        logger.info("opened TCP 22 and %s to %s", spec.ports_text, spec.allow_cidr)

    def _console_output(self, instance_id: str) -> str:
        """The console text, with ``Latest=True`` (the live buffer; Nitro only) until EC2
        refuses it, then without (the buffer saved at boot, on Xen types too).

        :raises botocore.exceptions.ClientError: the call failed with and without Latest.
        """
        if self._console_latest:
            try:
                output = self.ec2.get_console_output(InstanceId=instance_id, Latest=True)
                return str(output.get("Output") or "")
            except botocore.exceptions.ClientError as e:
                if _error_code(e) in NOT_FOUND["instance"] | PERMISSION_CODES:
                    raise  # not yet visible, or not allowed: not about Latest
                latest_error = e
            try:
                output = self.ec2.get_console_output(InstanceId=instance_id)
            except botocore.exceptions.ClientError:
                raise latest_error from None
            logger.info(
                "EC2 refused the latest console output of %s (%s; a Xen instance type): "
                "reading the boot-time console instead",
                instance_id,
                _error_code(latest_error),
            )
            self._console_latest = False
            return str(output.get("Output") or "")
        output = self.ec2.get_console_output(InstanceId=instance_id)
        return str(output.get("Output") or "")

    def host_keys(self, instance: InstanceInfo, timeout: float) -> list[str]:
        """The host keys cloud-init printed to the console, polled for ``timeout`` seconds.

        :raises CloudError: none appeared in time (naming EC2's error when the console call
            kept failing), or EC2 refused the call for lack of permission.
        """
        deadline = time.monotonic() + timeout
        failing: str | None = None  # EC2's last error, while the console call fails
        seen_output = False
        while True:
            try:
                text = self._console_output(instance.instance_id)
                failing = None
            except botocore.exceptions.ClientError as e:
                if _error_code(e) in PERMISSION_CODES:
                    raise _cloud_error("reading the console output", e) from e
                logger.debug("console output not available yet: %s", _error_code(e))
                failing, text = f"{_error_code(e)}: {_error_message(e)}", ""
            except botocore.exceptions.BotoCoreError as e:
                raise _cloud_error("reading the console output", e) from e
            seen_output = seen_output or bool(text.strip())
            keys = parse_host_keys(text)
            if keys:
                return keys
            if time.monotonic() + self._poll > deadline:
                raise no_host_keys(instance.instance_id, timeout, failing, seen_output)
            time.sleep(self._poll)

    def after_connect(self, spec: LaunchSpec, forget: Callable[[Resource], None]) -> list[str]:
        """Delete the key pair: the instance has the key, and nothing else needs it. (Not
        through :meth:`delete`, which is the teardown's.)"""
        resource = Resource("key-pair", f"studioserve-{spec.deployment_id}", self._region)
        try:
            self.ec2.delete_key_pair(KeyName=resource.id)
        except botocore.exceptions.ClientError as e:
            if _error_code(e) not in NOT_FOUND["key-pair"]:
                raise _cloud_error(f"deleting {resource.describe()}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise _cloud_error(f"deleting {resource.describe()}", e) from e
        forget(resource)
        return [
            f"deleted EC2 key pair {resource.id} in {self._region} (not needed once the "
            "instance has its key)"
        ]

    # -- inventory and teardown -------------------------------------------------------------

    def find(self, deployment_id: str) -> list[Resource]:
        tag: list[FilterTypeDef] = [{"Name": f"tag:{TAG_KEY}", "Values": [deployment_id]}]
        found: list[Resource] = []
        try:
            for page in self.ec2.get_paginator("describe_instances").paginate(Filters=tag):
                for reservation in page["Reservations"]:
                    for inst in reservation["Instances"]:
                        if inst.get("State", {}).get("Name") not in {"terminated", "shutting-down"}:
                            found.append(Resource("instance", inst["InstanceId"], self._region))
            groups = self.ec2.get_paginator("describe_security_groups").paginate(Filters=tag)
            for group_page in groups:
                for group in group_page["SecurityGroups"]:
                    found.append(Resource("security-group", group["GroupId"], self._region))
            for key in self.ec2.describe_key_pairs(Filters=tag)["KeyPairs"]:
                found.append(Resource("key-pair", key["KeyName"], self._region))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("listing resources", e) from e
        return found

    def delete(self, resource: Resource, *, wait: bool = True) -> str:
        """Delete one resource; deleting what EC2 reports as not found is fine.

        :param wait: wait until an instance is terminated and retry a security group that
            is still in use; ``False`` issues one call.
        :raises CloudError: EC2 refused (anything but the resource's not-found code), or
            the instance did not terminate in time.
        """
        try:
            if resource.kind == "instance":
                return self._terminate(resource.id, wait=wait)
            if resource.kind == "security-group":
                return self._delete_group(resource.id, wait=wait)
            if resource.kind == "key-pair":
                self.ec2.delete_key_pair(KeyName=resource.id)
                return f"deleted EC2 key pair {resource.id} in {self._region}"
        except botocore.exceptions.ClientError as e:
            if _error_code(e) in NOT_FOUND.get(resource.kind, frozenset()):
                return f"{resource.describe()} was already gone"
            raise _cloud_error(f"deleting {resource.describe()}", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise _cloud_error(f"deleting {resource.describe()}", e) from e
        raise ValueError(f"EC2 cannot delete a {resource.kind}")

    def _terminate(self, instance_id: str, *, wait: bool) -> str:
        """TerminateInstances, then (``wait``) poll until ``terminated`` or not found,
        waiting through pending/running/stopping/shutting-down and re-issuing the call
        while the instance is still pending, running or stopped (a terminate of a pending
        instance can be lost)."""
        self.ec2.terminate_instances(InstanceIds=[instance_id])
        done = f"terminated EC2 instance {instance_id} in {self._region} (and its root volume)"
        if not wait:
            return f"requested termination of EC2 instance {instance_id} in {self._region}"
        deadline = time.monotonic() + self.terminate_timeout
        while True:
            inst = self._describe_instance(instance_id)
            state = "terminated" if inst is None else inst.get("State", {}).get("Name", "")
            if state == "terminated":
                return done
            if time.monotonic() > deadline:
                raise CloudError(
                    f"EC2 instance {instance_id} did not terminate within "
                    f"{self.terminate_timeout:g}s (still '{state}'); check it with "
                    f"`aws ec2 describe-instances --instance-ids {instance_id} --region "
                    f"{self._region}` and `studio instances stop`"
                )
            if state in {"pending", "running", "stopped"}:
                logger.info(
                    "EC2 instance %s is still '%s': terminating it again", instance_id, state
                )
                try:
                    self.ec2.terminate_instances(InstanceIds=[instance_id])
                except botocore.exceptions.ClientError as e:
                    if _error_code(e) in NOT_FOUND["instance"]:
                        return done
                    if _error_code(e) != "IncorrectInstanceState":
                        raise
            else:
                logger.debug("EC2 instance %s is '%s'", instance_id, state)
            time.sleep(self._poll)

    def _delete_group(self, group_id: str, *, wait: bool) -> str:
        """DeleteSecurityGroup, retried (``wait``) while the group is still in use: for a
        little while after its instance terminated, its network interface holds it."""
        deadline = time.monotonic() + self.group_delete_timeout
        while True:
            try:
                self.ec2.delete_security_group(GroupId=group_id)
                return f"deleted security group {group_id} in {self._region}"
            except botocore.exceptions.ClientError as e:
                code = _error_code(e)
                if code not in GROUP_BUSY_CODES:
                    raise
                if not wait or time.monotonic() > deadline:
                    raise CloudError(
                        f"security group {group_id} is still in use ({code}: "
                        f"{_error_message(e)}); it remains. Delete what uses it (an instance "
                        "or another group's rule), then run `studio instances stop`"
                    ) from e
                logger.debug("security group %s still in use (%s); retrying", group_id, code)
                time.sleep(self._poll)

    def instance_state(self, instance_id: str) -> str:
        try:
            inst = self._describe_instance(instance_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("describing the instance", e) from e
        if inst is None:
            return "gone"
        state = str(inst.get("State", {}).get("Name", ""))
        return STATE_NAMES.get(state, state)
