"""Fixtures for the cloud layer: moto's server, the GCE fake and a loopback sshd (the helpers
are in tests/cloud/helpers.py and tests/cloud/ec2_faults.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloud.ec2_faults import moto_server
from tests.cloud.helpers import SSHD, Sshd, kill_leftover


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real OpenSSH sshd on 127.0.0.1 standing in for the instance (one per module)."""
    if not os.path.exists(SSHD):
        pytest.skip("OpenSSH server missing (apt-get install openssh-server)")
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's threaded server on loopback (one per module; reset it per test)."""
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def stop_leftover_servers(tmp_path: Path) -> Iterator[None]:
    """A failing test may leave a server it started on this machine ("the instance"): stop
    it."""
    yield
    kill_leftover(tmp_path / "remote")


@pytest.fixture
def modeldir(tmp_path: Path) -> Path:
    """A modeldir without a checkpoint: the server serves the identity model (fast to start)."""
    path = tmp_path / "modeldir"
    path.mkdir()
    (path / "README").write_text("no checkpoint: identity model\n")
    return path
