"""The Ray backend's options and start-up errors, without a cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from studioserve.cli import main
from studioserve.config import ServeConfig
from studioserve.errors import ConfigError
from studioserve.rayserve.options import RayOptions, parse_autoscale


def test_autoscale_is_min_colon_max() -> None:
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4", "0:2", "3:2", "a:b", "1:"):
        with pytest.raises(ConfigError, match="autoscale"):
            parse_autoscale(bad)


def test_ray_options_need_the_ray_backend_and_agree() -> None:
    with pytest.raises(ConfigError, match="--replicas need"):
        ServeConfig(key="m", replicas=2)
    with pytest.raises(ConfigError, match="--ray-address need"):
        ServeConfig(key="m", ray_address="auto")
    with pytest.raises(ConfigError, match="not both"):
        ServeConfig(key="m", backend="ray", replicas=2, autoscale=(1, 3))
    with pytest.raises(ConfigError, match="--backend"):
        ServeConfig(key="m", backend="kubernetes")


def test_replicas_come_from_the_flag_then_instances_then_serving_toml() -> None:
    plain = ServeConfig(key="m", backend="ray")
    assert RayOptions().deployment(plain, instances=None, max_batch_size=64)["num_replicas"] == 1
    assert RayOptions().deployment(plain, instances=3, max_batch_size=64)["num_replicas"] == 3
    given = ServeConfig(key="m", backend="ray", instances=2)
    assert RayOptions().deployment(given, instances=3, max_batch_size=64)["num_replicas"] == 2
    flag = RayOptions(replicas=4).deployment(given, instances=3, max_batch_size=64)
    assert flag["num_replicas"] == 4


def test_batching_queue_and_gpus_map_onto_replica_options() -> None:
    config = ServeConfig(key="m", backend="ray", queue_size=100)
    out = RayOptions(gpus=1, autoscale=(1, 5)).deployment(config, instances=None, max_batch_size=32)
    assert out["max_ongoing_requests"] == 64  # a batch can fill while one computes
    assert out["max_queued_requests"] == 100
    assert out["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert "num_replicas" not in out
    scaling = out["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 5)
    assert scaling["target_ongoing_requests"] == 32


def test_the_cli_maps_gpus_to_replicas_and_refuses_cloud_with_ray() -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["serve", "m", "--backend", "ray", "--cloud", "ec2"])
    assert r.exit_code != 0
    assert "--cloud and --backend ray" in r.output
    r = runner.invoke(main, ["serve", "m", "--replicas", "2"])
    assert r.exit_code != 0
    assert "--backend ray" in r.output
    r = runner.invoke(main, ["serve", "m", "--backend", "ray", "--autoscale", "5:1"])
    assert r.exit_code != 0
    assert "1 <= MIN <= MAX" in r.output


def test_without_ray_the_error_names_the_extra() -> None:
    probe = (
        "import sys; sys.modules['ray'] = None\n"
        "from studioserve.rayserve.backend import import_ray\n"
        "try:\n    import_ray()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ConfigError")
    assert "pip install 'studioserve[ray]'" in out.stdout
