"""Deployments to EC2 against moto's server (boto3 pointed at it with Overrides.endpoint_url),
with a real sshd on loopback standing in for the instance. Nothing here connects to moto's
fake public addresses: SSH and HTTP go to 127.0.0.1 (Overrides.connect_host). The provider on
its own, and the EC2 errors moto cannot produce, are in test_ec2_provider.py."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from studioserve.cloud import (
    STEPS,
    CloudOptions,
    DeploymentFailed,
    HostKeyMismatch,
    Overrides,
    StepContext,
    deploy,
    list_instances,
    stop_instances,
)
from studioserve.cloud.base import LIFETIME_SCRIPT, LaunchSpec, Resource, utcnow
from studioserve.cloud.ec2 import Ec2Provider
from studioserve.cloud.ec2_catalog import choose_instance_type
from studioserve.cloud.registry import InstanceRecord, Registry
from studioserve.cloud.ssh import generate_keypair
from studioserve.config import ServeConfig, config_dir
from studioserve.errors import CloudError, ConfigError
from tests.cloud.ec2_faults import (
    AMI_PARAMETER,
    FaultProxy,
    leftovers,
    reset_account,
)
from tests.cloud.helpers import (
    Sshd,
    assert_grpc_answers,
    assert_no_secrets,
    files_under,
    free_port,
    local_instance_options,
    local_instance_overrides,
    needs_sshd,
    new_host_key,
    post_json,
    private_key_body,
    wait_for,
)

AWS_SECRET = "fake-aws-secret-3c1f9a77d2"


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A clean moto account, clients, and an AMI published under a test SSM parameter."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    return reset_account(moto_url)


@pytest.fixture
def faults(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """An error-injecting proxy in front of moto (see ec2_faults.py); no SDK retries."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultProxy(aws["url"]) as proxy:
        yield proxy


def local_keys() -> list[str]:
    folder = config_dir() / "keys"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


class CloudInit:
    """A hook standing in for cloud-init: at wait_ssh it installs the key pair's public key
    (read back from EC2) into the sshd's authorized_keys, and snapshots what EC2 holds."""

    def __init__(self, ec2: Any, sshd: Sshd) -> None:
        self.ec2 = ec2
        self.sshd = sshd
        self.snapshot: dict[str, Any] = {}

    def __call__(self, step: str, ctx: StepContext) -> None:
        if step != "wait_ssh":
            return
        assert ctx.instance is not None
        iid = ctx.instance.instance_id
        pairs = self.ec2.describe_key_pairs(
            KeyNames=[f"studioserve-{ctx.deployment_id}"], IncludePublicKey=True
        )["KeyPairs"]
        self.sshd.authorize(pairs[0]["PublicKey"])
        user_data = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        self.snapshot = {
            "instance": self.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0][
                "Instances"
            ][0],
            "shutdown": self.ec2.describe_instance_attribute(
                InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior"
            )["InstanceInitiatedShutdownBehavior"]["Value"],
            "user_data": base64.b64decode(user_data["UserData"]["Value"]).decode(),
            "groups": self.ec2.describe_security_groups(
                Filters=[{"Name": "tag:studioserve", "Values": [ctx.deployment_id]}]
            )["SecurityGroups"],
            "key_pairs": pairs,
            "volumes": self.ec2.describe_volumes()["Volumes"],
        }


def options(sshd: Sshd, tmp_path: Path, **changes: Any) -> CloudOptions:
    fields = local_instance_options(sshd)
    fields.update(cloud="ec2", gpus=1, image="ssm:" + AMI_PARAMETER, region="us-east-1")
    fields.update(changes)
    return CloudOptions(**fields)


def overrides(aws: dict[str, Any], sshd: Sshd, tmp_path: Path, **changes: Any) -> Overrides:
    """This machine as the instance, moto as EC2, and the sshd's host key pinned (moto's
    console output has no host keys)."""
    fields: dict[str, Any] = {"endpoint_url": aws["url"], "host_key": sshd.host_key}
    fields.update(changes)
    return local_instance_overrides(sshd, tmp_path / "remote", tmp_path / "ended", **fields)


def api_options(**changes: Any) -> CloudOptions:
    """Options for a launch that fails at the EC2 API, before any SSH (no sshd needed)."""
    fields: dict[str, Any] = {
        "cloud": "ec2",
        "image": "ssm:" + AMI_PARAMETER,
        "allow_cidr": "198.51.100.7/32",
    }
    fields.update(changes)
    return CloudOptions(**fields)


def api_overrides(url: str, **changes: Any) -> Overrides:
    return Overrides(endpoint_url=url, connect_host="127.0.0.1", poll_interval=0.05, **changes)


# -- choices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "accelerator", "expected"),
    [
        (0, None, "m7i.xlarge"),
        (1, None, "g6.xlarge"),
        (2, None, "g6.12xlarge"),
        (4, "l4", "g6.12xlarge"),
        (8, None, "g6.48xlarge"),
        (1, "a10g", "g5.xlarge"),
        (1, "nvidia-l40s", "g6e.xlarge"),
        (1, "a100", "p4d.24xlarge"),
        (8, "H100", "p5.48xlarge"),
    ],
)
def test_instance_type_follows_gpus(gpus: int, accelerator: str | None, expected: str) -> None:
    assert choose_instance_type(gpus, accelerator) == expected


def test_instance_type_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="--instance-type"):
        choose_instance_type(1, "k80")
    with pytest.raises(ConfigError, match="at most 8"):
        choose_instance_type(9)


def test_image_from_ssm_parameter_or_a_clear_error(aws: dict[str, Any]) -> None:
    opts = CloudOptions(cloud="ec2", image="ssm:" + AMI_PARAMETER)
    moto = Overrides(endpoint_url=aws["url"])
    assert Ec2Provider(opts, moto).image() == aws["ami"]
    assert (
        Ec2Provider(opts.replace(image="ami-0123456789abcdef0"), moto).image()
        == "ami-0123456789abcdef0"
    )
    with pytest.raises(CloudError, match="holds no AMI"):
        Ec2Provider(opts.replace(image="ssm:/no/such/parameter"), moto).image()
    # moto has neither the public Deep Learning AMI parameters nor such images
    with pytest.raises(CloudError, match="pass --image"):
        Ec2Provider(opts.replace(image=None), moto).image()


# -- a full deployment ------------------------------------------------------------------------


@needs_sshd
def test_deploy_creates_exactly_what_it_should_and_stop_removes_it(
    aws: dict[str, Any],
    sshd: Sshd,
    tmp_path: Path,
    modeldir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="studioserve")
    ec2 = aws["ec2"]
    init = CloudInit(ec2, sshd)
    port, grpc_port = free_port(), free_port()
    opts = options(sshd, tmp_path)
    config = ServeConfig(
        key="exp-1", port=port, killafter=300, max_batch_size=16, grpc_port=grpc_port
    )
    dep = deploy(config, modeldir, opts, overrides=overrides(aws, sshd, tmp_path, hooks=(init,)))
    snap = init.snapshot

    # the instance: type, image, terminate-on-shutdown, tags, key, one group, disk, IMDSv2
    inst = snap["instance"]
    assert inst["InstanceType"] == "g6.xlarge"
    assert inst["ImageId"] == aws["ami"]
    assert snap["shutdown"] == "terminate"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["studioserve"] == dep.id
    assert tags["Name"] == f"studioserve-{dep.id}"
    assert inst["KeyName"] == f"studioserve-{dep.id}"
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [g["GroupId"] for g in snap["groups"]]
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    [volume] = snap["volumes"]
    assert volume["Size"] == 100  # --disk-gb's default; the image's snapshot is 15 GB
    assert {t["Key"]: t["Value"] for t in volume["Tags"]}["studioserve"] == dep.id

    # the security group: exactly SSH and the serving ports (HTTP, gRPC), from allow_cidr only
    [group] = snap["groups"]
    rules = sorted(
        (p["IpProtocol"], p["FromPort"], p["ToPort"], tuple(r["CidrIp"] for r in p["IpRanges"]))
        for p in group["IpPermissions"]
    )
    assert rules == sorted(("tcp", p, p, ("198.51.100.7/32",)) for p in (22, port, grpc_port))
    assert not any(p.get("Ipv6Ranges") for p in group["IpPermissions"])

    # the key pair held this deployment's public key, and was deleted after the first login
    [pair] = snap["key_pairs"]
    assert pair["PublicKey"].split()[:2] == dep.key_path.with_suffix(".pub").read_text().split()[:2]
    assert "key_pairs" not in leftovers(ec2)

    # user data: the end command and the boot timer (the launch lease, counted on the
    # instance from its first boot), nothing secret
    user_data = snap["user_data"]
    assert "shutdown -h now" in user_data
    assert f"{LIFETIME_SCRIPT} {int(opts.lease)}\n" in user_data
    assert dep.expires_at.strftime("%Y-%m-%d %H:%M") not in user_data
    assert tags["studioserve:expires"] == dep.expires_at.isoformat()

    # the deployment and the registry
    assert dep.url == f"http://127.0.0.1:{port}"
    assert dep.public_ip == inst["PublicIpAddress"]
    assert dep.region == "us-east-1"
    assert dep.instance_type == "g6.xlarge"
    assert (dep.expires_at - dep.created_at).total_seconds() == 24 * 3600
    assert dep.key_path.stat().st_mode & 0o777 == 0o600
    [record] = list_instances()
    assert (record.id, record.state, record.url) == (dep.id, "running", dep.url)
    assert {r.kind for r in record.resources} == {"instance", "security-group", "local-key"}

    # the server answers with the token only (identity model)
    assert post_json(dep.url, {"a": [1.0, 2.0]}, dep.token) == (200, {"a": [1.0, 2.0]})
    assert post_json(dep.url, {"a": [1.0]}, None)[0] == 401
    assert post_json(dep.url, {"a": [1.0]}, "wrong")[0] == 401

    # and over gRPC (--grpc-port), with the same token
    assert dep.grpc_address == f"127.0.0.1:{grpc_port}"
    assert_grpc_answers(dep.grpc_address, dep.token)

    # what was sent: no token, private key or AWS secret in user data, EC2 state, uploads, logs
    remote = tmp_path / "remote"
    token_file = remote / "token"
    assert token_file.read_text().strip() == dep.token
    assert token_file.stat().st_mode & 0o777 == 0o600
    blobs: dict[str, bytes | str] = {
        "user data": user_data,
        "EC2 state": json.dumps(snap, default=str),
        "log output": caplog.text,
    }
    for path in files_under(remote, skip={"venv", "token", "serve.log"}):
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    blobs[f"{path.name}!{name}"] = zf.read(name)
        else:
            blobs[str(path)] = path.read_bytes()
    assert any("run.sh" in k for k in blobs)
    assert any(".whl!" in k for k in blobs)
    assert_no_secrets(
        blobs,
        {
            "token": dep.token,
            "private key": private_key_body(dep.key_path),
            "AWS secret": AWS_SECRET,
        },
    )
    run_sh = (remote / "run.sh").read_text()
    assert "--token-file" in run_sh
    assert "--killafter 300 " in run_sh
    assert "--max-batch-size 16 " in run_sh
    assert re.search(rf"--grpc-port {grpc_port}\b", run_sh)

    # stop: everything goes, including the local key
    lines = stop_instances([dep.id])
    text = "\n".join(lines)
    assert f"terminated EC2 instance {dep.instance_id}" in text
    assert f"deleted security group {group['GroupId']}" in text
    assert "deleted the local SSH key" in text
    assert leftovers(ec2) == {}
    assert list_instances() == []
    assert local_keys() == []
    # (this machine stood in for the instance, so its server is still running: the autouse
    # fixture stops it, as terminating the instance would have)


@needs_sshd
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_removes_everything(
    step: str, aws: dict[str, Any], sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    ec2 = aws["ec2"]

    def fail(name: str, ctx: StepContext) -> None:
        if name == step:
            raise RuntimeError(f"injected failure before {name}")

    ovr = overrides(aws, sshd, tmp_path, hooks=(CloudInit(ec2, sshd), fail))
    with pytest.raises(DeploymentFailed) as info:
        deploy(
            ServeConfig(key="exp", port=free_port(), killafter=30),
            modeldir,
            options(sshd, tmp_path),
            overrides=ovr,
        )
    err = info.value
    assert err.step == step
    assert not err.interrupted
    assert "injected failure" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    summary = "\n".join(err.summary)
    assert "deleted the local SSH key" in summary
    if STEPS.index(step) > 0:
        assert "terminated EC2 instance" in summary
        assert "deleted security group" in summary
    if 0 < STEPS.index(step) <= STEPS.index("wait_ssh"):
        assert "deleted EC2 key pair" in summary
    assert leftovers(ec2) == {}
    assert list_instances(refresh=False) == []
    assert local_keys() == []
    pid_file = tmp_path / "remote" / "serve.pid"
    if STEPS.index(step) > STEPS.index("start"):
        # the server had started: the rollback stopped it
        pid = int(pid_file.read_text())
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the remote server to stop")
    else:
        assert not pid_file.exists()


@needs_sshd
def test_ctrl_c_during_launch_rolls_back_and_says_so(
    aws: dict[str, Any], sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    def interrupt(name: str, ctx: StepContext) -> None:
        if name == "open_port":
            raise KeyboardInterrupt

    ovr = overrides(aws, sshd, tmp_path, hooks=(interrupt,))
    with pytest.raises(DeploymentFailed, match=r"interrupted \(Ctrl-C\)") as info:
        deploy(
            ServeConfig(key="exp", port=free_port()),
            modeldir,
            options(sshd, tmp_path),
            overrides=ovr,
        )
    assert info.value.interrupted
    assert leftovers(aws["ec2"]) == {}
    assert local_keys() == []


@needs_sshd
def test_a_host_key_other_than_the_reported_one_is_refused(
    aws: dict[str, Any], sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    _, other_key = new_host_key(tmp_path, "other")
    ovr = overrides(aws, sshd, tmp_path, host_key=other_key, hooks=(CloudInit(aws["ec2"], sshd),))
    with pytest.raises(DeploymentFailed) as info:
        deploy(
            ServeConfig(key="exp", port=free_port()),
            modeldir,
            options(sshd, tmp_path),
            overrides=ovr,
        )
    assert info.value.step == "wait_ssh"
    assert isinstance(info.value.__cause__, HostKeyMismatch)
    assert "refusing to connect" in str(info.value)
    assert leftovers(aws["ec2"]) == {}


def test_an_api_error_mid_launch_removes_what_was_made(
    aws: dict[str, Any], faults: FaultProxy, modeldir: Path
) -> None:
    # an error no other zone or type can cure: the launch stops at once and rolls back
    faults.fail("RunInstances", "InvalidBlockDeviceMapping", "The device name is invalid.")
    with pytest.raises(DeploymentFailed, match="EC2 launch failed") as info:
        deploy(ServeConfig(key="exp"), modeldir, api_options(), overrides=api_overrides(faults.url))
    assert info.value.step == "launch"
    assert len(faults.seen("RunInstances")) == 1
    summary = "\n".join(info.value.summary)
    assert "deleted security group" in summary
    assert "deleted EC2 key pair" in summary
    assert leftovers(aws["ec2"]) == {}


def test_no_zone_with_the_type_is_a_clear_error_and_leaves_nothing(
    aws: dict[str, Any], faults: FaultProxy, modeldir: Path
) -> None:
    faults.fail(
        "RunInstances",
        "InsufficientInstanceCapacity",
        "We currently do not have sufficient g5.xlarge capacity.",
        status=500,
        when=lambda params: params.get("InstanceType") == "g5.xlarge",
    )
    faults.fail("RunInstances", "Unsupported", "The requested configuration is not supported.")
    with pytest.raises(DeploymentFailed) as info:
        deploy(
            ServeConfig(key="exp"),
            modeldir,
            api_options(instance_type="g6.xlarge,g5.xlarge"),
            overrides=api_overrides(faults.url),
        )
    message = str(info.value)
    assert info.value.step == "launch"
    assert "g6.xlarge in us-east-1a: Unsupported" in message
    assert "g5.xlarge in us-east-1f: InsufficientInstanceCapacity" in message
    assert "AWS's capacity, not your account's quota" in message
    assert len(faults.seen("RunInstances")) == 10  # 5 zones offer each type
    assert leftovers(aws["ec2"]) == {}
    assert local_keys() == []


def test_an_unknown_instance_type_fails_before_anything_is_made(
    aws: dict[str, Any], modeldir: Path
) -> None:
    with pytest.raises(ConfigError, match="no instance type zz9.nosuch"):
        deploy(
            ServeConfig(key="exp"),
            modeldir,
            api_options(instance_type="g6.xlarge,zz9.nosuch"),
            overrides=api_overrides(aws["url"]),
        )
    assert leftovers(aws["ec2"]) == {}
    assert local_keys() == []


def test_list_cleans_up_after_instances_that_ended_and_dead_launches(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    """An instance that terminated itself leaves its security group; a launch whose process
    died leaves whatever it had made. ``list_instances`` removes both."""
    ec2 = aws["ec2"]
    provider = Ec2Provider(
        CloudOptions(cloud="ec2", image="ssm:" + AMI_PARAMETER),
        Overrides(endpoint_url=aws["url"], poll_interval=0.05),
    )
    now = utcnow()
    made: dict[str, list[Resource]] = {}
    for dep in ("ss-0000aaaa", "ss-0000bbbb"):
        spec = LaunchSpec(
            deployment_id=dep,
            public_key=generate_keypair(tmp_path, dep).public_key,
            ssh_user="ubuntu",
            port=5000,
            allow_cidr="198.51.100.7/32",
            created_at=now,
            expires_at=now,
        )
        provider.launch(spec, made.setdefault(dep, []).append)
    ended, dead = "ss-0000aaaa", "ss-0000bbbb"
    ended_instance = next(r.id for r in made[ended] if r.kind == "instance")
    ec2.terminate_instances(InstanceIds=[ended_instance])  # as its own shutdown would
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    registry = Registry()
    registry.upsert(
        InstanceRecord(
            id=ended,
            cloud="ec2",
            state="running",
            instance_id=ended_instance,
            region="us-east-1",
            endpoint_url=aws["url"],
            created_at=now.isoformat(),
            resources=made[ended],
        )
    )
    registry.upsert(
        InstanceRecord(
            id=dead,
            cloud="ec2",
            state="launching",
            region="us-east-1",
            endpoint_url=aws["url"],
            created_at=now.isoformat(),
            pid=int(gone.stdout),
            host=socket.gethostname(),
            resources=[r for r in made[dead] if r.kind == "key-pair"],  # the rest: by tag
        )
    )
    assert leftovers(ec2) != {}
    assert list_instances() == []
    assert leftovers(ec2) == {}
    assert registry.load() == []


# -- --subnet: a VPC other than the default one -------------------------------------------------


@needs_sshd
def test_deploy_into_a_subnet_of_another_vpc(
    aws: dict[str, Any], sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    ec2 = aws["ec2"]
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    # a zone that offers the default type (moto picks one at random otherwise, us-east-1e
    # among them, where g6.xlarge is not sold)
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone="us-east-1a")[
        "Subnet"
    ]["SubnetId"]
    init = CloudInit(ec2, sshd)
    dep = deploy(
        ServeConfig(key="exp", port=free_port(), killafter=300),
        modeldir,
        options(sshd, tmp_path, subnet=subnet),
        overrides=overrides(aws, sshd, tmp_path, hooks=(init,)),
    )
    inst = init.snapshot["instance"]
    [group] = init.snapshot["groups"]
    assert (inst["SubnetId"], inst["VpcId"]) == (subnet, vpc)
    assert group["VpcId"] == vpc
    [eni] = inst["NetworkInterfaces"]
    assert eni["SubnetId"] == subnet
    assert [g["GroupId"] for g in eni["Groups"]] == [group["GroupId"]]
    assert inst["PublicIpAddress"]  # asked for, whatever the subnet's default
    assert post_json(dep.url, {"a": [1.0]}, dep.token) == (200, {"a": [1.0]})
    text = "\n".join(stop_instances([dep.id]))
    assert f"deleted security group {group['GroupId']}" in text
    assert leftovers(ec2) == {}


def test_an_unknown_subnet_is_a_clear_error_and_leaves_nothing(
    aws: dict[str, Any], modeldir: Path
) -> None:
    opts = api_options(subnet="subnet-0123456789abcdef0")
    # found by the preflight: nothing is created
    with pytest.raises(CloudError, match="subnet subnet-0123456789abcdef0 does not exist"):
        deploy(ServeConfig(key="exp"), modeldir, opts, overrides=api_overrides(aws["url"]))
    assert leftovers(aws["ec2"]) == {}
    assert list_instances(refresh=False) == []
    assert local_keys() == []


def test_no_default_vpc_names_the_subnet_option(aws: dict[str, Any], modeldir: Path) -> None:
    ec2 = aws["ec2"]
    [default] = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    for sn in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [default["VpcId"]]}])[
        "Subnets"
    ]:
        ec2.delete_subnet(SubnetId=sn["SubnetId"])
    ec2.delete_vpc(VpcId=default["VpcId"])
    with pytest.raises(CloudError, match="no default VPC; pass --subnet"):
        deploy(ServeConfig(key="exp"), modeldir, api_options(), overrides=api_overrides(aws["url"]))
    assert leftovers(ec2) == {}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"subnet": "sub-123"}, "is not an EC2 subnet id"),
        ({"subnet": "subnet-0123456789abcdef0", "cloud": "gcloud"}, "--subnet is for --cloud ec2"),
    ],
)
def test_subnet_option_is_checked_up_front(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"cloud": "ec2", **changes}
    with pytest.raises(ConfigError, match=message):
        CloudOptions(**fields)
