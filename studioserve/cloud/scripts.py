"""The shell and Python text that runs on the instance: the boot script, the install, the
serve-then-end wrapper, the GPU check. Pure functions of their arguments (no IO), so each can
be read, syntax-checked and run by the tests. None of them holds a secret: the boot script is
readable from the cloud API, and the token travels as a 0600 file over SSH.

The backstop timer is computed on the instance from the instance's own clock: the boot script
records the first boot's time and ends the instance ``lease`` seconds after it;
``studioserve-lifetime SECONDS`` moves that end to SECONDS after the first boot (the launch
calls it with ``--max-lifetime`` once the server is ready).
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Iterable, Sequence

from .base import END_SCRIPT, LIFETIME_SCRIPT

#: where the boot script keeps the first boot's time and the planned end (epoch seconds)
STATE_DIR = "/var/lib/studioserve"

#: the oldest Python the remote virtualenv may be made from (pyproject's requires-python)
MIN_PYTHON = (3, 11)


def lifetime_script(*, deployment_id: str, root: str = "") -> str:
    """``studioserve-lifetime [SECONDS]``: end the instance SECONDS after its first boot.

    Without SECONDS it re-applies the end already planned (after a reboot on images without
    systemd, where ``shutdown -h +N`` does not survive one). With systemd the end is a
    persistent timer at that absolute time (it fires after a reboot too).

    :param root: prefixed to every absolute path (tests run the script in a folder).
    """
    q = shlex.quote
    units = q(f"{root}/etc/systemd/system")
    return f"""#!/bin/sh
# studioserve {deployment_id}: end this instance SECONDS after its first boot.
set -eu
state={q(root + STATE_DIR)}
start=$(cat "$state/booted-at")
if [ $# -ge 1 ]; then
  case "$1" in
    ''|*[!0-9]*) echo "studioserve-lifetime: not a number of seconds: $1" >&2; exit 2;;
  esac
  echo $((start + $1)) > "$state/ends-at"
fi
end=$(cat "$state/ends-at")
if command -v systemctl >/dev/null 2>&1 && [ -d {q(root + "/run/systemd/system")} ]; then
  when=$(date -u -d "@$end" '+%Y-%m-%d %H:%M:%S UTC')
  mkdir -p {units}
  cat > {units}/studioserve-expire.service <<UNIT
[Unit]
Description=studioserve: end this instance (lifetime reached)
[Service]
Type=oneshot
ExecStart={root}{END_SCRIPT} "lifetime reached"
UNIT
  cat > {units}/studioserve-expire.timer <<UNIT
[Unit]
Description=studioserve: end of this instance's lifetime
[Timer]
OnCalendar=$when
Persistent=true
[Install]
WantedBy=timers.target
UNIT
  systemctl daemon-reload
  systemctl enable studioserve-expire.timer >/dev/null 2>&1 || true
  systemctl restart studioserve-expire.timer
  echo "studioserve: this instance ends at $when at the latest"
  exit 0
fi
left=$(( (end - $(date +%s) + 59) / 60 ))
[ "$left" -lt 1 ] && left=1
shutdown -c >/dev/null 2>&1 || true
shutdown -h +"$left" "studioserve: lifetime reached" >/dev/null 2>&1 &
echo "studioserve: this instance ends in $left minutes at the latest"
"""


def boot_script(*, deployment_id: str, lease: float, end_body: str, root: str = "") -> str:
    """The boot script (EC2 user data / GCE startup-script): installs the end command and the
    lifetime command, records the first boot, and starts the launch lease (``lease`` seconds
    after the first boot; the launch extends it once the server is ready).

    Safe to run on every boot (GCE runs its startup script each time): the first boot's time
    and an extended end are kept.

    :param root: prefixed to every absolute path (tests run the script in a folder).
    """
    q = shlex.quote
    end_script = root + END_SCRIPT
    lifetime = root + LIFETIME_SCRIPT
    return f"""#!/bin/sh
# studioserve deployment {deployment_id}: end this instance when `studio serve` exits, or when
# its lifetime runs out (a launch lease of {lease:.0f}s from the first boot until the server
# is ready, then --max-lifetime). This script holds no secret.
state={q(root + STATE_DIR)}
mkdir -p "$state" {q(posixpath.dirname(end_script))}
[ -s "$state/booted-at" ] || date +%s > "$state/booted-at"
cat > {q(end_script)} <<'STUDIOSERVE_END'
#!/bin/sh
# Ends this instance (studioserve {deployment_id}).
logger -t studioserve "ending this instance: ${{1:-server exited}}" 2>/dev/null || true
{end_body.strip()}
STUDIOSERVE_END
chmod 755 {q(end_script)}
cat > {q(lifetime)} <<'STUDIOSERVE_LIFETIME'
{lifetime_script(deployment_id=deployment_id, root=root).strip()}
STUDIOSERVE_LIFETIME
chmod 755 {q(lifetime)}
if [ -s "$state/ends-at" ]; then
  {q(lifetime)}
else
  {q(lifetime)} {int(lease)}
fi
"""


def run_script(
    *,
    deployment_id: str,
    remote_dir: str,
    serve_args: Sequence[str],
    end_command: str,
) -> str:
    """The script started on the instance: run ``studio serve``, then end the instance.

    The token is not in it (``--token-file`` names a 0600 file).
    """
    q = shlex.quote
    serve = " ".join(q(a) for a in serve_args)
    return f"""#!/bin/sh
# studioserve deployment {deployment_id}: serve, then end this instance when the server exits.
cd {q(remote_dir)} || exit 1
export STUDIO_HOME={q(remote_dir + "/home")}
{serve}
status=$?
echo "studioserve: studio serve exited with status $status; ending the instance"
{end_command}
"""


def sudo_command(command: str) -> str:
    """``command`` as root: directly when logged in as root, else with ``sudo -n``."""
    return f'if [ "$(id -u)" = 0 ]; then S=; else S="sudo -n"; fi; $S {command}'


def default_end_command() -> str:
    """What ``run.sh`` runs when the server exits: the boot script's end command (power off
    and delete), with a plain power-off if that command is missing."""
    return (
        'if [ "$(id -u)" = 0 ]; then S=; else S="sudo -n"; fi\n'
        f'$S {END_SCRIPT} "server exited" || $S shutdown -h now "studioserve: server exited"'
    )


def default_lifetime_command(seconds: float) -> str:
    """The command that moves the backstop timer to ``seconds`` after the first boot."""
    return sudo_command(f"{LIFETIME_SCRIPT} {int(seconds)}")


def python_version_command(python: str) -> str:
    """Prints ``MAJOR.MINOR`` of ``python`` on the instance (nothing when it is missing)."""
    return f"{shlex.quote(python)} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"


def parse_python_version(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` from :func:`python_version_command`'s output, None if unreadable."""
    parts = text.strip().splitlines()[-1:] if text.strip() else []
    try:
        major, minor = parts[0].split(".")[:2]
        return int(major), int(minor)
    except (IndexError, ValueError):
        return None


#: the modules that show a framework is installed in the remote virtualenv
FRAMEWORK_MODULES = {
    "tensorflow": ("tensorflow", "keras"),
    "torch": ("torch",),
    "onnx": ("onnxruntime",),
    "sklearn": ("sklearn", "skops"),
    "xgboost": ("xgboost",),
    "lightgbm": ("lightgbm",),
    "closure": ("cloudpickle",),
    "spark": ("pyspark",),
}


def requirements_for(
    families: Iterable[str], *, gpu: bool, wheel: str, extras: Iterable[str] = ()
) -> list[str]:
    """The pip requirements that give the remote virtualenv the model's frameworks.

    TensorFlow comes as ``tensorflow[and-cuda]`` on a GPU instance and ``tensorflow-cpu``
    otherwise; ONNX Runtime as ``onnxruntime-gpu`` on a GPU instance; the others as the
    studioserve extra of the same name (``WHEEL[torch]``), with ``extras`` (``grpc`` for
    ``--grpc-port``).
    """
    reqs: list[str] = []
    extras = list(extras)
    for family in sorted(set(families)):
        if family == "tensorflow":
            reqs += ["tensorflow[and-cuda]>=2.16" if gpu else "tensorflow-cpu>=2.16", "keras>=3"]
        elif family == "onnx" and gpu:
            reqs += ["onnxruntime-gpu>=1.17"]
        elif family in FRAMEWORK_MODULES:
            extras.append(family)
    if extras:
        reqs.insert(0, f"{wheel}[{','.join(extras)}]")
    return reqs


def install_script(
    *,
    remote_dir: str,
    python: str,
    wheel_name: str,
    key: str,
    families: Sequence[str],
    requirements: Sequence[str],
    venv_args: Sequence[str] = (),
    pip_args: Sequence[str] = (),
    site_dirs: Sequence[str] = (),
) -> str:
    """``install.sh``: an isolated virtualenv (not ``--system-site-packages``: an image's
    apt-installed Python packages, which pip cannot uninstall, would otherwise collide with
    the wheel's dependencies; the frameworks bring their own CUDA wheels), the studioserve
    wheel and its dependencies, the model's frameworks, and the experiment added to a store
    on the instance.

    The virtualenv falls back to installing ``python3-venv`` (Debian/Ubuntu images without it)
    after an ``apt-get update``; both wait up to 10 minutes for the package lock, which
    cloud-init's own upgrades often hold right after boot.
    """
    q = shlex.quote
    make_venv = " ".join([q(python), "-m", "venv", *(q(a) for a in venv_args), "venv"])
    pip = " ".join(q(a) for a in pip_args)
    apt = "sudo -n apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3"
    lines = [
        "set -eu",
        f"cd {q(remote_dir)}",
        f"export STUDIO_HOME={q(remote_dir + '/home')} PIP_DISABLE_PIP_VERSION_CHECK=1",
        "export PIP_NO_INPUT=1",
        "if [ ! -x venv/bin/python ]; then",
        f"  {make_venv} 2>/dev/null || {{",
        "    echo 'studioserve: installing python3-venv' >&2",
        f"    {apt} update -q >/dev/null",
        f"    {apt} install -y -q python3-venv >/dev/null",
        "    rm -rf venv",
        f"    {make_venv}",
        "  }",
        "fi",
    ]
    if site_dirs:
        write_pth = (
            "import sys, sysconfig; "
            "open(sysconfig.get_path('purelib') + '/studioserve-extra-site.pth', 'w')"
            ".write(''.join(d + chr(10) for d in sys.argv[1:]))"
        )
        dirs = " ".join(q(d) for d in site_dirs)
        lines.append(f"venv/bin/python -c {q(write_pth)} {dirs}")
    lines.append(f"venv/bin/python -m pip install -q {pip} {q('dist/' + wheel_name)}")
    if requirements:
        modules = sorted({m for f in families for m in FRAMEWORK_MODULES.get(f, ())})
        have = (
            "import importlib.util as u, sys; "
            f"sys.exit(0 if all(u.find_spec(m) for m in {modules!r}) else 1)"
        )
        reqs = " ".join(q(r) for r in requirements)
        lines.append(f"venv/bin/python -c {q(have)} || venv/bin/python -m pip install -q {reqs}")
    lines.append(f"venv/bin/studio experiments add {q(key)} upload/modeldir --store store --quiet")
    return "\n".join(lines) + "\n"


#: run with the virtualenv's Python after the install: which GPUs the driver and the model's
#: framework see, as one JSON line ({"gpus": [names], "framework": N or null, "error": ...})
GPU_CHECK = r"""
import json, shutil, subprocess, sys
family = sys.argv[1] if len(sys.argv) > 1 else ""
out = {"gpus": [], "framework": None, "error": None}
if shutil.which("nvidia-smi"):
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60,
        ).stdout
        out["gpus"] = [n.strip() for n in names.splitlines() if n.strip()]
    except Exception as e:
        out["error"] = "nvidia-smi: %s" % e
try:
    if family == "tensorflow":
        import tensorflow as tf
        out["framework"] = len(tf.config.list_physical_devices("GPU"))
    elif family == "torch":
        import torch
        out["framework"] = torch.cuda.device_count()
    elif family == "onnx":
        import onnxruntime as ort
        out["framework"] = int("CUDAExecutionProvider" in ort.get_available_providers())
except Exception as e:
    out["error"] = "%s: %s: %s" % (family, type(e).__name__, e)
print(json.dumps(out))
"""

#: the frameworks whose GPU use the check can see (the others run on the CPU anyway)
GPU_FRAMEWORKS = ("tensorflow", "torch", "onnx")


def gpu_check_command(venv_python: str, family: str) -> str:
    """The command that prints :data:`GPU_CHECK`'s JSON line on the instance."""
    return f"{shlex.quote(venv_python)} -c {shlex.quote(GPU_CHECK)} {shlex.quote(family)}"
