"""What the EC2 provider knows and says without asking EC2: tables, rules, texts and request
bodies, all pure. No boto3 or botocore here; :mod:`.ec2` makes the calls (and the retries
and waits) and imports this.

* machine images: the public SSM parameters and name patterns of the Ubuntu 24.04 Deep
  Learning Base GPU AMI and of plain Ubuntu 24.04 (:func:`ami_search`), the root volume an
  image needs (:func:`root_volume`), the architecture check;
* instance types: the GPU families and the GPUs of the common types
  (:func:`choose_instance_type`, :func:`parse_instance_types`, :func:`known_gpu`,
  :func:`gpus_of`, :func:`alternatives`), and the preflight's checks of the types, of where
  they are offered and of ``--gpus`` (``check_*``);
* prices and the plan: approximate us-east-1 prices, gp3 storage, the pricing page
  (:func:`price_notes`), and what a launch would create and cost (:func:`plan_of`);
* request bodies: tags, the RunInstances parameters, the network of one placement, the
  ingress rules;
* error codes: what each code EC2 answers means (capacity, quota, not found, in use, no
  permission, unknown type or image), and the instance states as the provider names them;
* refusals and failures: :class:`Attempt`, the Service Quotas quota (name and code) of a
  type's family (:func:`quota_for`), what to do about each refusal (:func:`hint`), and the
  errors the provider raises with a fix in them (no default VPC, no host keys, ...).

Its log lines go to the provider's logger (``studioserve.cloud.ec2``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

from ..errors import CloudError, ConfigError
from .base import TAG_KEY, CloudOptions, LaunchSpec, Plan

#: the provider's logger (``studioserve.cloud.ec2``): what this logs, the provider logged
logger = logging.getLogger(__name__.removesuffix("_catalog"))

# -- machine images --------------------------------------------------------------------------------

#: Deep Learning Base (OSS NVIDIA driver) GPU AMI on Ubuntu 24.04 (Python 3.12), from its
#: public SSM parameter. No 22.04 fallback: its Python 3.10 is older than studioserve needs.
GPU_AMI_PARAMETERS = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id",
)
GPU_AMI_NAME_PATTERNS = ("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)*",)
#: plain Ubuntu 24.04 for CPU instances (Canonical's public SSM parameter)
CPU_AMI_PARAMETERS = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
)
CPU_AMI_NAME_PATTERNS = ("ubuntu/images/hvm-ssd*/ubuntu-*-24.04-amd64-server-*",)
CANONICAL_OWNER = "099720109477"


def ami_search(gpu: bool) -> dict[str, Any]:
    """``describe_images``' parameters for the newest default AMI when its SSM parameter
    holds none: the Deep Learning GPU AMI (Amazon's) or plain Ubuntu (Canonical's), x86_64."""
    patterns = GPU_AMI_NAME_PATTERNS if gpu else CPU_AMI_NAME_PATTERNS
    return {
        "Owners": ["amazon"] if gpu else [CANONICAL_OWNER],
        "Filters": [
            {"Name": "name", "Values": list(patterns)},
            {"Name": "state", "Values": ["available"]},
            {"Name": "architecture", "Values": ["x86_64"]},
        ],
    }


def no_default_ami(gpu: bool, region: str) -> CloudError:
    """The error when :func:`ami_search` found nothing in ``region``."""
    return CloudError(
        f"found no Ubuntu 24.04 {'Deep Learning GPU' if gpu else 'server'} AMI in "
        f"{region}; pass --image ami-... (with Python 3.11 or newer)"
    )


def unknown_image(image: str, region: str) -> ConfigError:
    """The error for an ``--image`` that ``describe_images`` does not know (UNKNOWN_IMAGE_CODES)."""
    return ConfigError(
        f"image {image} does not exist in {region} (or is not shared "
        "with this account); pass another --image"
    )


def check_architecture(image: str, arch: str, architectures: dict[str, list[str]]) -> None:
    """:raises ConfigError: none of the types (``architectures``' keys, each with the
    architectures it runs) runs ``image``, an ``arch`` image."""
    if not [t for t, runs in architectures.items() if arch in runs]:
        raise ConfigError(
            f"image {image} is {arch}, which {' and '.join(architectures)} cannot run; "
            "pass an --image for the type's architecture, or another --instance-type"
        )


def root_volume(image_info: dict[str, Any], disk_gb: int) -> tuple[str, int]:
    """(root device name, size in GB) from the image as ``describe_images`` reports it:
    ``disk_gb``, or the image's root snapshot when that is larger (EC2 refuses a root volume
    smaller than its snapshot)."""
    root_device = str(image_info.get("RootDeviceName") or "/dev/sda1")
    size = disk_gb
    for mapping in image_info.get("BlockDeviceMappings") or []:
        if mapping.get("DeviceName") == root_device:
            snapshot_gb = int(mapping.get("Ebs", {}).get("VolumeSize") or 0)
            if snapshot_gb > size:
                logger.info(
                    "root volume %d GB: the image's snapshot is larger than --disk-gb %d",
                    snapshot_gb,
                    size,
                )
                size = snapshot_gb
    return root_device, size


# -- instance types --------------------------------------------------------------------------------

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

_ONE_FOUR_EIGHT = {
    "xlarge": 1,
    "2xlarge": 1,
    "4xlarge": 1,
    "8xlarge": 1,
    "16xlarge": 1,
    "12xlarge": 4,
    "24xlarge": 4,
    "48xlarge": 8,
}
_G4DN = {
    "xlarge": 1,
    "2xlarge": 1,
    "4xlarge": 1,
    "8xlarge": 1,
    "16xlarge": 1,
    "12xlarge": 4,
    "metal": 8,
}
#: the GPUs of the common GPU families, by family: (model, {size: count}); other types are
#: asked of ``describe_instance_types`` (its GpuInfo)
KNOWN_GPUS: dict[str, tuple[str, dict[str, int]]] = {
    "g4dn": ("NVIDIA T4", _G4DN),
    "g5": ("NVIDIA A10G", _ONE_FOUR_EIGHT),
    "g6": ("NVIDIA L4", _ONE_FOUR_EIGHT),
    "g6e": ("NVIDIA L40S", _ONE_FOUR_EIGHT),
    "gr6": ("NVIDIA L4", {"4xlarge": 1, "8xlarge": 1}),
    "p4d": ("NVIDIA A100", {"24xlarge": 8}),
    "p4de": ("NVIDIA A100", {"24xlarge": 8}),
    "p5": ("NVIDIA H100", {"4xlarge": 1, "48xlarge": 8}),
    "p5e": ("NVIDIA H200", {"48xlarge": 8}),
    "p5en": ("NVIDIA H200", {"48xlarge": 8}),
}
#: family prefixes that never have a GPU (no API call needed to say so)
CPU_FAMILY_PREFIXES = frozenset(
    {"a", "c", "d", "h", "i", "im", "is", "m", "r", "t", "u", "x", "z", "hpc", "mac"}
)


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


def parse_instance_types(value: str) -> list[str]:
    """``--instance-type``: one type or a comma-separated list, in the order to try them.

    :raises ConfigError: an empty or malformed entry.
    """
    types = [t.strip() for t in value.split(",")]
    bad = [t for t in types if not re.fullmatch(r"[a-z][a-z0-9-]*\.[a-z0-9-]+", t)]
    if bad or not types:
        raise ConfigError(
            f"--instance-type {value!r}: {', '.join(repr(b) for b in bad) or 'nothing'} is not "
            "an EC2 instance type; write one (g6.xlarge) or a list to try in order "
            "(g6.xlarge,g5.xlarge)"
        )
    return list(dict.fromkeys(types))


def family_prefix(instance_type: str) -> str:
    """The letters a family starts with: ``g`` of ``g6e.xlarge``, ``inf`` of ``inf2.xlarge``."""
    match = re.match(r"[a-z]+", instance_type)
    return match.group(0) if match else ""


def known_gpu(instance_type: str) -> tuple[int, str] | None:
    """(count, model) from :data:`KNOWN_GPUS`, None when the type is not in the table."""
    family, _, size = instance_type.partition(".")
    entry = KNOWN_GPUS.get(family)
    if entry is None or size not in entry[1]:
        return None
    return entry[1][size], entry[0]


def describe_gpus(gpu_info: dict[str, Any]) -> str | None:
    """``"1x NVIDIA L4"`` from the ``GpuInfo`` of ``describe_instance_types`` (None without
    GPUs); a fractional GPU (g6f) counts as its share of one."""
    gpus = gpu_info.get("Gpus") or []
    if not gpus:
        return None
    parts = []
    for gpu in gpus:
        model = " ".join(p for p in (gpu.get("Manufacturer"), gpu.get("Name")) if p)
        count = gpu.get("Count") or 0
        share = gpu.get("GpuPartitionSize")
        if not count and share:  # a fractional GPU (g6f): a share of one
            parts.append(f"{float(share):g}x {model}")
        else:
            parts.append(f"{count}x {model}")
    return ", ".join(parts)


def gpus_of(
    instance_type: str, describe_type: Callable[[str], dict[str, Any] | None]
) -> str | None:
    """The GPUs of ``instance_type`` (``"1x NVIDIA L4"``), None for a CPU type: from
    :data:`KNOWN_GPUS`, else (unless its family never has one) from ``describe_type``, its
    ``describe_instance_types`` answer (None where EC2 does not know it)."""
    known = known_gpu(instance_type)
    if known is not None:
        return f"{known[0]}x {known[1]}"
    if family_prefix(instance_type) in CPU_FAMILY_PREFIXES:
        return None
    return describe_gpus((describe_type(instance_type) or {}).get("GpuInfo", {}))


def alternatives(instance_type: str) -> list[str]:
    """Types from the other GPU families with as many GPUs (for the capacity hint)."""
    gpus = known_gpu(instance_type)
    if gpus is None:
        return []
    return [
        family[gpus[0]]
        for family in GPU_FAMILIES.values()
        if gpus[0] in family and family[gpus[0]] != instance_type
    ]


def check_known(unknown: list[str], region: str) -> None:
    """:raises ConfigError: EC2 has ``unknown`` types (any) in ``region``."""
    if unknown:
        raise ConfigError(
            f"EC2 has no instance type {', '.join(unknown)} in {region}; check the "
            "spelling (aws ec2 describe-instance-types), or use --gpus/--accelerator"
        )


def check_gpus(instance_type: str, options: CloudOptions) -> None:
    """Warn when ``--instance-type`` (its first, ``instance_type``) has fewer GPUs than
    ``--gpus`` asks for (types not in :data:`KNOWN_GPUS` are not checked)."""
    known = known_gpu(instance_type)
    if options.instance_type and known and options.gpus > known[0]:
        logger.warning(
            "--instance-type %s has %d GPU(s), fewer than --gpus %d",
            instance_type,
            known[0],
            options.gpus,
        )


def check_offered(offered: dict[str, list[str] | None], region: str) -> None:
    """Warn of each type (the keys, in order) that no zone of ``region`` offers (its zones
    ``[]``; None: not known).

    :raises ConfigError: none of them is offered anywhere here.
    """
    types = list(offered)
    if all(zones == [] for zones in offered.values()):
        raise ConfigError(
            f"{' and '.join(types)} {'is' if len(types) == 1 else 'are'} not offered in "
            f"any zone of {region}; use another --region or --instance-type"
        )
    for t, zones in offered.items():
        if zones == []:
            logger.warning("%s is not offered in %s; it will be skipped", t, region)


def check_subnet_zone(offered: dict[str, list[str] | None], subnet: str, zone: str) -> None:
    """:raises ConfigError: none of the types (``offered``'s keys) is offered in ``zone``,
    the zone of ``--subnet``."""
    if not any(zones is None or zone in zones for zones in offered.values()):
        types = list(offered)
        where = "; ".join(f"{t} in {', '.join(zones)}" for t, zones in offered.items() if zones)
        raise ConfigError(
            f"subnet {subnet} is in {zone}, where "
            f"{' and '.join(types)} {'is' if len(types) == 1 else 'are'} not offered "
            f"(offered: {where}); pass a --subnet in one of those zones"
        )


# -- prices and the plan ---------------------------------------------------------------------------

#: approximate on-demand Linux prices in us-east-1, USD per hour (AWS's list prices, 2025;
#: check https://aws.amazon.com/ec2/pricing/on-demand/ before relying on them)
US_EAST_1_PRICES: dict[str, float] = {
    "g6.xlarge": 0.8048,
    "g6.12xlarge": 4.6016,
    "g6.48xlarge": 13.3504,
    "g5.xlarge": 1.006,
    "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288,
    "g6e.xlarge": 1.861,
    "g6e.12xlarge": 10.493,
    "g6e.48xlarge": 30.131,
    "p4d.24xlarge": 21.96,
    "p5.48xlarge": 55.04,
    "m7i.xlarge": 0.2016,
}
PRICE_REGION = "us-east-1"
#: gp3 storage in us-east-1, USD per GB-month (730 hours)
GP3_PRICE_GB_MONTH = 0.08
PRICING_URL = "https://aws.amazon.com/ec2/pricing/on-demand/"


def duration(seconds: float) -> str:
    """``1h 55m``, ``24h``, ``90s``: a lifetime for people."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    hours, minutes = divmod(seconds // 60, 60)
    if not hours:
        return f"{minutes}m"
    return f"{hours}h {minutes}m" if minutes else f"{hours}h"


def price_notes(
    instance_type: str, region: str, disk_gb: int, max_lifetime: float
) -> tuple[float | None, list[str]]:
    """(USD per hour where :data:`US_EAST_1_PRICES` knows it for ``region``, the plan's note
    on the cost: per hour, with the gp3 volume, and at most over ``max_lifetime``)."""
    known = US_EAST_1_PRICES.get(instance_type)
    price = known if known is not None and region == PRICE_REGION else None
    storage = disk_gb * GP3_PRICE_GB_MONTH / 730
    if price is not None:
        worst = (price + storage) * max_lifetime / 3600
        note = (
            f"about ${price:.2f}/hour for {instance_type} plus ${storage:.3f}/hour for the "
            f"{disk_gb} GB volume (approximate us-east-1 on-demand Linux prices; see "
            f"{PRICING_URL}); at most about ${worst:.2f} if it runs the whole "
            f"--max-lifetime ({duration(max_lifetime)})"
        )
    elif known is not None:
        note = (
            f"{instance_type} costs about ${known:.2f}/hour in us-east-1; {region} may differ "
            f"(see {PRICING_URL})"
        )
    else:
        note = f"price of {instance_type}: see {PRICING_URL}"
    return price, [note]


def plan_of(
    spec: LaunchSpec,
    region: str,
    *,
    types: list[str],
    image: str,
    disk_gb: int,
    gpu: str | None,
    vpc: str,
    subnet: dict[str, Any] | None,
) -> Plan:
    """What a launch of ``spec`` would create and cost: the first of ``types`` from
    ``image`` in ``vpc``, in ``subnet`` (``--subnet`` as ``describe_subnets`` reports it;
    None: the default VPC)."""
    first = types[0]
    name = f"studioserve-{spec.deployment_id}"
    if subnet is not None:
        where = f"subnet {subnet['SubnetId']} ({subnet['AvailabilityZone']}, {subnet['VpcId']})"
    else:
        where = f"the default VPC {vpc} (the first zone that offers it and has capacity)"
    creates = (
        f"key pair {name}: this deployment's public SSH key (deleted after the first login)",
        f"security group {name} in {vpc}: inbound TCP 22 and TCP {spec.ports_text} from "
        f"{spec.allow_cidr} only",
        f"instance {first} ({gpu or 'no GPU'}) from {image} in {where}, with a {disk_gb} GB "
        f"gp3 root volume, IMDSv2 required, tagged {TAG_KEY}={spec.deployment_id}",
    )
    price, notes = price_notes(first, region, disk_gb, spec.max_lifetime)
    if len(types) > 1:
        notes.append(
            f"if EC2 has no capacity for {first}, tries {', '.join(types[1:])} in that order"
        )
    return Plan(
        cloud="ec2",
        location=region,
        instance_type=first,
        gpu=gpu,
        image=image,
        price_per_hour=price,
        creates=creates,
        backstops=backstops(spec),
        notes=tuple(notes),
    )


def backstops(spec: LaunchSpec) -> tuple[str, ...]:
    """The ways an instance of ``spec`` ends without you (the plan's lines)."""
    return (
        "when `studio serve` on the instance exits, the instance shuts down (and so is terminated)",
        f"boot timer (the instance's own clock): it ends itself {duration(spec.lease)} after "
        f"its first boot unless the server gets ready, then {duration(spec.max_lifetime)} "
        "after its first boot (--max-lifetime)",
        "InstanceInitiatedShutdownBehavior=terminate: a shutdown from inside terminates the "
        "instance (no stopped instance keeps costing storage)",
        "DeleteOnTermination: the root volume is deleted with the instance",
        f"everything is tagged {TAG_KEY}={spec.deployment_id}: `studio instances list` "
        "removes what an ended or crashed launch left",
    )


# -- request bodies --------------------------------------------------------------------------------


def tags(spec: LaunchSpec, resource_type: str) -> list[Any]:
    """The TagSpecifications of one resource: the deployment id, its name, its expiry."""
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


def instance_params(
    spec: LaunchSpec, *, image: str, root_device: str, disk_gb: int, user_data: str
) -> dict[str, Any]:
    """RunInstances' parameters but the type and the network: terminate on shutdown, a gp3
    root volume deleted with the instance, IMDSv2 required, the instance and volume tagged."""
    return {
        "ImageId": image,
        "MinCount": 1,
        "MaxCount": 1,
        "KeyName": f"studioserve-{spec.deployment_id}",
        "UserData": user_data,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "BlockDeviceMappings": [
            {
                "DeviceName": root_device,
                "Ebs": {
                    "VolumeSize": disk_gb,
                    "VolumeType": "gp3",
                    "DeleteOnTermination": True,
                },
            }
        ],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": tags(spec, "instance") + tags(spec, "volume"),
    }


def network_params(group: str, subnet: str | None, *, given_subnet: bool) -> dict[str, Any]:
    """RunInstances' network for one placement: the security group, in ``subnet`` (None: the
    zone EC2 chooses); a ``--subnet`` (``given_subnet``) gets a network interface with a
    public address even where the subnet does not hand them out by default."""
    if given_subnet:
        return {
            "NetworkInterfaces": [
                {
                    "DeviceIndex": 0,
                    "SubnetId": subnet,
                    "Groups": [group],
                    "AssociatePublicIpAddress": True,
                    "DeleteOnTermination": True,
                }
            ]
        }
    network: dict[str, Any] = {"SecurityGroupIds": [group]}
    if subnet is not None:
        network["SubnetId"] = subnet
    return network


def ingress_permissions(allow_cidr: str, port: int, grpc_port: int | None = None) -> list[Any]:
    """The security group's inbound rules: TCP 22, ``port`` and ``grpc_port`` (when set)
    from ``allow_cidr`` only."""
    v6 = ":" in allow_cidr
    ranges_key = "Ipv6Ranges" if v6 else "IpRanges"
    cidr_key = "CidrIpv6" if v6 else "CidrIp"
    return [
        {
            "IpProtocol": "tcp",
            "FromPort": p,
            "ToPort": p,
            ranges_key: [{cidr_key: allow_cidr, "Description": what}],
        }
        for p, what in (
            (22, "studioserve ssh"),
            (port, "studioserve http"),
            *(((grpc_port, "studioserve grpc"),) if grpc_port is not None else ()),
        )
    ]


# -- error codes and states ------------------------------------------------------------------------

#: RunInstances errors after which another zone (or type) may work
CAPACITY_CODES = frozenset({"InsufficientInstanceCapacity", "InsufficientCapacity", "Unsupported"})
#: RunInstances errors that are the account's limits: another zone cannot help, another type
#: (another quota, or a smaller one) may
QUOTA_CODES = frozenset(
    {"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"}
)
#: the code EC2 answers for a resource that does not exist, by resource kind: only these are
#: "already gone" (InvalidGroup.InUse, InvalidGroup.Duplicate, ... are not)
NOT_FOUND = {
    "instance": frozenset({"InvalidInstanceID.NotFound"}),
    "security-group": frozenset({"InvalidGroup.NotFound"}),
    "key-pair": frozenset({"InvalidKeyPair.NotFound"}),
}
#: a security group still referenced (by a terminating instance's network interface, or by
#: another group's rule): retried until the wait runs out
GROUP_BUSY_CODES = frozenset({"DependencyViolation", "InvalidGroup.InUse"})
#: errors that waiting does not cure
PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AuthFailure", "OptInRequired"})
#: ``describe_instance_types`` of a type EC2 does not have
UNKNOWN_TYPE_CODES = frozenset({"InvalidInstanceType", "InvalidParameterValue"})
#: ``describe_images`` of an AMI that does not exist here (or is not shared with the account)
UNKNOWN_IMAGE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Malformed"})

#: EC2's instance states as :meth:`.base.Provider.instance_state` names them
STATE_NAMES = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "gone",
    "terminated": "gone",
}


# -- refusals and failures -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One RunInstances that EC2 refused (or one placement skipped without asking)."""

    instance_type: str
    zone: str | None
    code: str
    message: str

    def describe(self) -> str:
        where = self.zone or "the zone EC2 chose"
        return f"{self.instance_type} in {where}: {self.code}: {self.message}"


def skipped(instance_type: str, zones: list[str], subnet_zone: str | None, region: str) -> Attempt:
    """Why ``instance_type`` got no placement at all: not offered in ``--subnet``'s zone
    (``subnet_zone``), nowhere in ``region`` (``zones`` empty), or not where the default VPC
    has a subnet."""
    if subnet_zone is not None:
        return Attempt(instance_type, subnet_zone, "NotOffered", "not offered in this zone")
    if not zones:
        return Attempt(instance_type, None, "NotOffered", f"not offered in {region}")
    return Attempt(
        instance_type,
        None,
        "NoSubnet",
        f"the default VPC has no subnet in the zones that offer it ({', '.join(zones)})",
    )


def trying(what: str) -> str:
    """``; trying WHAT`` for the log line of a refusal (nothing when nothing is left)."""
    return f"; trying {what}" if what else ""


def quota_for(instance_type: str) -> tuple[str, str | None]:
    """The Service Quotas quota (name, code) holding the on-demand vCPUs of
    ``instance_type``'s family (code None where not listed here)."""
    prefix = family_prefix(instance_type)
    if prefix in {"g", "gr", "vt"}:
        return "Running On-Demand G and VT instances", "L-DB2E81BA"
    if prefix == "p":
        return "Running On-Demand P instances", "L-417A185B"
    if prefix == "inf":
        return "Running On-Demand Inf instances", "L-1945791B"
    named = {
        "trn": "Running On-Demand Trn instances",
        "dl": "Running On-Demand DL instances",
        "f": "Running On-Demand F instances",
        "x": "Running On-Demand X instances",
        "u": "Running On-Demand High Memory instances",
        "hpc": "Running On-Demand HPC instances",
    }
    if prefix in named:
        return named[prefix], None
    return "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", "L-1216C47A"


def hint(
    attempt: Attempt,
    *,
    region: str,
    subnet: str | None,
    types: Callable[[], list[str]],
    zones: Callable[[str], list[str] | None],
    describe_type: Callable[[str], dict[str, Any] | None],
) -> str:
    """What to do about one refusal (each code its own hint).

    :param subnet: ``--subnet``, None in the default VPC.
    :param types: the types to try, in order; :param zones: the zones offering a type (None
        when not known); :param describe_type: ``describe_instance_types`` of a type. Each is
        asked only by the hint that needs it.
    """
    t = attempt.instance_type
    if attempt.code in {"InsufficientInstanceCapacity", "InsufficientCapacity"}:
        others = [a for a in alternatives(t) if a not in types()][:2]
        example = f"{t},{others[0]}" if others else f"{t},<another type>"
        return (
            f"{attempt.code} for {t}: AWS has no spare {t} capacity there right now (this "
            "is AWS's capacity, not your account's quota). Try again later, another "
            f"--region, or let other types be used in order: --instance-type {example}"
        )
    if attempt.code in {"Unsupported", "NotOffered"}:
        offered = zones(t) or []
        offer = (
            f"the zones of {region} that offer it: {', '.join(offered)}"
            if offered
            else f"no zone of {region} offers it: use another --region or --instance-type"
        )
        if subnet is not None and attempt.zone is not None:
            return (
                f"{attempt.code}: {t} is not offered in {attempt.zone}, the zone of subnet "
                f"{subnet}; {offer}" + ("; pass a --subnet in one of them" if offered else "")
            )
        if attempt.code == "NotOffered" or not offered:
            return f"{t}: {offer}"
        return (
            f"Unsupported: EC2 refused {t} in every zone tried although {offer}; the image "
            "or options may not combine with it (see EC2's message): try another "
            "--instance-type or --image"
        )
    if attempt.code == "NoSubnet":
        return (
            f"{t}: the default VPC lacks a subnet in the zones that offer it; pass --subnet "
            f"with a subnet in one of {', '.join(zones(t) or [])}"
        )
    if attempt.code in QUOTA_CODES:
        name, code = quota_for(t)
        vcpus = (describe_type(t) or {}).get("VCpuInfo", {}).get("DefaultVCpus")
        need = f" ({t} needs {vcpus} vCPUs)" if vcpus else ""
        quota = f"'{name}'" + (f" ({code})" if code else "")
        return (
            f"{attempt.code} for {t}: your account's vCPU quota {quota} in {region} is "
            f"too low{need}: request an increase in the Service Quotas console (Amazon "
            "EC2), or use another --instance-type or --region"
        )
    return f"{attempt.code} for {t}"


def launch_failed(
    types: list[str], region: str, attempts: list[Attempt], hint: Callable[[Attempt], str]
) -> CloudError:
    """The error when every attempt was refused: a line per attempt, then each distinct
    ``hint``."""
    lines = [f"EC2 launch failed: no {' or '.join(types)} instance in {region}:"]
    lines += [f"  {a.describe()}" for a in attempts]
    lines += list(dict.fromkeys(hint(a) for a in attempts))
    return CloudError("\n".join(lines))


def no_default_vpc(region: str) -> CloudError:
    """The error for a region without a default VPC (and no ``--subnet``)."""
    return CloudError(
        f"region {region} has no default VPC; pass --subnet SUBNET_ID (a subnet "
        "whose route table reaches an internet gateway), create a default VPC "
        "(aws ec2 create-default-vpc), or use another --region"
    )


def no_host_keys(
    instance_id: str, timeout: float, failing: str | None, seen_output: bool
) -> CloudError:
    """The error when the console showed no host keys within ``timeout``: ``failing`` is
    EC2's last GetConsoleOutput error (``CODE: message``) while the call still failed."""
    if failing is not None:
        why = f"EC2 GetConsoleOutput kept failing: {failing}"
    elif seen_output:
        why = "the console showed no SSH host key block"
    else:
        why = "the console output stayed empty"
    return CloudError(
        f"instance {instance_id} did not print its SSH host keys to its "
        f"console within {timeout:g}s ({why}), so its identity cannot be verified; "
        "it is being removed. Images without cloud-init need --image with one that "
        "has it"
    )
