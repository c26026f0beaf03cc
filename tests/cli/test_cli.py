"""The `studio` command, in-process with CliRunner (and `--help` as a real process)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from studioserve.cli import CloudArgs, StudioCommand, StudioGroup, main, serve
from studioserve.config import ServeConfig
from studioserve.errors import StudioServeError


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "weights.h5").write_bytes(b"\x89HDF fake")
    (d / "sub" / "notes.txt").write_text("hello")
    return d


def test_help_is_fast_and_lists_commands() -> None:
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "studioserve", "--help"], capture_output=True, text=True, check=True
    )
    elapsed = time.monotonic() - start
    for command in ("serve", "experiments", "demo"):
        assert command in out.stdout
    # generous bound for a loaded CI machine; the point is that Keras/TF are not imported
    assert elapsed < 5, elapsed
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, studioserve, studioserve.cli; "
            "print(any(m in sys.modules for m in ('keras', 'tensorflow', 'numpy', 'flask', "
            "'torch', 'onnxruntime', 'onnx', 'sklearn', 'skops', 'xgboost', 'lightgbm', "
            "'pyspark', 'cloudpickle', 'joblib', 'ray')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"


def test_experiments_add_list_show_rm(runner: CliRunner, model_dir: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    r = runner.invoke(
        main,
        ["experiments", "add", "exp-1", str(model_dir), "--store", store, "--description", "d"],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["experiments", "list", "--store", store, "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.output)
    assert [e["key"] for e in listed] == ["exp-1"]
    assert listed[0]["description"] == "d"
    r = runner.invoke(main, ["experiments", "show", "exp-1", "--store", store])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert sorted(f["path"] for f in shown["files"]) == ["sub/notes.txt", "weights.h5"]
    r = runner.invoke(main, ["experiments", "add", "exp-1", str(model_dir), "--store", store])
    assert r.exit_code == 1
    assert "--force" in r.output
    r = runner.invoke(main, ["experiments", "rm", "exp-1", "--store", store])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["experiments", "list", "--store", store, "--json"])
    assert json.loads(r.output) == []


def test_store_from_environment(
    runner: CliRunner, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STUDIO_STORE", str(tmp_path / "envstore"))
    assert runner.invoke(main, ["experiments", "add", "e", str(model_dir)]).exit_code == 0
    assert (tmp_path / "envstore" / "e" / "experiment.json").is_file()
    assert (tmp_path / "envstore" / "e" / "modeldir" / "weights.h5").is_file()


@pytest.mark.parametrize("key", ["../etc", "a/b", "..", "x" * 129, "sp ace"])
def test_invalid_keys_are_refused(runner: CliRunner, model_dir: Path, key: str) -> None:
    r = runner.invoke(main, ["experiments", "add", key, str(model_dir)])
    assert r.exit_code == 1
    assert "invalid experiment key" in r.output
    r = runner.invoke(main, ["serve", key])
    assert r.exit_code == 1
    assert "invalid experiment key" in r.output


def test_serve_missing_key_names_store_and_closest(
    runner: CliRunner, model_dir: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    for key in ("mnist-7", "cifar", "mnist-8"):
        runner.invoke(main, ["experiments", "add", key, str(model_dir), "--store", store])
    r = runner.invoke(main, ["serve", "mnist-9", "--store", store, "--port", "0"])
    assert r.exit_code == 1
    assert store in r.output
    assert r.output.index("mnist-") < r.output.index("cifar")


def test_cloud_flags_need_cloud(runner: CliRunner) -> None:
    r = runner.invoke(main, ["serve", "k", "--gpus", "1", "--zone", "z"])
    assert r.exit_code == 2
    assert "--gpus, --zone need(s) --cloud" in r.output
    r = runner.invoke(main, ["serve", "k", "--subnet", "subnet-0123456789abcdef0"])
    assert r.exit_code == 2
    assert "--subnet need(s) --cloud" in r.output
    r = runner.invoke(
        main, ["serve", "k", "--cloud", "gcloud", "--subnet", "subnet-0123456789abcdef0"]
    )
    assert r.exit_code == 1
    assert "--subnet is for --cloud ec2" in r.output


def test_instances_list_empty_and_stop_needs_ids(runner: CliRunner) -> None:
    r = runner.invoke(main, ["instances", "list", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == []
    r = runner.invoke(main, ["instances", "stop"])
    assert r.exit_code == 2
    r = runner.invoke(main, ["instances", "stop", "nope"])
    assert r.exit_code == 1
    assert "no studioserve instance 'nope'" in r.output


def test_bad_options_exit_2(runner: CliRunner) -> None:
    r = runner.invoke(main, ["serve", "k", "--port", "70000"])
    assert r.exit_code == 2
    r = runner.invoke(main, ["serve", "k", "--max-batch-size", "0"])
    assert r.exit_code == 2


def test_serve_help_shows_servecfg_defaults(runner: CliRunner) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    ctx = click.Context(serve)
    shown = {
        opt.name: opt
        for opt in serve.params
        if isinstance(opt, click.Option) and opt.show_default and opt.name in defaults
    }
    assert set(shown) >= {
        "port",
        "host",
        "killafter",
        "max_batch_size",
        "max_delay_ms",
        "max_body",
        "threads",
        "request_timeout",
        "http_server",
    }
    help_text = " ".join(runner.invoke(main, ["serve", "--help"]).output.split())
    for name, opt in shown.items():
        assert opt.default == defaults[name], name
        record = opt.get_help_record(ctx)
        assert record is not None
        line = " ".join(" ".join(record).split())
        # a None default is computed at run time and shown as "(auto)"
        shown_default = "(auto)" if defaults[name] is None else str(defaults[name])
        assert re.search(rf"\[default: {re.escape(shown_default)}[;\]]", line), line
        assert line in help_text, line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--gpus", "1"),
        ("--instance-type", "g5.xlarge"),
        ("--machine-type", "g2-standard-4"),
        ("--accelerator", "l4"),
        ("--region", "us-east-1"),
        ("--subnet", "subnet-0123456789abcdef0"),
        ("--zone", "us-central1-a"),
        ("--project", "p"),
        ("--image", "ami-0123"),
        ("--allow-cidr", "10.0.0.0/8"),
        ("--max-lifetime", "120"),
        ("--ssh-user", "ubuntu"),
        ("--disk-gb", "200"),
        ("--provisioning-model", "spot"),
        ("--service-account", "create"),
        ("--allow-cpu-fallback", None),
        ("--dry-run", None),
    ],
)
def test_each_cloud_only_option_without_cloud_is_a_usage_error(
    runner: CliRunner, option: str, value: str | None
) -> None:
    r = runner.invoke(main, ["serve", "k", option, *([value] if value else [])])
    assert r.exit_code == 2
    assert "Usage: " in r.stderr
    assert f"Error: {option} need(s) --cloud ec2|gcloud" in r.stderr
    assert r.stdout == ""


def test_cloud_args_map_to_cloud_options() -> None:
    from studioserve.cloud import DEFAULT_MAX_LIFETIME

    options = CloudArgs(cloud="ec2").options()
    assert (options.cloud, options.gpus, options.max_lifetime) == ("ec2", 1, DEFAULT_MAX_LIFETIME)
    options = CloudArgs(cloud="gcloud", gpus=0, zone="z", max_lifetime=120.0).options()
    assert (options.gpus, options.zone, options.max_lifetime) == (0, "z", 120.0)
    options = CloudArgs(
        cloud="gcloud", provisioning_model="spot", allow_cpu_fallback=True, dry_run=True
    ).options()
    assert (options.provisioning_model, options.allow_cpu_fallback) == ("spot", True)


def test_a_library_error_is_one_line_on_stderr_and_exit_1(
    runner: CliRunner, tmp_path: Path
) -> None:
    r = runner.invoke(main, ["experiments", "show", "nosuchkey", "--store", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ")
    assert "nosuchkey" in lines[0]
    assert not isinstance(r.exception, StudioServeError)  # converted, not a traceback


def test_a_library_error_exits_1_as_a_process(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "studioserve", "experiments", "rm", "nosuchkey"],
        capture_output=True,
        text=True,
        env={**os.environ, "STUDIO_STORE": str(tmp_path)},
    )
    assert out.returncode == 1
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("Error: ")


def test_every_command_converts_library_errors() -> None:
    def walk(group: click.Group) -> Iterator[click.Command]:
        for command in group.commands.values():
            yield command
            if isinstance(command, click.Group):
                yield from walk(command)

    assert isinstance(main, StudioGroup)
    commands = list(walk(main))
    assert {c.name for c in commands} >= {"serve", "demo", "bench", "instances", "experiments"}
    for command in commands:
        assert isinstance(
            command, StudioGroup if isinstance(command, click.Group) else StudioCommand
        )
