"""PyTorch models: a TorchScript archive, a ``torch.export`` program, or a trusted pickled module.

The only module that imports torch, and only inside its functions, so importing studioserve
(and ``studio --help``) never loads it. Three rows of the detection table load here:

- ``torchscript`` (``torch.jit.save``: ``*.pt``, ``*.pth``, ``*.torchscript``), loaded with
  ``torch.jit.load``; platform ``pytorch_libtorch``.
- ``torch_export`` (``torch.export.save``: ``*.pt2``), loaded with ``torch.export.load`` and
  run as its ``.module()``; platform ``pytorch_export``.
- ``torch_pickle`` (``torch.save(model)``), loaded with ``torch.load(weights_only=False)``,
  which runs code from the file: only with ``--trust-artifact``. A ``state_dict`` (or any file
  that holds only tensors and plain data) is refused, trusted or not: it has no architecture.
  :func:`refuse_untrusted` tells one apart with ``torch.load(weights_only=True)``, which runs
  no code, so the refusal names the wrapper contract instead of the opt-in.

The signature: serving.toml's ``[[input]]``/``[[output]]`` when given; else a ``torch.export``
program's own (its user inputs' example shapes and dtypes, axis 0 the batch); else, for
TorchScript and pickled modules, the width of the ``Linear`` layer that owns the first
parameter, when that is what it is; else the load fails with the serving.toml table to add.
Inputs are named after ``forward``'s parameters; outputs ``output_0``, ``output_1``, ... (a
tensor, or a tuple or list of them) or by the keys of a returned dict, or as serving.toml names
them; their per-example shapes and dtypes come from one probe call on zeros.

Each batch is one call (:class:`~studioserve.models.batched.BatchFunctionModel`: items of
concurrent requests meet in it) under ``torch.inference_mode()``, the module in ``eval()`` mode
(a ``torch.export`` program keeps the mode it was exported in: export it after
``model.eval()``); inputs are converted to the model's dtype on its device, outputs come back
as numpy arrays. Instances: the file is loaded once per instance, each on its device: the
visible CUDA GPUs round-robin (as ``GPU:N``), else the CPU; ``LoadOptions.devices`` wins. Unless
the user set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, torch's intra-op threads are sized to
the cores the process may use, shared among the CPU instances.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelLoadError
from ..tensors import TensorSpec
from .artifacts import Artifact
from .batched import BatchFunctionModel, LoadOptions, example_batch, missing_framework

logger = logging.getLogger(__name__)

__all__ = ["TorchModel", "load", "refuse_untrusted", "serve_module"]

#: environment variables through which a user sizes torch's threads (then we leave them be)
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: torch's own intra-op thread count, read before we first change it
_default_threads: int | None = None
#: rows of the probe call that reads the output signature (2: shows the batch axis)
_PROBE_ROWS = 2


class TorchModel(BatchFunctionModel):
    """A PyTorch module behind a batching stage, one copy per instance, each on its device.

    :param modules: each instance's module (already on its device).
    :param torch_devices: each instance's torch device (``"cpu"``, ``"cuda:0"``).
    :param call_order: the input names in the order ``forward`` takes them.
    :param model_dtypes: the torch dtype each input is converted to (by input name).
    :param output_keys: where each output is in what forward returns (None: it is the one
        tensor).
    :param row_by_row: call the module once per row of a batch (a program exported for one).
    """

    kind: ClassVar[str] = "torch"

    def __init__(
        self,
        modules: Sequence[Any],
        *,
        torch_devices: Sequence[str],
        call_order: Sequence[str],
        model_dtypes: Mapping[str, Any],
        output_keys: Sequence[str | int] | None,
        row_by_row: bool = False,
        source: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        platform: str,
        max_batch_size: int,
        max_delay: float,
        queue_size: int,
    ) -> None:
        calls = [
            _BatchCall(
                m,
                d,
                call_order,
                model_dtypes,
                output_keys,
                [o.name for o in outputs],
                row_by_row=row_by_row,
            )
            for m, d in zip(modules, torch_devices, strict=True)
        ]
        super().__init__(
            calls,
            source=source,
            inputs=inputs,
            outputs=outputs,
            platform=platform,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            queue_size=queue_size,
            devices=[_label(d) for d in torch_devices],
        )
        #: every instance's module, in instance order
        self.torch_modules: tuple[Any, ...] = tuple(modules)
        #: every instance's torch device, in instance order
        self.torch_devices: tuple[str, ...] = tuple(torch_devices)

    def describe(self) -> str:
        text = super().describe()
        if self.instances == 1 and self.devices:
            text += f" on {self.devices[0]}"
        return text


class _BatchCall:
    """One instance's batch function: numpy in, the module on its device, numpy out.

    :param output_keys: where each output is in what forward returns (tuple or list
        positions, dict keys); None: forward returns the one output tensor itself.
    :param row_by_row: call the module once per row (a program exported for one row).
    :param probe: return what forward returns, as it is (to read the output signature).
    """

    def __init__(
        self,
        module: Any,
        device: str,
        call_order: Sequence[str],
        model_dtypes: Mapping[str, Any],
        output_keys: Sequence[str | int] | None,
        output_names: Sequence[str],
        *,
        row_by_row: bool = False,
        probe: bool = False,
    ) -> None:
        import torch

        self._torch = torch
        self._module = module
        self._device = torch.device(device)
        self._order = list(call_order)
        self._dtypes = dict(model_dtypes)
        self._keys = None if output_keys is None else list(output_keys)
        self._names = list(output_names)
        self._row_by_row = row_by_row
        self._probe = probe

    def __call__(self, batch: Any) -> Any:
        arrays = [batch[n] for n in self._order] if isinstance(batch, dict) else [batch]
        if not self._row_by_row or self._probe:
            return self._run(arrays)
        rows = [self._run([a[i : i + 1] for a in arrays]) for i in range(len(arrays[0]))]
        if isinstance(rows[0], dict):
            return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return np.concatenate(rows)

    def _run(self, arrays: Sequence[Any]) -> Any:
        tensors = [
            self._tensor(a, self._dtypes.get(n)) for a, n in zip(arrays, self._order, strict=True)
        ]
        with self._torch.inference_mode():
            result = self._module(*tensors)
            if self._probe:
                return result
            if self._keys is None:
                return _to_numpy(result)
            return {
                name: _to_numpy(result[key])
                for name, key in zip(self._names, self._keys, strict=True)
            }

    def _tensor(self, array: Any, dtype: Any) -> Any:
        arr = np.asarray(array)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, order="C")  # from_numpy shares memory: a private copy
        t = self._torch.from_numpy(arr)
        return t.to(device=self._device, dtype=dtype if dtype is not None else t.dtype)


def load(artifact: Artifact, options: LoadOptions) -> TorchModel:
    """The detection table's loader for ``torchscript``, ``torch_export`` and (trusted)
    ``torch_pickle`` artifacts.

    :raises ModelLoadError: when torch is not installed (naming the extra), the file does not
        load, it is a state_dict, or its signature cannot be told and serving.toml gives none.
    """
    torch = _import_torch(artifact.describe())
    name = artifact.framework.name
    path = artifact.path
    devices = _torch_devices(torch, options)
    if name == "torch_pickle":
        refusal = _weights_refusal(torch, path)
        if refusal is not None:
            raise refusal
    modules = [_load_module(torch, artifact, device) for device in devices]
    if name == "torch_export":
        specs, dtypes, order, static_batch = _export_inputs(torch, modules[0], path, options)
        module_calls = [m.module() for m in modules]
    else:
        specs, dtypes, order = _module_inputs(torch, modules[0], str(path), options)
        module_calls, static_batch = modules, False
    return _build(
        torch,
        module_calls,
        devices,
        specs=specs,
        dtypes=dtypes,
        order=order,
        static_batch=static_batch,
        source=str(path),
        platform=artifact.framework.platform,
        options=options,
    )


def serve_module(module: Any, *, source: str, options: LoadOptions | None = None) -> TorchModel:
    """A ``torch.nn.Module`` built in code as a served model (a wrapper's ``create_model`` may
    return this: build the module, ``load_state_dict``, ``return serve_module(module, ...)``).

    Instances are deep copies, each on its device; the signature is read as for a pickled
    module (``options.inputs`` when given, else a first ``Linear`` layer's width).

    :raises ModelLoadError: when torch is not installed, it is not a module, or its signature
        cannot be told and ``options.inputs`` gives none.
    """
    options = options or LoadOptions()
    torch = _import_torch(f"PyTorch model {source}")
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"{source}: serve_module takes a torch.nn.Module, not {type(module).__name__}"
        )
    devices = _torch_devices(torch, options)
    copies = [module if i == 0 else copy.deepcopy(module) for i in range(len(devices))]
    modules = [c.to(device).eval() for c, device in zip(copies, devices, strict=True)]
    specs, dtypes, order = _module_inputs(torch, modules[0], source, options)
    return _build(
        torch,
        modules,
        devices,
        specs=specs,
        dtypes=dtypes,
        order=order,
        static_batch=False,
        source=source,
        platform="pytorch_libtorch",
        options=options,
    )


def refuse_untrusted(artifact: Artifact) -> ModelLoadError | None:
    """The loader's hook for an artifact refused without ``--trust-artifact``: a clearer
    refusal when the file is a state_dict (told apart with ``weights_only=True``, which runs
    no code), else None (the loader's own refusal, naming the opt-in, stands)."""
    if artifact.framework.name != "torch_pickle":
        return None
    try:
        import torch
    except ImportError:
        return None
    return _weights_refusal(torch, artifact.path)


# -- loading ---------------------------------------------------------------------------------


def _import_torch(what: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise missing_framework(what, "torch", "torch") from e
    return torch


def _load_module(torch: Any, artifact: Artifact, device: str) -> Any:
    """One instance's copy of the artifact, on ``device``: a module, or an ExportedProgram."""
    path = artifact.path
    name = artifact.framework.name
    try:
        if name == "torchscript":
            with warnings.catch_warnings():  # recent torch warns at every TorchScript load
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location=device).eval()
        if name == "torch_export":
            program = torch.export.load(str(path))
            if device != "cpu":
                try:
                    from torch.export.passes import move_to_device_pass
                except ImportError as e:
                    raise ModelLoadError(
                        f"{path}: placing a torch.export program on {device} needs a newer "
                        f"torch than {torch.__version__} (torch.export.passes."
                        "move_to_device_pass); upgrade torch, or hide the GPUs "
                        "(CUDA_VISIBLE_DEVICES=) to serve it on the CPU"
                    ) from e
                program = move_to_device_pass(program, device)
            return program
        loaded = torch.load(str(path), map_location=device, weights_only=False)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"cannot load {artifact.describe()}: {type(e).__name__}: {e}; "
            + _SAVE_HINT.get(name, "check the file")
        ) from e
    if not isinstance(loaded, torch.nn.Module):
        raise ModelLoadError(
            f"{path} holds a {type(loaded).__name__}, not a torch.nn.Module; "
            + _SAVE_HINT["torch_pickle"]
        )
    return loaded.to(device).eval()


_SAVE_HINT = {
    "torchscript": "save the model with torch.jit.save(torch.jit.script(model), 'model.pt')",
    "torch_export": (
        "save the model with torch.export.save(torch.export.export(model, (example,), "
        "dynamic_shapes=...), 'model.pt2')"
    ),
    "torch_pickle": (
        "save the model with torch.save(model, 'model.pt') where its class can be imported, "
        "or better as TorchScript (torch.jit.save(torch.jit.script(model), 'model.pt')) or "
        "a torch.export program ('model.pt2'), which run no code from the file when loaded"
    ),
}


def _weights_refusal(torch: Any, path: Path) -> ModelLoadError | None:
    """The refusal of a file that holds weights only (a state_dict), or None for anything
    else (a pickled module, which ``weights_only=True`` does not load; a broken file)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # a pickle that needs code to load (a module), or not loadable at all
        return None
    tensors = _tensor_names(torch, data)
    if isinstance(data, Mapping) and tensors and len(tensors) == len(data):
        what = f"a state_dict ({len(tensors)} tensors: {_few(tensors)})"
    elif tensors:
        what = f"a {type(data).__name__} holding tensors ({_few(tensors)}), e.g. a checkpoint"
    else:
        what = f"a {type(data).__name__} of plain data"
    return ModelLoadError(
        f"{path} is {what}, not a model: weights without the module's architecture, so "
        "studioserve cannot run it (a state_dict is refused with or without "
        "--trust-artifact). Serve it with a wrapper (studio serve KEY --wrapper wrapper.py) "
        "whose create_model(modeldir) builds the module, loads these weights with "
        "module.load_state_dict(torch.load(path, weights_only=True)) and returns "
        "studioserve.models.torch.serve_module(module, source=modeldir); or save the whole "
        "model instead: torch.jit.save(torch.jit.script(model), 'model.pt') or "
        "torch.export.save(torch.export.export(model, (example,)), 'model.pt2')"
    )


def _tensor_names(torch: Any, data: Any, prefix: str = "") -> list[str]:
    """The dotted names of every tensor in nested dicts, lists and tuples."""
    if isinstance(data, torch.Tensor):
        return [prefix or "tensor"]
    items: Any
    if isinstance(data, Mapping):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return []
    names: list[str] = []
    for k, v in items:
        names += _tensor_names(torch, v, f"{prefix}.{k}" if prefix else str(k))
    return names


def _few(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


# -- devices and threads ---------------------------------------------------------------------


def _torch_devices(torch: Any, options: LoadOptions) -> list[str]:
    """Each instance's torch device: ``options.devices``, else the visible GPUs round-robin,
    else the CPU; torch's intra-op threads sized for the CPU instances."""
    n = options.instances
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelLoadError(f"instances must be an integer >= 1, not {n!r}")
    if options.devices is not None:
        devices = [_torch_device(torch, d) for d in options.devices]
        if len(devices) != n:
            raise ModelLoadError(
                f"{len(devices)} devices for {n} instances; give one device per instance"
            )
    elif torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        devices = [f"cuda:{i % gpus}" for i in range(n)]
    else:
        devices = ["cpu"] * n
    _size_threads(torch, sum(1 for d in devices if d == "cpu"))
    return devices


def _torch_device(torch: Any, label: str) -> str:
    """A device label ("CPU", "GPU:1", "cuda:1", "cuda") as torch's ("cpu", "cuda:1")."""
    text = str(label).strip().lower()
    match = re.fullmatch(r"(?:/?device:)?(cpu|gpu|cuda)(?::(\d+))?", text)
    if match is None:
        raise ModelLoadError(
            f'device {label!r} is not a device label such as "CPU", "GPU:0" or "cuda:0"'
        )
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        return "cpu"
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ModelLoadError(
            f"device {label!r}: torch sees {seen} CUDA GPU(s); pick another device or CPU"
        )
    return f"cuda:{index}"


def _label(device: str) -> str:
    """A torch device as studioserve's device label ("CPU", "GPU:0": Triton's kinds)."""
    return "CPU" if device == "cpu" else "GPU:" + device.partition(":")[2]


def _size_threads(torch: Any, cpu_instances: int) -> None:
    """Size torch's intra-op threads to the cores this process may use, shared by the CPU
    instances (each runs its batches at once), unless the user set them."""
    global _default_threads
    if cpu_instances < 1 or any(os.environ.get(v) for v in _THREAD_VARIABLES):
        return
    if _default_threads is None:
        _default_threads = int(torch.get_num_threads())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = max(1, min(cores, _default_threads) // cpu_instances)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.debug("torch: %d intra-op threads for %d CPU instance(s)", threads, cpu_instances)


# -- signatures ------------------------------------------------------------------------------


def _export_inputs(
    torch: Any, program: Any, path: Path, options: LoadOptions
) -> tuple[list[TensorSpec], dict[str, Any], list[str], bool]:
    """An ExportedProgram's inputs: (specs, model dtypes, call order, static batch axis).

    serving.toml's ``[[input]]`` names and shapes win; the program's own example shapes (axis
    0 the batch) and dtypes fill in the rest.
    """
    user = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs: list[TensorSpec] = []
    dtypes: dict[str, Any] = {}
    static = False
    for name in user:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor) or val.dim() < 1:
            raise ModelLoadError(
                f"{path}: input {name!r} of the exported program is not a tensor with a batch "
                "axis; export a forward that takes tensors of shape (batch, ...)"
            )
        dims = [d if isinstance(d, int) else None for d in val.shape]
        if dims[0] is not None:
            if dims[0] != 1:
                raise ModelLoadError(
                    f"{path}: the exported program takes exactly {dims[0]} rows (input "
                    f"{name!r} has the static shape {tuple(val.shape)}); export it with a "
                    'dynamic batch axis: batch = torch.export.Dim("batch"); '
                    "torch.export.export(model, (example,), dynamic_shapes=({0: batch},))"
                )
            static = True
        specs.append(TensorSpec(name, tuple(dims[1:]), _numpy_name(val.dtype)))
        dtypes[name] = val.dtype
    if options.inputs is not None:
        specs = _declared(specs, options.inputs, str(path))
        dtypes = {s.name: dtypes[u] for s, u in zip(specs, user, strict=True)}
        user = [s.name for s in specs]
    return specs, dtypes, user, static


def _declared(
    found: Sequence[TensorSpec], declared: Sequence[TensorSpec], source: str
) -> list[TensorSpec]:
    """serving.toml's inputs in the model's argument order (by name, else by position)."""
    if len(declared) != len(found):
        raise ModelLoadError(
            f"{source}: serving.toml declares {len(declared)} input(s) "
            f"({', '.join(s.name for s in declared)}), the model takes {len(found)} "
            f"({', '.join(s.name for s in found)}); declare one [[input]] per argument"
        )
    by_name = {s.name: s for s in declared}
    if set(by_name) == {s.name for s in found}:
        return [by_name[s.name] for s in found]
    return list(declared)


def _module_inputs(
    torch: Any, module: Any, source: str, options: LoadOptions
) -> tuple[list[TensorSpec], dict[str, Any], list[str]]:
    """A TorchScript or Python module's inputs: (specs, model dtypes, call order)."""
    names = _forward_arguments(module)
    float_dtype = _float_dtype(torch, module)
    if options.inputs is not None:
        if names is None:
            specs = list(options.inputs)
        else:
            found = [TensorSpec(n, (), "float32") for n in names]
            specs = _declared(found, options.inputs, source)
        dtypes = {
            s.name: float_dtype
            for s in specs
            if float_dtype is not None and (s.numpy_dtype is not None and s.numpy_dtype.kind == "f")
        }
        return specs, dtypes, [s.name for s in specs]
    width = _first_linear_width(torch, module)
    if names is None or len(names) != 1 or width is None:
        why = (
            "its forward takes no plain tensor arguments"
            if not names
            else f"its forward takes {len(names)} tensors ({', '.join(names)})"
            if len(names) > 1
            else "its first parameter does not belong to a Linear layer"
        )
        raise ModelLoadError(
            f"{source}: cannot tell the model's input shape ({why}); add its signature to the "
            "experiment's serving.toml: one [[input]] table per forward argument, e.g. "
            f'[[input]] name = "{names[0] if names else "x"}", dtype = "float32", '
            "shape = [3, 224, 224] (one example's shape without the batch axis, -1 for a "
            "size that varies)"
        )
    dtype = float_dtype if float_dtype is not None else torch.float32
    spec = TensorSpec(names[0], (width,), _numpy_name(dtype))
    return [spec], {spec.name: dtype}, [spec.name]


def _forward_arguments(module: Any) -> list[str] | None:
    """The names of ``forward``'s arguments (None when they are not plain positional ones)."""
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript: the compiled schema, self first
        args = list(schema.arguments)[1:]
        if not all(str(a.type) == "Tensor" for a in args):
            return None
        return [str(a.name) for a in args]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in required]


def _float_dtype(torch: Any, module: Any) -> Any:
    """The dtype of the module's first floating-point parameter, or None."""
    for p in module.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return None


def _first_linear_width(torch: Any, module: Any) -> int | None:
    """``in_features`` of the Linear layer that owns the module's first parameter, or None."""
    first = next(iter(module.named_parameters()), None)
    if first is None:
        return None
    name, param = first
    owner = module
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    kind = getattr(owner, "original_name", None) or type(owner).__name__
    if kind != "Linear" or not name.endswith("weight") or param.dim() != 2:
        return None
    return int(param.shape[1])


def _numpy_name(dtype: Any) -> str:
    """A torch dtype as the numpy dtype name a request gives it in (bfloat16 as float32)."""
    name = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(name).name
    except TypeError:
        return "float32" if dtype.is_floating_point else name


# -- the model -------------------------------------------------------------------------------


def _build(
    torch: Any,
    modules: Sequence[Any],
    devices: Sequence[str],
    *,
    specs: Sequence[TensorSpec],
    dtypes: Mapping[str, Any],
    order: Sequence[str],
    static_batch: bool,
    source: str,
    platform: str,
    options: LoadOptions,
) -> TorchModel:
    """Probe the first instance for its outputs, then the served model (warmed on zeros)."""
    if static_batch:
        logger.warning(
            "%s: the exported program takes one row (its batch axis is static), so each row "
            "runs in its own call; export it with a dynamic batch axis "
            '(torch.export.Dim("batch")) to compute a batch in one call',
            source,
        )
    rows = 1 if static_batch else _PROBE_ROWS
    probe = _BatchCall(modules[0], devices[0], order, dtypes, None, [], probe=True)
    try:
        result = probe(example_batch(specs, rows=rows))
    except Exception as e:
        raise ModelLoadError(
            f"{source}: the model failed a call on zeros shaped like its signature "
            f"({', '.join(s.describe() for s in specs)}): {type(e).__name__}: {e}; if the "
            "signature is wrong, set it in the experiment's serving.toml ([[input]] tables "
            'with name, dtype = "float32" and shape = one example\'s shape)'
        ) from e
    keys, outputs = _outputs(torch, result, rows, source, options.outputs)
    model = TorchModel(
        modules,
        torch_devices=devices,
        call_order=order,
        model_dtypes=dtypes,
        output_keys=keys,
        row_by_row=static_batch,
        source=source,
        inputs=specs,
        outputs=outputs,
        platform=platform,
        max_batch_size=options.max_batch_size,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
    )
    logger.info(
        "%s: PyTorch %s on %s", source, torch.__version__, ", ".join(_where(torch, devices))
    )
    return model


def _outputs(
    torch: Any,
    result: Any,
    rows: int,
    source: str,
    declared: Sequence[TensorSpec] | None,
) -> tuple[list[str | int] | None, list[TensorSpec]]:
    """Where each output is in what forward returns (None: it is the one tensor), and the
    outputs' signature."""
    keys: list[str | int]
    single = isinstance(result, torch.Tensor)
    if single:
        keys, values = [0], [result]
    elif isinstance(result, (tuple, list)) and result:
        keys, values = list(range(len(result))), list(result)
    elif isinstance(result, Mapping) and result and all(isinstance(k, str) for k in result):
        keys, values = list(result), list(result.values())
    else:
        raise ModelLoadError(
            f"{source}: forward returned a {type(result).__name__}; return a tensor, or a "
            "tuple, list or dict of str to tensors"
        )
    for key, value in zip(keys, values, strict=True):
        is_tensor = isinstance(value, torch.Tensor)
        if not is_tensor or value.dim() < 1 or value.shape[0] != rows:
            shape = tuple(value.shape) if is_tensor else type(value).__name__
            raise ModelLoadError(
                f"{source}: output {key!r} of a call on {rows} rows is {shape}, not a tensor "
                f"with {rows} rows; forward must return one row per example along axis 0"
            )
    names = [k if isinstance(k, str) else f"output_{k}" for k in keys]
    found = [
        TensorSpec(n, tuple(int(d) for d in v.shape[1:]), _numpy_name(v.dtype))
        for n, v in zip(names, values, strict=True)
    ]
    picks = None if single else keys
    if declared is None:
        return picks, found
    if len(declared) != len(found):
        raise ModelLoadError(
            f"{source}: serving.toml declares {len(declared)} output(s) "
            f"({', '.join(s.name for s in declared)}), the model returns {len(found)} "
            f"({', '.join(names)}); declare one [[output]] per output"
        )
    by_name = {s.name: s for s in declared}
    if set(by_name) == set(names):  # a dict's keys: declared by name
        return picks, [by_name[n] for n in names]
    return picks, list(declared)


def _where(torch: Any, devices: Sequence[str]) -> list[str]:
    """Each distinct device, with the GPU's name."""
    out: list[str] = []
    for d in dict.fromkeys(devices):
        if d == "cpu":
            threads = torch.get_num_threads()
            out.append(f"CPU ({threads} thread{'' if threads == 1 else 's'})")
        else:
            out.append(f"{_label(d)} ({torch.cuda.get_device_name(torch.device(d))})")
    return out


def _to_numpy(value: Any) -> Any:
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return t.numpy()
