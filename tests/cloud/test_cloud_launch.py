"""The launch itself, on EC2 (moto's server) with this machine playing the instance through a
real sshd: what stops a launch (SIGTERM, SIGHUP, Ctrl-C during the rollback), the launch lease
and its extension, the checks that fail a launch early (the instance's Python, a GPU the
framework cannot see, a serving port blocked on the way) and the dry run."""

from __future__ import annotations

import base64
import logging
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import studioserve.cloud.launch as launch_module
from studioserve.cli import main
from studioserve.cloud import (
    CloudOptions,
    DeploymentFailed,
    Overrides,
    Resource,
    StepContext,
    deploy,
    list_instances,
    plan_deployment,
    stop_instances,
)
from studioserve.cloud.ec2 import Ec2Provider
from studioserve.cloud.registry import Registry
from studioserve.config import ServeConfig, config_dir
from studioserve.errors import ConfigError
from tests.cloud.ec2_faults import AMI_PARAMETER, leftovers, reset_account
from tests.cloud.helpers import (
    Sshd,
    free_port,
    local_instance_options,
    local_instance_overrides,
    post_json,
)


@pytest.fixture
def ec2(moto_url: str) -> Any:
    """A clean moto account with an AMI published under the test SSM parameter."""
    return reset_account(moto_url)["ec2"]


def cloud_init(ec2: Any, sshd: Sshd) -> Any:
    """A hook standing in for cloud-init: installs the key pair's public key at wait_ssh."""

    def hook(step: str, ctx: StepContext) -> None:
        if step == "wait_ssh":
            pairs = ec2.describe_key_pairs(
                KeyNames=[f"studioserve-{ctx.deployment_id}"], IncludePublicKey=True
            )["KeyPairs"]
            sshd.authorize(pairs[0]["PublicKey"])

    return hook


def setup(
    ec2: Any, sshd: Sshd, tmp_path: Path, *extra_hooks: Any, **changes: Any
) -> tuple[CloudOptions, Overrides]:
    """Options and overrides for a launch onto this machine; ``changes`` go to whichever of
    the two has the field."""
    fields: dict[str, Any] = {
        "cloud": "ec2",
        "gpus": 1,
        "image": "ssm:" + AMI_PARAMETER,
        "region": "us-east-1",
        **local_instance_options(sshd),
    }
    option_names = set(CloudOptions.__dataclass_fields__)
    fields.update({k: v for k, v in changes.items() if k in option_names})
    overrides = local_instance_overrides(
        sshd,
        tmp_path / "remote",
        tmp_path / "ended",
        endpoint_url=ec2.meta.endpoint_url,
        host_key=sshd.host_key,
        hooks=(cloud_init(ec2, sshd), *extra_hooks),
        **{k: v for k, v in changes.items() if k not in option_names},
    )
    return CloudOptions(**fields), overrides


def config() -> ServeConfig:
    return ServeConfig(key="exp", port=free_port(), killafter=600)


# -- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_during_a_launch_rolls_it_back(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path, signum: int
) -> None:
    def terminal_closed(step: str, ctx: StepContext) -> None:
        if step == "install":
            os.kill(os.getpid(), signum)

    before = signal.getsignal(signum)
    options, overrides = setup(ec2, sshd, tmp_path, terminal_closed)
    with pytest.raises(DeploymentFailed) as failed:
        deploy(config(), modeldir, options, overrides=overrides)
    name = signal.Signals(signum).name
    assert failed.value.interrupted
    assert failed.value.step == "install"
    assert f"interrupted ({name})" in str(failed.value)
    assert leftovers(ec2) == {}
    assert Registry().load() == []
    assert signal.getsignal(signum) is before  # the previous handler is back


class SignalOnDelete(Ec2Provider):
    """The EC2 provider, with Ctrl-C pressed ``presses`` times as the instance delete starts."""

    presses = 1
    calls: list[tuple[str, bool]]

    def delete(self, resource: Resource, *, wait: bool = True) -> str:
        self.calls.append((resource.kind, wait))
        if resource.kind == "instance" and len(self.calls) == 1:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)
        return super().delete(resource, wait=wait)


def _failing_provider(options: CloudOptions, overrides: Overrides, presses: int) -> SignalOnDelete:
    provider = SignalOnDelete(options, overrides)
    provider.presses = presses
    provider.calls = []
    return provider


def test_a_first_ctrl_c_during_the_rollback_does_not_stop_it(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(step: str, ctx: StepContext) -> None:
        if step == "upload":
            raise RuntimeError("disk full")

    options, overrides = setup(ec2, sshd, tmp_path, broken)
    provider = _failing_provider(options, overrides, presses=1)
    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING), pytest.raises(DeploymentFailed) as failed:
        deploy(config(), modeldir, options, provider=provider, overrides=overrides)
    assert "disk full" in str(failed.value)
    assert "cleaning up, press Ctrl-C again only to abandon: these resources will be left" in (
        caplog.text
    )
    assert leftovers(ec2) == {}
    assert all(wait for _, wait in provider.calls)  # every delete waited for
    assert Registry().load() == []
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_a_second_ctrl_c_abandons_the_wait_but_every_delete_is_issued(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    def broken(step: str, ctx: StepContext) -> None:
        if step == "upload":
            raise RuntimeError("disk full")

    options, overrides = setup(ec2, sshd, tmp_path, broken)
    provider = _failing_provider(options, overrides, presses=2)
    with pytest.raises(DeploymentFailed) as failed:
        deploy(config(), modeldir, options, provider=provider, overrides=overrides)
    summary = "\n".join(failed.value.summary)
    assert "abandoned" in summary
    kinds = [kind for kind, _ in provider.calls]
    # the instance's and the security group's delete calls were still made
    assert "instance" in kinds
    assert "security-group" in kinds
    [record] = Registry().load()
    assert record.state == "teardown-failed"
    assert {r.kind for r in record.resources} >= {"instance"}
    # what was not confirmed is retried by `studio instances stop`
    stop_instances([record.id])
    assert leftovers(ec2) == {}
    assert Registry().load() == []


# -- the launch lease ---------------------------------------------------------------------------


def test_the_launch_lease_is_extended_to_max_lifetime_only_once_ready(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    options, overrides = setup(
        ec2, sshd, tmp_path, ssh_timeout=60, install_timeout=300, ready_timeout=120
    )
    options = options.replace(max_lifetime=7200)
    lifetime = tmp_path / "ended.lifetime"
    dep = deploy(config(), modeldir, options, overrides=overrides)
    try:
        user_data = ec2.describe_instance_attribute(
            InstanceId=dep.instance_id, Attribute="userData"
        )["UserData"]["Value"]
        boot = base64.b64decode(user_data).decode()
        assert f"/usr/local/sbin/studioserve-lifetime {60 + 300 + 120 + 600}" in boot
        assert lifetime.read_text().split() == ["7200"]
    finally:
        stop_instances([dep.id])


def test_a_launch_that_fails_before_ready_keeps_the_short_lease(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    def broken(step: str, ctx: StepContext) -> None:
        if step == "wait_ready":
            raise RuntimeError("laptop lost its network")

    options, overrides = setup(ec2, sshd, tmp_path, broken)
    with pytest.raises(DeploymentFailed):
        deploy(config(), modeldir, options, overrides=overrides)
    assert not (tmp_path / "ended.lifetime").exists()


# -- checks that fail a launch early ------------------------------------------------------------


def test_an_image_whose_python_is_too_old_fails_before_the_upload(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\necho 3.10\n")
    old.chmod(old.stat().st_mode | stat.S_IXUSR)
    options, overrides = setup(ec2, sshd, tmp_path, remote_python=str(old))
    with pytest.raises(DeploymentFailed) as failed:
        deploy(config(), modeldir, options, overrides=overrides)
    assert failed.value.step == "preflight"
    assert "has Python 3.10; studioserve needs Python 3.11 or newer" in str(failed.value)
    assert not (tmp_path / "remote" / "dist").exists()  # nothing uploaded
    assert leftovers(ec2) == {}


def test_a_gpu_instance_whose_framework_sees_no_gpu_fails_unless_allowed(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # --gpus 0 does not make a GPU type a CPU instance: the type decides
    options, overrides = setup(ec2, sshd, tmp_path, gpus=0, instance_type="g6.xlarge")
    first = overrides.replace(remote_dir=str(tmp_path / "first"))
    with pytest.raises(DeploymentFailed) as failed:
        deploy(config(), modeldir, options.replace(allow_cpu_fallback=False), overrides=first)
    assert failed.value.step == "install"
    message = str(failed.value)
    assert "g6.xlarge has 1x NVIDIA L4" in message
    assert "--allow-cpu-fallback" in message
    assert leftovers(ec2) == {}
    again = overrides.replace(remote_dir=str(tmp_path / "remote"))  # a fresh "instance"
    with caplog.at_level(logging.WARNING):
        dep = deploy(config(), modeldir, options, overrides=again)
    try:
        assert "WARNING: g6.xlarge has 1x NVIDIA L4" in caplog.text
        assert dep.gpu is None
    finally:
        stop_instances([dep.id])


def test_a_serving_port_blocked_on_the_way_is_named(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the server listens where SSH can reach it (127.0.0.2, on the "instance") but not where
    # this machine connects (127.0.0.1): as a corporate firewall blocking the port would
    monkeypatch.setattr(launch_module, "EXTERNAL_CHECK_TIMEOUT", 1.0)
    options, overrides = setup(ec2, sshd, tmp_path, remote_bind_host="127.0.0.2")
    serve = config()
    with pytest.raises(DeploymentFailed) as failed:
        deploy(serve, modeldir, options, overrides=overrides)
    assert failed.value.step == "wait_ready"
    message = str(failed.value)
    assert "the server is ready on the instance" in message
    assert f"blocks TCP port {serve.port}" in message
    assert leftovers(ec2) == {}


def test_a_ready_deployment_answers_and_says_where_its_gpu_would_be(
    ec2: Any, sshd: Sshd, tmp_path: Path, modeldir: Path
) -> None:
    options, overrides = setup(ec2, sshd, tmp_path)
    dep = deploy(config(), modeldir, options, overrides=overrides)
    try:
        status, body = post_json(dep.url, {"x": [[1.0, 2.0]]}, dep.token)
        assert (status, body) == (200, {"x": [[1.0, 2.0]]})
        [record] = list_instances()
        assert (record.id, record.state) == (dep.id, "running")
    finally:
        stop_instances([dep.id])
    assert leftovers(ec2) == {}


# -- the dry run --------------------------------------------------------------------------------


def test_a_dry_run_prints_the_plan_and_creates_nothing(ec2: Any, modeldir: Path) -> None:
    options = CloudOptions(
        cloud="ec2", gpus=1, image="ssm:" + AMI_PARAMETER, allow_cidr="203.0.113.7/32"
    )
    plan = plan_deployment(
        config(), modeldir, options, overrides=Overrides(endpoint_url=ec2.meta.endpoint_url)
    )
    text = "\n".join(plan.lines())
    assert "Dry run: nothing was created" in text
    assert "g6.xlarge" in text
    assert "NVIDIA L4" in text
    assert "203.0.113.7/32" in text
    assert "launch lease" in text
    assert "--max-lifetime" in text
    assert leftovers(ec2) == {}
    assert Registry().load() == []
    assert not (config_dir() / "keys").exists() or not list((config_dir() / "keys").iterdir())


def test_a_grpc_port_is_opened_installed_and_checked(ec2: Any, modeldir: Path) -> None:
    options = CloudOptions(
        cloud="ec2", gpus=1, image="ssm:" + AMI_PARAMETER, allow_cidr="203.0.113.7/32"
    )
    ov = Overrides(endpoint_url=ec2.meta.endpoint_url)
    serve = ServeConfig(key="exp", port=5000, killafter=600, grpc_port=0)
    plan = plan_deployment(serve, modeldir, options, overrides=ov)
    text = "\n".join(plan.lines())
    # 0 ("any free port") is Triton's 8001 on an instance: the firewall needs it ahead
    assert "inbound TCP 22 and TCP 5000 and 8001 from 203.0.113.7/32" in text
    assert "(TCP 22 and 5000, gRPC on 8001)" in text
    assert "studioserve[grpc]" in plan.requirements
    for clash in (22, 5000):
        with pytest.raises(ConfigError, match=f"--grpc-port {clash} is the instance's"):
            plan_deployment(
                ServeConfig(key="exp", port=5000, grpc_port=clash), modeldir, options, overrides=ov
            )
    assert leftovers(ec2) == {}


def test_the_cli_dry_run_creates_nothing(ec2: Any, modeldir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    store = tmp_path / "store"
    added = runner.invoke(main, ["experiments", "add", "exp", str(modeldir), "--store", str(store)])
    assert added.exit_code == 0, added.output
    args = ["serve", "exp", "--store", str(store), "--cloud", "ec2", "--image"]
    args += ["ssm:" + AMI_PARAMETER, "--allow-cidr", "203.0.113.7/32", "--dry-run"]
    result = runner.invoke(
        main, args, obj={"cloud_overrides": Overrides(endpoint_url=ec2.meta.endpoint_url)}
    )
    assert result.exit_code == 0, result.output
    assert "Dry run: nothing was created" in result.stdout
    assert "security group" in result.stdout
    assert leftovers(ec2) == {}
