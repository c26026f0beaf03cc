"""How many GPUs this process may use, without importing any framework.

Counting them through a framework (TensorFlow's ``list_physical_devices``, torch's
``cuda.device_count``) would import it for every model, whatever its framework; the NVIDIA
driver lists its GPUs under ``/proc/driver/nvidia/gpus`` and ``CUDA_VISIBLE_DEVICES`` narrows
them, which every framework honours.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["visible_gpu_count"]

_DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")


def visible_gpu_count() -> int:
    """The GPUs a framework in this process would see (0 on a machine without NVIDIA GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        kept = []
        for e in entries:
            if e.startswith("-"):  # "-1": no GPU, and nothing after it counts
                break
            kept.append(e)
        return len(kept)
    try:
        return sum(1 for entry in _DRIVER_GPUS.iterdir() if entry.is_dir())
    except OSError:
        return 0
