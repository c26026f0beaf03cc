"""Counting the GPUs a framework would see, without importing one."""

from __future__ import annotations

import pytest

from studioserve.models import devices


@pytest.mark.parametrize(
    ("value", "count"), [("0,1,2,3", 4), ("1", 1), ("", 0), ("-1", 0), ("0,-1,1", 1)]
)
def test_cuda_visible_devices_decides(
    monkeypatch: pytest.MonkeyPatch, value: str, count: int
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert devices.visible_gpu_count() == count


def test_the_driver_list_counts_without_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (root / bus).mkdir()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_DRIVER_GPUS", root)
    assert devices.visible_gpu_count() == 2
    monkeypatch.setattr(devices, "_DRIVER_GPUS", root / "missing")
    assert devices.visible_gpu_count() == 0
