"""The README's Python snippets run as written against the bundled demo (`studio demo`).

Every literal block of README.rst that imports studioserve is executed, with the README's URL
(``http://127.0.0.1:5000``) pointed at a live demo server on an ephemeral port. Names the README
leaves to the reader (``x1``, ``preprocess``, ``images``, ...) are bound to real values of the
demo model's shape first, so a snippet that drifts from the API fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import start_cli, stop_cli

REPO = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:5000"


def literal_blocks(text: str) -> list[str]:
    """The reST literal blocks (the indented lines after a ``::``), dedented."""
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            blocks.append("\n".join(block).strip("\n"))
        else:
            i += 1
    return blocks


def python_snippets() -> list[str]:
    text = (REPO / "README.rst").read_text()
    return [b for b in literal_blocks(text) if re.search(r"^from studioserve", b, re.M)]


def quick_start_commands() -> list[str]:
    """The quick start's ``.venv/bin/python -c`` and ``curl`` lines (backslash-joined)."""
    text = (REPO / "README.rst").read_text().replace("\\\n    ", "")
    return [
        line.strip()
        for block in literal_blocks(text)
        for line in block.splitlines()
        if line.startswith((".venv/bin/python -c", "curl "))
    ]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("readme") / "store"
    env = dict(os.environ, STUDIO_STORE=str(store))
    proc, url = start_cli(["--port", "0", "--killafter", "0"], env, command="demo")
    try:
        yield url
    finally:
        assert stop_cli(proc) == 0


def _namespace() -> dict[str, Any]:
    """Real values for the names the README's snippets leave to the reader (demo shapes)."""
    from studioserve.demo import build_demo_model

    rng = np.random.default_rng(0)
    images = [rng.random((1, 4), dtype=np.float32) for _ in range(3)]
    return {
        "x1": rng.random(4, dtype=np.float32),
        "x2": rng.random((2, 4), dtype=np.float32),
        "preprocess": lambda x: np.asarray(x, dtype=np.float32),
        "model": build_demo_model(),
        "postprocess": lambda rows: rows.argmax(axis=-1),
        "images": images,
        "image": images[0],
    }


def test_the_readme_has_python_snippets() -> None:
    snippets = python_snippets()
    assert any("Client(" in s for s in snippets)
    assert any("ModelPipe" in s for s in snippets)
    assert len(quick_start_commands()) == 2


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_python_snippet_runs(demo: str, index: int) -> None:
    snippet = python_snippets()[index].replace(README_URL, demo)
    namespace = _namespace()
    exec(compile(snippet, f"README.rst snippet {index}", "exec"), namespace)  # noqa: S102
    if "client" in namespace:  # the Client block: it answered with the keys it was sent
        result = namespace["client"].predict({"a": namespace["x1"], "b": namespace["x2"]})
        assert set(result) == {"a", "b"}
        assert result["a"].shape == (3,)
        assert result["b"].shape == (2, 3)
    if "labels" in namespace:  # the pipeline block: one label per image, in order
        assert len(namespace["labels"]) == len(namespace["images"])
        assert namespace["label"].shape == (1,)


def test_readme_quick_start_client_lines_work(demo: str) -> None:
    python_line, curl_line = quick_start_commands()
    code = shlex.split(python_line)[2]
    result = subprocess.run(
        [sys.executable, "-c", code.replace(README_URL, demo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "'a': array([" in result.stdout
    assert curl_line.endswith(f"{README_URL}/")
