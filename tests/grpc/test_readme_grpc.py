"""The README's tritonclient.grpc recipe runs as written against a real server (its address
and model name pointed at the tiny model's)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from studioserve.runtime import ModelServer
from tests.cli.test_readme import literal_blocks

README = Path(__file__).resolve().parents[2] / "README.rst"


def test_the_readme_grpc_recipe_runs(tiny: ModelServer) -> None:
    blocks = [b for b in literal_blocks(README.read_text()) if "tritonclient.grpc" in b]
    assert len(blocks) == 1, blocks
    assert tiny.grpc_address is not None
    code = blocks[0].replace("127.0.0.1:8001", tiny.grpc_address).replace("mnist-7", "tiny")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.rst gRPC recipe", "exec"), {})  # noqa: S102
    assert out.getvalue().startswith("[[0. 0. 0. 0.]")
