"""The cloud library's local pieces: options, scripts, the wheel, the registry, the address
lookup, and the package's import hygiene. No cloud and no SSH here."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import studioserve.cloud
from studioserve.cloud import (
    CloudOptions,
    Deployment,
    Overrides,
    Resource,
    deploy,
    stop_instances,
)
from studioserve.cloud.base import deletion_order, normalize_cidr, parse_host_keys
from studioserve.cloud.network import detect_public_cidr
from studioserve.cloud.payload import resolve_wrapper, serve_args
from studioserve.cloud.registry import InstanceRecord, Registry, registry_path
from studioserve.cloud.scripts import (
    boot_script,
    default_end_command,
    install_script,
    parse_python_version,
    requirements_for,
    run_script,
)
from studioserve.cloud.wheel import build_wheel
from studioserve.config import ServeConfig
from studioserve.errors import CloudError, ConfigError, InvalidKey

CONSOLE = """\
[    0.000000] Linux version 6.8.0-1021-aws (buildd@lcy02-amd64-086)
ec2: #############################################################
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
ec2: 256 SHA256:0dJ2mO9V3JqgPwq7mHc2sS5Hr5x4oQw5V1Ecf4iSQlQ root@ip-172-31-5-9 (ECDSA)
ec2: -----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOld= root@ip-172-31-5-9
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBl6OSx8pbnCw4fV3XQfqUq2VHr2sG6bCUeZRzvD+5Vd root@ip-172-31-5-9
-----END SSH HOST KEY KEYS-----
Cloud-init v. 24.4 finished at Tue, 24 Nov 2026 10:00:00 +0000.
"""


def test_host_keys_are_read_from_the_console_key_block() -> None:
    assert parse_host_keys(CONSOLE) == [
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOld=",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBl6OSx8pbnCw4fV3XQfqUq2VHr2sG6bCUeZRzvD+5Vd",
    ]
    prefixed = "\n".join("ec2: " + line for line in CONSOLE.splitlines())
    assert len(parse_host_keys(prefixed)) == 2
    assert parse_host_keys("[ 0.0] booting\nlogin:") == []
    # a reboot prints the block again: the last one wins
    again = CONSOLE.replace("Bl6OSx8", "Zz6OSx8")
    assert "Zz6OSx8" in parse_host_keys(CONSOLE + again)[1]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("203.0.113.7", "203.0.113.7/32"),
        (" 203.0.113.7/32 ", "203.0.113.7/32"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("2001:db8::1", "2001:db8::1/128"),
    ],
)
def test_allow_cidr_is_normalized(value: str, expected: str) -> None:
    assert normalize_cidr(value) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cloud": "azure"}, "unknown cloud"),
        ({"gpus": -1}, "--gpus"),
        ({"max_lifetime": 0}, "--max-lifetime"),
        ({"allow_cidr": "everyone"}, "--allow-cidr"),
        ({"ssh_user": "root; rm -rf /"}, "SSH user"),
        ({"disk_gb": 5}, "boot disk"),
        ({"install_timeout": 0}, "timeouts"),
        ({"provisioning_model": "spot"}, "--provisioning-model is for --cloud gcloud"),
        ({"cloud": "gcloud", "provisioning_model": "cheap"}, "--provisioning-model 'cheap'"),
    ],
)
def test_bad_options_say_what_to_fix(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"cloud": "ec2", **changes}
    with pytest.raises(ConfigError, match=message):
        CloudOptions(**fields)  # type: ignore[arg-type]


def test_test_seams_are_explicit_overrides_never_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("STUDIOSERVE_CONNECT_HOST", "STUDIOSERVE_SSH_PORT", "STUDIOSERVE_HOST_KEY"):
        monkeypatch.setenv(name, "planted")
    overrides = Overrides(connect_host="127.0.0.1", ssh_port=2200, remote_requirements=())
    assert (overrides.connect_host, overrides.ssh_port) == ("127.0.0.1", 2200)
    assert Overrides().connect_host is None  # the environment is not read
    with pytest.raises(ConfigError, match="SSH port"):
        Overrides(ssh_port=0)
    fields = {f.name for f in dataclasses.fields(CloudOptions)}
    assert not fields & {"connect_host", "endpoint_url", "remote_dir", "hooks", "host_key"}
    reads_env = re.compile(r"(environ|getenv)[^\n]*STUDIOSERVE_")
    sources = Path(studioserve.cloud.__file__).parent.glob("*.py")
    assert not [p.name for p in sources if reads_env.search(p.read_text())]


def test_lease_covers_the_timeouts_and_never_exceeds_the_lifetime() -> None:
    options = CloudOptions(cloud="ec2", ssh_timeout=100, install_timeout=200, ready_timeout=300)
    assert options.lease == 100 + 200 + 300 + 600
    assert CloudOptions(cloud="ec2", max_lifetime=120).lease == 120
    assert CloudOptions(cloud="ec2").lease < CloudOptions(cloud="ec2").max_lifetime / 4


def _sh_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "script.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)


def _run_boot(script: str, root: Path, *, systemd: bool) -> subprocess.CompletedProcess[str]:
    """Run a boot script (or the lifetime command) under ``root`` as the instance would, with
    ``shutdown`` and ``systemctl`` recording their arguments instead of acting."""
    bin_dir = root / "fakebin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("shutdown", "systemctl"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "$@" >> {root}/{name}.log\n')
        tool.chmod(0o755)
    if systemd:
        (root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(root)}
    return subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, check=True, timeout=30
    )


def _wait_for_line(path: Path, text: str) -> str:
    """The file's content once ``text`` is in it (or after 5 s): ``shutdown`` is started in
    the background, after a synchronous ``shutdown -c`` has already written to the log."""
    for _ in range(100):
        if path.exists() and text in path.read_text():
            break
        time.sleep(0.05)
    return path.read_text() if path.exists() else ""


def test_boot_script_starts_the_lease_from_the_instance_s_own_clock(tmp_path: Path) -> None:
    script = boot_script(
        deployment_id="ss-0123abcd", lease=5400, end_body="echo bye", root=str(tmp_path)
    )
    _sh_syntax_ok(script, tmp_path)
    assert "shutdown -h now" not in script
    assert "OnCalendar=2" not in script
    before = int(time.time())
    _run_boot(script, tmp_path, systemd=False)
    state = tmp_path / "var/lib/studioserve"
    booted = int((state / "booted-at").read_text())
    assert before <= booted <= int(time.time())
    assert int((state / "ends-at").read_text()) == booted + 5400
    expected = "-h +90 studioserve: lifetime reached"
    assert expected in _wait_for_line(tmp_path / "shutdown.log", expected)
    assert (tmp_path / "usr/local/sbin/studioserve-end").stat().st_mode & 0o111
    # ready: the launch moves the end to --max-lifetime after the FIRST boot
    _run_boot(f"{tmp_path}/usr/local/sbin/studioserve-lifetime 86400", tmp_path, systemd=False)
    assert int((state / "ends-at").read_text()) == booted + 86400
    # a reboot runs the boot script again (GCE): it keeps the first boot and the extension
    (state / "booted-at").write_text(f"{booted}\n")
    _run_boot(script, tmp_path, systemd=False)
    assert int((state / "booted-at").read_text()) == booted
    assert int((state / "ends-at").read_text()) == booted + 86400
    with pytest.raises(subprocess.CalledProcessError):
        _run_boot(f"{tmp_path}/usr/local/sbin/studioserve-lifetime soon", tmp_path, systemd=False)


def test_with_systemd_the_backstop_is_a_persistent_timer(tmp_path: Path) -> None:
    script = boot_script(
        deployment_id="ss-0123abcd", lease=600, end_body="echo bye", root=str(tmp_path)
    )
    _run_boot(script, tmp_path, systemd=True)
    booted = int((tmp_path / "var/lib/studioserve/booted-at").read_text())
    timer = (tmp_path / "etc/systemd/system/studioserve-expire.timer").read_text()
    when = dt.datetime.fromtimestamp(booted + 600, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f"OnCalendar={when}" in timer
    assert "Persistent=true" in timer
    service = (tmp_path / "etc/systemd/system/studioserve-expire.service").read_text()
    assert f"ExecStart={tmp_path}/usr/local/sbin/studioserve-end" in service
    assert "restart studioserve-expire.timer" in (tmp_path / "systemctl.log").read_text()


def test_boot_scripts_hold_no_secret_and_gce_s_asks_its_token_at_run_time(tmp_path: Path) -> None:
    from studioserve.cloud.gce import END_BODY

    gce_script = boot_script(deployment_id="ss-0123abcd", lease=600, end_body=END_BODY)
    _sh_syntax_ok(gce_script, tmp_path)
    assert "metadata.google.internal" in gce_script
    assert "service-accounts/default/token" in gce_script  # fetched at run time, on the VM


def test_run_and_install_scripts(tmp_path: Path) -> None:
    config = ServeConfig(
        key="exp.1",
        port=8080,
        killafter=600,
        max_batch_size=32,
        max_delay_ms=2.5,
        threads=8,
        token="never-in-a-script",
        verbose=True,
    )
    args = serve_args(
        config,
        remote_dir="/home/ubuntu/studio serve",
        port=8080,
        wrapper_arg="/home/ubuntu/studio serve/upload/wrapper/w.py",
        bind_host="0.0.0.0",
    )
    assert args[:3] == ["/home/ubuntu/studio serve/venv/bin/studio", "serve", "exp.1"]
    flags = dict(zip(args[3::2], args[4::2], strict=False))
    assert flags["--host"] == "0.0.0.0"
    assert flags["--port"] == "8080"
    assert flags["--killafter"] == "600"
    assert flags["--token-file"] == "/home/ubuntu/studio serve/token"
    assert flags["--max-batch-size"] == "32"
    assert flags["--max-delay-ms"] == "2.5"
    assert "--threads" in args
    assert "--verbose" in args
    assert "--max-body" not in args  # defaults are left to the server
    script = run_script(
        deployment_id="ss-0123abcd",
        remote_dir="/home/ubuntu/studio serve",
        serve_args=args,
        end_command="sudo -n /usr/local/sbin/studioserve-end",
    )
    _sh_syntax_ok(script, tmp_path)
    assert "'/home/ubuntu/studio serve/token'" in script
    assert "never-in-a-script" not in script
    assert script.rstrip().endswith("sudo -n /usr/local/sbin/studioserve-end")
    default_end = run_script(
        deployment_id="ss-0123abcd",
        remote_dir="/home/ubuntu/studioserve",
        serve_args=args,
        end_command=default_end_command(),
    )
    _sh_syntax_ok(default_end, tmp_path)
    assert "/usr/local/sbin/studioserve-end" in default_end
    install = install_script(
        remote_dir="/home/ubuntu/studioserve",
        python="python3",
        wheel_name="studioserve-0.1.0+gabc-py3-none-any.whl",
        key="exp.1",
        families=["tensorflow"],
        requirements=requirements_for(["tensorflow"], gpu=True, wheel="dist/w.whl"),
        site_dirs=("/opt/site",),
    )
    _sh_syntax_ok(install, tmp_path)
    assert "python3 -m venv venv" in install
    assert "--system-site-packages" not in install  # isolated from apt's Python packages
    assert "tensorflow[and-cuda]" in install  # only installed when the image lacks it
    assert "experiments add exp.1 upload/modeldir --store store" in install
    # the venv fallback refreshes the package lists first, waiting for cloud-init's lock
    update = install.index("apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 update")
    assert update < install.index("install -y -q python3-venv")


@pytest.mark.parametrize(
    ("families", "gpu", "expected"),
    [
        (["tensorflow"], False, ["tensorflow-cpu>=2.16", "keras>=3"]),
        (["tensorflow"], True, ["tensorflow[and-cuda]>=2.16", "keras>=3"]),
        (["torch"], True, ["W[torch]"]),
        (["onnx"], True, ["onnxruntime-gpu>=1.17"]),
        (["onnx"], False, ["W[onnx]"]),
        (["sklearn", "xgboost"], False, ["W[sklearn,xgboost]"]),
        ([], True, []),
    ],
)
def test_the_instance_installs_the_model_s_frameworks(
    families: list[str], gpu: bool, expected: list[str]
) -> None:
    assert requirements_for(families, gpu=gpu, wheel="W") == expected


def test_the_remote_python_version_is_read_from_its_output() -> None:
    assert parse_python_version("3.12\n") == (3, 12)
    assert parse_python_version("warning\n3.10") == (3, 10)
    assert parse_python_version("") is None
    assert parse_python_version("sh: python3: not found") is None


def test_wheel_of_the_running_package(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"studioserve-{studioserve.__version__}+g")
    assert wheel.name.endswith("-py3-none-any.whl")
    again = build_wheel(tmp_path)
    assert again == wheel  # cached by content
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "studioserve/cloud/launch.py" in names
        assert "studioserve/cli.py" in names
        assert not any("__pycache__" in n for n in names)
        dist_info = wheel.name.split("-py3")[0] + ".dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        assert "Requires-Dist: flask" in metadata
        # the extras travel too, so the instance can install WHEEL[torch]
        assert "Provides-Extra: torch" in metadata
        assert 'extra == "torch"' in metadata
        core = [line for line in metadata.splitlines() if "flask" in line.lower()]
        assert core
        assert all("extra ==" not in line for line in core)
        assert "studio = studioserve.cli:main" in zf.read(f"{dist_info}/entry_points.txt").decode()
        for line in zf.read(f"{dist_info}/RECORD").decode().splitlines():
            name, digest, size = line.split(",")
            if not digest:
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + expected.decode()
            assert int(size) == len(data)


def test_wrapper_files_are_uploaded_and_module_names_found(tmp_path: Path) -> None:
    wrapper = tmp_path / "my_wrapper.py"
    wrapper.write_text("def create_model(modeldir):\n    return lambda d: d\n")
    assert resolve_wrapper(str(wrapper)) == (wrapper.resolve(), None)
    path, name = resolve_wrapper("json")  # an importable module: its file is uploaded
    assert path is not None
    assert path.name == "__init__.py"
    assert name is None
    assert resolve_wrapper("no_such_module_xyz") == (None, "no_such_module_xyz")
    assert resolve_wrapper(None) == (None, None)


@pytest.fixture
def echo_server() -> Iterator[dict[str, object]]:
    state: dict[str, object] = {"body": b"203.0.113.9\n"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state["body"]
            assert isinstance(body, bytes)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="ip-echo")
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_default_allow_cidr_is_your_own_address_asked_directly(
    echo_server: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(echo_server["url"])
    assert detect_public_cidr(url) == "203.0.113.9/32"
    # behind a proxy: SSH and the readiness check go direct, so the lookup must too (through
    # the proxy it would see the proxy's address; here the "proxy" does not even exist)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert detect_public_cidr(url) == "203.0.113.9/32"
    echo_server["body"] = b"<html>captive portal</html>"
    with pytest.raises(CloudError, match=r"directly: HTTPS_PROXY.*pass --allow-cidr"):
        detect_public_cidr(url)


def test_deploy_refuses_unsafe_or_impossible_requests(tmp_path: Path) -> None:
    opts = CloudOptions(cloud="ec2", allow_cidr="203.0.113.9/32")
    with pytest.raises(ConfigError, match="--no-auth"):
        deploy(ServeConfig(key="k", no_auth=True), tmp_path, opts)
    with pytest.raises(ConfigError, match="not a folder"):
        deploy(ServeConfig(key="k"), tmp_path / "missing", opts)
    with pytest.raises(ConfigError, match="SSH's port"):
        deploy(ServeConfig(key="k", port=22), tmp_path, opts)
    with pytest.raises(InvalidKey):
        deploy(ServeConfig(key="../etc"), tmp_path, opts)


def test_registry_round_trip_is_private(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "instances.json")
    record = InstanceRecord(
        id="ss-0123abcd",
        cloud="gcloud",
        state="running",
        instance_id="studioserve-0123abcd",
        zone="us-central1-a",
        created_at=(dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).isoformat(),
        resources=[Resource("instance", "studioserve-0123abcd", "us-central1-a")],
    )
    registry.upsert(record)
    assert (tmp_path / "instances.json").stat().st_mode & 0o777 == 0o600
    [loaded] = registry.load()
    assert loaded == record
    assert loaded.location == "us-central1-a"
    assert dt.timedelta(hours=1) < loaded.age < dt.timedelta(hours=3)
    assert json.loads((tmp_path / "instances.json").read_text())["version"] == 1
    registry.remove(record.id)
    assert registry.load() == []


def test_stop_needs_known_ids(tmp_path: Path) -> None:
    assert registry_path().name == "instances.json"
    with pytest.raises(ConfigError, match="--all"):
        stop_instances()
    with pytest.raises(ConfigError, match="no studioserve instance 'ss-ffffffff'"):
        stop_instances(["ss-ffffffff"])
    assert stop_instances(all=True) == []


def test_deletion_order_and_token_hidden_from_repr() -> None:
    resources = [
        Resource("local-key", "/k"),
        Resource("security-group", "sg-1"),
        Resource("key-pair", "kp"),
        Resource("instance", "i-1"),
        Resource("instance", "i-1"),
    ]
    assert [r.kind for r in deletion_order(resources)] == [
        "instance",
        "security-group",
        "key-pair",
        "local-key",
    ]
    now = dt.datetime.now(dt.UTC)
    dep = Deployment(
        id="ss-0123abcd",
        cloud="ec2",
        instance_id="i-1",
        instance_type="g6.xlarge",
        image="ami-1",
        region="us-east-1",
        zone=None,
        project=None,
        url="http://203.0.113.9:5000",
        token="tok-must-not-show",
        public_ip="203.0.113.9",
        port=5000,
        ssh_user="ubuntu",
        key_path=Path("/k"),
        gpu="1x NVIDIA L4",
        created_at=now,
        expires_at=now,
        killafter=600,
        remote_dir="/home/ubuntu/studioserve",
        log_path="/home/ubuntu/studioserve/serve.log",
        resources=(),
    )
    assert "tok-must-not-show" not in repr(dep)


def test_public_api_and_no_sdk_import_at_import_time() -> None:
    exported = {
        name
        for name in dir(studioserve.cloud)
        if not name.startswith("_")
        and not isinstance(getattr(studioserve.cloud, name), types.ModuleType)
    } - {"annotations"}
    assert set(studioserve.cloud.__all__) == exported
    assert callable(studioserve.cloud.deploy)
    code = (
        "import sys, studioserve.cloud; "
        "bad = [m for m in ('boto3', 'paramiko', 'google.cloud.compute_v1', 'keras') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
