"""SSH against a real OpenSSH sshd on 127.0.0.1 (its own config, host key and authorized
keys), and the end-to-end deployment: EC2 (moto) launches the "instance", and this machine,
through the sshd, plays it: upload, install, the real ``studio serve`` with a real Keras
model, a prediction through the URL and token, then the exit after --killafter."""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from studioserve.cloud import CloudOptions, HostKeyMismatch, StepContext, deploy, list_instances
from studioserve.cloud.ssh import SshSession, generate_keypair, host_key_fingerprint
from studioserve.config import ServeConfig, config_dir
from studioserve.errors import CloudError
from tests.cloud.helpers import (
    Sshd,
    free_port,
    kill_leftover,
    local_instance_options,
    local_instance_overrides,
    new_host_key,
    post_json,
    save_model,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/sbin/sshd"),
    reason="OpenSSH server missing (apt-get install openssh-server)",
)


@pytest.fixture
def login(sshd: Sshd, tmp_path: Path) -> Path:
    """A fresh key pair that the sshd accepts; returns the private key path."""
    keys = generate_keypair(tmp_path / "keys", "login")
    sshd.authorize(keys.public_key)
    return keys.private_path


def test_generated_key_pair_is_private_and_usable(tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path / "keys", "ss-12345678", comment="ubuntu")
    assert keys.private_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert keys.public_key.startswith("ssh-ed25519 AAAA")
    assert keys.public_key.endswith(" ubuntu")
    assert keys.public_path.read_text().strip() == keys.public_key
    loaded = paramiko.Ed25519Key.from_private_key_file(str(keys.private_path))
    assert loaded.get_base64() == keys.public_key.split()[1]
    assert host_key_fingerprint(keys.public_key).startswith("SHA256:")
    assert sorted(p.name for p in keys.delete()) == ["ss-12345678", "ss-12345678.pub"]
    assert not keys.private_path.exists()


def test_commands_exit_codes_and_files(sshd: Sshd, login: Path, tmp_path: Path) -> None:
    with SshSession.connect(
        "127.0.0.1", port=sshd.port, user=sshd.user, key_path=login, host_keys=[sshd.host_key]
    ) as session:
        result = session.run("echo out; echo err >&2; exit 3", check=False)
        assert (result.status, result.stdout, result.stderr) == (3, "out\n", "err\n")
        with pytest.raises(CloudError, match="status 3"):
            session.run("exit 3")
        remote = tmp_path / "remote" / "a" / "b"
        session.makedirs(str(remote))
        assert remote.is_dir()
        assert remote.stat().st_mode & 0o777 == 0o700
        session.put_bytes(b"secret\n", f"{remote}/token", mode=0o600)
        assert (remote / "token").read_bytes() == b"secret\n"
        assert (remote / "token").stat().st_mode & 0o777 == 0o600
        local = tmp_path / "local.bin"
        local.write_bytes(os.urandom(300_000))
        assert session.put_file(local, f"{remote}/copy.bin") == 300_000
        assert (remote / "copy.bin").read_bytes() == local.read_bytes()
        assert session.is_file(f"{remote}/copy.bin")
        assert not session.is_file(f"{remote}/missing")
        # a detached process with all three streams redirected does not hold the channel
        started = session.run("nohup sleep 60 > /dev/null 2>&1 < /dev/null & echo $!")
        os.kill(int(started.stdout), 15)


def test_a_different_host_key_is_refused_at_once(sshd: Sshd, login: Path, tmp_path: Path) -> None:
    _, other = new_host_key(tmp_path, "other")
    # same key type, other key: paramiko's BadHostKeyException, never retried
    with pytest.raises(HostKeyMismatch, match="refusing to connect"):
        SshSession.connect(
            "127.0.0.1",
            port=sshd.port,
            user=sshd.user,
            key_path=login,
            host_keys=[other],
            timeout=120,
        )
    # only another key type was reported: the server's ed25519 key is unknown, so refused
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    line = ecdsa.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    with pytest.raises(HostKeyMismatch, match="refusing to connect"):
        SshSession.connect(
            "127.0.0.1",
            port=sshd.port,
            user=sshd.user,
            key_path=login,
            host_keys=[line],
            timeout=120,
        )
    with pytest.raises(CloudError, match="no SSH host key"):
        SshSession.connect(
            "127.0.0.1", port=sshd.port, user=sshd.user, key_path=login, host_keys=[]
        )


def test_login_is_retried_until_the_key_is_installed(
    sshd: Sshd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While an instance boots, sshd answers before cloud-init installed the key: retry."""
    keys = generate_keypair(tmp_path / "keys", "late")
    refused = threading.Event()

    class OnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not ready" in record.getMessage():
                refused.set()

    def cloud_init() -> None:
        if refused.wait(60):
            sshd.authorize(keys.public_key)

    caplog.set_level(logging.DEBUG, logger="studioserve.cloud.ssh")
    handler = OnRetry()
    logging.getLogger("studioserve.cloud.ssh").addHandler(handler)
    installer = threading.Thread(target=cloud_init, name="studioserve-test-cloud-init")
    installer.start()
    try:
        with SshSession.connect(
            "127.0.0.1",
            port=sshd.port,
            user=sshd.user,
            key_path=keys.private_path,
            host_keys=[sshd.host_key],
            timeout=60,
        ) as session:
            assert session.run("echo ok").stdout == "ok\n"
    finally:
        refused.set()
        installer.join()
        logging.getLogger("studioserve.cloud.ssh").removeHandler(handler)
    assert refused.is_set()


def test_gives_up_after_the_overall_timeout(login: Path, sshd: Sshd) -> None:
    closed_port = free_port()  # nothing listens there
    with pytest.raises(CloudError, match=r"could not log in .* within 2s"):
        SshSession.connect(
            "127.0.0.1",
            port=closed_port,
            user=sshd.user,
            key_path=login,
            host_keys=[sshd.host_key],
            timeout=2,
        )


# -- end to end -------------------------------------------------------------------------------


def test_end_to_end_real_server_prediction_then_killafter(
    sshd: Sshd, moto_url: str, tmp_path: Path, keras_mlp_factory: Any
) -> None:
    # moto's backends are per process, shared with other test modules' servers: start clean
    urllib.request.urlopen(urllib.request.Request(moto_url + "/moto-api/reset", method="POST"))
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name="us-east-1")
    ssm = boto3.client("ssm", endpoint_url=moto_url, region_name="us-east-1")
    ubuntu = "ubuntu/images/hvm-ssd/ubuntu-xenial-16.04-amd64-server-20170721"
    ami = ec2.describe_images(Filters=[{"Name": "name", "Values": [ubuntu]}])["Images"][0]
    ssm.put_parameter(Name="/studioserve-test/dlami", Value=ami["ImageId"], Type="String")
    modeldir = save_model(tmp_path / "modeldir", keras_mlp_factory)
    x = np.linspace(-1, 1, 16, dtype="float32").reshape(2, 8)
    expected = np.asarray(keras_mlp_factory()(x))

    def cloud_init(step: str, ctx: StepContext) -> None:
        if step == "wait_ssh":
            pairs = ec2.describe_key_pairs(
                KeyNames=[f"studioserve-{ctx.deployment_id}"], IncludePublicKey=True
            )["KeyPairs"]
            sshd.authorize(pairs[0]["PublicKey"])

    remote = tmp_path / "remote"
    ended = tmp_path / "ended"
    opts = CloudOptions(
        cloud="ec2",
        gpus=1,
        image="ssm:/studioserve-test/dlami",
        **local_instance_options(sshd),
    )
    overrides = local_instance_overrides(
        sshd, remote, ended, endpoint_url=moto_url, host_key=sshd.host_key, hooks=(cloud_init,)
    )
    try:
        dep = deploy(
            ServeConfig(key="mlp", port=free_port(), killafter=8),
            modeldir,
            opts,
            overrides=overrides,
        )
        status, body = post_json(dep.url, {"x": x.tolist()}, dep.token)
        assert status == 200
        np.testing.assert_allclose(np.asarray(body["x"]), expected, rtol=1e-5, atol=1e-6)
        assert post_json(dep.url, {"x": x.tolist()}, None)[0] == 401
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(dep.url + "/readyz", timeout=10) as response:
            assert response.status == 200
        # the server exits after --killafter and ends the "instance" (here: writes a marker)
        wait_for(ended.exists, 90, "the server to exit after --killafter and run the end command")
    finally:
        kill_leftover(remote)
    log = (remote / "serve.log").read_text()
    assert "--killafter" in log
    assert "ending the instance" in log
    # on EC2 the shutdown terminates the instance (InstanceInitiatedShutdownBehavior); moto
    # runs nothing, so do what EC2 would, then see `studio instances list` tidy up the rest
    ec2.terminate_instances(InstanceIds=[dep.instance_id])
    assert list_instances() == []
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag:studioserve", "Values": [dep.id]}])
    assert groups["SecurityGroups"] == []
    assert ec2.describe_key_pairs()["KeyPairs"] == []
    assert not (config_dir() / "keys" / dep.id).exists()
