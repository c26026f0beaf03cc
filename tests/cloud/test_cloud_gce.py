"""The GCE provider against a loopback fake of the Compute REST API (tests/fakes/gce_fake.py), via
google-cloud-compute's REST transport with a custom api_endpoint and anonymous credentials,
and a real sshd on loopback standing in for the instance."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from studioserve.cloud import (
    STEPS,
    CloudOptions,
    DeploymentFailed,
    StepContext,
    deploy,
    list_instances,
    stop_instances,
)
from studioserve.cloud.base import InstanceInfo, LaunchSpec, Resource, utcnow
from studioserve.cloud.deploy import InstanceRecord, _Registry
from studioserve.cloud.gce import GceProvider, choose_machine
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
    post_json,
    private_key_body,
    wait_for,
)
from tests.fakes.gce_fake import GceFake

PROJECT = "studio-test"
ZONE = "europe-west4-a"


@pytest.fixture
def gce() -> Iterator[GceFake]:
    with GceFake() as fake:
        yield fake


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("OpenSSH server missing (apt-get install openssh-server)")
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(autouse=True)
def stop_leftover_servers(tmp_path: Path) -> Iterator[None]:
    yield
    kill_leftover(tmp_path / "remote")


@pytest.fixture
def modeldir(tmp_path: Path) -> Path:
    path = tmp_path / "modeldir"
    path.mkdir()
    (path / "README").write_text("no checkpoint: identity model\n")
    return path


class GuestAgent:
    """A hook standing in for the guest agent: at wait_ssh it installs the ssh-keys metadata
    entry the API holds into the sshd's authorized_keys, and snapshots the API's state."""

    def __init__(self, fake: GceFake, sshd: Sshd) -> None:
        self.fake = fake
        self.sshd = sshd
        self.snapshot: dict[str, Any] = {}

    def __call__(self, step: str, ctx: StepContext) -> None:
        if step != "wait_ssh":
            return
        [instance] = self.fake.all_instances()
        items = {i["key"]: i["value"] for i in instance["metadata"]["items"]}
        user, key = items["ssh-keys"].split(":", 1)
        assert user == self.sshd.user
        self.sshd.authorize(key)
        self.snapshot = {"instance": instance, "firewalls": self.fake.all_firewalls()}


def options(fake: GceFake, sshd: Sshd, tmp_path: Path, **changes: Any) -> CloudOptions:
    fields = local_instance_options(sshd, tmp_path / "remote", tmp_path / "ended")
    fields.update(
        cloud="gcloud",
        gpus=1,
        project=PROJECT,
        zone=ZONE,
        endpoint_url=fake.url,
        anonymous=True,
    )
    fields.update(changes)
    return CloudOptions(**fields)


def leftovers(fake: GceFake) -> dict[str, list[str]]:
    found = {
        "instances": [i["name"] for i in fake.all_instances()],
        "firewalls": [f["name"] for f in fake.all_firewalls()],
    }
    return {k: v for k, v in found.items() if v}


def local_keys() -> list[str]:
    folder = config_dir() / "keys"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- choices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "accelerator", "machine_type", "expected"),
    [
        (0, None, None, ("n2-standard-4", None, 0)),
        (1, None, None, ("g2-standard-4", None, 0)),
        (3, "nvidia-l4", None, ("g2-standard-48", None, 0)),
        (1, "nvidia-tesla-a100", None, ("a2-highgpu-1g", None, 0)),
        (8, "nvidia-h100-80gb", None, ("a3-highgpu-8g", None, 0)),
        (2, "nvidia-tesla-t4", None, ("n1-standard-16", "nvidia-tesla-t4", 2)),
        (1, None, "n1-standard-4", ("n1-standard-4", "nvidia-tesla-t4", 1)),
        (1, None, "g2-standard-8", ("g2-standard-8", None, 0)),
    ],
)
def test_machine_follows_gpus(
    gpus: int, accelerator: str | None, machine_type: str | None, expected: tuple[Any, ...]
) -> None:
    assert choose_machine(gpus, accelerator, machine_type) == expected


def test_machine_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="--machine-type"):
        choose_machine(1, "nvidia-tesla-k80")
    with pytest.raises(ConfigError, match="at most 8"):
        choose_machine(16, "nvidia-l4")


# -- full deployments -------------------------------------------------------------------------


@needs_sshd
def test_deploy_then_killafter_ends_it_and_nothing_is_left(
    gce: GceFake, sshd: Sshd, tmp_path: Path, modeldir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="studioserve")
    gce.host_keys = [sshd.host_key]  # published as guest attributes: nothing pinned by hand
    agent = GuestAgent(gce, sshd)
    port = free_port()
    opts = options(gce, sshd, tmp_path, hooks=(agent,), max_lifetime=3600)
    dep = deploy(ServeConfig(key="exp", port=port, killafter=6), modeldir, opts)
    assert post_json(dep.url, {"a": [3.0]}, dep.token) == (200, {"a": [3.0]})
    assert post_json(dep.url, {"a": [3.0]}, None)[0] == 401

    name = "studioserve-" + dep.id.removeprefix("ss-")
    inst = agent.snapshot["instance"]
    assert inst["name"] == name == dep.instance_id
    assert inst["machineType"] == f"zones/{ZONE}/machineTypes/g2-standard-4"
    assert "guestAccelerators" not in inst  # g2 machines come with their L4
    assert inst["labels"] == {"studioserve": dep.id}
    assert inst["tags"]["items"] == [name]
    [disk] = inst["disks"]
    assert disk["boot"] is True
    assert disk["autoDelete"] is True
    assert disk["initializeParams"]["sourceImage"].startswith(
        "projects/deeplearning-platform-release/global/images/family/common-cu"
    )
    scheduling = inst["scheduling"]
    assert scheduling["instanceTerminationAction"] == "DELETE"
    assert int(scheduling["maxRunDuration"]["seconds"]) == 3600
    assert scheduling["onHostMaintenance"] == "TERMINATE"
    assert scheduling["automaticRestart"] is False
    assert inst["serviceAccounts"] == [
        {"email": "default", "scopes": ["https://www.googleapis.com/auth/compute"]}
    ]
    metadata = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
    assert set(metadata) == {
        "ssh-keys",
        "startup-script",
        "enable-guest-attributes",
        "enable-oslogin",
        "block-project-ssh-keys",
        "install-nvidia-driver",
    }
    assert (
        metadata["ssh-keys"]
        == f"{sshd.user}:{dep.key_path.with_suffix('.pub').read_text().strip()}"
    )
    assert "/instances/" in metadata["startup-script"]  # the self-delete through the API
    [rule] = agent.snapshot["firewalls"]
    assert rule["name"] == name
    assert rule["direction"] == "INGRESS"
    assert rule["sourceRanges"] == ["198.51.100.7/32"]
    assert rule["targetTags"] == [name]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["22", str(port)]}]
    assert rule["network"] == "global/networks/default"
    assert dep.zone == ZONE
    assert dep.project == PROJECT
    assert dep.public_ip is not None
    assert dep.public_ip.startswith("203.0.113.")

    # long-running operations were awaited with explicit wait calls against the fake
    paths = [(r.method, r.path) for r in gce.request_log()]
    assert any(
        m == "POST" and f"/zones/{ZONE}/operations/" in p and p.endswith("/wait") for m, p in paths
    )
    assert any(m == "POST" and "/global/operations/" in p and p.endswith("/wait") for m, p in paths)

    # nothing secret in any request, upload or log line
    remote = tmp_path / "remote"
    blobs: dict[str, bytes | str] = {
        f"{r.method} {r.path} #{n}": r.body + json.dumps(r.query)
        for n, r in enumerate(gce.request_log())
    }
    blobs["log output"] = caplog.text
    for path in files_under(remote, skip={"venv", "token", "serve.log"}):
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as zf:
                blobs.update({f"{path.name}!{n}": zf.read(n) for n in zf.namelist()})
        else:
            blobs[str(path)] = path.read_bytes()
    assert_no_secrets(blobs, {"token": dep.token, "private key": private_key_body(dep.key_path)})

    # the server exits after --killafter and runs the end command (here: a marker file)...
    wait_for((tmp_path / "ended").exists, 60, "the server to exit after --killafter")
    # ...which on GCE deletes the instance through the API; say its firewall DELETE failed:
    gce.remove_instance(name)
    assert leftovers(gce) == {"firewalls": [name]}
    assert list_instances() == []  # the leftover rule is found and removed
    assert leftovers(gce) == {}
    assert local_keys() == []


@needs_sshd
def test_stop_instances_removes_instance_and_firewall(
    gce: GceFake, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    gce.host_keys = [sshd.host_key]
    opts = options(gce, sshd, tmp_path, hooks=(GuestAgent(gce, sshd),), gpus=0)
    dep = deploy(ServeConfig(key="exp", port=free_port(), killafter=300), modeldir, opts)
    [inst] = gce.all_instances()
    assert inst["machineType"].endswith("/n2-standard-4")
    assert inst["scheduling"]["onHostMaintenance"] == "MIGRATE"
    assert "ubuntu-os-cloud" in inst["disks"][0]["initializeParams"]["sourceImage"]
    [record] = list_instances("gcloud")
    assert record.state == "running"
    assert list_instances("ec2") == []
    lines = stop_instances([dep.instance_id])  # an instance name works as well as the id
    text = "\n".join(lines)
    assert f"deleted GCE instance {dep.instance_id}" in text
    assert f"deleted firewall rule {dep.instance_id}" in text
    assert leftovers(gce) == {}
    assert list_instances() == []
    assert local_keys() == []


@needs_sshd
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_removes_everything(
    step: str, gce: GceFake, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    gce.host_keys = [sshd.host_key]

    def fail(name: str, ctx: StepContext) -> None:
        if name == step:
            raise RuntimeError(f"injected failure before {name}")

    opts = options(gce, sshd, tmp_path, hooks=(GuestAgent(gce, sshd), fail))
    with pytest.raises(DeploymentFailed) as info:
        deploy(ServeConfig(key="exp", port=free_port(), killafter=30), modeldir, opts)
    err = info.value
    assert err.step == step
    assert isinstance(err.__cause__, RuntimeError)
    summary = "\n".join(err.summary)
    if STEPS.index(step) > 0:
        assert "deleted GCE instance" in summary
    if STEPS.index(step) > STEPS.index("open_port"):
        assert "deleted firewall rule" in summary
    assert leftovers(gce) == {}
    assert list_instances(refresh=False) == []
    assert local_keys() == []
    if STEPS.index(step) > STEPS.index("start"):
        pid = int((tmp_path / "remote" / "serve.pid").read_text())
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the remote server to stop")


def test_an_api_error_opening_the_port_removes_the_instance(
    gce: GceFake, tmp_path: Path, modeldir: Path
) -> None:
    gce.fail(
        "POST",
        r"/global/firewalls$",
        status=403,
        message="Quota 'FIREWALLS' exceeded. Limit: 200.0 globally.",
        reason="quotaExceeded",
    )
    opts = CloudOptions(
        cloud="gcloud",
        project=PROJECT,
        zone=ZONE,
        endpoint_url=gce.url,
        anonymous=True,
        allow_cidr="198.51.100.7/32",
    )
    with pytest.raises(DeploymentFailed, match="quota") as info:
        deploy(ServeConfig(key="exp"), modeldir, opts)
    assert info.value.step == "open_port"
    assert any("deleted GCE instance" in line for line in info.value.summary)
    assert leftovers(gce) == {}


def test_a_failed_insert_operation_is_reported_and_cleaned(
    gce: GceFake, tmp_path: Path, modeldir: Path
) -> None:
    gce.fail(
        "POST",
        rf"/zones/{ZONE}/instances$",
        message="The zone does not have enough resources available to fulfill the request.",
        reason="ZONE_RESOURCE_POOL_EXHAUSTED",
        in_operation=True,
    )
    opts = CloudOptions(
        cloud="gcloud",
        project=PROJECT,
        zone=ZONE,
        endpoint_url=gce.url,
        anonymous=True,
        allow_cidr="198.51.100.7/32",
    )
    with pytest.raises(DeploymentFailed, match="try another --zone") as info:
        deploy(ServeConfig(key="exp"), modeldir, opts)
    assert info.value.step == "launch"
    assert leftovers(gce) == {}
    assert local_keys() == []


def _launch(
    provider: GceProvider, deployment_id: str, key_dir: Path
) -> tuple[InstanceInfo, list[Resource]]:
    now = utcnow()
    spec = LaunchSpec(
        deployment_id=deployment_id,
        public_key=generate_keypair(key_dir, deployment_id).public_key,
        ssh_user="studioserve",
        port=5000,
        allow_cidr="198.51.100.7/32",
        created_at=now,
        expires_at=now,
    )
    made: list[Resource] = []
    info = provider.launch(spec, made.append)
    provider.open_ports(spec, info, made.append)
    return info, made


def test_host_keys_come_from_guest_attributes_or_the_serial_console(
    gce: GceFake, tmp_path: Path
) -> None:
    provider = GceProvider(
        CloudOptions(
            cloud="gcloud", project=PROJECT, zone=ZONE, endpoint_url=gce.url, anonymous=True
        ),
        poll_interval=0.01,
    )
    info, _ = _launch(provider, "ss-0000cccc", tmp_path)
    with pytest.raises(CloudError, match="did not publish its SSH host keys"):
        provider.host_keys(info, timeout=0.05)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTheTestOnly0000000000000000"
    gce.host_keys = [key]
    assert provider.host_keys(info, timeout=5) == [key]
    gce.guest_attributes = False  # an image without the guest agent's host key attributes
    assert provider.host_keys(info, timeout=5) == [key]


def test_list_deletes_a_gce_instance_that_stopped_instead_of_deleting_itself(
    gce: GceFake, tmp_path: Path
) -> None:
    opts = CloudOptions(
        cloud="gcloud", project=PROJECT, zone=ZONE, endpoint_url=gce.url, anonymous=True
    )
    info, made = _launch(GceProvider(opts), "ss-0000dddd", tmp_path)
    _Registry().upsert(
        InstanceRecord(
            id="ss-0000dddd",
            cloud="gcloud",
            state="running",
            instance_id=info.instance_id,
            zone=ZONE,
            project=PROJECT,
            endpoint_url=gce.url,
            anonymous=True,
            created_at=utcnow().isoformat(),
            resources=made,
        )
    )
    [record] = list_instances()
    assert record.state == "running"
    gce.set_status(info.instance_id, "TERMINATED")  # its API delete failed; it only powered off
    assert list_instances() == []
    assert leftovers(gce) == {}
