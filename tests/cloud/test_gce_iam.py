"""``--service-account create``: the dedicated least-privilege account, its custom role and its
conditional grant, made once per project through the IAM and Resource Manager REST APIs (the
GCE fake serves both), then used by the instance's own check and end command."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from studioserve.cloud.gce import GceProvider
from studioserve.cloud.gce_iam import CONDITION_EXPRESSION, PERMISSIONS, account_email
from studioserve.cloud.gce_scripts import end_body
from studioserve.errors import CloudError, ConfigError
from tests.fakes.gce_fake import GceFake, fake_provider, launch_spec, run_script

PROJECT = "studio-test"
ZONE = "europe-west4-a"
EMAIL = account_email(PROJECT)
ROLE = f"projects/{PROJECT}/roles/studioserveSelfDelete"


@pytest.fixture
def gce() -> Iterator[GceFake]:
    with GceFake() as fake:
        yield fake


def provider(fake: GceFake, **options: object) -> GceProvider:
    result: GceProvider = fake_provider(fake, project=PROJECT, zone=ZONE, **options)
    return result


def launch(p: GceProvider, deployment_id: str) -> str:
    spec = launch_spec(deployment_id)
    info = p.launch(spec, lambda r: None)
    p.open_ports(spec, info, lambda r: None)
    return info.instance_id


def iam_writes(fake: GceFake) -> list[str]:
    return [
        f"{r.method} {r.path}"
        for r in fake.request_log()
        if r.path.startswith("/v1/") and r.method != "GET" and not r.path.endswith("getIamPolicy")
    ]


def test_create_makes_a_dedicated_account_once_and_the_instance_runs_as_it(
    gce: GceFake, tmp_path: Path
) -> None:
    first = provider(gce, service_account="create")
    name = launch(first, "ss-0000f001")
    account = gce.service_accounts[EMAIL]
    assert account["email"] == EMAIL
    role = gce.roles[ROLE]
    assert sorted(role["includedPermissions"]) == sorted(PERMISSIONS)
    assert "compute.instances.delete" in role["includedPermissions"]
    assert not any(p.startswith(("compute.instances.create", "iam.")) for p in PERMISSIONS)
    [binding] = [b for b in gce.policies[PROJECT]["bindings"] if b["role"] == ROLE]
    assert binding["members"] == [f"serviceAccount:{EMAIL}"]
    assert binding["condition"]["expression"] == CONDITION_EXPRESSION
    assert 'startsWith("studioserve-")' in CONDITION_EXPRESSION
    assert gce.policies[PROJECT]["version"] == 3
    # the owner's binding was kept
    assert any(b["role"] == "roles/owner" for b in gce.policies[PROJECT]["bindings"])
    [inst] = gce.all_instances()
    assert inst["serviceAccounts"] == [
        {"email": EMAIL, "scopes": ["https://www.googleapis.com/auth/compute"]}
    ]
    assert len(iam_writes(gce)) == 3  # account, role, policy

    # the instance's check passes with the dedicated account's rights, and it deletes itself
    checked = run_script(first.remote_preflight())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert EMAIL in checked.stdout
    ended = run_script(
        end_body(
            metadata_url=gce.url,
            api_url=gce.url,
            poweroff=f"echo poweroff > {tmp_path / 'off'}",
            grace=0,
            backoff=0.01,
            python=sys.executable,
        )
    )
    assert ended.returncode == 0, ended.stderr
    assert gce.all_instances() == []
    assert gce.all_firewalls() == []
    assert name.startswith("studioserve-")

    # a second deployment reuses everything
    second = provider(gce, service_account="create")
    launch(second, "ss-0000f002")
    assert len(iam_writes(gce)) == 3


def test_the_dedicated_account_may_delete_only_studioserve_resources(gce: GceFake) -> None:
    launch(provider(gce, service_account="create"), "ss-0000f003")
    token = gce.handle(
        "GET",
        "/computeMetadata/v1/instance/service-accounts/default/token",
        "",
        {"metadata-flavor": "Google"},
    )[1]
    assert isinstance(token, dict)
    auth = {"authorization": "Bearer " + token["access_token"]}
    base = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances"
    body = '{"permissions": ["compute.instances.delete", "compute.instances.setMetadata"]}'
    status, granted = gce.handle(
        "POST", f"{base}/studioserve-0000f003/testIamPermissions", body, auth
    )
    assert (status, granted) == (200, {"permissions": ["compute.instances.delete"]})
    # someone else's instance in the project
    gce.instances[(PROJECT, ZONE, "prod-db")] = {"name": "prod-db", "selfLink": "x"}
    status, granted = gce.handle("POST", f"{base}/prod-db/testIamPermissions", body, auth)
    assert (status, granted) == (200, {})
    status, _ = gce.handle("DELETE", f"{base}/prod-db", "", auth)
    assert status == 403


def test_a_grant_made_now_makes_the_check_wait_for_propagation(gce: GceFake) -> None:
    fresh = provider(gce, service_account="create")
    launch(fresh, "ss-0000f004")
    assert " 240 <<'STUDIOSERVE_PY'" in fresh.remote_preflight()
    reused = provider(gce, service_account="create")
    launch(reused, "ss-0000f005")
    assert " 0 <<'STUDIOSERVE_PY'" in reused.remote_preflight()


def test_an_account_the_api_does_not_know_yet_is_retried(gce: GceFake) -> None:
    gce.new_account_hidden_inserts = 2  # IAM propagation: the first two inserts do not see it
    launch(provider(gce, service_account="create"), "ss-0000f006")
    inserts = [
        r
        for r in gce.request_log()
        if r.method == "POST" and r.path.endswith(f"/zones/{ZONE}/instances")
    ]
    assert len(inserts) == 3
    assert [i["name"] for i in gce.all_instances()] == ["studioserve-0000f006"]


def test_a_concurrent_policy_change_is_retried(gce: GceFake) -> None:
    gce.fail("POST", r":setIamPolicy$", status=409, message="concurrent policy changes")
    launch(provider(gce, service_account="create"), "ss-0000f007")
    assert [b for b in gce.policies[PROJECT]["bindings"] if b["role"] == ROLE]


def test_a_soft_deleted_role_is_undeleted_and_repaired(gce: GceFake) -> None:
    gce.roles[ROLE] = {
        "name": ROLE,
        "includedPermissions": ["compute.instances.delete"],
        "deleted": True,
        "etag": "BwR0",
    }
    launch(provider(gce, service_account="create"), "ss-0000f008")
    role = gce.roles[ROLE]
    assert not role.get("deleted")
    assert sorted(role["includedPermissions"]) == sorted(PERMISSIONS)


def test_create_without_iam_rights_names_the_roles_and_creates_no_instance(
    gce: GceFake,
) -> None:
    gce.fail(
        "POST",
        rf"/v1/projects/{PROJECT}/serviceAccounts$",
        status=403,
        message="Permission 'iam.serviceAccounts.create' denied on resource",
    )
    with pytest.raises(CloudError) as info:
        launch(provider(gce, service_account="create"), "ss-0000f009")
    text = str(info.value)
    assert "iam.serviceAccounts.create" in text
    assert "roles/iam.serviceAccountAdmin" in text
    assert "--service-account EMAIL" in text
    assert gce.all_instances() == []


def test_an_email_names_an_existing_account(gce: GceFake) -> None:
    email = "runner@other-project.iam.gserviceaccount.com"
    launch(provider(gce, service_account=email), "ss-0000f00a")
    [inst] = gce.all_instances()
    assert inst["serviceAccounts"][0]["email"] == email
    assert iam_writes(gce) == []


def test_none_attaches_no_account(gce: GceFake) -> None:
    launch(provider(gce, service_account="none"), "ss-0000f00b")
    [inst] = gce.all_instances()
    assert "serviceAccounts" not in inst


def test_a_malformed_account_is_refused_before_anything_is_created(gce: GceFake) -> None:
    with pytest.raises(ConfigError, match="default, create, none or an account's email"):
        provider(gce, service_account="my-runner").preflight()
    assert [r for r in gce.request_log() if r.method != "GET"] == []


def test_the_plan_says_what_create_would_make(gce: GceFake) -> None:
    plan = provider(gce, service_account="create").plan(launch_spec("ss-0000f00c"))
    text = "\n".join(plan.creates)
    assert EMAIL in text
    assert "studioserveSelfDelete" in text
    assert "once per project" in text
    assert iam_writes(gce) == []
    assert gce.service_accounts == {}
