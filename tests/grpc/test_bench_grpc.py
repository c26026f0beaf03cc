"""``studio bench --protocol grpc`` against the real server's gRPC port: the message built from
the ModelMetadata call, the closed and open loops, and the probe's errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from studioserve.cli import main
from studioserve.errors import ClientError, ConfigError
from studioserve.loadgen import BenchConfig, run_bench
from studioserve.runtime import ModelServer


def test_closed_and_open_loop_over_grpc(tiny: ModelServer) -> None:
    assert tiny.grpc_address is not None
    closed = run_bench(
        BenchConfig(
            url=tiny.grpc_address,
            protocol="grpc",
            concurrency=(1, 3),
            requests=12,
            warmup=0,
            batch=2,
            processes=1,
        )
    )
    assert "gRPC ModelInfer 'tiny', raw tensors x: float32[2, 16]" in closed.target.description
    assert [level.ok for level in closed.levels] == [12, 12]
    assert all(level.errors == 0 for level in closed.levels)
    opened = run_bench(
        BenchConfig(
            url=f"grpc://{tiny.grpc_address}",
            protocol="grpc",
            request_rates=(50.0,),
            requests=10,
            warmup=0,
            processes=1,
        )
    )
    assert opened.levels[0].ok == 10


def test_the_cli_speaks_grpc(tiny: ModelServer) -> None:
    assert tiny.grpc_address is not None
    result = CliRunner().invoke(
        main,
        [
            "bench",
            tiny.grpc_address,
            "--protocol",
            "grpc",
            "-c",
            "2",
            "-n",
            "6",
            "--warmup",
            "0",
            "--processes",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "gRPC ModelInfer 'tiny'" in result.output


def test_probe_errors_name_the_problem(tiny: ModelServer, secured: ModelServer) -> None:
    assert tiny.grpc_address is not None
    with pytest.raises(ClientError, match="NOT_FOUND: unknown model 'ghost'"):
        run_bench(BenchConfig(url=tiny.grpc_address, protocol="grpc", model="ghost", warmup=0))
    assert secured.grpc_address is not None
    with pytest.raises(ClientError, match=r"UNAUTHENTICATED \(pass --token\)"):
        run_bench(BenchConfig(url=secured.grpc_address, protocol="grpc", warmup=0))
    with pytest.raises(ConfigError, match="host:port"):
        run_bench(BenchConfig(url="https://example.invalid/x", protocol="grpc", warmup=0))
