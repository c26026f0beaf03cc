"""One model's serving settings: the optional ``serving.toml`` beside its modeldir.

``<store>/<key>/serving.toml`` (DESIGN.md sections 2 and 9) sets that model's batching, version
policy, instances (replicas), trust and ensemble steps; command-line flags override it for
every model (:meth:`ModelConfig.merged`). The store layer hands the file's bytes to
:meth:`ModelConfig.from_toml`; nothing here reads a store or imports a model. For example::

    max_batch_size = 64
    max_delay_ms = 2
    preferred_batch_sizes = [16, 32]
    adaptive = false
    version_policy = "latest:2"     # or "latest", "all", "specific:1,3"
    instances = 2
    trust = false

    [[ensemble.step]]               # Triton's ensemble_scheduling, one table per step
    model = "food11"
    version = 2                     # optional; without it, the newest served version
    input_map = { image = "IMAGE" }                  # step input -> ensemble tensor
    output_map = { probabilities = "CLASS_PROBS" }   # step output -> ensemble tensor

The batching keys may also sit in a ``[batching]`` table. Every mistake (invalid TOML, an
unknown key, a wrong type, a size below 1) is a :class:`~studioserve.errors.ConfigError` that
names the file, the key and the fix. :func:`validate_ensemble` checks an ensemble's graph
against the served models' signatures and returns its :class:`EnsemblePlan`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .errors import ConfigError

__all__ = [
    "BATCHING_KEYS",
    "MODEL_CONFIG_FILE",
    "EnsemblePlan",
    "EnsembleStep",
    "ModelConfig",
    "TensorEntry",
    "parse_version_policy",
    "validate_ensemble",
]

#: the file beside modeldir that holds a model's serving settings
MODEL_CONFIG_FILE = "serving.toml"
#: the keys that may also sit in a ``[batching]`` table
BATCHING_KEYS = (
    "max_batch_size",
    "max_delay_ms",
    "preferred_batch_sizes",
    "adaptive",
    "latency_objective_ms",
)
_TOP_KEYS = (
    *BATCHING_KEYS,
    "version_policy",
    "instances",
    "trust",
    "framework",
    "input",
    "output",
    "ensemble",
    "batching",
)
_TENSOR_KEYS = ("name", "dtype", "shape")
_ENSEMBLE_KEYS = ("step",)
_STEP_KEYS = ("model", "version", "input_map", "output_map")
_POLICY_FIX = 'write "latest", "latest:N", "all" or "specific:V1,V2" (versions are integers >= 1)'


def parse_version_policy(
    text: str, *, source: str = MODEL_CONFIG_FILE, key: str = "version_policy"
) -> tuple[str, int, tuple[int, ...]]:
    """Check a version policy's text (Triton's version_policy, as one string).

    ``"latest"`` (the newest version), ``"latest:N"`` (the N newest), ``"all"``,
    ``"specific:V1,V2,..."``. Case and spaces around the parts do not matter.

    :param source: where the text came from, for the error (a file, ``--version-policy``).
    :param key: the key that held it, for the error.
    :returns: ``(kind, count, versions)``: ``("latest", N, ())``, ``("all", 0, ())`` or
        ``("specific", 0, (V1, V2, ...))`` with the versions sorted and unique.
    :raises ConfigError: for anything else, naming the source, the key and the grammar.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{_at(key, source)} must be a string, not {_show(text)}; {_POLICY_FIX}")
    kind, sep, arg = (part.strip() for part in text.strip().partition(":"))
    kind = kind.lower()
    if kind == "all" and not sep:
        return ("all", 0, ())
    if kind == "latest":
        if not sep:
            return ("latest", 1, ())
        if re.fullmatch(r"[0-9]+", arg) and int(arg) >= 1:
            return ("latest", int(arg), ())
    if kind == "specific" and sep:
        parts = [p.strip() for p in arg.split(",")]
        if parts and all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts):
            return ("specific", 0, tuple(sorted({int(p) for p in parts})))
    raise ConfigError(
        f"{_at(key, source)} is {text!r}, which is not a version policy; {_POLICY_FIX}"
    )


def _policy_text(kind: str, count: int, versions: tuple[int, ...]) -> str:
    """The canonical text of a parsed policy (``"latest:2"``, ``"all"``, ``"specific:1,3"``)."""
    if kind == "latest":
        return f"latest:{count}"
    if kind == "specific":
        return "specific:" + ",".join(str(v) for v in versions)
    return "all"


@dataclasses.dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble (one ``[[ensemble.step]]`` table, as Triton's ``step``).

    :param model: the served model's key this step runs.
    :param version: the version to run, or None for that model's newest served version.
    :param input_map: the step model's input name -> the ensemble tensor it is fed.
    :param output_map: the step model's output name -> the ensemble tensor it produces.
    """

    model: str
    version: int | None = None
    input_map: dict[str, str] = dataclasses.field(default_factory=dict)
    output_map: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Private copies, so the caller's dicts cannot change a frozen step.
        object.__setattr__(self, "input_map", dict(self.input_map))
        object.__setattr__(self, "output_map", dict(self.output_map))
        _check_name(self.model, "EnsembleStep.model", "", 'model = "KEY"')
        if self.version is not None:
            _positive_int(self.version, "EnsembleStep.version", "")
        for attr in ("input_map", "output_map"):
            _name_map(getattr(self, attr), f"EnsembleStep.{attr}", "")

    def __hash__(self) -> int:
        return hash(
            (
                self.model,
                self.version,
                tuple(sorted(self.input_map.items())),
                tuple(sorted(self.output_map.items())),
            )
        )

    @property
    def consumes(self) -> tuple[str, ...]:
        """The ensemble tensors this step reads, unique, in input_map order."""
        return tuple(dict.fromkeys(self.input_map.values()))

    @property
    def produces(self) -> tuple[str, ...]:
        """The ensemble tensors this step writes, in output_map order."""
        return tuple(self.output_map.values())

    def describe(self) -> str:
        """``food11@2`` or ``food11`` (newest served version)."""
        return self.model if self.version is None else f"{self.model}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "input_map": dict(self.input_map),
            "output_map": dict(self.output_map),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One model's serving settings; every field None means "not set here".

    Built from ``serving.toml`` by :meth:`from_toml`, or directly (the CLI's overrides);
    :meth:`merged` lays the overrides over a file's settings. Values are checked when built.

    :param max_batch_size: the most items one model call takes (>= 1).
    :param max_delay_ms: how long a batch waits for more items after its first (>= 0).
    :param preferred_batch_sizes: batch sizes to cut batches at when possible (each >= 1 and
        at most ``max_batch_size`` when both are set), sorted and unique.
    :param adaptive: steer the batch limit with AIMD against ``latency_objective_ms``.
    :param latency_objective_ms: how long a batch may take to compute in adaptive mode (> 0).
    :param version_policy: which versions to serve, as :func:`parse_version_policy` reads it;
        stored in its canonical form (``"latest:1"``, ``"all"``, ``"specific:1,3"``).
    :param instances: copies of the model's batched stage fed by one queue (>= 1).
    :param trust: allow artifacts that execute code when loaded (DESIGN.md section 3).
    :param ensemble: the steps of an ensemble, in the order the file lists them.
    """

    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    adaptive: bool | None = None
    latency_objective_ms: float | None = None
    version_policy: str | None = None
    instances: int | None = None
    trust: bool | None = None
    ensemble: tuple[EnsembleStep, ...] | None = None
    framework: str | None = None
    inputs: tuple[TensorEntry, ...] | None = None
    outputs: tuple[TensorEntry, ...] | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name in ("inputs", "outputs"):
                value = tuple(value)
                if not value or not all(isinstance(t, TensorEntry) for t in value):
                    raise ConfigError(
                        f"ModelConfig.{field.name} must be a non-empty tuple of TensorEntry"
                    )
            elif field.name == "ensemble":
                value = tuple(value)
                if not value or not all(isinstance(s, EnsembleStep) for s in value):
                    raise ConfigError(
                        "ModelConfig.ensemble must be a non-empty tuple of EnsembleStep, "
                        f"not {_show(self.ensemble)}"
                    )
            else:
                value = _FIELD_CHECKS[field.name](value, f"ModelConfig.{field.name}", "")
            object.__setattr__(self, field.name, value)
        _check_batch_sizes(self.max_batch_size, self.preferred_batch_sizes, "")

    @classmethod
    def from_toml(cls, data: bytes | str, *, source: str = MODEL_CONFIG_FILE) -> ModelConfig:
        """Parse a ``serving.toml``.

        :param data: the file's bytes (UTF-8) or text.
        :param source: where it came from, for errors (e.g. ``s3://b/p/mnist/serving.toml``).
        :raises ConfigError: for invalid TOML (with its line), an unknown key (with the
            closest known key), a wrong type or an out-of-range value; the message names the
            source, the key and the fix.
        """
        if isinstance(data, bytes):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{source} is not UTF-8 text ({e}); save it as UTF-8 TOML") from e
        else:
            text = data
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}; fix the syntax there") from e
        return cls.from_dict(doc, source=source)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = MODEL_CONFIG_FILE) -> ModelConfig:
        """Build from the parsed TOML document (a dict of its keys); see :meth:`from_toml`."""
        _check_keys(doc, _TOP_KEYS, "", source)
        values: dict[str, Any] = {}
        batching = doc.get("batching")
        if batching is not None:
            if not isinstance(batching, Mapping):
                raise ConfigError(
                    f"batching in {source} must be a table, not {_show(batching)}; write "
                    "[batching] with max_batch_size = ... under it, or put those keys at "
                    "the top level"
                )
            _check_keys(batching, BATCHING_KEYS, "batching", source)
            for name in batching:
                if name in doc:
                    raise ConfigError(
                        f"{name} is set twice in {source}, at the top level and in "
                        "[batching]; keep one of them"
                    )
            values.update({name: (batching[name], f"batching.{name}") for name in batching})
        for name, value in doc.items():
            if name not in ("batching", "ensemble", "input", "output"):
                values[name] = (value, name)
        fields: dict[str, Any] = {
            name: _FIELD_CHECKS[name](value, key, source) for name, (value, key) in values.items()
        }
        if "ensemble" in doc:
            fields["ensemble"] = _parse_ensemble(doc["ensemble"], source)
        for key, field_name in (("input", "inputs"), ("output", "outputs")):
            if key in doc:
                fields[field_name] = _parse_tensors(doc[key], key, source)
        _check_batch_sizes(
            fields.get("max_batch_size"), fields.get("preferred_batch_sizes"), source
        )
        return cls(**fields)

    def merged(self, overrides: ModelConfig, *, source: str = MODEL_CONFIG_FILE) -> ModelConfig:
        """These settings with every field that ``overrides`` sets taking its value.

        The CLI's flags are the overrides of every model's file.

        :param source: where these settings came from, for the error.
        :raises ConfigError: when the result is inconsistent (preferred batch sizes above the
            overriding max batch size, or the reverse).
        """
        changes = {
            f.name: getattr(overrides, f.name)
            for f in dataclasses.fields(overrides)
            if getattr(overrides, f.name) is not None
        }
        if not changes:
            return self
        _check_batch_sizes(
            changes.get("max_batch_size", self.max_batch_size),
            changes.get("preferred_batch_sizes", self.preferred_batch_sizes),
            f"{source} with the command-line overrides",
        )
        return dataclasses.replace(self, **changes)

    def is_empty(self) -> bool:
        """True when no field is set (no file, or an empty one)."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def to_json(self) -> dict[str, Any]:
        """Every field, None for what is not set (for the status page and the index)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("ensemble", "inputs", "outputs") and value is not None:
                value = [item.to_json() for item in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class EnsemblePlan:
    """A validated ensemble: what it takes, what it answers and the order its steps run in.

    :param name: the ensemble's model key.
    :param inputs: the ensemble tensors its steps consume and no step produces (what a request
        sends), in the order the steps first read them.
    :param outputs: the ensemble tensors its steps produce and no step consumes (what it
        answers), in execution order.
    :param steps: the steps in execution order: each after every step whose output it reads
        (a stable topological order: independent steps keep the file's order).
    :param order: each step's index in the file's list, parallel to ``steps``.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: tuple[EnsembleStep, ...]
    order: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "steps": [step.to_json() for step in self.steps],
        }


def validate_ensemble(
    name: str,
    steps: Sequence[EnsembleStep],
    signatures: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    *,
    ensembles: Mapping[str, Sequence[EnsembleStep]] | None = None,
    source: str | None = None,
) -> EnsemblePlan:
    """Check an ensemble's graph against the served models and plan its execution.

    :param name: the ensemble's model key.
    :param steps: its steps, as its ``serving.toml`` lists them.
    :param signatures: each served model's key -> (input names, output names); an empty input
        list means the model takes any key, an empty output list that its outputs are unknown.
    :param ensembles: the steps of the other served ensembles, by key, to find cycles through
        them (an ensemble whose steps reach back to ``name``).
    :param source: the ensemble's ``serving.toml``, for the errors.
    :raises ConfigError: naming the ensemble and the step, for a step naming an unknown model,
        a step input or output the model does not have, a model input left unmapped, a cycle
        (through the ensemble itself, another ensemble or the steps' tensors), or two outputs
        written to one ensemble tensor.
    """
    where = f"ensemble {name!r}" + (f" ({source})" if source else "")
    if not steps:
        raise ConfigError(f"{where} has no steps; add at least one [[ensemble.step]]")
    others = dict(ensembles or {})
    others.pop(name, None)
    served = sorted(signatures)
    producer: dict[str, int] = {}
    for i, step in enumerate(steps):
        at = f"{where}: ensemble.step[{i}] (model {step.model!r})"
        if step.model == name:
            raise ConfigError(f"{at} runs the ensemble itself, a cycle; name another served model")
        cycle = _cycle_through(step.model, name, others, [name])
        if cycle:
            raise ConfigError(
                f"{at} makes a cycle through other ensembles: {' -> '.join(cycle)}; "
                "an ensemble may not reach itself through its steps"
            )
        if step.model not in signatures:
            close = _closest(step.model, served)
            raise ConfigError(
                f"{at} names a model that is not served; served models: "
                f"{', '.join(served) or '(none)'}"
                + (f". Did you mean {close!r}?" if close else "; serve it too or fix the key")
            )
        inputs, outputs = (list(names) for names in signatures[step.model])
        if inputs:
            extra = [n for n in step.input_map if n not in inputs]
            if extra:
                close = _closest(extra[0], inputs)
                raise ConfigError(
                    f"{at}: input_map names input {extra[0]!r}, which the model does not have; "
                    f"its inputs: {', '.join(inputs)}"
                    + (f". Did you mean {close!r}?" if close else "")
                )
            missing = [n for n in inputs if n not in step.input_map]
            if missing:
                raise ConfigError(
                    f"{at}: the model's input {missing[0]!r} is not mapped; add it to "
                    f'input_map ({missing[0]} = "TENSOR"), fed by an ensemble input or an '
                    "earlier step's output"
                )
        if outputs:
            extra = [n for n in step.output_map if n not in outputs]
            if extra:
                close = _closest(extra[0], outputs)
                raise ConfigError(
                    f"{at}: output_map names output {extra[0]!r}, which the model does not "
                    f"have; its outputs: {', '.join(outputs)}"
                    + (f". Did you mean {close!r}?" if close else "")
                )
        for output, tensor in step.output_map.items():
            if tensor in producer:
                j = producer[tensor]
                first = f"ensemble.step[{j}] (model {steps[j].model!r})"
                if j == i:
                    first = "another output of the same step"
                raise ConfigError(
                    f"{at}: output {output!r} writes ensemble tensor {tensor!r}, which "
                    f"{first} already writes; give each output its own tensor name"
                )
            producer[tensor] = i
    order = _execution_order(steps, producer, where)
    consumed = {t for step in steps for t in step.consumes}
    inputs_seen: dict[str, None] = {}
    outputs_seen: dict[str, None] = {}
    for i in order:
        for tensor in steps[i].consumes:
            if tensor not in producer:
                inputs_seen.setdefault(tensor)
        for tensor in steps[i].produces:
            if tensor not in consumed:
                outputs_seen.setdefault(tensor)
    return EnsemblePlan(
        name=name,
        inputs=tuple(inputs_seen),
        outputs=tuple(outputs_seen),
        steps=tuple(steps[i] for i in order),
        order=tuple(order),
    )


def _execution_order(
    steps: Sequence[EnsembleStep], producer: Mapping[str, int], where: str
) -> list[int]:
    """Kahn's algorithm over "step i reads what step j writes"; ties keep the file's order.

    :raises ConfigError: naming the steps of a cycle in the data flow.
    """
    needs = [{producer[t] for t in step.consumes if t in producer} for step in steps]
    order: list[int] = []
    done: set[int] = set()
    while len(order) < len(steps):
        ready = [i for i in range(len(steps)) if i not in done and needs[i] <= done]
        if not ready:
            stuck = [i for i in range(len(steps)) if i not in done]
            cycle = _data_cycle(stuck, needs)
            names = " -> ".join(f"step[{i}] ({steps[i].model})" for i in cycle)
            raise ConfigError(
                f"{where}: ensemble.step[{cycle[0]}] (model {steps[cycle[0]].model!r}) is in "
                f"a cycle of tensors: {names}; each step may read only ensemble inputs and "
                "the outputs of steps that do not depend on it"
            )
        order.append(ready[0])
        done.add(ready[0])
    return order


def _data_cycle(stuck: list[int], needs: list[set[int]]) -> list[int]:
    """One cycle among the steps left when no step is ready, as ``[a, b, ..., a]``."""
    path: list[int] = []
    node = stuck[0]
    while node not in path:
        path.append(node)
        node = min(j for j in needs[node] if j in stuck)
    return [*path[path.index(node) :], node]


def _cycle_through(
    model: str, name: str, ensembles: Mapping[str, Sequence[EnsembleStep]], path: list[str]
) -> list[str] | None:
    """The path ``name -> ... -> name`` when ``model``'s ensemble steps reach ``name``."""
    path = [*path, model]
    if model == name:
        return path
    if model in path[:-1]:
        return path  # a cycle among the others, entered from name's step
    for step in ensembles.get(model, ()):
        found = _cycle_through(step.model, name, ensembles, path)
        if found:
            return found
    return None


def _parse_ensemble(value: Any, source: str) -> tuple[EnsembleStep, ...]:
    fix = 'write each step as [[ensemble.step]] with model = "KEY", input_map and output_map'
    if not isinstance(value, Mapping):
        raise ConfigError(f"ensemble in {source} must be a table, not {_show(value)}; {fix}")
    _check_keys(value, _ENSEMBLE_KEYS, "ensemble", source)
    raw = value.get("step")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"ensemble.step in {source} must list at least one step; {fix}")
    steps: list[EnsembleStep] = []
    for i, table in enumerate(raw):
        key = f"ensemble.step[{i}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key} in {source} must be a table, not {_show(table)}; {fix}")
        _check_keys(table, _STEP_KEYS, key, source)
        if "model" not in table:
            raise ConfigError(f'{key} in {source} has no model; add model = "KEY"')
        model = _check_name(table["model"], f"{key}.model", source, 'model = "KEY"')
        version = table.get("version")
        if version is not None:
            version = _positive_int(version, f"{key}.version", source)
        maps = {}
        for attr in ("input_map", "output_map"):
            if attr not in table:
                raise ConfigError(
                    f'{key} in {source} has no {attr}; add {attr} = {{ NAME = "TENSOR" }} '
                    "(the model's name -> the ensemble tensor's name)"
                )
            maps[attr] = _name_map(table[attr], f"{key}.{attr}", source)
        steps.append(EnsembleStep(model=model, version=version, **maps))
    return tuple(steps)


# -- field checks: each takes (value, key, source) and returns the normalized value or raises.
# ``source`` is the file (or flag) the value came from; "" for a value built in code.


def _at(key: str, source: str) -> str:
    """``key in source``, or the key alone for a value built in code."""
    return f"{key} in {source}" if source else key


def _leaf(key: str) -> str:
    """The last part of a dotted key (``ensemble.step[0].version`` -> ``version``)."""
    return key.rsplit(".", 1)[-1]


def _check_batch_sizes(mbs: int | None, preferred: Sequence[int] | None, source: str) -> None:
    if mbs is not None and preferred and max(preferred) > mbs:
        raise ConfigError(
            f"preferred_batch_sizes {list(preferred)} exceed max_batch_size {mbs}"
            f"{' in ' + source if source else ''}; every preferred size must be at most "
            "max_batch_size, so lower them or raise max_batch_size"
        )


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{_at(key, source)} must be an integer, not {_show(value)}; write {_leaf(key)} = 8"
        )
    if value < 1:
        raise ConfigError(f"{_at(key, source)} is {value}; it must be at least 1")
    return value


def _milliseconds(value: Any, key: str, source: str, *, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"{_at(key, source)} must be a number of milliseconds, not {_show(value)}; "
            f"write {_leaf(key)} = 2.5"
        )
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = "0 or more" if zero_ok else "more than 0"
        raise ConfigError(f"{_at(key, source)} is {value}; it must be finite and {bound}")
    return float(value)


def _boolean(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{_at(key, source)} must be true or false, not {_show(value)}; "
            f"write {_leaf(key)} = true"
        )
    return value


def _sizes(value: Any, key: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(
            f"{_at(key, source)} must be a non-empty array of integers, not {_show(value)}; "
            f"write {_leaf(key)} = [16, 32]"
        )
    for i, size in enumerate(value):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f"{_at(f'{key}[{i}]', source)} is {_show(size)}; each preferred batch size "
                f"must be an integer >= 1, as in {_leaf(key)} = [16, 32]"
            )
    return tuple(sorted(set(value)))


def _policy(value: Any, key: str, source: str) -> str:
    return _policy_text(*parse_version_policy(value, source=source, key=key))


def _check_name(value: Any, key: str, source: str, example: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{_at(key, source)} must be a non-empty string, not {_show(value)}; write {example}"
        )
    return value


def _name_map(value: Any, key: str, source: str) -> dict[str, str]:
    example = f'{_leaf(key)} = {{ name = "TENSOR" }} (the model\'s name -> the ensemble tensor)'
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"{_at(key, source)} must be a non-empty table of names, not {_show(value)}; "
            f"write {example}"
        )
    for name, tensor in value.items():
        if not isinstance(name, str) or not name or not isinstance(tensor, str) or not tensor:
            raise ConfigError(
                f"{_at(f'{key}.{name}', source)} must be a non-empty tensor name, not "
                f"{_show(tensor)}; write {example}"
            )
    return dict(value)


_FIELD_CHECKS: dict[str, Callable[[Any, str, str], Any]] = {
    "max_batch_size": _positive_int,
    "max_delay_ms": lambda v, k, s: _milliseconds(v, k, s, zero_ok=True),
    "preferred_batch_sizes": _sizes,
    "adaptive": _boolean,
    "latency_objective_ms": lambda v, k, s: _milliseconds(v, k, s, zero_ok=False),
    "version_policy": _policy,
    "instances": _positive_int,
    "trust": _boolean,
    "framework": lambda v, k, s: _check_name(v, k, s, 'framework = "onnx"'),
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One input or output of a model's signature as serving.toml gives it.

    :param name: the tensor's name.
    :param dtype: a numpy dtype name (``"float32"``).
    :param shape: one example's shape; None (``-1`` in the file) for a dimension of any size.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _parse_tensors(value: Any, key: str, source: str) -> tuple[TensorEntry, ...]:
    """``[[input]]`` / ``[[output]]`` tables: name, dtype, shape (``-1`` for any size)."""
    example = f'[[{key}]] tables with name = "x", dtype = "float32", shape = [4]'
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} in {source} must be one or more {example}")
    out = []
    for i, table in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{at} in {source} must be a table; write {example}")
        _check_keys(table, _TENSOR_KEYS, at, source)
        for needed in ("name", "dtype", "shape"):
            if needed not in table:
                raise ConfigError(f"{at} in {source} has no {needed}; write {example}")
        name = table["name"]
        dtype = table["dtype"]
        shape = table["shape"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{at}.name in {source} must be a non-empty string")
        if not isinstance(dtype, str) or not re.fullmatch(r"[a-z]+[0-9]*", dtype):
            raise ConfigError(
                f'{at}.dtype in {source} must be a numpy dtype name such as "float32", '
                f"not {_show(dtype)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1) for d in shape
        ):
            raise ConfigError(
                f"{at}.shape in {source} must be a list of sizes >= 1 (-1 for any size) of "
                f"one example, without the batch axis; not {_show(shape)}"
            )
        out.append(TensorEntry(name, dtype, tuple(None if d == -1 else d for d in shape)))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} in {source} names a tensor twice: {', '.join(names)}")
    return tuple(out)


def _check_keys(table: Mapping[str, Any], known: Sequence[str], prefix: str, source: str) -> None:
    for name in table:
        if name not in known:
            key = f"{prefix}.{name}" if prefix else name
            close = _closest(name, known)
            hint = f": did you mean {close!r}?" if close else ";"
            raise ConfigError(
                f"unknown key {key!r} in {source}{hint} known keys"
                f"{' in ' + prefix if prefix else ''}: {', '.join(known)}"
            )


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _show(value: Any) -> str:
    """A value and its TOML type, for an error message."""
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    kind = "table" if isinstance(value, Mapping) else kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"
