"""The text that runs on a GCE instance to end it: the end command's body (delete the firewall
rule and the instance through the Compute API with the instance's own service account, then
power off) and the check run over SSH before the upload (may that account delete them?).

Pure functions of their arguments (no IO, no google import), so the tests run them on this
machine against the fake API and metadata server. Both talk to the metadata server at
``metadata_url`` (``/computeMetadata/v1/...`` with ``Metadata-Flavor: Google``) for the
instance's token, project, name and zone, and to the Compute API at ``api_url``
(``/compute/v1/projects/...``); neither holds a secret (the token never leaves the instance).
"""

from __future__ import annotations

import shlex

#: the metadata server every GCE instance reaches without credentials
DEFAULT_METADATA_URL = "http://metadata.google.internal"
#: the Compute Engine API
DEFAULT_API_URL = "https://compute.googleapis.com"
#: what the end command runs last (a plain power-off)
DEFAULT_POWEROFF = 'shutdown -h now "studioserve: ending"'

#: exit status of the end script's Python when the API refused the instance's own deletion
#: (403, or no service account): the caller powers off, which leaves a stopped VM
EXIT_DENIED = 3
#: exit status when the API could not be reached or kept failing after the retries
EXIT_FAILED = 1

#: the role the checks name for an account that may not delete the instance
INSTANCE_ROLE = "roles/compute.instanceAdmin.v1"
#: the role that allows deleting firewall rules
FIREWALL_ROLE = "roles/compute.securityAdmin"

_GRANT_HINT = (
    f"grant the account {INSTANCE_ROLE} (and {FIREWALL_ROLE} for the firewall rule) on the "
    "project, or deploy with --service-account create (a dedicated account that may delete "
    "only studioserve-* resources) or --service-account EMAIL (an account that may)"
)

#: shared by both scripts: metadata and API helpers with retries on transient failures
#: (network errors, 429 and 5xx), never on 403/404
_COMMON_PY = r'''
import json, sys, time, urllib.error, urllib.request

MD = sys.argv[1].rstrip("/") + "/computeMetadata/v1/"
API = sys.argv[2].rstrip("/") + "/compute/v1/projects/"
ATTEMPTS = max(1, int(sys.argv[3]))
BACKOFF = float(sys.argv[4])
TRANSIENT = {429, 500, 502, 503, 504}
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message):
    print("studioserve: " + message, file=sys.stderr, flush=True)


def short(text):
    text = " ".join(str(text).split())
    try:
        text = json.loads(text)["error"]["message"]
    except Exception:
        pass
    return text[:300]


def send(opener, method, url, headers, body=None, timeout=30):
    """(status, text) after retrying transient failures; status 0: unreachable."""
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers = dict(headers, **{"Content-Type": "application/json"})
    status, text = 0, ""
    for attempt in range(ATTEMPTS):
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
            if status not in TRANSIENT:
                return status, text
        except (urllib.error.URLError, OSError) as e:
            status, text = 0, str(getattr(e, "reason", e))
        if attempt + 1 < ATTEMPTS:
            delay = BACKOFF * 2 ** attempt
            what = status or "unreachable"
            log(f"{method} {url}: {what} ({short(text)}); retrying in {delay:g}s")
            time.sleep(delay)
    return status, text


def metadata(path):
    status, text = send(DIRECT, "GET", MD + path, {"Metadata-Flavor": "Google"}, timeout=10)
    return status, text.strip()


def identity():
    """(token, email, project, zone, name); token None when the instance has no account."""
    status, text = metadata("instance/service-accounts/default/token")
    token = json.loads(text)["access_token"] if status == 200 else None
    if status not in (200, 404):
        problem = f"{status}: {short(text)}"
        raise SystemExit(f"studioserve: the metadata server did not answer ({problem})")
    email = metadata("instance/service-accounts/default/email")[1] if token else ""
    values = []
    for path in ("project/project-id", "instance/zone", "instance/name"):
        got, value = metadata(path)
        if got != 200:
            raise SystemExit(f"studioserve: the metadata server has no {path} ({got})")
        values.append(value)
    project, zone, name = values
    return token, email, project, zone.rsplit("/", 1)[-1], name


def api(method, path, token, body=None):
    headers = {"Authorization": "Bearer " + token, "Accept": "application/json"}
    return send(urllib.request.build_opener(), method, API + path, headers, body)
'''

#: the end command's Python: DELETE the firewall rule, then the instance (the API keeps
#: deleting it after this VM goes down); exits 0 when the instance's deletion was accepted
_END_PY = r"""
GRANT_HINT = sys.argv[5]
token, email, project, zone, name = identity()
if token is None:
    log("this instance has no service account, so it cannot delete itself; it powers off "
        "instead (a stopped VM is not deleted by its max run duration): run "
        "`studio instances list` to delete it and its firewall rule")
    sys.exit(EXIT_DENIED)
targets = [
    ("firewall rule", f"{project}/global/firewalls/{name}", "compute.firewalls.delete"),
    ("instance", f"{project}/zones/{zone}/instances/{name}", "compute.instances.delete"),
]
result = EXIT_FAILED
for what, path, permission in targets:
    status, text = api("DELETE", path, token)
    if 200 <= status < 300 or status == 404:
        state = "is already gone" if status == 404 else "is being deleted"
        log(f"the {what} {name} {state}")
        ok = True
    elif status == 403:
        log(f"the service account {email} may not delete the {what} {name} (403, it lacks "
            f"{permission}: {short(text)}): {GRANT_HINT}")
        ok = False
    else:
        log(f"could not delete the {what} {name} ({status or 'unreachable'}: {short(text)})")
        ok = False
    if what == "instance":
        result = 0 if ok else (EXIT_DENIED if status == 403 else EXIT_FAILED)
if result != 0:
    log("this instance could not delete itself, so it powers off instead; a stopped VM is not "
        "deleted by its max run duration and its disk is still billed: run "
        "`studio instances list` to delete it and its firewall rule")
sys.exit(result)
"""

#: the check run over SSH before the upload: may the instance's account delete it (and its
#: firewall rule)? Waits up to WAIT seconds for a grant that is still propagating
_PREFLIGHT_PY = r"""
GRANT_HINT = sys.argv[5]
WAIT = float(sys.argv[6])
token, email, project, zone, name = identity()
if token is None:
    log("this instance has no service account, so it could not delete itself when the server "
        "exits (it would only power off, and a stopped VM is never deleted by its max run "
        "duration); deploy with --service-account create, default or EMAIL")
    sys.exit(EXIT_DENIED)


def granted(path, permission):
    status, text = api("POST", path + "/testIamPermissions", token, {"permissions": [permission]})
    if status == 200:
        return permission in (json.loads(text or "{}").get("permissions") or []), ""
    return False, f"{status or 'unreachable'}: {short(text)}"


deadline = time.monotonic() + WAIT
instance_path = f"{project}/zones/{zone}/instances/{name}"
while True:
    ok, problem = granted(instance_path, "compute.instances.delete")
    if ok or time.monotonic() >= deadline:
        break
    time.sleep(min(10.0, max(0.05, deadline - time.monotonic())))
if not ok:
    detail = f" (testIamPermissions answered {problem})" if problem else ""
    print(f"studioserve: the instance's service account {email} may not delete the instance "
          f"{name} (it lacks compute.instances.delete{detail}), so it could not delete itself "
          "when the server exits: it would only power off, and a stopped VM is never deleted "
          f"by its max run duration. Fix: {GRANT_HINT}", flush=True)
    sys.exit(EXIT_DENIED)
ok, problem = granted(f"{project}/global/firewalls/{name}", "compute.firewalls.delete")
if not ok and not problem.startswith("404"):
    detail = f" (testIamPermissions answered {problem})" if problem else ""
    print(f"studioserve: warning: the service account {email} may not delete the firewall "
          f"rule {name}{detail}; `studio instances list` deletes it after the instance ends "
          f"({GRANT_HINT})", flush=True)
print(f"studioserve: the service account {email} may delete this instance", flush=True)
"""


def _python_call(
    python: str,
    code: str,
    *,
    metadata_url: str,
    api_url: str,
    attempts: int,
    backoff: float,
    extra: tuple[str, ...],
) -> str:
    q = shlex.quote
    args = " ".join(
        q(a) for a in (metadata_url, api_url, str(attempts), f"{backoff:g}", _GRANT_HINT, *extra)
    )
    source = (
        f"EXIT_DENIED, EXIT_FAILED = {EXIT_DENIED}, {EXIT_FAILED}\n"
        + _COMMON_PY.strip()
        + "\n\n"
        + code.strip()
    )
    return f"{q(python)} - {args} <<'STUDIOSERVE_PY'\n{source}\nSTUDIOSERVE_PY"


def end_body(
    *,
    metadata_url: str = DEFAULT_METADATA_URL,
    api_url: str = DEFAULT_API_URL,
    poweroff: str = DEFAULT_POWEROFF,
    grace: float = 120.0,
    attempts: int = 6,
    backoff: float = 2.0,
    python: str = "python3",
) -> str:
    """The end command's shell body (``studioserve-end``, run as root).

    DELETEs the firewall rule and the instance through the API with the token of the
    instance's service account, retrying transient failures (network errors, 429, 5xx) with
    exponential backoff (``backoff``, twice that, ...; ``attempts`` tries). A 403 is not
    retried: it is logged with the role to grant. Then it powers off with ``poweroff``: after
    ``grace`` seconds when the deletion was accepted (the deletion stops the VM first), at
    once when it was not (a stopped VM is no longer billed for its machine, but its
    maxRunDuration no longer deletes it: ``studio instances list`` does).
    """
    call = _python_call(
        python,
        _END_PY,
        metadata_url=metadata_url,
        api_url=api_url,
        attempts=attempts,
        backoff=backoff,
        extra=(),
    )
    return f"""{call}
rc=$?
if [ "$rc" = 0 ]; then
  sleep {grace:g}
else
  logger -t studioserve "the instance could not delete itself (status $rc); powering off" \\
    2>/dev/null || true
fi
{poweroff}
"""


def preflight_script(
    *,
    metadata_url: str = DEFAULT_METADATA_URL,
    api_url: str = DEFAULT_API_URL,
    wait: float = 0.0,
    attempts: int = 4,
    backoff: float = 2.0,
    python: str = "python3",
) -> str:
    """The check run on the instance over SSH before the upload.

    Asks the metadata server for the instance's token and the Compute API's
    ``instances.testIamPermissions`` whether that account holds ``compute.instances.delete``
    on the instance: exits :data:`EXIT_DENIED` with the role to grant and the
    ``--service-account`` fix when not (after up to ``wait`` seconds, for a grant that is
    still propagating). ``firewalls.testIamPermissions`` for ``compute.firewalls.delete``
    only warns: a leftover rule costs nothing and ``studio instances list`` deletes it.
    """
    return _python_call(
        python,
        _PREFLIGHT_PY,
        metadata_url=metadata_url,
        api_url=api_url,
        attempts=attempts,
        backoff=backoff,
        extra=(f"{wait:g}",),
    )


def no_account_note() -> str:
    """What the check says for ``--service-account none`` (the launch goes on)."""
    return (
        "studioserve: --service-account none: this instance cannot delete itself. It ends "
        "anyway: its max run duration makes Compute Engine DELETE it while it runs (the launch "
        "lease, then --max-lifetime); when the server exits it powers off, and a stopped VM is "
        "never deleted by that rule: `studio instances list` (or `studio instances stop`) "
        "deletes it, its disk and its firewall rule"
    )


def note_script(text: str) -> str:
    """A shell script that prints ``text`` and succeeds."""
    return f"printf '%s\\n' {shlex.quote(text)}"
