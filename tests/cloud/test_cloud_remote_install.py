"""The remote install for real: through the loopback sshd, install.sh creates a real
virtualenv (with pip, without this test environment's packages) and pip-installs the
studioserve wheel and its dependencies from the package index this machine is configured
with, then the server starts from that virtualenv and answers. Every other cloud test takes
the shortcut (--no-index --no-deps and this environment's site-packages); this one does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from studioserve.cloud import CloudOptions, StepContext, deploy, stop_instances
from studioserve.config import ServeConfig
from tests.cloud.ec2_faults import AMI_PARAMETER, reset_account
from tests.cloud.helpers import (
    Sshd,
    free_port,
    kill_leftover,
    local_instance_options,
    local_instance_overrides,
    post_json,
)

WRAPPER = '''"""A wrapper whose model needs numpy only (no framework to download)."""
import numpy as np


def create_model(modeldir):
    return lambda data: {"y": np.asarray(data["x"], dtype="float32") * 2}
'''


@pytest.fixture
def moto_ec2(moto_url: str) -> Any:
    return reset_account(moto_url)["ec2"]


def test_the_install_creates_a_real_venv_and_pip_installs_the_wheel_and_its_dependencies(
    sshd: Sshd, moto_ec2: Any, tmp_path: Path
) -> None:
    modeldir = tmp_path / "modeldir"
    modeldir.mkdir()
    (modeldir / "notes.txt").write_text("served by the wrapper\n")
    wrapper = tmp_path / "double.py"
    wrapper.write_text(WRAPPER)

    def cloud_init(step: str, ctx: StepContext) -> None:
        if step == "wait_ssh":
            pairs = moto_ec2.describe_key_pairs(
                KeyNames=[f"studioserve-{ctx.deployment_id}"], IncludePublicKey=True
            )["KeyPairs"]
            sshd.authorize(pairs[0]["PublicKey"])

    remote = tmp_path / "remote"
    options = CloudOptions(
        cloud="ec2",
        gpus=0,
        image="ssm:" + AMI_PARAMETER,
        **{**local_instance_options(sshd), "ready_timeout": 180.0},
    )
    overrides = local_instance_overrides(
        sshd,
        remote,
        tmp_path / "ended",
        endpoint_url=moto_ec2.meta.endpoint_url,
        host_key=sshd.host_key,
        hooks=(cloud_init,),
        # the real thing: pip in the venv, the package index, no borrowed site-packages
        remote_venv_args=(),
        remote_pip_args=(),
        remote_site_dirs=(),
        remote_requirements=None,
    )
    config = ServeConfig(key="double", port=free_port(), killafter=600, wrapper=str(wrapper))
    try:
        dep = deploy(config, modeldir, options, overrides=overrides)
        try:
            status, body = post_json(dep.url, {"x": [[1.0, 2.5]]}, dep.token)
            assert (status, body) == (200, {"y": [[2.0, 5.0]]})
        finally:
            stop_instances([dep.id])
    finally:
        kill_leftover(remote)
    venv_python = remote / "venv" / "bin" / "python"
    # the venv's own packages, installed by pip from the index, not this environment's
    probe = (
        "import flask, numpy, studioserve, sys; "
        "print(studioserve.__file__); print(numpy.__file__); print(sys.prefix)"
    )
    out = subprocess.run(
        [str(venv_python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.split()
    assert all(path.startswith(str(remote / "venv")) for path in out), out
    assert not (remote / "venv").joinpath("studioserve-extra-site.pth").exists()
    assert sys.prefix not in out
