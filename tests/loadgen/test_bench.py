"""``studio bench`` against a live server: a sane table, CSV and PNG, in both protocols.

Short runs (``--duration 1``); the figures themselves are not asserted (no timed tests), only
that they are present, consistent and error-free.
"""

from __future__ import annotations

import csv
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from studioserve.cli import main
from studioserve.errors import ConfigError
from studioserve.loadgen import BenchConfig, BenchResult, LevelResult, Target, run_bench
from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.tensors import TensorSpec
from tests.helpers import running_server

W = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)


def _tiny() -> PipeModel:
    pipe = ModelPipe(name="tiny")
    pipe.add(lambda x: x @ W, max_batch_size=64, name="matmul")
    return PipeModel(
        pipe,
        source="bench-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (16,), "float32")],
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with running_server("tiny", model=_tiny()) as s:
        yield s


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _table_rows(output: str) -> list[list[str]]:
    """The data rows of the printed table (lines that start with a level number)."""
    return [line.split() for line in output.splitlines() if re.match(r"\s*[\d.]+\s+[\d,]+\s", line)]


@pytest.mark.parametrize("protocol", ["pickle", "oip"])
def test_bench_writes_a_table_csv_and_png(server: Any, tmp_path: Path, protocol: str) -> None:
    csv_path, png_path = tmp_path / "b.csv", tmp_path / "b.png"
    args = ["bench", server.url, "--protocol", protocol, "--concurrency", "1,4"]
    args += ["--duration", "1", "--warmup", "0.2", "--csv", str(csv_path), "--plot", str(png_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"studio bench {server.url}" in out
    assert (
        "OIP POST /v2/models/tiny/infer, binary" if protocol == "oip" else "pickle POST /"
    ) in out
    header = next(line for line in out.splitlines() if "concurrency" in line)
    assert header.split() == [
        "concurrency",
        "requests",
        "req/s",
        "p50",
        "ms",
        "p90",
        "ms",
        "p99",
        "ms",
        "errors",
        "gen",
        "busy",
    ]
    table = _table_rows(out)
    assert [r[0] for r in table] == ["1", "4"]
    for row in table:
        requests = int(row[1].replace(",", ""))
        assert requests > 0
        assert float(row[2].replace(",", "")) > 0
        p50, p90, p99 = (float(v.replace(",", "")) for v in row[3:6])
        assert 0 < p50 <= p90 <= p99
        assert row[6] == "0"  # errors
    rows = _rows(csv_path)
    assert [(r["protocol"], r["mode"], r["level"]) for r in rows] == [
        (protocol, "concurrency", "1.0"),
        (protocol, "concurrency", "4.0"),
    ]
    for r in rows:
        assert int(r["requests"]) == int(r["ok"]) > 0
        assert r["errors"] == "0"
        assert float(r["req_per_s"]) > 0
        assert 0 < float(r["p50_ms"]) <= float(r["p99_ms"]) <= float(r["max_ms"])
        assert 0 <= float(r["generator_busy"]) <= 1.5
    assert rows[1]["processes"] in ("1", "2", "3", "4")
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    assert "wrote" in out


def test_requests_mode_sends_exactly_that_many(server: Any, tmp_path: Path) -> None:
    csv_path = tmp_path / "n.csv"
    args = ["bench", server.url, "-n", "25", "-c", "1,3", "--warmup", "0", "--csv", str(csv_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [int(r["requests"]) for r in _rows(csv_path)] == [25, 25]
    assert [int(r["ok"]) for r in _rows(csv_path)] == [25, 25]


def test_open_loop_request_rate(server: Any, tmp_path: Path) -> None:
    csv_path = tmp_path / "r.csv"
    args = ["bench", server.url, "-r", "50,100", "-n", "30", "--warmup", "0"]
    args += ["--protocol", "oip", "--json-tensors", "--csv", str(csv_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "req/s offered" in result.output
    assert "JSON tensors" in result.output
    rows = _rows(csv_path)
    assert [(r["mode"], r["level"], r["requests"]) for r in rows] == [
        ("rate", "50.0", "30"),
        ("rate", "100.0", "30"),
    ]
    assert all(r["errors"] == "0" for r in rows)


def test_body_from_a_file_and_a_batch(server: Any, tmp_path: Path) -> None:
    body = tmp_path / "body.pkl"
    body.write_bytes(pickle.dumps({"a": np.ones((8, 16), np.float32)}))
    args = ["bench", server.url, "--body", str(body), "--batch", "8", "-n", "10", "-c", "2"]
    result = CliRunner().invoke(main, [*args, "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert f"body from {body}" in result.output
    assert "rows/s" in result.output
    (row,) = _table_rows(result.output)
    assert row[1] == "10"


def test_synthesised_batch_matches_the_signature(server: Any) -> None:
    result = run_bench(
        BenchConfig(url=server.url, concurrency=(2,), requests=8, warmup=0, batch=5),
        progress=None,
    )
    assert "x: float32[5, 16]" in result.target.description
    assert result.levels[0].ok == 8
    assert result.levels[0].rows_per_second == pytest.approx(5 * result.levels[0].throughput)


def test_progress_bar_is_drawn_on_the_given_stream(server: Any) -> None:
    stream = io.StringIO()
    run_bench(
        BenchConfig(url=server.url, concurrency=(1,), duration=0.5, warmup=0), progress=stream
    )
    drawn = stream.getvalue()
    assert "c=1" in drawn
    assert "[#" in drawn
    assert drawn.endswith("\r")  # cleared at the end


def test_token_is_sent_and_a_failing_probe_stops_early(tmp_path: Path) -> None:
    with running_server("tiny", model=_tiny(), token="s3cret") as s:
        runner = CliRunner()
        bad = runner.invoke(main, ["bench", s.url, "-n", "5", "-c", "1", "--warmup", "0"])
        assert bad.exit_code == 1
        assert "HTTP 401 (pass --token)" in bad.output
        for protocol in ("pickle", "oip"):
            ok = runner.invoke(
                main,
                ["bench", s.url, "-n", "5", "-c", "1", "--warmup", "0", "-p", protocol],
                env={"STUDIO_TOKEN": "s3cret"},
            )
            assert ok.exit_code == 0, ok.output
            assert _table_rows(ok.output)[0][1] == "5"


def test_unreachable_server_and_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    # a port nothing listens on: bind one and close it
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(main, ["bench", f"http://127.0.0.1:{port}", "-n", "1"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output
    result = runner.invoke(main, ["bench", "http://127.0.0.1:1", "-c", "1,x"])
    assert result.exit_code == 2
    assert "give numbers like 1,8,64" in result.output
    result = runner.invoke(main, ["bench", "ftp://example/", "-n", "1"])
    assert result.exit_code == 1
    assert "give an http:// or https:// URL" in result.output
    with pytest.raises(ConfigError, match="concurrency levels must be >= 1"):
        BenchConfig(url="http://127.0.0.1:1", concurrency=(0,))


def _level(busy: float, errors: int = 0) -> LevelResult:
    return LevelResult(
        mode="concurrency",
        level=64,
        requests=100 + errors,
        ok=100,
        errors=errors,
        error_kinds={"HTTP 503": errors} if errors else {},
        seconds=1.0,
        throughput=100.0,
        rows_per_second=100.0,
        p50_ms=1.0,
        p90_ms=2.0,
        p99_ms=3.0,
        max_ms=4.0,
        mean_ms=1.5,
        processes=2,
        generator_busy=busy,
        generator_cpu_per_request_us=200.0,
    )


def test_the_table_says_when_the_generator_is_the_bottleneck() -> None:
    target = Target("http", "10.0.0.5", 80, "/", b"", {}, "pickle POST /", 1)
    cfg = BenchConfig(url="http://10.0.0.5", concurrency=(64,))
    calm = BenchResult(cfg, target, [_level(0.4)], 8).table()
    assert "bottleneck" not in calm
    assert "40%" in calm
    busy = BenchResult(cfg, target, [_level(0.97, errors=3)], 8).table()
    assert "97% !" in busy
    assert "the load generator was the bottleneck at c=64" in busy
    assert "c=64: 3 error(s): HTTP 503 x3" in busy
