"""Amazon EC2: the only module that imports boto3.

What one deployment creates (each tagged ``studioserve=<id>``):

* a key pair ``studioserve-<id>`` holding the deployment's *public* key; deleted as soon as
  the first SSH login works (running instances keep the key; it is no longer needed);
* a security group ``studioserve-<id>`` in the default VPC, allowing TCP 22 and the serving
  port from ``--allow-cidr`` only;
* the instance, with ``InstanceInitiatedShutdownBehavior=terminate`` (a shutdown from inside
  deletes it), its root volume set to ``DeleteOnTermination``, IMDSv2 required, and user data
  that only installs the end command and the max-lifetime timer (no secrets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions

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

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import FilterTypeDef
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"

#: Deep Learning Base (OSS NVIDIA driver) GPU AMIs, newest Ubuntu first (public SSM parameters)
GPU_AMI_PARAMETERS = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id",
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id",
)
GPU_AMI_NAME_PATTERNS = (
    "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)*",
    "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*",
)
#: plain Ubuntu for CPU instances (Canonical's public SSM parameters)
CPU_AMI_PARAMETERS = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id",
)
CPU_AMI_NAME_PATTERNS = ("ubuntu/images/hvm-ssd*/ubuntu-*-24.04-amd64-server-*",)
CANONICAL_OWNER = "099720109477"

#: GPU instance families by accelerator: {GPUs per instance: instance type}
GPU_FAMILIES: dict[str, dict[int, str]] = {
    "l4": {1: "g6.xlarge", 4: "g6.12xlarge", 8: "g6.48xlarge"},
    "a10g": {1: "g5.xlarge", 4: "g5.12xlarge", 8: "g5.48xlarge"},
    "l40s": {1: "g6e.xlarge", 4: "g6e.12xlarge", 8: "g6e.48xlarge"},
    "a100": {8: "p4d.24xlarge"},
    "h100": {8: "p5.48xlarge"},
}
DEFAULT_ACCELERATOR = "l4"
CPU_INSTANCE_TYPE = "m7i.xlarge"

_QUOTA_CODES = {
    "VcpuLimitExceeded",
    "InstanceLimitExceeded",
    "InsufficientInstanceCapacity",
    "MaxSpotInstanceCountExceeded",
}


def choose_instance_type(gpus: int, accelerator: str | None = None) -> str:
    """The instance type for ``gpus`` GPUs: the smallest of the family with at least that many.

    :raises ConfigError: no instance of that family has that many GPUs.
    """
    if gpus == 0:
        return CPU_INSTANCE_TYPE
    family_name = (accelerator or DEFAULT_ACCELERATOR).lower().removeprefix("nvidia-")
    family = GPU_FAMILIES.get(family_name)
    if family is None:
        raise ConfigError(
            f"unknown EC2 accelerator {accelerator!r}; use one of {', '.join(GPU_FAMILIES)} "
            "or pass --instance-type"
        )
    for count in sorted(family):
        if count >= gpus:
            if count != gpus:
                logger.info(
                    "no %s instance has exactly %d GPUs; using %d", family_name, gpus, count
                )
            return family[count]
    raise ConfigError(
        f"no {family_name} instance has {gpus} GPUs (at most {max(family)}); "
        "pass --instance-type or fewer --gpus"
    )


def _error_code(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _cloud_error(action: str, e: Exception) -> CloudError:
    code = _error_code(e)
    hint = ""
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        hint = "; configure AWS credentials (aws configure, AWS_PROFILE or AWS_ACCESS_KEY_ID)"
    elif code in _QUOTA_CODES:
        hint = (
            "; your account's quota or the region's capacity for this instance type is "
            "exhausted: request a quota increase (Service Quotas, 'Running On-Demand G and VT "
            "instances'), or try --region/--instance-type"
        )
    elif code in {"UnauthorizedOperation", "AuthFailure"}:
        hint = "; the AWS identity in use lacks permission for this (see the README's IAM list)"
    return CloudError(f"EC2 {action} failed: {e}{hint}")


class Ec2Provider(Provider):
    """EC2 in one region."""

    cloud = "ec2"
    default_ssh_user = "ubuntu"

    def __init__(self, options: CloudOptions, *, poll_interval: float = 5.0) -> None:
        session = boto3.session.Session(region_name=options.region)
        region = options.region or session.region_name or DEFAULT_REGION
        self._region = region
        self._options = options
        self._poll = poll_interval
        kwargs: dict[str, Any] = {"region_name": region}
        if options.endpoint_url:
            kwargs["endpoint_url"] = options.endpoint_url
        self.ec2: EC2Client = session.client("ec2", **kwargs)
        self.ssm: SSMClient = session.client("ssm", **kwargs)

    @property
    def location(self) -> str:
        return self._region

    def describe(self) -> dict[str, str | None]:
        return {"region": self._region, "zone": None, "project": None}

    # -- choices ----------------------------------------------------------------------------

    def instance_type(self) -> str:
        return self._options.instance_type or choose_instance_type(
            self._options.gpus, self._options.accelerator
        )

    def image(self) -> str:
        """The AMI: ``--image`` (an AMI id, or ``ssm:/NAME`` for the one an SSM parameter
        holds), else the newest Deep Learning Base GPU AMI (plain Ubuntu for CPU instances)
        from its public SSM parameter, else from ``describe_images``."""
        image = self._options.image
        if image and not image.startswith("ssm:"):
            return image
        gpu = self._options.gpus > 0
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
        owners = ["amazon"] if gpu else [CANONICAL_OWNER]
        patterns = GPU_AMI_NAME_PATTERNS if gpu else CPU_AMI_NAME_PATTERNS
        try:
            images = self.ec2.describe_images(
                Owners=owners,
                Filters=[
                    {"Name": "name", "Values": list(patterns)},
                    {"Name": "state", "Values": ["available"]},
                    {"Name": "architecture", "Values": ["x86_64"]},
                ],
            )["Images"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("looking up the machine image", e) from e
        if not images:
            raise CloudError(
                f"found no {'Deep Learning GPU' if gpu else 'Ubuntu'} AMI in {self._region}; "
                "pass --image ami-..."
            )
        newest = max(images, key=lambda i: i.get("CreationDate", ""))
        logger.info("AMI %s (%s)", newest["ImageId"], newest.get("Name", ""))
        return newest["ImageId"]

    # -- launch -----------------------------------------------------------------------------

    def _tags(self, spec: LaunchSpec, resource_type: str) -> list[Any]:
        return [
            {
                "ResourceType": resource_type,
                "Tags": [
                    {"Key": TAG_KEY, "Value": spec.deployment_id},
                    {"Key": "Name", "Value": f"studioserve-{spec.deployment_id}"},
                    {"Key": "studioserve:expires", "Value": spec.expires_at.isoformat()},
                ],
            }
        ]

    def _vpc(self) -> str:
        """The VPC the instance goes into: ``--subnet``'s, else the region's default VPC."""
        subnet = self._options.subnet
        if subnet is not None:
            try:
                found = self.ec2.describe_subnets(SubnetIds=[subnet])["Subnets"]
            except botocore.exceptions.ClientError as e:
                if "NotFound" not in _error_code(e):
                    raise
                found = []
            if not found:
                raise CloudError(f"subnet {subnet} does not exist in region {self._region}")
            return found[0]["VpcId"]
        vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise CloudError(
                f"region {self._region} has no default VPC; pass --subnet SUBNET_ID (a subnet "
                "whose route table reaches an internet gateway), create a default VPC "
                "(aws ec2 create-default-vpc), or use another --region"
            )
        return vpcs[0]["VpcId"]

    def launch(self, spec: LaunchSpec, record: Callable[[Resource], None]) -> InstanceInfo:
        name = f"studioserve-{spec.deployment_id}"
        instance_type = self.instance_type()
        try:
            image = self.image()
            root_device = "/dev/sda1"
            found = self.ec2.describe_images(ImageIds=[image])["Images"]
            if found and found[0].get("RootDeviceName"):
                root_device = found[0]["RootDeviceName"]
            vpc = self._vpc()
            self.ec2.import_key_pair(
                KeyName=name,
                PublicKeyMaterial=spec.public_key.encode("ascii"),
                TagSpecifications=self._tags(spec, "key-pair"),  # type: ignore[arg-type]
            )
            record(Resource("key-pair", name, self._region))
            group = self.ec2.create_security_group(
                GroupName=name,
                Description=f"studioserve {spec.deployment_id}: SSH and port {spec.port}",
                VpcId=vpc,
                TagSpecifications=self._tags(spec, "security-group"),  # type: ignore[arg-type]
            )["GroupId"]
            record(Resource("security-group", group, self._region))
            user_data = boot_script(
                deployment_id=spec.deployment_id,
                expires_at=spec.expires_at,
                end_body='shutdown -h now "studioserve: ending"',
            )
            network: dict[str, Any] = {"SecurityGroupIds": [group]}
            if self._options.subnet is not None:
                # a public address even where the subnet does not hand them out by default
                network = {
                    "NetworkInterfaces": [
                        {
                            "DeviceIndex": 0,
                            "SubnetId": self._options.subnet,
                            "Groups": [group],
                            "AssociatePublicIpAddress": True,
                            "DeleteOnTermination": True,
                        }
                    ]
                }
            reservation = self.ec2.run_instances(
                ImageId=image,
                InstanceType=instance_type,  # type: ignore[arg-type]
                MinCount=1,
                MaxCount=1,
                KeyName=name,
                **network,
                UserData=user_data,
                InstanceInitiatedShutdownBehavior="terminate",
                BlockDeviceMappings=[
                    {
                        "DeviceName": root_device,
                        "Ebs": {
                            "VolumeSize": self._options.disk_gb,
                            "VolumeType": "gp3",
                            "DeleteOnTermination": True,
                        },
                    }
                ],
                MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
                TagSpecifications=self._tags(spec, "instance") + self._tags(spec, "volume"),  # type: ignore[arg-type]
            )
            instance_id = reservation["Instances"][0]["InstanceId"]
            record(Resource("instance", instance_id, self._region))
            logger.info(
                "launched EC2 %s %s (%s) in %s", instance_type, instance_id, image, self._region
            )
            waiter = self.ec2.get_waiter("instance_running")
            waiter.wait(
                InstanceIds=[instance_id],
                WaiterConfig={"Delay": max(1, int(self._poll)), "MaxAttempts": 120},
            )
            described = self.ec2.describe_instances(InstanceIds=[instance_id])
            inst = described["Reservations"][0]["Instances"][0]
        except botocore.exceptions.WaiterError as e:
            raise CloudError(f"EC2 instance did not reach 'running': {e}") from e
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("launch", e) from e
        return InstanceInfo(
            instance_id=instance_id,
            name=name,
            public_ip=inst.get("PublicIpAddress"),
            private_ip=inst.get("PrivateIpAddress"),
            location=self._region,
            instance_type=instance_type,
            image=image,
        )

    def open_ports(
        self, spec: LaunchSpec, instance: InstanceInfo, record: Callable[[Resource], None]
    ) -> None:
        group = f"studioserve-{spec.deployment_id}"
        groups = self.ec2.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [group]}]
        )["SecurityGroups"]
        if not groups:
            raise CloudError(f"security group {group} disappeared during the launch")
        v6 = ":" in spec.allow_cidr
        ranges_key = "Ipv6Ranges" if v6 else "IpRanges"
        cidr_key = "CidrIpv6" if v6 else "CidrIp"
        permissions: list[Any] = [
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                ranges_key: [{cidr_key: spec.allow_cidr, "Description": what}],
            }
            for port, what in ((22, "studioserve ssh"), (spec.port, "studioserve http"))
        ]
        try:
            self.ec2.authorize_security_group_ingress(
                GroupId=groups[0]["GroupId"], IpPermissions=permissions
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("opening ports", e) from e
        logger.info("opened TCP 22 and %d to %s", spec.port, spec.allow_cidr)

    def host_keys(self, instance: InstanceInfo, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                output = self.ec2.get_console_output(InstanceId=instance.instance_id, Latest=True)
            except botocore.exceptions.ClientError as e:
                logger.debug("console output not available yet: %s", _error_code(e))
                output = {}  # type: ignore[typeddict-item]
            keys = parse_host_keys(str(output.get("Output") or ""))
            if keys:
                return keys
            if time.monotonic() + self._poll > deadline:
                raise CloudError(
                    f"instance {instance.instance_id} did not print its SSH host keys to its "
                    f"console within {timeout:g}s, so its identity cannot be verified; it is "
                    "being removed. Images without cloud-init need --image with one that has it"
                )
            time.sleep(self._poll)

    def after_connect(self, spec: LaunchSpec, forget: Callable[[Resource], None]) -> list[str]:
        resource = Resource("key-pair", f"studioserve-{spec.deployment_id}", self._region)
        line = self.delete(resource)
        forget(resource)
        return [line + " (not needed once the instance has its key)"]

    # -- inventory and teardown -------------------------------------------------------------

    def find(self, deployment_id: str) -> list[Resource]:
        tag: list[FilterTypeDef] = [{"Name": f"tag:{TAG_KEY}", "Values": [deployment_id]}]
        found: list[Resource] = []
        try:
            for reservation in self.ec2.describe_instances(Filters=tag)["Reservations"]:
                for inst in reservation["Instances"]:
                    if inst.get("State", {}).get("Name") not in {"terminated", "shutting-down"}:
                        found.append(Resource("instance", inst["InstanceId"], self._region))
            for group in self.ec2.describe_security_groups(Filters=tag)["SecurityGroups"]:
                found.append(Resource("security-group", group["GroupId"], self._region))
            for key in self.ec2.describe_key_pairs(Filters=tag)["KeyPairs"]:
                found.append(Resource("key-pair", key["KeyName"], self._region))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _cloud_error("listing resources", e) from e
        return found

    def delete(self, resource: Resource) -> str:
        try:
            if resource.kind == "instance":
                self.ec2.terminate_instances(InstanceIds=[resource.id])
                self.ec2.get_waiter("instance_terminated").wait(
                    InstanceIds=[resource.id],
                    WaiterConfig={"Delay": max(1, int(self._poll)), "MaxAttempts": 120},
                )
                return (
                    f"terminated EC2 instance {resource.id} in {self._region} (and its root volume)"
                )
            if resource.kind == "security-group":
                return self._delete_group(resource.id)
            if resource.kind == "key-pair":
                self.ec2.delete_key_pair(KeyName=resource.id)
                return f"deleted EC2 key pair {resource.id} in {self._region}"
        except botocore.exceptions.ClientError as e:
            if _error_code(e).endswith(".NotFound") or _error_code(e).startswith("InvalidGroup"):
                return f"{resource.describe()} was already gone"
            raise _cloud_error(f"deleting {resource.describe()}", e) from e
        except botocore.exceptions.WaiterError as e:
            raise CloudError(f"EC2 instance {resource.id} did not terminate: {e}") from e
        except botocore.exceptions.BotoCoreError as e:
            raise _cloud_error(f"deleting {resource.describe()}", e) from e
        raise ValueError(f"EC2 cannot delete a {resource.kind}")

    def _delete_group(self, group_id: str, timeout: float = 300.0) -> str:
        # A group stays "in use" for a little while after its instance terminated.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ec2.delete_security_group(GroupId=group_id)
                return f"deleted security group {group_id} in {self._region}"
            except botocore.exceptions.ClientError as e:
                if _error_code(e) != "DependencyViolation" or time.monotonic() > deadline:
                    raise
                time.sleep(self._poll)

    def instance_state(self, instance_id: str) -> str:
        try:
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except botocore.exceptions.ClientError as e:
            if _error_code(e) == "InvalidInstanceID.NotFound":
                return "gone"
            raise _cloud_error("describing the instance", e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise _cloud_error("describing the instance", e) from e
        if not reservations or not reservations[0]["Instances"]:
            return "gone"
        state = reservations[0]["Instances"][0].get("State", {}).get("Name", "")
        return {
            "pending": "pending",
            "running": "running",
            "stopping": "stopping",
            "stopped": "stopped",
            "shutting-down": "gone",
            "terminated": "gone",
        }.get(state, state)
