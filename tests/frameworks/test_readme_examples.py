"""The README's framework examples, run as written: save, `studio experiments add`, serve, ask.

Each literal block of the README's "Frameworks" section that starts with ``import`` is run in a
fresh folder; its ``# studio experiments add KEY DIR/ && studio serve KEY`` lines are then run
too, and the served model answers one example shaped by its own OIP metadata.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli.test_readme import literal_blocks
from tests.helpers import raw_post, start_cli, stop_cli

REPO = Path(__file__).resolve().parents[2]
SERVE = re.compile(
    r"#\s*studio experiments add (\S+) (\S+?)/?((?: --serving-config \S+)?)"
    r" && studio serve (\S+)((?: --\S+)*)"
)


def _framework_blocks() -> list[str]:
    text = (REPO / "README.rst").read_text()
    start = text.index("\nFrameworks\n----------\n")
    end = text.index("\nSeveral models, versions and hot reload\n", start)
    return [b for b in literal_blocks(text[start:end]) if SERVE.search(b)]


BLOCKS = _framework_blocks()


def test_the_framework_section_has_an_example_per_framework() -> None:
    joined = "\n".join(BLOCKS)
    for needle in (
        "torch.export",
        "torch.onnx",
        "skops",
        "xgboost",
        "lightgbm",
        "cloudpickle",
        "pyspark",
    ):
        assert needle in joined, needle
    assert all(SERVE.search(b) for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_framework_example_serves(tmp_path: Path, index: int) -> None:
    block = BLOCKS[index]
    env = {
        **os.environ,
        "STUDIO_STORE": str(tmp_path / "store"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
    }
    run = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for key, folder, config, served, flags_text in SERVE.findall(block):
        assert key == served
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "studioserve",
                "experiments",
                "add",
                key,
                str(tmp_path / folder),
                *config.split(),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert added.returncode == 0, added.stderr
        flags = flags_text.split()
        proc, url = start_cli([key, "--port", "0", "--killafter", "0", *flags], env)
        try:
            status, _, raw = raw_post(url, None, method="GET", path=f"/v2/models/{key}")
            assert status == 200, raw
            meta = json.loads(raw)
            spec = meta["inputs"][0]
            shape = [1 if d < 0 else d for d in spec["shape"][1:]]
            body = json.dumps({"k": np.zeros(shape).tolist()}).encode()
            status, _, raw = raw_post(url, body, {"Content-Type": "application/json"})
            assert status == 200, raw
            assert "k" in json.loads(raw)
        finally:
            assert stop_cli(proc) == 0
