"""The dedicated least-privilege service account GCE instances run as with
``--service-account create``: ``studioserve-self-delete@PROJECT.iam.gserviceaccount.com``,
holding one custom role (:data:`PERMISSIONS`: delete an instance, its boot disk and a firewall
rule, nothing else) on the project, under an IAM condition that limits it to resources named
``studioserve-*`` (:data:`CONDITION_EXPRESSION`).

Created once per project and reused after (each call checks and repairs what is missing);
nothing here is deleted with a deployment. Calls the IAM API (``iam.googleapis.com``: the
account and the role) and the Resource Manager API (``cloudresourcemanager.googleapis.com``:
the project's IAM policy) over REST through a caller-supplied authorized session (google-auth's
``AuthorizedSession``, built by :mod:`.gce`), so this module imports no google package.

Assumptions about the APIs (from their REST references): custom role ids allow letters, digits,
``_`` and ``.``; a soft-deleted custom role is returned by ``roles.get`` with ``deleted: true``
and must be undeleted (its id cannot be reused for 37 days); a policy with conditions must be
written as version 3; ``setIamPolicy`` answers 409 when the etag is stale, and 400 "does not
exist" for an account created moments ago (both retried). Deleting a firewall rule is assumed
to also need ``compute.networks.updatePolicy`` on its network, hence the network clause in the
condition (that permission alone changes nothing). An account created moments ago can take a
minute or more before an instance may use it and before its grant is effective.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import CloudError

logger = logging.getLogger(__name__)

IAM_URL = "https://iam.googleapis.com"
CRM_URL = "https://cloudresourcemanager.googleapis.com"
ACCOUNT_ID = "studioserve-self-delete"
ROLE_ID = "studioserveSelfDelete"
#: what the instance's end command needs: DELETE the instance (and with it its auto-delete
#: boot disk) and its firewall rule; the operations it starts are not polled
PERMISSIONS = (
    "compute.disks.delete",
    "compute.firewalls.delete",
    "compute.instances.delete",
    "compute.networks.updatePolicy",
)
CONDITION_TITLE = "studioserve resources only"
CONDITION_EXPRESSION = (
    'resource.type == "compute.googleapis.com/Network" || '
    'resource.name.extract("/instances/{name}").startsWith("studioserve-") || '
    'resource.name.extract("/disks/{name}").startsWith("studioserve-") || '
    'resource.name.extract("/firewalls/{name}").startsWith("studioserve-")'
)

_CREATE_HINT = (
    "--service-account create needs your account to hold roles/iam.serviceAccountAdmin, "
    "roles/iam.roleAdmin and roles/resourcemanager.projectIamAdmin (or Owner) on project "
    "{project}, with the IAM and Cloud Resource Manager APIs enabled; or ask an admin to run it "
    "once, or pass --service-account EMAIL of an account that may delete studioserve-* "
    "instances"
)


class Response(Protocol):
    """The part of a ``requests.Response`` used here."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class Session(Protocol):
    """The part of a ``requests.Session`` (google-auth's ``AuthorizedSession``) used here."""

    def request(self, method: str, url: str, **kwargs: Any) -> Response: ...


def account_email(project: str) -> str:
    """The dedicated account's email in ``project``."""
    return f"{ACCOUNT_ID}@{project}.iam.gserviceaccount.com"


def role_name(project: str) -> str:
    """The custom role's full name in ``project``."""
    return f"projects/{project}/roles/{ROLE_ID}"


@dataclasses.dataclass(frozen=True)
class SelfDeleteAccount:
    """The dedicated account, ready to use.

    :param created: what this call created or repaired (``"service account"``, ``"role"``,
        ``"binding"``); empty when everything was already in place. Anything in it means the
        grant may still be propagating.
    """

    email: str
    role: str
    created: tuple[str, ...]


def _message(status: int, text: str, data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or text)[:500]
    return f"HTTP {status}: {text[:300]}"


class IamClient:
    """Creates (or finds) the dedicated account, its role and its conditional grant.

    :param session: an authorized session with the cloud-platform scope.
    :param attempts: tries for calls that conflict or race with propagation.
    :param backoff: seconds before the first retry; doubled each time.
    """

    def __init__(
        self,
        session: Session,
        project: str,
        *,
        iam_url: str = IAM_URL,
        crm_url: str = CRM_URL,
        attempts: int = 6,
        backoff: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._session = session
        self.project = project
        self._iam = iam_url.rstrip("/") + "/v1/projects/" + project
        self._crm = crm_url.rstrip("/") + "/v1/projects/" + project
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._sleep = sleep
        self.email = account_email(project)
        self.role = role_name(project)

    def _call(
        self, action: str, method: str, url: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any, str]:
        """``(status, decoded JSON, message)``; raises CloudError when unreachable."""
        try:
            response = self._session.request(method, url, json=body, timeout=60)
        except OSError as e:  # requests' exceptions are OSErrors
            raise CloudError(f"GCE {action} failed: {e}") from e
        text = response.text
        try:
            data = response.json() if text.strip() else {}
        except ValueError:
            data = {}
        return response.status_code, data, _message(response.status_code, text, data)

    def _fail(self, action: str, status: int, message: str) -> CloudError:
        hint = ""
        upper = message.upper()
        if "SERVICE_DISABLED" in upper or "HAS NOT BEEN USED" in upper or "IS DISABLED" in upper:
            hint = (
                "; enable the IAM and Cloud Resource Manager APIs (`gcloud services enable "
                "iam.googleapis.com cloudresourcemanager.googleapis.com`)"
            )
        elif status in (401, 403):
            hint = "; " + _CREATE_HINT.format(project=self.project)
        return CloudError(f"GCE {action} failed ({status}): {message}{hint}")

    def exists(self) -> bool | None:
        """Whether the account exists (read-only; None when it cannot be told)."""
        try:
            status, _, _ = self._call("looking up the service account", "GET", self._account_url)
        except CloudError:
            return None
        return True if status == 200 else False if status == 404 else None

    @property
    def _account_url(self) -> str:
        return f"{self._iam}/serviceAccounts/{self.email}"

    def ensure(self) -> SelfDeleteAccount:
        """Create what is missing of the account, the role and the grant; returns the account.

        :raises CloudError: an API refused (with the roles your account needs).
        """
        created: list[str] = []
        if self._ensure_account():
            created.append("service account")
        if self._ensure_role():
            created.append("role")
        if self._ensure_binding():
            created.append("binding")
        if created:
            logger.info(
                "GCE: %s for %s (role %s, condition: studioserve-* resources only)",
                ", ".join(f"created the {c}" for c in created),
                self.email,
                self.role,
            )
        return SelfDeleteAccount(email=self.email, role=self.role, created=tuple(created))

    def _ensure_account(self) -> bool:
        action = "looking up the service account " + self.email
        status, data, message = self._call(action, "GET", self._account_url)
        if status == 200:
            if data.get("disabled"):
                raise CloudError(
                    f"the service account {self.email} is disabled: enable it "
                    f"(`gcloud iam service-accounts enable {self.email}`) or pass another "
                    "--service-account"
                )
            return False
        if status != 404:
            raise self._fail(action, status, message)
        action = "creating the service account " + self.email
        body = {
            "accountId": ACCOUNT_ID,
            "serviceAccount": {
                "displayName": "studioserve instances (self-delete only)",
                "description": (
                    "studio serve --cloud gcloud instances run as this account: it may delete "
                    "studioserve-* instances, disks and firewall rules, nothing else"
                ),
            },
        }
        status, data, message = self._call(action, "POST", f"{self._iam}/serviceAccounts", body)
        if status == 409:  # another launch made it in the meantime
            return False
        if status != 200:
            raise self._fail(action, status, message)
        return True

    def _ensure_role(self) -> bool:
        url = f"{self._iam}/roles/{ROLE_ID}"
        action = "looking up the custom role " + self.role
        status, data, message = self._call(action, "GET", url)
        if status == 404:
            action = "creating the custom role " + self.role
            body = {
                "roleId": ROLE_ID,
                "role": {
                    "title": "studioserve self-delete",
                    "description": (
                        "Lets a studioserve instance delete itself, its boot disk and its "
                        "firewall rule"
                    ),
                    "includedPermissions": list(PERMISSIONS),
                    "stage": "GA",
                },
            }
            status, data, message = self._call(action, "POST", f"{self._iam}/roles", body)
            if status == 409:
                return False
            if status != 200:
                raise self._fail(action, status, message)
            return True
        if status != 200:
            raise self._fail(action, status, message)
        changed = False
        if data.get("deleted"):
            action = "undeleting the custom role " + self.role
            status, data, message = self._call(
                action, "POST", url + ":undelete", {"etag": data.get("etag", "")}
            )
            if status != 200:
                raise self._fail(action, status, message)
            changed = True
        if sorted(data.get("includedPermissions") or []) != sorted(PERMISSIONS):
            action = "updating the custom role " + self.role
            body = {"includedPermissions": list(PERMISSIONS), "etag": data.get("etag", "")}
            status, data, message = self._call(
                action, "PATCH", url + "?updateMask=includedPermissions", body
            )
            if status != 200:
                raise self._fail(action, status, message)
            changed = True
        return changed

    def _ensure_binding(self) -> bool:
        member = "serviceAccount:" + self.email
        action = f"granting {self.role} to {self.email} on project {self.project}"
        for attempt in range(self._attempts):
            status, policy, message = self._call(
                action,
                "POST",
                f"{self._crm}:getIamPolicy",
                {"options": {"requestedPolicyVersion": 3}},
            )
            if status != 200:
                raise self._fail(action, status, message)
            bindings: list[dict[str, Any]] = policy.setdefault("bindings", [])
            binding = next(
                (
                    b
                    for b in bindings
                    if b.get("role") == self.role
                    and (b.get("condition") or {}).get("expression") == CONDITION_EXPRESSION
                ),
                None,
            )
            if binding is not None and member in binding.get("members", []):
                return False
            if binding is None:
                binding = {
                    "role": self.role,
                    "members": [],
                    "condition": {
                        "title": CONDITION_TITLE,
                        "description": "only resources whose name starts with studioserve-",
                        "expression": CONDITION_EXPRESSION,
                    },
                }
                bindings.append(binding)
            binding.setdefault("members", []).append(member)
            policy["version"] = 3
            status, _, message = self._call(
                action, "POST", f"{self._crm}:setIamPolicy", {"policy": policy}
            )
            if status == 200:
                return True
            retry = status in (409, 412) or (status == 400 and "does not exist" in message)
            if not retry or attempt + 1 == self._attempts:
                raise self._fail(action, status, message)
            delay = self._backoff * 2**attempt
            logger.info("GCE: %s: %s; retrying in %gs", action, message, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")
