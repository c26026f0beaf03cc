"""Ec2Provider on its own against moto's server, and against the EC2 answers moto never gives
(no capacity, a type not offered in a zone, a vCPU quota, a group still in use, a pending
instance, a console that refuses Latest) through the fault proxy of ec2_faults.py.

Each test is a few API calls; the provider polls every 0.05 s (Overrides.poll_interval).
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from studioserve.cloud import CloudOptions, Overrides
from studioserve.cloud.base import (
    LIFETIME_SCRIPT,
    InstanceInfo,
    LaunchSpec,
    Resource,
    deletion_order,
    utcnow,
)
from studioserve.cloud.ec2 import Ec2Provider
from studioserve.cloud.ec2_catalog import (
    CPU_AMI_NAME_PATTERNS,
    CPU_AMI_PARAMETERS,
    GPU_AMI_NAME_PATTERNS,
    GPU_AMI_PARAMETERS,
    KNOWN_GPUS,
    US_EAST_1_PRICES,
    known_gpu,
    parse_instance_types,
    quota_for,
)
from studioserve.cloud.scripts import boot_script
from studioserve.cloud.ssh import generate_keypair
from studioserve.errors import CloudError, ConfigError
from tests.cloud.ec2_faults import (
    AMI_PARAMETER,
    Call,
    FaultProxy,
    Reply,
    console_reply,
    ec2_error,
    ec2_reply,
    host_key_console,
    json_error,
    leftovers,
    reset_account,
    ssm_parameter,
)

POLL = 0.05
#: the zones moto's us-east-1 offers g6.xlarge in (not us-east-1e)
G6_ZONES = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1f"]
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0b8Yy2K2c0a1r7Ue3x0x4tq1aZbq3m7tYf2c1Vh9k"


@pytest.fixture
def aws(moto_url: str) -> dict[str, Any]:
    return reset_account(moto_url)


@pytest.fixture
def faults(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The proxy in front of moto. The SDK's own retries are off (AWS_MAX_ATTEMPTS=1): EC2
    answers InsufficientInstanceCapacity with status 500, which botocore retries with
    backoff before the provider sees it; here the provider's handling is what is tested."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultProxy(aws["url"]) as proxy:
        yield proxy


def provider(url: str, **changes: Any) -> Ec2Provider:
    fields: dict[str, Any] = {"cloud": "ec2", "image": "ssm:" + AMI_PARAMETER}
    fields.update(changes)
    return Ec2Provider(CloudOptions(**fields), Overrides(endpoint_url=url, poll_interval=POLL))


def launch_spec(tmp_path: Path, **changes: Any) -> LaunchSpec:
    now = utcnow().replace(microsecond=0)
    fields: dict[str, Any] = {
        "deployment_id": "ss-0000abcd",
        "public_key": generate_keypair(tmp_path / "keys", uuid.uuid4().hex).public_key,
        "ssh_user": "ubuntu",
        "port": 8080,
        "allow_cidr": "198.51.100.7/32",
        "created_at": now,
        "expires_at": now + _dt.timedelta(hours=24),
        "lease": 6900.0,
        "max_lifetime": 24 * 3600.0,
    }
    fields.update(changes)
    return LaunchSpec(**fields)


def run_instance(aws: dict[str, Any]) -> InstanceInfo:
    """An instance made directly in moto (for the console and teardown tests)."""
    inst = aws["ec2"].run_instances(
        ImageId=aws["ami"], MinCount=1, MaxCount=1, InstanceType="t3.micro"
    )["Instances"][0]
    return InstanceInfo(
        instance_id=inst["InstanceId"],
        name="studioserve-test",
        public_ip=None,
        private_ip=None,
        location="us-east-1",
        instance_type="t3.micro",
        image=aws["ami"],
    )


def default_subnets(ec2: Any) -> dict[str, str]:
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    return {s["AvailabilityZone"]: s["SubnetId"] for s in subnets["Subnets"]}


def delete_all(p: Ec2Provider, made: list[Resource]) -> list[str]:
    return [p.delete(r) for r in deletion_order(made)]


def read_only(proxy: FaultProxy) -> list[str]:
    """The actions the proxy saw that are not lookups."""
    return [c.action for c in proxy.calls if not c.action.startswith(("Describe", "Get", "List"))]


# -- construction, launch, find, delete -------------------------------------------------------


def test_construction_makes_no_api_call(faults: FaultProxy) -> None:
    p = provider(faults.url, instance_type="g6.xlarge,g5.xlarge")
    assert p.location == "us-east-1"
    assert p.instance_types() == ["g6.xlarge", "g5.xlarge"]
    assert faults.calls == []


def test_launch_find_and_delete(aws: dict[str, Any], tmp_path: Path) -> None:
    ec2 = aws["ec2"]
    p = provider(aws["url"])
    spec = launch_spec(tmp_path, lease=1234.0)
    made: list[Resource] = []
    info = p.launch(spec, made.append)
    assert [r.kind for r in made] == ["key-pair", "security-group", "instance"]
    assert (info.instance_type, info.image, info.location) == ("g6.xlarge", aws["ami"], "us-east-1")
    inst = ec2.describe_instances(InstanceIds=[info.instance_id])["Reservations"][0]["Instances"][0]
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    assert inst["Placement"]["AvailabilityZone"] in G6_ZONES
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["studioserve"] == spec.deployment_id
    assert tags["studioserve:expires"] == spec.expires_at.isoformat()
    shutdown = ec2.describe_instance_attribute(
        InstanceId=info.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    [mapping] = inst["BlockDeviceMappings"]
    assert mapping["Ebs"]["DeleteOnTermination"] is True

    # finding 16: the boot timer is the launch lease, counted on the instance
    raw = ec2.describe_instance_attribute(InstanceId=info.instance_id, Attribute="userData")
    user_data = base64.b64decode(raw["UserData"]["Value"]).decode()
    assert user_data == boot_script(
        deployment_id=spec.deployment_id,
        lease=1234.0,
        end_body='shutdown -h now "studioserve: ending"',
    )
    assert f"{LIFETIME_SCRIPT} 1234\n" in user_data
    assert "OnCalendar=" + spec.expires_at.strftime("%Y-%m-%d") not in user_data

    assert sorted(p.find(spec.deployment_id), key=lambda r: r.kind) == sorted(
        made, key=lambda r: r.kind
    )
    assert p.instance_state(info.instance_id) == "running"
    lines = delete_all(p, made)
    assert lines[0].startswith(f"terminated EC2 instance {info.instance_id}")
    assert leftovers(ec2) == {}
    assert p.find(spec.deployment_id) == []
    assert p.instance_state(info.instance_id) == "gone"
    # deleting again is fine (EC2 deletes a missing key pair and re-terminates a terminated
    # instance without complaint; a missing group is InvalidGroup.NotFound)
    assert [p.delete(r).endswith("was already gone") for r in made] == [False, True, False]


# -- finding 3: no Ubuntu 22.04 (Python 3.10) fallback images --------------------------------


def test_the_fallback_images_are_ubuntu_24_04_only() -> None:
    names = GPU_AMI_PARAMETERS + GPU_AMI_NAME_PATTERNS + CPU_AMI_PARAMETERS + CPU_AMI_NAME_PATTERNS
    assert all("24.04" in n for n in names)
    assert not [n for n in names if "22.04" in n]


@pytest.mark.parametrize("instance_type", ["g6.xlarge", "m7i.xlarge"])
def test_a_22_04_image_is_never_picked(faults: FaultProxy, instance_type: str) -> None:
    """AWS still publishes the 22.04 parameters: the lookup must not take them, neither from
    SSM nor by image name."""
    old = "ami-0a22a22a22a22a22a"

    def public_parameters(call: Call, forward: Any) -> Reply:
        name = str(call.params.get("Name", ""))
        if "22.04" in name:
            return ssm_parameter(name, old)
        return json_error("ParameterNotFound", f"Parameter {name} not found.")

    faults.on("GetParameter", public_parameters)
    p = provider(faults.url, image=None, instance_type=instance_type)
    with pytest.raises(CloudError, match="no Ubuntu 24.04 .*pass --image"):
        p.image()
    asked = [str(c.params["Name"]) for c in faults.seen("GetParameter")]
    expected = GPU_AMI_PARAMETERS if instance_type.startswith("g") else CPU_AMI_PARAMETERS
    assert asked == list(expected)
    [search] = faults.seen("DescribeImages")
    name_filters = [
        v for k, v in search.params.items() if re.fullmatch(r"Filter\.1\.Value\.\d+", k)
    ]
    assert name_filters
    assert all("24.04" in v for v in name_filters)


def test_the_24_04_parameter_gives_the_image(faults: FaultProxy) -> None:
    faults.on(
        "GetParameter",
        lambda call, forward: ssm_parameter(str(call.params["Name"]), "ami-0b24b24b24b24b24b"),
        when=lambda params: params.get("Name") == GPU_AMI_PARAMETERS[0],
    )
    # --gpus 0 with a GPU type: the type decides, so the GPU image (finding 7)
    p = provider(faults.url, image=None, gpus=0, instance_type="g6.xlarge")
    assert p.image() == "ami-0b24b24b24b24b24b"
    assert [c.params["Name"] for c in faults.seen("GetParameter")] == [GPU_AMI_PARAMETERS[0]]


# -- finding 7: gpu() follows the instance type -----------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"gpus": 0}, None),
        ({"gpus": 1}, "1x NVIDIA L4"),
        ({"gpus": 8}, "8x NVIDIA L4"),
        ({"gpus": 0, "instance_type": "g6.xlarge"}, "1x NVIDIA L4"),
        ({"gpus": 4, "instance_type": "m7i.2xlarge"}, None),
        ({"instance_type": "p5.48xlarge"}, "8x NVIDIA H100"),
        ({"accelerator": "a100", "gpus": 8}, "8x NVIDIA A100"),
        ({"instance_type": "g4dn.12xlarge"}, "4x NVIDIA T4"),
    ],
)
def test_gpu_of_known_types_needs_no_api_call(
    faults: FaultProxy, changes: dict[str, Any], expected: str | None
) -> None:
    assert provider(faults.url, **changes).gpu() == expected
    assert faults.calls == []


@pytest.mark.parametrize(
    ("instance_type", "expected"),
    [
        ("g5g.xlarge", "1x NVIDIA T4g"),
        ("g7.12xlarge", "2x NVIDIA RTX PRO 4500"),
        ("g6f.xlarge", "0.125x NVIDIA L4"),
        ("inf2.xlarge", None),
    ],
)
def test_gpu_of_other_types_comes_from_describe_instance_types(
    faults: FaultProxy, instance_type: str, expected: str | None
) -> None:
    p = provider(faults.url, instance_type=instance_type)
    assert p.gpu() == expected
    assert p.gpu() == expected  # cached
    assert len(faults.seen("DescribeInstanceTypes")) == 1


def test_the_gpu_table_agrees_with_ec2(aws: dict[str, Any]) -> None:
    """Every type in KNOWN_GPUS has the GPUs describe_instance_types reports for it."""
    types = [f"{family}.{size}" for family, (_, sizes) in KNOWN_GPUS.items() for size in sizes]
    found = aws["ec2"].describe_instance_types(InstanceTypes=types)["InstanceTypes"]
    reported = {
        t["InstanceType"]: [
            f"{g['Count']}x {g['Manufacturer']} {g['Name']}" for g in t["GpuInfo"]["Gpus"]
        ]
        for t in found
    }
    table = {t: known_gpu(t) for t in types}
    assert {t: [f"{g[0]}x {g[1]}"] for t, g in table.items() if g} == reported


# -- finding 21: plan() -----------------------------------------------------------------------


def test_plan_says_what_would_be_created_and_creates_nothing(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path
) -> None:
    p = provider(faults.url, instance_type="g6.xlarge,g5.xlarge")
    spec = launch_spec(tmp_path, lease=6900.0, max_lifetime=24 * 3600.0)
    plan = p.plan(spec)
    assert (plan.cloud, plan.location, plan.instance_type) == ("ec2", "us-east-1", "g6.xlarge")
    assert (plan.gpu, plan.image) == ("1x NVIDIA L4", aws["ami"])
    assert plan.price_per_hour == US_EAST_1_PRICES["g6.xlarge"]
    key, group, instance = plan.creates
    assert key.startswith("key pair studioserve-ss-0000abcd")
    assert "inbound TCP 22 and TCP 8080 from 198.51.100.7/32 only" in group
    assert "g6.xlarge (1x NVIDIA L4)" in instance
    assert "100 GB gp3 root volume" in instance
    backstops = "\n".join(plan.backstops)
    assert "1h 55m after its first boot" in backstops
    assert "then 24h after its first boot" in backstops
    assert "InstanceInitiatedShutdownBehavior=terminate" in backstops
    assert "DeleteOnTermination" in backstops
    notes = "\n".join(plan.notes)
    assert "about $0.80/hour" in notes
    assert "approximate us-east-1" in notes
    assert "tries g5.xlarge" in notes
    assert read_only(faults) == []
    assert leftovers(aws["ec2"]) == {}


def test_plan_price_is_none_elsewhere_or_for_unknown_types(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    spec = launch_spec(tmp_path)
    plan = provider(aws["url"], instance_type="g6.2xlarge").plan(spec)
    assert (plan.price_per_hour, plan.gpu) == (None, "1x NVIDIA L4")
    assert any("see https://aws.amazon.com/ec2/pricing" in n for n in plan.notes)
    west = boto3.client("ec2", endpoint_url=aws["url"], region_name="us-west-2")
    image = west.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    plan = provider(aws["url"], region="us-west-2", image=image).plan(spec)
    assert plan.price_per_hour is None
    assert any("about $0.80/hour in us-east-1; us-west-2 may differ" in n for n in plan.notes)


# -- finding 17: the root volume is at least the image's snapshot -----------------------------


@pytest.mark.parametrize(("disk_gb", "expected"), [(100, 200), (300, 300)])
def test_root_volume_is_at_least_the_image_snapshot(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path, disk_gb: int, expected: int
) -> None:
    # moto reports every AMI's root snapshot as 15 GB; this one is 200 GB, like the DLAMI's
    faults.rewrite(
        "DescribeImages",
        lambda body: body.replace("<volumeSize>15</volumeSize>", "<volumeSize>200</volumeSize>"),
    )
    p = provider(faults.url, disk_gb=disk_gb)
    assert f"{expected} GB gp3 root volume" in p.plan(launch_spec(tmp_path)).creates[2]
    made: list[Resource] = []
    p.launch(launch_spec(tmp_path), made.append)
    [run] = faults.seen("RunInstances")
    assert run.params["BlockDeviceMapping.1.Ebs.VolumeSize"] == str(expected)
    assert run.params["BlockDeviceMapping.1.DeviceName"] == "/dev/sda1"
    [volume] = aws["ec2"].describe_volumes()["Volumes"]
    assert volume["Size"] == expected
    delete_all(p, made)
    assert leftovers(aws["ec2"]) == {}


# -- finding 9: capacity, zones, type lists, quotas -------------------------------------------

CAPACITY = (
    "We currently do not have sufficient {type} capacity in the Availability Zone you "
    "requested ({zone}). Our system will be working on provisioning additional capacity."
)


def test_no_capacity_in_one_zone_launches_in_the_next(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="studioserve")
    subnets = default_subnets(aws["ec2"])
    faults.fail(
        "RunInstances",
        "InsufficientInstanceCapacity",
        CAPACITY.format(type="g6.xlarge", zone="us-east-1a"),
        status=500,
        when=lambda params: params.get("SubnetId") == subnets["us-east-1a"],
    )
    p = provider(faults.url)
    made: list[Resource] = []
    info = p.launch(launch_spec(tmp_path), made.append)
    runs = faults.seen("RunInstances")
    assert [r.params["SubnetId"] for r in runs] == [subnets["us-east-1a"], subnets["us-east-1b"]]
    assert [r.faulted for r in runs] == [True, False]
    inst = aws["ec2"].describe_instances(InstanceIds=[info.instance_id])["Reservations"][0][
        "Instances"
    ][0]
    assert inst["Placement"]["AvailabilityZone"] == "us-east-1b"
    assert [r.kind for r in made].count("instance") == 1
    assert "trying g6.xlarge in us-east-1b" in caplog.text
    zones = faults.seen("DescribeInstanceTypeOfferings")
    assert zones
    assert zones[0].params["LocationType"] == "availability-zone"
    delete_all(p, made)
    assert leftovers(aws["ec2"]) == {}


def test_unsupported_in_every_zone_is_a_clear_error_and_creates_no_instance(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path
) -> None:
    faults.fail(
        "RunInstances",
        "Unsupported",
        "Your requested instance type (g6.xlarge) is not supported in your requested "
        "Availability Zone. Please retry your request by not specifying an Availability Zone.",
    )
    p = provider(faults.url)
    made: list[Resource] = []
    with pytest.raises(CloudError) as info:
        p.launch(launch_spec(tmp_path), made.append)
    message = str(info.value)
    subnets = default_subnets(aws["ec2"])
    runs = faults.seen("RunInstances")
    assert [r.params["SubnetId"] for r in runs] == [subnets[z] for z in G6_ZONES]  # not 1e
    assert message.startswith("EC2 launch failed: no g6.xlarge instance in us-east-1")
    for zone in G6_ZONES:
        assert f"g6.xlarge in {zone}: Unsupported: Your requested instance type" in message
    assert "Unsupported: EC2 refused g6.xlarge in every zone tried" in message
    assert "quota" not in message
    assert [r.kind for r in made] == ["key-pair", "security-group"]
    delete_all(p, made)
    assert leftovers(aws["ec2"]) == {}


def test_a_type_list_uses_the_next_type_when_the_first_has_no_capacity(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="studioserve")
    faults.fail(
        "RunInstances",
        "InsufficientInstanceCapacity",
        "We currently do not have sufficient g6.xlarge capacity.",
        status=500,
        when=lambda params: params.get("InstanceType") == "g6.xlarge",
    )
    p = provider(faults.url, instance_type="g6.xlarge, g5.xlarge")
    assert p.gpu() == "1x NVIDIA L4"
    made: list[Resource] = []
    info = p.launch(launch_spec(tmp_path), made.append)
    types = [r.params["InstanceType"] for r in faults.seen("RunInstances")]
    assert types == ["g6.xlarge"] * len(G6_ZONES) + ["g5.xlarge"]
    assert info.instance_type == "g5.xlarge"
    assert p.gpu() == "1x NVIDIA A10G"  # the launched type's
    assert "trying the next type, g5.xlarge" in caplog.text
    delete_all(p, made)
    assert leftovers(aws["ec2"]) == {}


def test_no_capacity_anywhere_says_it_is_aws_capacity_not_quota(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path
) -> None:
    faults.fail("RunInstances", "InsufficientInstanceCapacity", "No capacity.", status=500)
    made: list[Resource] = []
    with pytest.raises(CloudError) as info:
        provider(faults.url).launch(launch_spec(tmp_path), made.append)
    message = str(info.value)
    assert "AWS's capacity, not your account's quota" in message
    assert "--instance-type g6.xlarge,g5.xlarge" in message
    assert "Service Quotas" not in message
    assert "instance" not in [r.kind for r in made]


QUOTAS = (
    "Running On-Demand P instances",
    "Running On-Demand G and VT instances",
    "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
)


@pytest.mark.parametrize(
    ("instance_type", "quota", "code"),
    [
        ("p5.48xlarge", "Running On-Demand P instances", "L-417A185B"),
        ("g6.xlarge", "Running On-Demand G and VT instances", "L-DB2E81BA"),
        ("m7i.xlarge", QUOTAS[2], "L-1216C47A"),
    ],
)
def test_a_vcpu_quota_names_the_quota_of_the_type_s_family(
    aws: dict[str, Any],
    faults: FaultProxy,
    tmp_path: Path,
    instance_type: str,
    quota: str,
    code: str,
) -> None:
    faults.fail(
        "RunInstances",
        "VcpuLimitExceeded",
        "You have requested more vCPU capacity than your current vCPU limit of 0 allows for "
        "the instance bucket that the specified instance type belongs to.",
    )
    made: list[Resource] = []
    with pytest.raises(CloudError) as info:
        provider(faults.url, instance_type=instance_type).launch(launch_spec(tmp_path), made.append)
    message = str(info.value)
    assert f"'{quota}'" in message
    assert quota_for(instance_type)[0] == quota
    assert code in message
    assert "Service Quotas" in message
    assert [q for q in QUOTAS if q in message] == [quota]
    vcpus = aws["ec2"].describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]
    assert f"needs {vcpus['VCpuInfo']['DefaultVCpus']} vCPUs" in message
    assert len(faults.seen("RunInstances")) == 1  # a quota is the same in every zone
    assert "instance" not in [r.kind for r in made]


def test_with_a_subnet_the_zone_is_fixed_and_the_hint_names_other_zones(
    aws: dict[str, Any], faults: FaultProxy, tmp_path: Path
) -> None:
    ec2 = aws["ec2"]
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone="us-east-1a")[
        "Subnet"
    ]["SubnetId"]
    faults.fail("RunInstances", "Unsupported", "The requested configuration is not supported.")
    made: list[Resource] = []
    p = provider(faults.url, subnet=subnet)
    with pytest.raises(CloudError) as info:
        p.launch(launch_spec(tmp_path), made.append)
    [run] = faults.seen("RunInstances")
    assert run.params["NetworkInterface.1.SubnetId"] == subnet
    message = str(info.value)
    assert f"not offered in us-east-1a, the zone of subnet {subnet}" in message
    assert f"offer it: {', '.join(G6_ZONES)}; pass a --subnet" in message
    delete_all(p, made)


# -- preflight --------------------------------------------------------------------------------


def test_preflight_accepts_a_good_choice_with_lookups_only(faults: FaultProxy) -> None:
    provider(faults.url, instance_type="g6.xlarge,g5.xlarge").preflight()
    assert read_only(faults) == []


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"instance_type": "g6.xlarge,zz9.nosuch"}, ConfigError, "no instance type zz9.nosuch"),
        ({"instance_type": "g6.xlarge,,"}, ConfigError, "is not an EC2 instance type"),
        ({"instance_type": "g5g.xlarge"}, ConfigError, "is x86_64, which g5g.xlarge cannot run"),
        ({"image": "ami-0123456789abcdef0"}, ConfigError, "does not exist in us-east-1"),
        ({"subnet": "subnet-0123456789abcdef0"}, CloudError, "does not exist in region"),
    ],
)
def test_preflight_refuses_with_the_fix(
    faults: FaultProxy, changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        provider(faults.url, **changes).preflight()
    assert read_only(faults) == []


def test_preflight_refuses_a_subnet_in_a_zone_without_the_type(aws: dict[str, Any]) -> None:
    subnet = default_subnets(aws["ec2"])["us-east-1e"]  # moto: no g6.xlarge in 1e
    with pytest.raises(ConfigError, match="subnet .* is in us-east-1e, where g6.xlarge is not"):
        provider(aws["url"], subnet=subnet).preflight()


def test_preflight_without_permission_to_describe_types_warns_and_goes_on(
    faults: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    faults.fail("DescribeInstanceTypes", "UnauthorizedOperation", "Not authorized.", status=403)
    provider(faults.url, instance_type="g6.xlarge").preflight()
    assert "skipping the instance type checks" in caplog.text
    with pytest.raises(CloudError, match="lacks permission"):  # no silent "no GPU"
        provider(faults.url, instance_type="g5g.xlarge").gpu()


def test_parse_instance_types() -> None:
    assert parse_instance_types("g6.xlarge") == ["g6.xlarge"]
    assert parse_instance_types(" g6.xlarge , g5.xlarge,g6.xlarge") == ["g6.xlarge", "g5.xlarge"]
    with pytest.raises(ConfigError, match="g6"):
        parse_instance_types("g6")


# -- finding 10: the console on Xen types -----------------------------------------------------


def test_console_latest_refused_falls_back_to_the_boot_console(
    aws: dict[str, Any], faults: FaultProxy
) -> None:
    instance = run_instance(aws)

    def console(call: Call, forward: Any) -> Reply:
        if call.params.get("Latest") == "true":
            return ec2_error(
                "UnsupportedOperation",
                "The instance type does not support retrieving the latest console output.",
            )
        return console_reply(instance.instance_id, host_key_console(HOST_KEY + " root@ip-10"))

    faults.on("GetConsoleOutput", console)
    p = provider(faults.url)
    assert p.host_keys(instance, timeout=5) == [HOST_KEY]
    assert p.host_keys(instance, timeout=5) == [HOST_KEY]
    latest = [c.params.get("Latest") for c in faults.seen("GetConsoleOutput")]
    assert latest == ["true", None, None]  # refused once, then never asked again


def test_console_that_kept_failing_names_the_error(aws: dict[str, Any], faults: FaultProxy) -> None:
    instance = run_instance(aws)
    faults.fail("GetConsoleOutput", "UnsupportedOperation", "Not supported for this instance.")
    with pytest.raises(CloudError) as info:
        provider(faults.url).host_keys(instance, timeout=0.3)
    message = str(info.value)
    assert "did not print its SSH host keys" in message
    assert "EC2 GetConsoleOutput kept failing: UnsupportedOperation" in message


def test_console_without_host_keys_says_so(aws: dict[str, Any]) -> None:
    instance = run_instance(aws)  # moto's console: a kernel log, no key block
    with pytest.raises(CloudError, match="the console showed no SSH host key block"):
        provider(aws["url"]).host_keys(instance, timeout=0.2)


def test_console_permission_error_fails_at_once(aws: dict[str, Any], faults: FaultProxy) -> None:
    instance = run_instance(aws)
    faults.fail("GetConsoleOutput", "UnauthorizedOperation", "You are not authorized.", status=403)
    with pytest.raises(CloudError, match="lacks permission"):
        provider(faults.url).host_keys(instance, timeout=60)
    assert len(faults.seen("GetConsoleOutput")) == 1


# -- finding 13: only not-found codes are "already gone" --------------------------------------


def make_group(aws: dict[str, Any]) -> str:
    return str(
        aws["ec2"].create_security_group(GroupName="studioserve-t", Description="t")["GroupId"]
    )


def test_a_group_in_use_is_retried_until_it_can_be_deleted(
    aws: dict[str, Any], faults: FaultProxy
) -> None:
    group = make_group(aws)
    faults.fail(
        "DeleteSecurityGroup",
        "DependencyViolation",
        f"resource {group} has a dependent object",
        times=2,
    )
    faults.fail("DeleteSecurityGroup", "InvalidGroup.InUse", "The group is in use.", times=1)
    line = provider(faults.url).delete(Resource("security-group", group, "us-east-1"))
    assert line == f"deleted security group {group} in us-east-1"
    assert [c.faulted for c in faults.seen("DeleteSecurityGroup")] == [True, True, True, False]
    assert leftovers(aws["ec2"]) == {}


@pytest.mark.parametrize("code", ["InvalidGroup.InUse", "DependencyViolation"])
def test_a_group_that_stays_in_use_is_not_reported_gone(
    aws: dict[str, Any], faults: FaultProxy, code: str
) -> None:
    group = make_group(aws)
    faults.fail("DeleteSecurityGroup", code, "The group is in use by another group's rule.")
    p = provider(faults.url)
    p.group_delete_timeout = 0.2
    with pytest.raises(CloudError, match=f"still in use \\({code}") as info:
        p.delete(Resource("security-group", group, "us-east-1"))
    assert "already gone" not in str(info.value)
    assert leftovers(aws["ec2"])["security_groups"] == [group]
    with pytest.raises(CloudError):
        p.delete(Resource("security-group", group, "us-east-1"), wait=False)


@pytest.mark.parametrize(
    ("kind", "action", "code", "gone"),
    [
        ("security-group", "DeleteSecurityGroup", "InvalidGroup.NotFound", True),
        ("security-group", "DeleteSecurityGroup", "InvalidGroup.Reserved", False),
        ("security-group", "DeleteSecurityGroup", "InvalidGroupId.Malformed", False),
        ("key-pair", "DeleteKeyPair", "InvalidKeyPair.NotFound", True),
        ("key-pair", "DeleteKeyPair", "InvalidGroup.NotFound", False),
        ("instance", "TerminateInstances", "InvalidInstanceID.NotFound", True),
        ("instance", "TerminateInstances", "InvalidInstanceID.Malformed", False),
    ],
)
def test_only_the_kind_s_not_found_code_is_already_gone(
    faults: FaultProxy, kind: str, action: str, code: str, gone: bool
) -> None:
    faults.fail(action, code, "injected")
    resource = Resource(kind, "sg-0123456789abcdef0", "us-east-1")
    p = provider(faults.url)
    if gone:
        assert p.delete(resource) == f"{resource.describe()} was already gone"
    else:
        with pytest.raises(CloudError, match=code):
            p.delete(resource)


def test_deleting_a_group_that_does_not_exist_is_already_gone(aws: dict[str, Any]) -> None:
    line = provider(aws["url"]).delete(Resource("security-group", "sg-0123456789abcdef0"))
    assert line.endswith("was already gone")


# -- finding 14: terminating a pending instance -----------------------------------------------


def pending(body: str) -> str:
    return body.replace(
        "<instanceState><code>16</code><name>running</name></instanceState>",
        "<instanceState><code>0</code><name>pending</name></instanceState>",
    )


def test_terminating_a_pending_instance_waits_and_ends_deleted(
    aws: dict[str, Any], faults: FaultProxy
) -> None:
    instance = run_instance(aws)
    iid = instance.instance_id
    # the first terminate is accepted but lost (the instance was still pending), and EC2
    # goes on showing it pending for a while
    faults.on(
        "TerminateInstances",
        lambda call, forward: ec2_reply(
            "TerminateInstances",
            f"<instancesSet><item><instanceId>{iid}</instanceId><currentState><code>0</code>"
            "<name>pending</name></currentState><previousState><code>0</code><name>pending"
            "</name></previousState></item></instancesSet>",
        ),
        times=1,
    )
    faults.rewrite("DescribeInstances", pending, times=2)
    line = provider(faults.url).delete(Resource("instance", iid, "us-east-1"))
    assert line == f"terminated EC2 instance {iid} in us-east-1 (and its root volume)"
    # the lost call, then the one re-issued when EC2 still showed the instance pending
    assert [c.faulted for c in faults.seen("TerminateInstances")] == [True, False]
    assert [c.faulted for c in faults.seen("DescribeInstances")][:1] == [True]
    state = aws["ec2"].describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "terminated"


def test_an_instance_that_never_terminates_is_an_error_not_a_hang(
    aws: dict[str, Any], faults: FaultProxy
) -> None:
    instance = run_instance(aws)
    faults.rewrite(
        "DescribeInstances",
        lambda body: re.sub(
            r"<instanceState>.*?</instanceState>",
            "<instanceState><code>32</code><name>shutting-down</name></instanceState>",
            body,
        ),
    )
    p = provider(faults.url)
    p.terminate_timeout = 0.2
    with pytest.raises(CloudError, match="did not terminate within 0.2s \\(still 'shutting-down'"):
        p.delete(Resource("instance", instance.instance_id, "us-east-1"))


def test_delete_without_waiting_issues_the_call_only(
    aws: dict[str, Any], faults: FaultProxy
) -> None:
    instance = run_instance(aws)
    line = provider(faults.url).delete(
        Resource("instance", instance.instance_id, "us-east-1"), wait=False
    )
    assert line.startswith("requested termination of EC2 instance")
    assert [c.action for c in faults.calls] == ["TerminateInstances"]
