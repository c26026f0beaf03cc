"""The GCE provider against a loopback fake of the Compute REST API and metadata server
(tests/fakes/gce_fake.py), via google-cloud-compute's REST transport with a custom
api_endpoint and anonymous credentials, and a real sshd on loopback standing in for the
instance."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.api_core.exceptions as gexc
import pytest
from google.cloud import compute_v1

from studioserve.cloud import (
    STEPS,
    CloudOptions,
    DeploymentFailed,
    Overrides,
    StepContext,
    deploy,
    list_instances,
    stop_instances,
)
from studioserve.cloud.base import Resource, utcnow
from studioserve.cloud.gce import GceProvider
from studioserve.cloud.gce_catalog import choose_machine, gpu_description
from studioserve.cloud.gce_scripts import end_body
from studioserve.cloud.registry import InstanceRecord, Registry
from studioserve.config import ServeConfig, config_dir
from studioserve.errors import CloudError, ConfigError
from tests.cloud.helpers import (
    Sshd,
    assert_no_secrets,
    files_under,
    free_port,
    local_instance_options,
    local_instance_overrides,
    needs_sshd,
    post_json,
    private_key_body,
    wait_for,
)
from tests.fakes.gce_fake import GceFake, fake_provider, launch_spec

PROJECT = "studio-test"
ZONE = "europe-west4-a"
DAY = 24 * 3600.0


@pytest.fixture
def gce() -> Iterator[GceFake]:
    with GceFake() as fake:
        yield fake


def provider(fake: GceFake, **options: Any) -> GceProvider:
    result: GceProvider = fake_provider(fake, project=PROJECT, zone=ZONE, **options)
    return result


def launched(p: GceProvider, deployment_id: str, **spec: Any) -> dict[str, Any]:
    """Launch through the provider (instance and firewall rule); the fake's instance."""
    launch = launch_spec(deployment_id, **spec)
    info = p.launch(launch, lambda r: None)
    p.open_ports(launch, info, lambda r: None)
    return {"info": info, "spec": launch}


def only_instance(fake: GceFake) -> dict[str, Any]:
    [inst] = fake.all_instances()
    return inst


def writes(fake: GceFake) -> list[str]:
    """Every request that could create or change something (not GETs, polls or metadata)."""
    return [
        f"{r.method} {r.path}"
        for r in fake.request_log()
        if r.method != "GET"
        and "/operations/" not in r.path
        and not r.path.endswith(("getIamPolicy", "testIamPermissions"))
    ]


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


def options(sshd: Sshd, tmp_path: Path, **changes: Any) -> CloudOptions:
    fields = local_instance_options(sshd)
    fields.update(cloud="gcloud", gpus=1, project=PROJECT, zone=ZONE)
    fields.update(changes)
    return CloudOptions(**fields)


def overrides(fake: GceFake, sshd: Sshd, tmp_path: Path, **changes: Any) -> Overrides:
    return local_instance_overrides(
        sshd,
        tmp_path / "remote",
        tmp_path / "ended",
        endpoint_url=fake.url,
        anonymous=True,
        metadata_url=fake.url,
        **changes,
    )


def api_only(fake: GceFake) -> Overrides:
    return Overrides(
        endpoint_url=fake.url, anonymous=True, metadata_url=fake.url, poll_interval=0.01
    )


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


@pytest.mark.parametrize(
    ("gpus", "accelerator", "machine_type", "expected"),
    [
        (0, None, None, None),
        (1, None, None, "1x NVIDIA L4"),
        (4, "nvidia-l4", None, "4x NVIDIA L4"),
        (1, "nvidia-tesla-a100", None, "1x NVIDIA A100 40GB"),
        (16, "nvidia-tesla-a100", None, "16x NVIDIA A100 40GB"),
        (2, "nvidia-a100-80gb", None, "2x NVIDIA A100 80GB"),
        (8, "nvidia-h100-80gb", None, "8x NVIDIA H100 80GB"),
        (2, "nvidia-tesla-t4", None, "2x NVIDIA T4"),
        (1, "nvidia-tesla-v100", "n1-standard-8", "1x NVIDIA V100"),
        (1, None, "g2-standard-12", "1x NVIDIA L4"),
        (1, None, "a3-ultragpu-8g", "8x NVIDIA H200 141GB"),
        (1, None, "n2-standard-8", None),  # --gpus 1 (the default) is not a GPU on an N2
        (4, None, "e2-standard-4", None),
    ],
)
def test_gpu_comes_from_the_machine_type_and_its_accelerators(
    gce: GceFake, gpus: int, accelerator: str | None, machine_type: str | None, expected: str | None
) -> None:
    p = provider(gce, gpus=gpus, accelerator=accelerator, machine_type=machine_type)
    assert p.gpu() == expected
    assert gpu_description(*choose_machine(gpus, accelerator, machine_type)) == expected


# -- preflight: what GCE does not sell or accept is refused before anything is created --------


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_h100_shapes_not_sold_on_demand_are_refused(gce: GceFake, gpus: int) -> None:
    p = provider(gce, gpus=gpus, accelerator="nvidia-h100-80gb")
    with pytest.raises(ConfigError) as info:
        p.preflight()
    text = str(info.value)
    assert f"a3-highgpu-{gpus}g" in text
    assert "--provisioning-model spot|flex-start" in text
    assert "a3-highgpu-8g" in text
    with pytest.raises(ConfigError, match="provisioning-model"):
        p.plan(launch_spec("ss-0000a001"))
    assert writes(gce) == []
    for model in ("spot", "flex-start"):
        provider(
            gce, gpus=gpus, accelerator="nvidia-h100-80gb", provisioning_model=model
        ).preflight()
    provider(gce, gpus=8, accelerator="nvidia-h100-80gb").preflight()  # sold on demand


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_lifetime": 10.0}, r"the launch lease is 10s \(10 s\), but .* at least 30s"),
        (
            {"max_lifetime": 121 * DAY},
            r"--max-lifetime is 10454400s \(121 days\), but .* at most 10368000s \(120 days\)",
        ),
        (
            {"max_lifetime": 8 * DAY, "provisioning_model": "flex-start"},
            r"--max-lifetime is 691200s \(8 days\), but a flex-start VM runs at most 604800s "
            r"\(7 days\)",
        ),
    ],
)
def test_run_limits_outside_what_gce_accepts_are_refused(
    gce: GceFake, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        provider(gce, **changes).preflight()
    assert writes(gce) == []
    provider(gce, max_lifetime=120 * DAY).preflight()
    provider(gce, max_lifetime=7 * DAY, provisioning_model="flex-start").preflight()


def test_a_missing_image_is_refused_by_the_preflight(gce: GceFake) -> None:
    p = provider(gce, image="projects/my-project/global/images/family/nope")
    with pytest.raises(ConfigError, match="image .*nope not found"):
        p.preflight()
    with pytest.raises(ConfigError, match="is not a GCE image"):
        provider(gce, image="ubuntu-latest").preflight()
    assert writes(gce) == []


def test_service_account_none_warns_how_the_instance_still_ends(
    gce: GceFake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="studioserve")
    provider(gce, service_account="none").preflight()
    assert "cannot delete itself" in caplog.text
    assert "studio instances list" in caplog.text


# -- launch -------------------------------------------------------------------------------------


def test_launch_asks_for_the_lease_and_the_extension_moves_it_to_the_max_lifetime(
    gce: GceFake,
) -> None:
    p = provider(gce)
    got = launched(p, "ss-0000b001", lease=900, max_lifetime=2 * DAY)
    scheduling = only_instance(gce)["scheduling"]
    assert int(scheduling["maxRunDuration"]["seconds"]) == 900
    assert scheduling["instanceTerminationAction"] == "DELETE"
    assert scheduling["provisioningModel"] == "STANDARD"
    line = p.extend_lifetime(got["info"], got["spec"])
    assert line is not None
    assert "15 min -> 2 days" in line
    inst = only_instance(gce)
    assert int(inst["scheduling"]["maxRunDuration"]["seconds"]) == 2 * DAY
    assert inst["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert gce.restarts == []  # the running server was not restarted
    [update] = [r for r in gce.request_log() if r.method == "PUT"]
    assert update.query["mostDisruptiveAllowedAction"] == ["REFRESH"]
    assert not [r for r in gce.request_log() if r.path.endswith("/setScheduling")]
    assert p.extend_lifetime(got["info"], got["spec"]) is None  # already there


def update(
    name: str, instance: compute_v1.Instance, action: str
) -> compute_v1.UpdateInstanceRequest:
    return compute_v1.UpdateInstanceRequest(
        project=PROJECT,
        zone=ZONE,
        instance=name,
        instance_resource=instance,
        most_disruptive_allowed_action=action,
    )


def test_the_fake_refuses_the_calls_the_api_refuses_on_a_running_instance(gce: GceFake) -> None:
    p = provider(gce)
    name = launched(p, "ss-0000b002")["info"].instance_id
    with pytest.raises(gexc.BadRequest, match="stopped instance"):
        p.instances.set_scheduling(
            project=PROJECT,
            zone=ZONE,
            instance=name,
            scheduling_resource=compute_v1.Scheduling(
                max_run_duration=compute_v1.Duration(seconds=7200),
                instance_termination_action="DELETE",
            ),
        )
    got = p.instances.get(project=PROJECT, zone=ZONE, instance=name)
    stale = compute_v1.Instance.deserialize(compute_v1.Instance.serialize(got))
    got.scheduling.max_run_duration = compute_v1.Duration(seconds=7200)
    with pytest.raises(gexc.BadRequest, match="needs a REFRESH"):
        p.instances.update(request=update(name, got, "NO_EFFECT"))
    got.machine_type = f"zones/{ZONE}/machineTypes/g2-standard-8"
    with pytest.raises(gexc.BadRequest, match="needs a RESTART"):
        p.instances.update(request=update(name, got, "REFRESH"))
    op = p.instances.update(
        project=PROJECT, zone=ZONE, instance=name, instance_resource=stale
    )  # no change: fine, and it moves the fingerprint
    p._wait(op, zonal=True)
    with pytest.raises(gexc.PreconditionFailed, match="fingerprint"):
        p.instances.update(project=PROJECT, zone=ZONE, instance=name, instance_resource=stale)


def test_spot_deletes_on_preemption(gce: GceFake) -> None:
    p = provider(gce, gpus=1, accelerator="nvidia-h100-80gb", provisioning_model="spot")
    p.preflight()
    launched(p, "ss-0000b003")
    inst = only_instance(gce)
    assert inst["machineType"].endswith("/a3-highgpu-1g")
    assert inst["scheduling"] == {
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
        "maxRunDuration": {"seconds": "900"},
    }
    assert "reservationAffinity" not in inst


def test_flex_start_has_its_scheduling_and_extends_within_seven_days(gce: GceFake) -> None:
    p = provider(gce, gpus=2, accelerator="nvidia-h100-80gb", provisioning_model="flex-start")
    got = launched(p, "ss-0000b004", lease=1800, max_lifetime=7 * DAY)
    inst = only_instance(gce)
    assert inst["machineType"].endswith("/a3-highgpu-2g")
    scheduling = inst["scheduling"]
    assert scheduling["provisioningModel"] == "FLEX_START"
    assert scheduling["instanceTerminationAction"] == "DELETE"
    assert scheduling["onHostMaintenance"] == "TERMINATE"
    assert scheduling["automaticRestart"] is False
    assert int(scheduling["maxRunDuration"]["seconds"]) == 1800
    assert inst["reservationAffinity"] == {"consumeReservationType": "NO_RESERVATION"}
    p.extend_lifetime(got["info"], got["spec"])
    assert int(only_instance(gce)["scheduling"]["maxRunDuration"]["seconds"]) == 7 * DAY
    with pytest.raises(ConfigError, match="7 days"):
        p.extend_lifetime(got["info"], launch_spec("ss-0000b004", max_lifetime=8 * DAY))


def test_the_boot_disk_is_at_least_the_images_size(gce: GceFake) -> None:
    gce.add_image(
        "deeplearning-platform-release",
        "common-cu129-ubuntu-2404-nvidia-580-v20260101",
        disk_gb=150,
        family="common-cu129-ubuntu-2404-nvidia-580",
    )
    launched(provider(gce), "ss-0000b005")
    [disk] = only_instance(gce)["disks"]
    assert int(disk["initializeParams"]["diskSizeGb"]) == 150
    assert disk["initializeParams"]["diskType"] == f"zones/{ZONE}/diskTypes/pd-balanced"
    assert disk["autoDelete"] is True


def test_an_explicit_image_and_a_larger_disk_gb(gce: GceFake) -> None:
    gce.add_image("my-project", "custom-v3", disk_gb=30)
    p = provider(gce, gpus=0, image="projects/my-project/global/images/custom-v3", disk_gb=200)
    launched(p, "ss-0000b006")
    params = only_instance(gce)["disks"][0]["initializeParams"]
    assert params["sourceImage"] == "projects/my-project/global/images/custom-v3"
    assert int(params["diskSizeGb"]) == 200


def test_a_cpu_machine_type_gets_the_cpu_image_and_live_migration(gce: GceFake) -> None:
    launched(provider(gce, machine_type="n2-standard-8"), "ss-0000b007")  # --gpus 1 default
    inst = only_instance(gce)
    assert inst["scheduling"]["onHostMaintenance"] == "MIGRATE"
    assert "ubuntu-os-cloud" in inst["disks"][0]["initializeParams"]["sourceImage"]
    keys = {i["key"] for i in inst["metadata"]["items"]}
    assert "install-nvidia-driver" not in keys


# -- the fake is as strict as the service where it matters ------------------------------------


def _instance(machine: str, **scheduling: Any) -> compute_v1.Instance:
    return compute_v1.Instance(
        name="strict-test",
        machine_type=f"zones/{ZONE}/machineTypes/{machine}",
        disks=[
            compute_v1.AttachedDisk(
                boot=True,
                auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image="projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
                    disk_size_gb=20,
                ),
            )
        ],
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
        scheduling=compute_v1.Scheduling(**scheduling),
    )


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        (_instance("g2-standard-4", on_host_maintenance="MIGRATE"), "live migration"),
        (_instance("a2-highgpu-1g"), "live migration"),  # MIGRATE is the default
        (
            _instance("a3-highgpu-1g", on_host_maintenance="TERMINATE"),
            "not available .* STANDARD provisioning model",
        ),
        (
            _instance(
                "a3-highgpu-4g",
                on_host_maintenance="TERMINATE",
                automatic_restart=True,
                provisioning_model="SPOT",
            ),
            "automaticRestart false",
        ),
        (
            _instance(
                "n2-standard-4",
                max_run_duration=compute_v1.Duration(seconds=10),
                instance_termination_action="DELETE",
            ),
            "outside",
        ),
    ],
)
def test_the_fake_refuses_what_the_service_refuses(
    gce: GceFake, instance: compute_v1.Instance, message: str
) -> None:
    with pytest.raises(gexc.BadRequest, match=message):
        provider(gce).instances.insert(project=PROJECT, zone=ZONE, instance_resource=instance)
    assert gce.all_instances() == []


def test_the_fake_refuses_a_disk_smaller_than_its_image(gce: GceFake) -> None:
    instance = _instance("n2-standard-4")
    instance.disks[0].initialize_params.source_image = (
        "projects/deeplearning-platform-release/global/images/family/"
        "common-cu129-ubuntu-2404-nvidia-580"
    )
    with pytest.raises(gexc.BadRequest, match="smaller than the image size"):
        provider(gce).instances.insert(project=PROJECT, zone=ZONE, instance_resource=instance)


def test_operations_pass_through_pending_and_running_before_done(gce: GceFake) -> None:
    gce.operation_polls = 4
    p = provider(gce)
    got = launched(p, "ss-0000b008")
    assert only_instance(gce)["status"] == "RUNNING"  # PROVISIONING, STAGING, RUNNING
    p.delete(Resource("instance", got["info"].instance_id, ZONE))
    statuses = gce.operation_statuses()
    assert len(statuses) == 3  # insert, firewall insert, delete
    for seen in statuses.values():
        assert seen == ["PENDING", "RUNNING", "RUNNING", "RUNNING", "DONE"]
    instance_gets = [
        r
        for r in gce.request_log()
        if r.method == "GET" and r.path.endswith("/instances/studioserve-0000b008")
    ]
    assert len(instance_gets) >= 3


def test_a_delete_that_is_not_waited_for_only_issues_the_call(gce: GceFake) -> None:
    p = provider(gce)
    name = launched(p, "ss-0000b009")["info"].instance_id
    polls_before = len([r for r in gce.request_log() if "/operations/" in r.path])
    assert "not waited for" in p.delete(Resource("instance", name, ZONE), wait=False)
    assert "not waited for" in p.delete(Resource("firewall", name), wait=False)
    assert len([r for r in gce.request_log() if "/operations/" in r.path]) == polls_before
    assert leftovers(gce) == {}
    assert "already gone" in p.delete(Resource("instance", name, ZONE))


# -- the plan (--dry-run) ------------------------------------------------------------------------


def test_the_plan_says_what_would_be_created_and_creates_nothing(gce: GceFake) -> None:
    plan = provider(gce).plan(launch_spec("ss-0000c001", lease=6900, max_lifetime=DAY))
    assert plan.cloud == "gcloud"
    assert plan.location == ZONE
    assert plan.instance_type == "g2-standard-4"
    assert plan.gpu == "1x NVIDIA L4"
    assert plan.price_per_hour == pytest.approx(0.707)
    assert "common-cu129-ubuntu-2404-nvidia-580-v20250801" in plan.image
    instance, firewall = plan.creates
    assert instance.startswith(f"instance studioserve-0000c001 in {ZONE}: g2-standard-4, 100 GB")
    assert "provisioning STANDARD" in instance
    assert "maxRunDuration 6900s (then 86400s once ready) then DELETE" in instance
    assert "default compute account" in instance
    assert "198.51.100.7/32" in firewall
    assert "TCP 22 and 5000" in firewall
    assert "tagged studioserve-0000c001" in firewall
    backstops = "\n".join(plan.backstops)
    assert "maxRunDuration" in backstops
    assert "not once it is stopped" in backstops
    assert "studio instances list" in backstops
    assert writes(gce) == []


def test_the_plan_of_an_attached_gpu_and_of_spot(gce: GceFake) -> None:
    plan = provider(gce, gpus=2, accelerator="nvidia-tesla-t4").plan(launch_spec("ss-0000c002"))
    assert plan.instance_type == "n1-standard-16 + 2x nvidia-tesla-t4"
    assert plan.gpu == "2x NVIDIA T4"
    assert plan.price_per_hour == pytest.approx(0.76 + 2 * 0.35)
    spot = provider(gce, gpus=1, accelerator="nvidia-h100-80gb", provisioning_model="spot")
    plan = spot.plan(launch_spec("ss-0000c003"))
    assert plan.price_per_hour is None
    assert "provisioning SPOT" in plan.creates[0]
    assert any("preempt" in n for n in plan.notes)


# -- host keys and the registry -----------------------------------------------------------------


def test_host_keys_come_from_guest_attributes_or_the_serial_console(gce: GceFake) -> None:
    p = provider(gce)
    info = launched(p, "ss-0000cccc")["info"]
    with pytest.raises(CloudError, match="did not publish its SSH host keys"):
        p.host_keys(info, timeout=0.05)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTheTestOnly0000000000000000"
    gce.host_keys = [key]
    assert p.host_keys(info, timeout=5) == [key]
    gce.guest_attributes = False  # an image without the guest agent's host key attributes
    assert p.host_keys(info, timeout=5) == [key]


def test_list_deletes_a_gce_instance_that_stopped_instead_of_deleting_itself(
    gce: GceFake,
) -> None:
    p = provider(gce)
    made: list[Any] = []
    launch = launch_spec("ss-0000dddd")
    info = p.launch(launch, made.append)
    p.open_ports(launch, info, made.append)
    Registry().upsert(
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


# -- full deployments (the lead's deploy; an sshd on loopback is the instance) ------------------


@needs_sshd
def test_deploy_then_killafter_ends_it_and_nothing_is_left(
    gce: GceFake, sshd: Sshd, tmp_path: Path, modeldir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="studioserve")
    gce.host_keys = [sshd.host_key]  # published as guest attributes: nothing pinned by hand
    agent = GuestAgent(gce, sshd)
    port, grpc_port = free_port(), free_port()
    opts = options(sshd, tmp_path, max_lifetime=7200)
    dep = deploy(
        ServeConfig(key="exp", port=port, killafter=6, grpc_port=grpc_port),
        modeldir,
        opts,
        overrides=overrides(gce, sshd, tmp_path, hooks=(agent,)),
    )
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
    assert int(scheduling["maxRunDuration"]["seconds"]) == int(opts.lease) < 7200
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
    assert end_body(metadata_url=gce.url, api_url=gce.url).strip() in metadata["startup-script"]
    [rule] = agent.snapshot["firewalls"]
    assert rule["name"] == name
    assert rule["direction"] == "INGRESS"
    assert rule["sourceRanges"] == ["198.51.100.7/32"]
    assert rule["targetTags"] == [name]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["22", str(port), str(grpc_port)]}]
    assert dep.grpc_address == f"127.0.0.1:{grpc_port}"

    assert rule["network"] == "global/networks/default"
    assert dep.zone == ZONE
    assert dep.project == PROJECT
    assert dep.public_ip is not None
    assert dep.public_ip.startswith("203.0.113.")

    # the check on the "instance" asked whether its account may delete it; once ready, the
    # run limit moved from the lease to --max-lifetime
    paths = [(r.method, r.path) for r in gce.request_log()]
    assert (
        "POST",
        f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/{name}/testIamPermissions",
    ) in paths
    assert int(only_instance(gce)["scheduling"]["maxRunDuration"]["seconds"]) == 7200

    # long-running operations were awaited with explicit wait calls against the fake
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
def test_deploy_fails_at_preflight_when_the_instance_may_not_delete_itself(
    gce: GceFake, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    gce.host_keys = [sshd.host_key]
    gce.deny("compute.instances.delete")
    ov = overrides(gce, sshd, tmp_path, hooks=(GuestAgent(gce, sshd),))
    with pytest.raises(DeploymentFailed) as info:
        deploy(
            ServeConfig(key="exp", port=free_port(), killafter=30),
            modeldir,
            options(sshd, tmp_path),
            overrides=ov,
        )
    assert info.value.step == "preflight"
    text = str(info.value.__cause__)
    assert "roles/compute.instanceAdmin.v1" in text
    assert "--service-account create" in text
    assert leftovers(gce) == {}
    assert not (tmp_path / "remote" / "dist").exists()  # nothing was uploaded


@needs_sshd
def test_stop_instances_removes_instance_and_firewall(
    gce: GceFake, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    gce.host_keys = [sshd.host_key]
    dep = deploy(
        ServeConfig(key="exp", port=free_port(), killafter=300),
        modeldir,
        options(sshd, tmp_path, gpus=0),
        overrides=overrides(gce, sshd, tmp_path, hooks=(GuestAgent(gce, sshd),)),
    )
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

    ov = overrides(gce, sshd, tmp_path, hooks=(GuestAgent(gce, sshd), fail))
    with pytest.raises(DeploymentFailed) as info:
        deploy(
            ServeConfig(key="exp", port=free_port(), killafter=30),
            modeldir,
            options(sshd, tmp_path),
            overrides=ov,
        )
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
    opts = CloudOptions(cloud="gcloud", project=PROJECT, zone=ZONE, allow_cidr="198.51.100.7/32")
    with pytest.raises(DeploymentFailed, match="quota") as info:
        deploy(ServeConfig(key="exp"), modeldir, opts, overrides=api_only(gce))
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
    opts = CloudOptions(cloud="gcloud", project=PROJECT, zone=ZONE, allow_cidr="198.51.100.7/32")
    with pytest.raises(DeploymentFailed, match="try another --zone") as info:
        deploy(ServeConfig(key="exp"), modeldir, opts, overrides=api_only(gce))
    assert info.value.step == "launch"
    assert leftovers(gce) == {}
    assert local_keys() == []


def test_deploy_refuses_an_unsold_shape_before_creating_anything(
    gce: GceFake, modeldir: Path
) -> None:
    opts = CloudOptions(
        cloud="gcloud",
        project=PROJECT,
        zone=ZONE,
        gpus=1,
        accelerator="nvidia-h100-80gb",
        allow_cidr="198.51.100.7/32",
    )
    with pytest.raises(ConfigError, match="--provisioning-model spot"):
        deploy(ServeConfig(key="exp"), modeldir, opts, overrides=api_only(gce))
    assert writes(gce) == []
    assert local_keys() == []
