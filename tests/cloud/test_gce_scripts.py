"""The instance's own end command and the check before the upload, run on this machine against
the GCE fake (API and metadata server): the instance deletes itself when its account may,
retries transient failures, and says clearly why not when it may not, then powers off (here:
a marker file)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from studioserve.cloud.gce import GceProvider
from studioserve.cloud.gce_scripts import EXIT_DENIED, end_body
from tests.fakes.gce_fake import GceFake, fake_provider, launch_spec, run_script

PROJECT = "studio-test"
ZONE = "europe-west4-a"


@pytest.fixture
def gce() -> Iterator[GceFake]:
    with GceFake() as fake:
        yield fake


def launched(fake: GceFake, deployment_id: str = "ss-0000eeee", **options: object) -> str:
    """Launch an instance and its firewall rule in the fake; returns their name."""
    provider: GceProvider = fake_provider(fake, project=PROJECT, zone=ZONE, **options)
    spec = launch_spec(deployment_id)
    info = provider.launch(spec, lambda r: None)
    provider.open_ports(spec, info, lambda r: None)
    return info.instance_id


def the_end(fake: GceFake, marker: Path) -> str:
    """The end command as the boot script installs it, with a marker file for the power-off
    and no waiting."""
    return end_body(
        metadata_url=fake.url,
        api_url=fake.url,
        poweroff=f"echo poweroff >> {marker}",
        grace=0,
        backoff=0.01,
        python=sys.executable,
    )


def leftovers(fake: GceFake) -> dict[str, list[str]]:
    found = {
        "instances": [i["name"] for i in fake.all_instances()],
        "firewalls": [f["name"] for f in fake.all_firewalls()],
    }
    return {k: v for k, v in found.items() if v}


def deletes(fake: GceFake, name: str) -> list[str]:
    return [r.path for r in fake.request_log() if r.method == "DELETE" and r.path.endswith(name)]


# -- the end command ---------------------------------------------------------------------------


def test_the_launch_installs_an_end_command_that_calls_the_configured_endpoints(
    gce: GceFake,
) -> None:
    name = launched(gce)
    [inst] = gce.all_instances()
    items = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
    script = items["startup-script"]
    expected = end_body(metadata_url=gce.url, api_url=gce.url)
    assert expected.strip() in script
    assert "metadata.google.internal" not in script
    assert name in inst["tags"]["items"]


def test_end_deletes_the_instance_and_its_firewall_rule(gce: GceFake, tmp_path: Path) -> None:
    name = launched(gce)
    marker = tmp_path / "poweroff"
    result = run_script(the_end(gce, marker))
    assert result.returncode == 0, result.stderr
    assert leftovers(gce) == {}
    assert f"the instance {name} is being deleted" in result.stderr
    # with the instance's own token from the metadata server
    [fw, inst] = [r for r in gce.request_log() if r.method == "DELETE"]
    assert fw.path.endswith(f"/global/firewalls/{name}")
    assert inst.path.endswith(f"/zones/{ZONE}/instances/{name}")
    assert inst.authorization.startswith("Bearer fake-metadata-token-")
    assert marker.read_text() == "poweroff\n"  # a no-op once the deletion has stopped the VM


def test_end_retries_transient_failures(gce: GceFake, tmp_path: Path) -> None:
    name = launched(gce)
    gce.fail("DELETE", rf"/instances/{name}$", status=503, reason="backendError", times=2)
    gce.fail("DELETE", rf"/firewalls/{name}$", status=429, reason="rateLimitExceeded")
    result = run_script(the_end(gce, tmp_path / "poweroff"))
    assert result.returncode == 0, result.stderr
    assert leftovers(gce) == {}
    assert len(deletes(gce, f"/instances/{name}")) == 3
    assert len(deletes(gce, f"/firewalls/{name}")) == 2
    assert result.stderr.count("retrying in") == 3


def test_end_says_why_when_it_may_not_delete_itself_and_powers_off(
    gce: GceFake, tmp_path: Path
) -> None:
    name = launched(gce)
    gce.deny("compute.instances.delete")
    marker = tmp_path / "poweroff"
    result = run_script(the_end(gce, marker))
    assert leftovers(gce) == {"instances": [name]}  # the firewall rule went
    assert len(deletes(gce, f"/instances/{name}")) == 1  # a 403 is not retried
    err = result.stderr
    assert f"may not delete the instance {name}" in err
    assert "compute.instances.delete" in err
    assert "roles/compute.instanceAdmin.v1" in err
    assert "--service-account create" in err
    assert "studio instances list" in err
    assert marker.read_text() == "poweroff\n"  # it still falls through to the power-off


def test_end_without_a_service_account_powers_off(gce: GceFake, tmp_path: Path) -> None:
    name = launched(gce, service_account="none")
    marker = tmp_path / "poweroff"
    result = run_script(the_end(gce, marker))
    assert "no service account" in result.stderr
    assert leftovers(gce) == {"instances": [name], "firewalls": [name]}
    assert deletes(gce, name) == []
    assert marker.read_text() == "poweroff\n"


def test_end_gives_up_after_its_retries_and_powers_off(gce: GceFake, tmp_path: Path) -> None:
    name = launched(gce)
    gce.fail("DELETE", rf"/instances/{name}$", status=500, reason="backendError", times=100)
    marker = tmp_path / "poweroff"
    result = run_script(the_end(gce, marker))
    assert f"could not delete the instance {name} (500" in result.stderr
    assert len(deletes(gce, f"/instances/{name}")) == 6
    assert leftovers(gce) == {"instances": [name]}
    assert marker.read_text() == "poweroff\n"


# -- the check before the upload ---------------------------------------------------------------


def test_remote_preflight_passes_when_the_instance_may_delete_itself(gce: GceFake) -> None:
    launched(gce)
    provider: GceProvider = fake_provider(gce, project=PROJECT, zone=ZONE)
    result = run_script(provider.remote_preflight())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "may delete this instance" in result.stdout
    asked = [r for r in gce.request_log() if r.path.endswith("/testIamPermissions")]
    assert [r.path.split("/")[-3] for r in asked] == ["instances", "firewalls"]
    assert '"compute.instances.delete"' in asked[0].body
    assert asked[0].authorization.startswith("Bearer fake-metadata-token-")


def test_remote_preflight_fails_naming_the_role_when_it_may_not(gce: GceFake) -> None:
    name = launched(gce)
    gce.deny("compute.instances.delete")
    provider: GceProvider = fake_provider(gce, project=PROJECT, zone=ZONE)
    result = run_script(provider.remote_preflight())
    assert result.returncode == EXIT_DENIED
    out = result.stdout
    assert f"may not delete the instance {name}" in out
    assert "roles/compute.instanceAdmin.v1" in out
    assert "--service-account create" in out
    assert "never deleted by its max run duration" in out


def test_remote_preflight_only_warns_about_the_firewall_rule(gce: GceFake) -> None:
    name = launched(gce)
    gce.deny("compute.firewalls.delete")
    provider: GceProvider = fake_provider(gce, project=PROJECT, zone=ZONE)
    result = run_script(provider.remote_preflight())
    assert result.returncode == 0
    assert f"may not delete the firewall rule {name}" in result.stdout
    assert "roles/compute.securityAdmin" in result.stdout


def test_remote_preflight_with_no_account_says_how_the_instance_still_ends(
    gce: GceFake,
) -> None:
    launched(gce, service_account="none")
    provider: GceProvider = fake_provider(gce, project=PROJECT, zone=ZONE, service_account="none")
    result = run_script(provider.remote_preflight())
    assert result.returncode == 0
    out = result.stdout
    assert "cannot delete itself" in out
    assert "max run duration makes Compute Engine DELETE it while it runs" in out
    assert "studio instances list" in out
    assert not [r for r in gce.request_log() if "testIamPermissions" in r.path]


def test_remote_preflight_fails_when_the_instance_unexpectedly_has_no_account(
    gce: GceFake,
) -> None:
    launched(gce, service_account="none")
    provider: GceProvider = fake_provider(gce, project=PROJECT, zone=ZONE)  # expects "default"
    result = run_script(provider.remote_preflight())
    assert result.returncode == EXIT_DENIED
    assert "no service account" in result.stderr


def test_the_metadata_server_wants_its_header(gce: GceFake) -> None:
    launched(gce)
    status, body = gce.handle("GET", "/computeMetadata/v1/instance/name", "", {})
    assert status == 403
    assert "Metadata-Flavor" in str(body)
    status, body = gce.handle(
        "GET", "/computeMetadata/v1/instance/name", "", {"metadata-flavor": "Google"}
    )
    assert (status, body) == (200, "studioserve-0000eeee")
