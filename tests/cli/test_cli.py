"""The `studio` command, in-process with CliRunner (and `--help` as a real process)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from studioserve.cli import main


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
            "import sys, studioserve.cli; "
            "print(any(m in sys.modules for m in ('keras', 'tensorflow', 'numpy', 'flask')))",
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
