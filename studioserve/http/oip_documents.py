"""The JSON documents of the Open Inference Protocol routes: server and model metadata, and
Triton's model configuration, built from a served model version's signature and pipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .._version import __version__
from ..models import Model
from ..serving.repository import ServedModel, ServedVersion
from ..tensors import TensorSpec
from ..wire.oip_codec import CONFIG_TYPES, spec_datatype

__all__ = ["model_config", "model_metadata", "server_metadata"]

EXTENSIONS: Final = [
    "binary_tensor_data",
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
]


def _dims(shape: Sequence[int | None]) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def _batched(model: Model) -> bool:
    return model.batches and bool(model.inputs)


def _max_batch_size(model: Model) -> int:
    pipe = model.pipe
    if pipe is None or not _batched(model):
        return 0
    return int(pipe.max_batch_size or 0)


def _tensor_meta(model: Model, specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    batch = [-1] if _batched(model) else []
    return [
        {"name": s.name, "datatype": spec_datatype(s), "shape": batch + _dims(s.shape)}
        for s in specs
    ]


def server_metadata() -> dict[str, Any]:
    return {"name": "studioserve", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(entry: ServedModel, served: ServedVersion) -> dict[str, Any]:
    """The metadata of ``served`` (a version of ``entry``): every served version is listed."""
    model = served.model
    return {
        "name": entry.name,
        "versions": [str(v) for v in sorted(entry.versions)],
        "platform": "ensemble" if entry.steps else model.platform,
        "inputs": _tensor_meta(model, model.inputs),
        "outputs": _tensor_meta(model, model.outputs),
    }


def _config_tensors(specs: Sequence[TensorSpec], output: bool) -> list[dict[str, Any]]:
    out = []
    for s in specs:
        t: dict[str, Any] = {
            "name": s.name,
            "data_type": CONFIG_TYPES[spec_datatype(s)],
            "dims": _dims(s.shape),
            "is_shape_tensor": False,
        }
        if output:
            t["label_filename"] = ""
        else:
            t.update(format="FORMAT_NONE", allow_ragged_batch=False, optional=False)
        out.append(t)
    return out


def model_config(entry: ServedModel, served: ServedVersion) -> dict[str, Any]:
    """Triton's model configuration of ``served`` (a version of ``entry``)."""
    model = served.model
    name = entry.name
    delay_ms = float(entry.settings.get("max_delay_ms") or 0.0)
    preferred: list[int] = []
    pipe = model.pipe
    stage = model.model_stage
    if pipe is not None and stage is not None:
        # a wrapper's pipe sets its own batching, not the server's: read its model stage
        stats = pipe.stats().stages.get(stage)
        if stats is not None:
            preferred = list(stats.preferred_batch_sizes)
            delay_ms = stats.max_delay * 1000
    cfg: dict[str, Any] = {
        "name": name,
        "platform": model.platform,
        "backend": "studioserve",
        "version_policy": _version_policy(entry),
        "max_batch_size": _max_batch_size(model),
        "input": _config_tensors(model.inputs, False),
        "output": _config_tensors(model.outputs, True),
        "batch_input": [],
        "batch_output": [],
        "instance_group": _instance_groups(name, model),
        "default_model_filename": model.source,
        "parameters": {"studioserve_kind": {"string_value": model.kind}},
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": False},
    }
    if entry.steps:
        cfg["platform"] = "ensemble"
        cfg["ensemble_scheduling"] = {"step": [dict(step) for step in entry.steps]}
    if _batched(model):
        cfg["dynamic_batching"] = {
            "preferred_batch_size": preferred,
            "max_queue_delay_microseconds": int(round(delay_ms * 1000)),
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
        }
    return cfg


def _version_policy(entry: ServedModel) -> dict[str, Any]:
    policy = str(entry.settings.get("version_policy") or "latest")
    kind, _, arg = policy.partition(":")
    if kind == "all":
        return {"all": {}}
    if kind == "specific":
        return {"specific": {"versions": [int(v) for v in arg.split(",") if v.strip()]}}
    return {"latest": {"num_versions": int(arg or 1)}}


def _instance_groups(name: str, model: Model) -> list[dict[str, Any]]:
    """One group per device kind, as Triton's instance_group (``--instances``)."""
    devices = [str(d or "CPU") for d in getattr(model, "devices", ()) or ()] or ["CPU"] * max(
        1, int(getattr(model, "instances", 1) or 1)
    )
    gpus = sorted({int(d.split(":")[1]) for d in devices if d.upper().startswith("GPU:")})
    cpus = sum(1 for d in devices if not d.upper().startswith("GPU"))
    groups: list[dict[str, Any]] = []
    if cpus:
        groups.append({"name": f"{name}_0", "kind": "KIND_CPU", "count": cpus})
    if gpus:
        groups.append(
            {
                "name": f"{name}_{len(groups)}",
                "kind": "KIND_GPU",
                "count": len(devices) - cpus,
                "gpus": gpus,
            }
        )
    return groups
