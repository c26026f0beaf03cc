"""The README's first command: `studio demo` serves the bundled experiment, and the client
snippet and curl line it prints work as printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_readme_quick_start_names_the_two_commands() -> None:
    readme = (REPO / "README.rst").read_text()
    assert "make demo" in readme
    assert "make test" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert "studio demo" in makefile


def test_demo_serves_and_its_snippets_work(tmp_path: Path) -> None:
    env = dict(os.environ, STUDIO_STORE=str(tmp_path / "store"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "studioserve", "demo", "--port", "0", "--killafter", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("curl "):
                break
        text = "".join(lines)
        assert "Serving experiment 'demo-mlp'" in text, text
        start = lines.index("Try it from Python:\n") + 1
        snippet = "".join(
            ln[4:] for ln in lines[start:] if ln.startswith("    ") and "curl " not in ln
        )
        result = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "'a': array([" in result.stdout
        curl_line = lines[-1].strip()
        assert re.search(r"http://127\.0\.0\.1:\d+/$", curl_line)
        if shutil.which("curl"):
            out = subprocess.run(curl_line, shell=True, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            probs = json.loads(out.stdout)["a"]
            assert len(probs) == 3
            assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
