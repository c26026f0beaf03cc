"""The EC2 provider against moto's server (boto3 pointed at it with endpoint_url), with a real
sshd on loopback standing in for the instance. Nothing here connects to moto's fake public
addresses: SSH and HTTP go to 127.0.0.1 (CloudOptions.connect_host)."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from studioserve.cloud import (
    STEPS,
    CloudOptions,
    DeploymentFailed,
    HostKeyMismatch,
    StepContext,
    deploy,
    list_instances,
    stop_instances,
)
from studioserve.cloud.base import LaunchSpec, Resource, utcnow
from studioserve.cloud.deploy import InstanceRecord, _Registry
from studioserve.cloud.ec2 import Ec2Provider, choose_instance_type
from studioserve.cloud.ssh import generate_keypair
from studioserve.config import ServeConfig, config_dir
from studioserve.errors import CloudError, ConfigError
from tests.cloud.helpers import (
    Sshd,
    assert_no_secrets,
    files_under,
    free_port,
    kill_leftover,
    local_instance_options,
    needs_sshd,
    new_host_key,
    post_json,
    private_key_body,
    wait_for,
)

AMI_PARAMETER = "/studioserve-test/dlami"
AWS_SECRET = "fake-aws-secret-3c1f9a77d2"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("OpenSSH server missing (apt-get install openssh-server)")
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A clean moto account, clients, and an AMI published under a test SSM parameter."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    urllib.request.urlopen(urllib.request.Request(moto_url + "/moto-api/reset", method="POST"))
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name="us-east-1")
    ssm = boto3.client("ssm", endpoint_url=moto_url, region_name="us-east-1")
    ubuntu = "ubuntu/images/hvm-ssd/ubuntu-xenial-16.04-amd64-server-20170721"
    ami = ec2.describe_images(Filters=[{"Name": "name", "Values": [ubuntu]}])["Images"][0][
        "ImageId"
    ]
    ssm.put_parameter(Name=AMI_PARAMETER, Value=ami, Type="String")
    return {"url": moto_url, "ec2": ec2, "ssm": ssm, "ami": ami}


def leftovers(ec2: Any) -> dict[str, list[str]]:
    """Everything studioserve-made that still exists (terminated instances do not count)."""
    instances = [
        i["InstanceId"]
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    groups = [
        g["GroupId"]
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if g["GroupName"].startswith("studioserve")
        or any(t["Key"] == "studioserve" for t in g.get("Tags", []))
    ]
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]]
    volumes = [v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]]
    found = {
        "instances": instances,
        "security_groups": groups,
        "key_pairs": keys,
        "volumes": volumes,
    }
    return {k: v for k, v in found.items() if v}


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


def options(aws: dict[str, Any], sshd: Sshd, tmp_path: Path, **changes: Any) -> CloudOptions:
    fields = local_instance_options(sshd, tmp_path / "remote", tmp_path / "ended")
    fields.update(
        cloud="ec2",
        gpus=1,
        image="ssm:" + AMI_PARAMETER,
        endpoint_url=aws["url"],
        region="us-east-1",
        host_key=sshd.host_key,  # moto's console output has no host keys: pin the sshd's
    )
    fields.update(changes)
    return CloudOptions(**fields)


def api_options(aws: dict[str, Any], **changes: Any) -> CloudOptions:
    """Options for a launch that fails at the EC2 API, before any SSH (no sshd needed)."""
    fields: dict[str, Any] = {
        "cloud": "ec2",
        "image": "ssm:" + AMI_PARAMETER,
        "endpoint_url": aws["url"],
        "allow_cidr": "198.51.100.7/32",
        "connect_host": "127.0.0.1",
    }
    fields.update(changes)
    return CloudOptions(**fields)


@pytest.fixture(autouse=True)
def stop_leftover_servers(tmp_path: Path) -> Iterator[None]:
    """A failing test may leave a server it started on this machine: stop it."""
    yield
    kill_leftover(tmp_path / "remote")


@pytest.fixture
def modeldir(tmp_path: Path) -> Path:
    """An empty modeldir: the server serves the identity model (fast to start)."""
    path = tmp_path / "modeldir"
    path.mkdir()
    (path / "README").write_text("no checkpoint: identity model\n")
    return path


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
    opts = CloudOptions(cloud="ec2", image="ssm:" + AMI_PARAMETER, endpoint_url=aws["url"])
    assert Ec2Provider(opts).image() == aws["ami"]
    assert (
        Ec2Provider(opts.replace(image="ami-0123456789abcdef0")).image() == "ami-0123456789abcdef0"
    )
    with pytest.raises(CloudError, match="holds no AMI"):
        Ec2Provider(opts.replace(image="ssm:/no/such/parameter")).image()
    # moto has neither the public Deep Learning AMI parameters nor such images
    with pytest.raises(CloudError, match="pass --image"):
        Ec2Provider(opts.replace(image=None)).image()


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
    port = free_port()
    opts = options(aws, sshd, tmp_path, hooks=(init,))
    config = ServeConfig(key="exp-1", port=port, killafter=300, max_batch_size=16)
    dep = deploy(config, modeldir, opts)
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
    assert volume["Size"] == 100
    assert {t["Key"]: t["Value"] for t in volume["Tags"]}["studioserve"] == dep.id

    # the security group: exactly SSH and the serving port, from allow_cidr only
    [group] = snap["groups"]
    rules = sorted(
        (p["IpProtocol"], p["FromPort"], p["ToPort"], tuple(r["CidrIp"] for r in p["IpRanges"]))
        for p in group["IpPermissions"]
    )
    assert rules == sorted(
        [("tcp", 22, 22, ("198.51.100.7/32",)), ("tcp", port, port, ("198.51.100.7/32",))]
    )
    assert not any(p.get("Ipv6Ranges") for p in group["IpPermissions"])

    # the key pair held this deployment's public key, and was deleted after the first login
    [pair] = snap["key_pairs"]
    assert pair["PublicKey"].split()[:2] == dep.key_path.with_suffix(".pub").read_text().split()[:2]
    assert "key_pairs" not in leftovers(ec2)

    # user data: the end command and the max-lifetime timer, nothing secret
    user_data = snap["user_data"]
    assert "shutdown -h now" in user_data
    assert "OnCalendar=" + dep.expires_at.strftime("%Y-%m-%d %H:%M:%S UTC") in user_data

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

    opts = options(aws, sshd, tmp_path, hooks=(CloudInit(ec2, sshd), fail))
    with pytest.raises(DeploymentFailed) as info:
        deploy(ServeConfig(key="exp", port=free_port(), killafter=30), modeldir, opts)
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

    opts = options(aws, sshd, tmp_path, hooks=(interrupt,))
    with pytest.raises(DeploymentFailed, match=r"interrupted \(Ctrl-C\)") as info:
        deploy(ServeConfig(key="exp", port=free_port()), modeldir, opts)
    assert info.value.interrupted
    assert leftovers(aws["ec2"]) == {}
    assert local_keys() == []


@needs_sshd
def test_a_host_key_other_than_the_reported_one_is_refused(
    aws: dict[str, Any], sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    _, other_key = new_host_key(tmp_path, "other")
    opts = options(aws, sshd, tmp_path, host_key=other_key, hooks=(CloudInit(aws["ec2"], sshd),))
    with pytest.raises(DeploymentFailed) as info:
        deploy(ServeConfig(key="exp", port=free_port()), modeldir, opts)
    assert info.value.step == "wait_ssh"
    assert isinstance(info.value.__cause__, HostKeyMismatch)
    assert "refusing to connect" in str(info.value)
    assert leftovers(aws["ec2"]) == {}


def test_an_api_error_mid_launch_removes_what_was_made(
    aws: dict[str, Any], tmp_path: Path, modeldir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moto.settings

    # make the fake API reject unknown instance types, as EC2 does
    monkeypatch.setattr(moto.settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)
    opts = api_options(aws, instance_type="zz9.nosuch")
    with pytest.raises(DeploymentFailed, match="EC2 launch failed") as info:
        deploy(ServeConfig(key="exp"), modeldir, opts)
    assert info.value.step == "launch"
    summary = "\n".join(info.value.summary)
    assert "deleted security group" in summary
    assert "deleted EC2 key pair" in summary
    assert leftovers(aws["ec2"]) == {}


def test_list_cleans_up_after_instances_that_ended_and_dead_launches(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    """An instance that terminated itself leaves its security group; a launch whose process
    died leaves whatever it had made. ``list_instances`` removes both."""
    ec2 = aws["ec2"]
    provider = Ec2Provider(
        CloudOptions(cloud="ec2", image="ssm:" + AMI_PARAMETER, endpoint_url=aws["url"])
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
    registry = _Registry()
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
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24")["Subnet"]["SubnetId"]
    init = CloudInit(ec2, sshd)
    opts = options(aws, sshd, tmp_path, subnet=subnet, hooks=(init,))
    dep = deploy(ServeConfig(key="exp", port=free_port(), killafter=300), modeldir, opts)
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
    opts = api_options(aws, subnet="subnet-0123456789abcdef0")
    with pytest.raises(DeploymentFailed, match="subnet subnet-0123456789abcdef0 does not exist"):
        deploy(ServeConfig(key="exp"), modeldir, opts)
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
    opts = api_options(aws)
    with pytest.raises(DeploymentFailed, match="no default VPC; pass --subnet"):
        deploy(ServeConfig(key="exp"), modeldir, opts)
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
