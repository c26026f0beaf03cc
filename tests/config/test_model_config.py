"""serving.toml: one model's serving settings, its errors (file, key, fix), the CLI's
overrides, and the validation and plan of an ensemble's graph."""

from __future__ import annotations

import pytest

from studioserve.errors import ConfigError
from studioserve.model_config import (
    EnsembleStep,
    ModelConfig,
    parse_version_policy,
    validate_ensemble,
)

SOURCE = "s3://b/p/mnist/serving.toml"

FULL = b"""
max_batch_size = 64
max_delay_ms = 2
preferred_batch_sizes = [32, 16]
adaptive = false
latency_objective_ms = 12.5
version_policy = "latest:2"
instances = 2
trust = false

[[ensemble.step]]
model = "food11"
version = 2
input_map = { image = "IMAGE" }
output_map = { probabilities = "CLASS_PROBS" }
[[ensemble.step]]
model = "captioner"
input_map = { probs = "CLASS_PROBS" }
output_map = { caption = "CAPTION" }
"""

FOOD11 = EnsembleStep("food11", 2, {"image": "IMAGE"}, {"probabilities": "CLASS_PROBS"})
CAPTIONER = EnsembleStep("captioner", None, {"probs": "CLASS_PROBS"}, {"caption": "CAPTION"})
SIGNATURES = {
    "food11": (["image"], ["probabilities"]),
    "captioner": (["probs"], ["caption"]),
    "echo": ([], []),
    "mixer": (["probs", "lang"], ["text"]),
}


def test_a_full_serving_toml() -> None:
    config = ModelConfig.from_toml(FULL, source=SOURCE)
    assert config == ModelConfig(
        max_batch_size=64,
        max_delay_ms=2.0,
        preferred_batch_sizes=(16, 32),
        adaptive=False,
        latency_objective_ms=12.5,
        version_policy="latest:2",
        instances=2,
        trust=False,
        ensemble=(FOOD11, CAPTIONER),
    )
    assert isinstance(config.max_delay_ms, float)
    assert hash(config) == hash(ModelConfig.from_toml(FULL.decode()))
    assert config.to_json()["ensemble"][0] == {
        "model": "food11",
        "version": 2,
        "input_map": {"image": "IMAGE"},
        "output_map": {"probabilities": "CLASS_PROBS"},
    }
    assert config.to_json()["preferred_batch_sizes"] == [16, 32]


def test_the_batching_table_and_an_empty_file() -> None:
    config = ModelConfig.from_toml(
        "version_policy = 'Specific: 3, 1'\n[batching]\nmax_batch_size = 8\nadaptive = true\n"
    )
    assert (config.max_batch_size, config.adaptive) == (8, True)
    assert config.version_policy == "specific:1,3"
    assert config.instances is None
    empty = ModelConfig.from_toml(b"")
    assert empty.is_empty()
    assert empty == ModelConfig()
    assert set(empty.to_json().values()) == {None}


@pytest.mark.parametrize(
    ("toml", "key", "fix"),
    [
        ("max_batch = 8", "'max_batch'", "did you mean 'max_batch_size'? known keys: "),
        ("[batching]\nmax_delay = 1", "'batching.max_delay'", "did you mean 'max_delay_ms'?"),
        ("max_batch_size = 0", "max_batch_size", "it must be at least 1"),
        ("max_batch_size = 1.5", "max_batch_size", "must be an integer, not float 1.5"),
        ("instances = -1", "instances", "at least 1"),
        ("instances = true", "instances", "must be an integer, not boolean"),
        ("max_delay_ms = -1", "max_delay_ms", "finite and 0 or more"),
        ("max_delay_ms = '2ms'", "max_delay_ms", "write max_delay_ms = 2.5"),
        ("latency_objective_ms = 0", "latency_objective_ms", "more than 0"),
        ("latency_objective_ms = inf", "latency_objective_ms", "finite"),
        ("preferred_batch_sizes = 16", "preferred_batch_sizes", "= [16, 32]"),
        ("preferred_batch_sizes = [16, 0]", "preferred_batch_sizes[1]", "integer >= 1"),
        ("preferred_batch_sizes = []", "preferred_batch_sizes", "non-empty array"),
        ("adaptive = 'yes'", "adaptive", "must be true or false"),
        ("trust = 1", "trust", "write trust = true"),
        ("version_policy = 'newest'", "version_policy", 'write "latest", "latest:N", "all"'),
        ("version_policy = 2", "version_policy", "must be a string"),
        ("batching = 3", "batching", "must be a table"),
        ("max_batch_size = 8\n[batching]\nmax_batch_size = 4", "max_batch_size", "keep one"),
        ("max_batch_size = 8\npreferred_batch_sizes = [16]", "preferred_batch_sizes", "lower"),
        ("ensemble = 3", "ensemble", "[[ensemble.step]]"),
        ("[ensemble]\nsteps = 1", "'ensemble.steps'", "did you mean 'step'?"),
        ("[ensemble]\nstep = []", "ensemble.step", "at least one step"),
        (
            "[[ensemble.step]]\ninput_map = {a = 'A'}\noutput_map = {b = 'B'}",
            "ensemble.step[0]",
            'add model = "KEY"',
        ),
        (
            "[[ensemble.step]]\nmodel = ''\ninput_map = {a = 'A'}\noutput_map = {b = 'B'}",
            "ensemble.step[0].model",
            "non-empty string",
        ),
        (
            "[[ensemble.step]]\nmodel = 'm'\nversion = 0\ninput_map = {a = 'A'}\n"
            "output_map = {b = 'B'}",
            "ensemble.step[0].version",
            "at least 1",
        ),
        (
            "[[ensemble.step]]\nmodel = 'm'\ninput_map = {a = 'A'}\noutput_map = {b = 'B'}\n"
            "[[ensemble.step]]\nmodel = 'n'\ninput_map = 3\noutput_map = {c = 'C'}",
            "ensemble.step[1].input_map",
            'input_map = { name = "TENSOR" }',
        ),
        (
            "[[ensemble.step]]\nmodel = 'm'\ninput_map = {a = 'A'}",
            "ensemble.step[0]",
            "add output_map",
        ),
        (
            "[[ensemble.step]]\nmodel = 'm'\ninput_map = {a = 'A'}\noutput_map = {b = ''}",
            "ensemble.step[0].output_map.b",
            "non-empty tensor name",
        ),
        (
            "[[ensemble.step]]\nmodel = 'm'\ninputs = {a = 'A'}\noutput_map = {b = 'B'}",
            "'ensemble.step[0].inputs'",
            "did you mean 'input_map'?",
        ),
    ],
)
def test_each_mistake_names_the_file_the_key_and_the_fix(toml: str, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_toml(toml, source=SOURCE)
    message = str(info.value)
    assert SOURCE in message
    assert key in message
    assert fix in message


def test_invalid_toml_and_bytes_name_the_file_and_the_line() -> None:
    with pytest.raises(ConfigError, match=rf"{SOURCE} is not valid TOML: .*line 2"):
        ModelConfig.from_toml(b"max_batch_size = 8\nmax_delay_ms = = 2\n", source=SOURCE)
    with pytest.raises(ConfigError, match=rf"{SOURCE} is not UTF-8"):
        ModelConfig.from_toml(b"\xff\xfe", source=SOURCE)


def test_values_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"ModelConfig.max_batch_size is 0"):
        ModelConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="exceed max_batch_size 4"):
        ModelConfig(max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(ConfigError, match="ModelConfig.version_policy"):
        ModelConfig(version_policy="sometimes")
    with pytest.raises(ConfigError, match="tuple of EnsembleStep"):
        ModelConfig(ensemble=())
    with pytest.raises(ConfigError, match="EnsembleStep.output_map"):
        EnsembleStep("m", None, {"a": "A"}, {})
    assert ModelConfig(version_policy="latest").version_policy == "latest:1"
    inputs = {"a": "A"}
    step = EnsembleStep("m", None, inputs, {"b": "B"})
    inputs["a"] = "changed"
    assert step.input_map == {"a": "A"}
    assert hash(step) == hash(EnsembleStep("m", None, {"a": "A"}, {"b": "B"}))


def test_set_fields_of_the_overrides_win() -> None:
    from_file = ModelConfig.from_toml(FULL, source=SOURCE)
    cli = ModelConfig(max_batch_size=128, instances=1, trust=True)
    merged = from_file.merged(cli, source=SOURCE)
    assert (merged.max_batch_size, merged.instances, merged.trust) == (128, 1, True)
    assert merged.max_delay_ms == 2.0
    assert merged.version_policy == "latest:2"
    assert merged.ensemble == from_file.ensemble
    assert from_file.merged(ModelConfig()) is from_file
    assert ModelConfig().merged(cli) == cli
    with pytest.raises(ConfigError, match=rf"exceed max_batch_size 8 in {SOURCE} with the comm"):
        from_file.merged(ModelConfig(max_batch_size=8), source=SOURCE)


def test_the_version_policy_grammar() -> None:
    assert parse_version_policy("latest") == ("latest", 1, ())
    assert parse_version_policy(" LATEST:4 ") == ("latest", 4, ())
    assert parse_version_policy("all") == ("all", 0, ())
    assert parse_version_policy("specific:3,1,3") == ("specific", 0, (1, 3))
    with pytest.raises(ConfigError, match=r"version_policy in serving.toml is 'latest:-1'"):
        parse_version_policy("latest:-1")


def test_an_ensemble_plan_runs_steps_in_data_order() -> None:
    # Listed consumer first: the plan runs food11 first.
    plan = validate_ensemble("pipeline", [CAPTIONER, FOOD11], SIGNATURES)
    assert [s.model for s in plan.steps] == ["food11", "captioner"]
    assert plan.order == (1, 0)
    assert plan.inputs == ("IMAGE",)
    assert plan.outputs == ("CAPTION",)
    assert plan.to_json()["steps"][0]["model"] == "food11"


def test_a_diamond_keeps_the_file_order_for_independent_steps() -> None:
    steps = [
        EnsembleStep("echo", None, {"x": "LEFT", "y": "RIGHT"}, {"z": "OUT"}),
        EnsembleStep("echo", None, {"x": "IN"}, {"x": "RIGHT"}),
        EnsembleStep("echo", None, {"x": "IN"}, {"x": "LEFT", "w": "SIDE"}),
    ]
    plan = validate_ensemble("diamond", steps, SIGNATURES)
    assert plan.order == (1, 2, 0)
    assert plan.inputs == ("IN",)
    # Every produced tensor that no step consumes is an output (SIDE too).
    assert plan.outputs == ("SIDE", "OUT")


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            [EnsembleStep("food12", None, {"image": "IMAGE"}, {"probabilities": "P"})],
            r"ensemble 'pipeline' \(s3://.*\): ensemble.step\[0\] \(model 'food12'\) names a "
            r"model that is not served; served models: captioner, echo, food11, mixer. "
            r"Did you mean 'food11'",
        ),
        (
            [FOOD11, EnsembleStep("mixer", None, {"probs": "CLASS_PROBS"}, {"text": "TEXT"})],
            r"ensemble.step\[1\] \(model 'mixer'\): the model's input 'lang' is not mapped; "
            r"add it to input_map",
        ),
        (
            [EnsembleStep("food11", None, {"img": "IMAGE"}, {"probabilities": "P"})],
            r"input_map names input 'img', which the model does not have; its inputs: image",
        ),
        (
            [EnsembleStep("food11", None, {"image": "IMAGE"}, {"probs": "P"})],
            r"output_map names output 'probs'.*its outputs: probabilities",
        ),
        (
            [FOOD11, EnsembleStep("pipeline", None, {"x": "CLASS_PROBS"}, {"y": "Y"})],
            r"ensemble.step\[1\] \(model 'pipeline'\) runs the ensemble itself, a cycle",
        ),
        (
            [
                FOOD11,
                EnsembleStep("echo", None, {"a": "IMAGE"}, {"b": "CLASS_PROBS"}),
            ],
            r"ensemble.step\[1\] \(model 'echo'\): output 'b' writes ensemble tensor "
            r"'CLASS_PROBS', which ensemble.step\[0\] \(model 'food11'\) already writes",
        ),
        (
            [EnsembleStep("echo", None, {"a": "IN"}, {"b": "OUT", "c": "OUT"})],
            r"output 'c' writes ensemble tensor 'OUT', which another output of the same step",
        ),
        (
            [
                EnsembleStep("echo", None, {"a": "B"}, {"b": "A"}),
                EnsembleStep("echo", None, {"a": "A"}, {"b": "B"}),
            ],
            r"ensemble.step\[0\] \(model 'echo'\) is in a cycle of tensors: "
            r"step\[0\] \(echo\) -> step\[1\] \(echo\) -> step\[0\] \(echo\)",
        ),
        (
            [EnsembleStep("echo", None, {"a": "X"}, {"b": "X"})],
            r"cycle of tensors: step\[0\] \(echo\) -> step\[0\] \(echo\)",
        ),
        ([], r"ensemble 'pipeline' \(s3://.*\) has no steps"),
    ],
)
def test_each_graph_error_names_the_ensemble_and_the_step(
    steps: list[EnsembleStep], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        validate_ensemble("pipeline", steps, SIGNATURES, source=SOURCE)


def test_a_cycle_through_another_ensemble() -> None:
    signatures = {**SIGNATURES, "outer": ([], []), "inner": ([], [])}
    inner_steps = [EnsembleStep("outer", None, {"a": "A"}, {"b": "B"})]
    outer_steps = [EnsembleStep("inner", None, {"a": "A"}, {"b": "B"})]
    with pytest.raises(
        ConfigError,
        match=r"ensemble 'outer': ensemble.step\[0\] \(model 'inner'\)"
        r" makes a cycle through other ensembles: outer -> inner -> outer",
    ):
        validate_ensemble("outer", outer_steps, signatures, ensembles={"inner": inner_steps})
    # Without the other ensembles' steps, inner is an ordinary model.
    assert validate_ensemble("outer", outer_steps, signatures).outputs == ("B",)
    # A cycle among other ensembles, reached from this one's step, is refused too.
    loop = {
        "inner": [EnsembleStep("loop", None, {"a": "A"}, {"b": "B"})],
        "loop": [EnsembleStep("inner", None, {"a": "A"}, {"b": "B"})],
    }
    with pytest.raises(ConfigError, match=r"outer -> inner -> loop -> inner"):
        validate_ensemble("outer", outer_steps, {**signatures, "loop": ([], [])}, ensembles=loop)
