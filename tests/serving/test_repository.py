"""ModelRepository: leases, the atomic switch, retirement after the last lease, the index."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ModelNotChosen, ModelNotFound, StudioServeError
from studioserve.models import CallableModel, Model, PipeModel
from studioserve.serving.repository import ModelRepository
from tests.helpers import gated_pipe


class Closing(CallableModel):
    """A callable model that records when it was closed."""

    def __init__(self, label: str) -> None:
        super().__init__(lambda data: {k: label for k in data}, source=label)
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        super().close()


def _predict(repo: ModelRepository, name: str | None, version: Any = None) -> Any:
    served = repo.lease(name, version)
    try:
        return served.model.predict({"k": 1}, timeout=5)["k"]
    finally:
        served.release()


def test_resolve_names_versions_and_the_default_model() -> None:
    repo = ModelRepository()
    repo.publish("a", {1: Closing("a1"), 2: Closing("a2")})
    assert _predict(repo, None) == "a2"  # the only model, its newest version
    assert _predict(repo, "a", "1") == "a1"
    assert _predict(repo, "a", 2) == "a2"
    with pytest.raises(ModelNotFound, match="served versions: 1, 2"):
        repo.lease("a", "7")
    with pytest.raises(ModelNotFound, match="this server serves 'a'"):
        repo.lease("zz")
    repo.publish("b", {1: Closing("b1")})
    with pytest.raises(ModelNotChosen, match="'a', 'b'"):
        repo.lease(None)
    assert repo.names() == ["a", "b"]
    repo.close()


def test_a_switch_is_atomic_and_the_old_version_closes_after_its_last_lease() -> None:
    repo = ModelRepository()
    old = Closing("old")
    repo.publish("m", {1: old})
    held = repo.lease("m")
    new = Closing("new")
    repo.publish("m", {2: new})
    assert _predict(repo, "m") == "new"  # new leases see only the new version at once
    assert not old.closed.is_set()  # the held lease keeps the old one open
    assert held.model.predict({"k": 0}, timeout=1) == {"k": "old"}
    held.release()
    assert old.closed.wait(5)
    assert held.wait_closed(5)
    assert not new.closed.is_set()
    repo.close()
    assert new.closed.is_set()


def test_an_unchanged_version_keeps_serving_through_a_republish() -> None:
    repo = ModelRepository()
    one = Closing("one")
    repo.publish("m", {1: one})
    served = repo.get("m").versions[1]
    repo.publish("m", {1: served, 2: Closing("two")})
    assert repo.get("m").versions[1] is served
    assert not one.closed.is_set()
    repo.close()


def test_listeners_hear_each_new_version_before_requests_reach_it() -> None:
    repo = ModelRepository()
    heard: list[str] = []
    repo.subscribe(lambda v: heard.append(v.label))
    repo.publish("m", {1: Closing("1")})
    repo.publish("m", {1: repo.get("m").versions[1], 2: Closing("2")})
    assert heard == ["m@1", "m@2"]
    late: list[str] = []
    repo.subscribe(lambda v: late.append(v.label))  # hears what is served already
    assert sorted(late) == ["m@1", "m@2"]
    repo.close()


def test_a_failed_reload_keeps_the_served_versions_and_is_counted() -> None:
    repo = ModelRepository()
    repo.publish("m", {1: Closing("1")})
    entry = repo.failed("m", "m/v2.keras: not a Keras file")
    assert entry.ready
    assert entry.failures == 1
    assert "v2.keras" in entry.reason
    assert _predict(repo, "m") == "1"
    index = repo.index()
    assert index == [
        {"name": "m", "version": "1", "state": "READY", "reason": "m/v2.keras: not a Keras file"}
    ]
    repo.close()


def test_remove_makes_a_model_disappear_at_once_and_finishes_its_requests() -> None:
    pipe, gate, entered = gated_pipe(max_batch_size=2)
    model = PipeModel(pipe, source="gated")
    model.start()
    repo = ModelRepository()
    repo.publish("g", {1: model})
    out: dict[str, Any] = {}

    def request() -> None:
        served = repo.lease("g")
        try:
            out.update(served.model.predict({"k": np.ones(1, np.float32)}, timeout=10))
        finally:
            served.release()

    t = threading.Thread(target=request)
    t.start()
    assert entered.wait(5)
    repo.remove("g")
    with pytest.raises(ModelNotFound):
        repo.lease("g")
    gate.set()
    t.join(10)
    assert "k" in out  # the request in flight was answered
    retired = repo._retired[0]
    assert retired.wait_closed(10)
    repo.close()


def test_the_repository_without_control_refuses_load_and_unload() -> None:
    repo = ModelRepository()
    repo.publish("m", {1: Closing("1")})
    with pytest.raises(StudioServeError, match="fixed"):
        repo.request_load("m")
    with pytest.raises(ModelNotFound):
        repo.request_unload("other")
    repo.close()


def test_close_waits_for_every_version() -> None:
    repo = ModelRepository()
    models: list[Model] = [Closing(str(i)) for i in range(3)]
    repo.publish("a", {1: models[0], 2: models[1]})
    repo.publish("b", {1: models[2]})
    repo.close()
    assert all(m.closed.is_set() for m in models)  # type: ignore[attr-defined]
