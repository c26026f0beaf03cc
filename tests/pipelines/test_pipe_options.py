"""add()'s options are checked before anything is built; the pipe's model stage and settings.

A stand-in ``keras`` module (only its ``Model`` class) makes a plain object a "Keras model",
and a stand-in runner records whether the stage warmed it: no Keras is imported here.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

import pytest

import studioserve.pipelines.stage as stage_module
from studioserve.pipelines import ModelPipe, StageStats


def times10(batch: list[int]) -> list[int]:
    return [x * 10 for x in batch]


class FakeModel:
    """Recognised as a Keras model once the stand-in ``keras`` module is installed."""

    name = "fake_model"

    def __call__(self, batch: Any) -> Any:
        return batch


class FakeRunner:
    """Stands in for KerasRunner: records that a stage was built for a model and warmed it."""

    built: list[Any] = []
    warmed: list[Any] = []

    def __init__(self, model: Any) -> None:
        self.model = model
        FakeRunner.built.append(model)

    def warm(self) -> None:
        FakeRunner.warmed.append(self.model)

    def prepare(self, item: Any) -> tuple[Any, int]:
        return item, 1

    def __call__(self, data: Any) -> Any:
        return data


@pytest.fixture
def fake_keras(monkeypatch: pytest.MonkeyPatch) -> type[FakeModel]:
    monkeypatch.setitem(sys.modules, "keras", types.SimpleNamespace(Model=FakeModel))
    monkeypatch.setattr(stage_module, "KerasRunner", FakeRunner)
    monkeypatch.setattr(FakeRunner, "built", [])
    monkeypatch.setattr(FakeRunner, "warmed", [])
    return FakeModel


# -- bad options: an error, and nothing built ------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"batch_size": 2, "max_batch_size": 4}, ValueError, "disagree"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be an integer >= 1"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"timeout": 0}, ValueError, "timeout must be > 0 seconds"),
        ({"adaptive": True, "latency_objective": 1.0}, ValueError, "needs max_batch_size"),
        ({"adaptive": True, "max_batch_size": 1}, ValueError, "max_batch_size > 1"),
        ({"max_batch_size": 4, "max_delay": -1}, ValueError, "max_delay must be >= 0"),
        ({"max_batch_size": 4, "linger": 2}, ValueError, "linger must be a fraction"),
        ({"max_batch_size": 4, "preferred_batch_sizes": [8]}, ValueError, "preferred"),
    ],
)
def test_bad_options_raise_before_anything_is_built(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    calls: list[Any] = []

    def func(x: Any) -> Any:
        calls.append(x)
        return x

    pipe = ModelPipe(name="bad")
    pipe.add(lambda x: x + 1)
    with pytest.raises(error, match=match):
        pipe.add(func, **options)
    assert pipe.stage_names == []
    assert repr(pipe) == "<ModelPipe 'bad': lambda>"  # func did not join the head either
    assert not [t for t in threading.enumerate() if t.name.startswith("studioserve-bad-")]
    # the pipe is as it was: a good add() and a submit still work, and func never ran
    pipe.add(times10, batch_size=2, name="m")
    assert pipe.submit(1).result() == 20
    assert calls == []
    pipe.close()


def test_a_non_callable_is_a_type_error_and_builds_nothing() -> None:
    pipe = ModelPipe()
    with pytest.raises(TypeError, match="needs a callable or a Keras model, not int"):
        pipe.add(42, num_workers=2)
    assert pipe.stage_names == []
    assert repr(pipe).endswith("identity>")


def test_a_keras_model_with_bad_options_is_never_warmed(fake_keras: type[FakeModel]) -> None:
    model = fake_keras()
    pipe = ModelPipe()
    for bad in ({"max_batch_size": 0}, {"max_delay": -1.0}, {"preferred_batch_sizes": [128]}):
        with pytest.raises(ValueError, match="max_batch_size|max_delay|preferred"):
            pipe.add(model, **bad)
    assert FakeRunner.built == []
    assert FakeRunner.warmed == []
    assert pipe.keras_model is None
    assert pipe.stage_names == []
    pipe.add(model)  # good options: built, warmed once, a batching stage of 64 rows
    assert FakeRunner.warmed == [model]
    assert pipe.keras_model is model
    assert pipe.stage_names == ["fake_model"]
    assert pipe.max_batch_size == 64
    pipe.close()


# -- the model stage and its settings --------------------------------------------------------------


def test_model_stage_is_the_batching_stage_with_the_largest_bound() -> None:
    assert ModelPipe().model_stage is None
    assert ModelPipe().add(times10).model_stage is None  # composed: no stage
    assert ModelPipe().add(times10, num_workers=2, name="a").model_stage == "a"
    plain = ModelPipe().add(times10, num_workers=1, name="a").add(times10, num_workers=1, name="b")
    assert plain.model_stage == "b"  # no batching stage: the last
    mixed = (
        ModelPipe()
        .add(times10, num_workers=1, name="pre")
        .add(times10, max_batch_size=8, name="small")
        .add(times10, max_batch_size=32, name="big")
        .add(times10, num_workers=1, name="post")
    )
    assert mixed.model_stage == "big"
    tie = (
        ModelPipe()
        .add(times10, max_batch_size=16, name="first")
        .add(times10, max_batch_size=16, name="second")
        .add(times10, max_batch_size=4, name="third")
    )
    assert tie.model_stage == "second"  # ties: the last
    # batch_size=1 without a batcher is not a batching stage
    assert ModelPipe().add(times10, batch_size=1, name="one").model_stage == "one"
    one = ModelPipe().add(times10, batch_size=4, name="b4").add(times10, batch_size=1, name="b1")
    assert one.model_stage == "b4"


def test_stage_stats_carry_max_delay_and_preferred_batch_sizes() -> None:
    with ModelPipe() as pipe:
        pipe.add(times10, num_workers=1, name="pre", max_delay=0.5)  # ignored: not batching
        pipe.add(
            times10,
            max_batch_size=32,
            max_delay=0.002,
            preferred_batch_sizes=[16, 4, 8, 4],
            name="model",
        )
        pipe.add(times10, max_batch_size=8, name="plain")
        stages = pipe.stats().stages
    assert stages["model"].max_delay == 0.002
    assert stages["model"].preferred_batch_sizes == (4, 8, 16)  # ascending, once each
    assert stages["plain"].max_delay == 0.0
    assert stages["plain"].preferred_batch_sizes == ()
    assert stages["pre"].max_delay == 0.0
    assert stages["pre"].preferred_batch_sizes == ()


def test_stage_stats_built_without_the_new_fields_get_defaults() -> None:
    st = StageStats(
        name="m",
        workers=1,
        batching=True,
        max_batch_size=8,
        batch_limit=8,
        items=0,
        batches=0,
        failures=0,
        batch_sizes={},
        compute_seconds=0.0,
        queue_wait_seconds=0.0,
        queue_depth=0,
    )
    assert st.max_delay == 0.0
    assert st.preferred_batch_sizes == ()
