"""Regression tests: issue 11's hostile bodies, issue 15's near-misses of the common pickle,
and every crash the decoder fuzzer found.

The issue's bodies are built in code (``hostile_cases.py``); the fuzzer's finds are small files
in ``corpus/``, listed with their expected status in ``corpus/index.json``. Each is decoded
with the default limits and must give its status quickly, allocate (tracemalloc's peak) far
less than it once did and within the budget for its size, and give its memory back.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest

from studioserve import wire
from studioserve.errors import (
    DecodedTooLarge,
    PickleTooLarge,
    StudioServeError,
    TooManyKeys,
    UnsafePickle,
)
from studioserve.wire import fast_pickle
from studioserve.wire.budget import DecodeLimits
from studioserve.wire.fast_pickle import fast_loads
from studioserve.wire.oip_codec import decode_infer_request
from studioserve.wire.safe_pickle import REQUEST_ARRAY_KINDS, safe_loads
from tests.wire import hostile_cases, sentinel
from tests.wire.hostile_cases import Case, measure

CASES = {case.name: case for case in hostile_cases.issue_cases()}
MiB = 1 << 20


@pytest.mark.parametrize("name", list(CASES))
def test_issue_case(name: str) -> None:
    case = CASES[name]
    m = measure(case)
    assert m.status == (case.status or 200), m.message
    assert m.peak <= m.budget
    assert m.peak < 8 * MiB, f"{m.peak} bytes touched"
    assert m.milliseconds < 2000
    assert m.rss_after - m.rss_before < 32 * MiB


def test_the_npz_claiming_1_gib_decodes_what_it_holds() -> None:
    out, fmt = wire.decode_request(hostile_cases.npz_claiming_1gib(), wire.NPZ)
    assert fmt == "npz"
    assert out["x"].tolist() == [0.0, 1.0]


def test_the_errors_name_their_limits() -> None:
    with pytest.raises(PickleTooLarge, match="decode budget of 276824064 bytes") as info:
        wire.decode_request(CASES["8 MiB of EMPTY_SET opcodes"].body, wire.PICKLE)
    assert isinstance(info.value, UnsafePickle)
    assert info.value.http_status == 413
    assert "--max-body" in str(info.value)
    with pytest.raises(TooManyKeys, match="600000 keys, more than the limit of 4096") as keys:
        wire.decode_request(CASES["JSON with 600,000 keys"].body, wire.JSON)
    assert "--max-keys" in str(keys.value)
    with pytest.raises(DecodedTooLarge, match="expands to more than the decode budget"):
        wire.decode_request(CASES["npz zip bomb (1 GiB of zeros)"].body, wire.NPZ)
    with pytest.raises(UnsafePickle, match=r"refused array shape \(0, 4611686018427387904\)"):
        wire.decode_request(CASES["pickle of an empty (0, 2**62) array"].body, None)


def test_the_zip_bombs_budget_follows_max_body() -> None:
    limits = DecodeLimits(max_body=MiB)  # the cap: 8 x 1 MiB, below 32 x its ~1 MiB
    assert limits.budget_for(len(CASES["npz zip bomb (1 GiB of zeros)"].body)) == 16 * MiB
    m = measure(CASES["npz zip bomb (1 GiB of zeros)"], limits)
    assert m.status == 413
    assert m.peak < MiB


def test_many_keys_within_the_limit_are_fine() -> None:
    body = json.dumps({f"k{i}": [i] for i in range(4096)}).encode()
    out, _ = wire.decode_request(body, wire.JSON)
    assert len(out) == 4096
    with pytest.raises(TooManyKeys):
        wire.decode_request(body, wire.JSON, limits=DecodeLimits(max_keys=4095))


def _decode_entry(entry: dict[str, Any], body: bytes) -> Any:
    if entry["format"] == "oip":
        return decode_infer_request(
            body, entry.get("header_length"), content_encoding=entry.get("encoding")
        )
    content_type = {"pickle": wire.PICKLE, "json": wire.JSON, "npz": wire.NPZ}[entry["format"]]
    return wire.decode_request(body, content_type)


FINDS = hostile_cases.corpus_cases()


@pytest.mark.parametrize(("entry", "body"), FINDS, ids=[entry["file"] for entry, _ in FINDS])
def test_fuzzer_find(entry: dict[str, Any], body: bytes) -> None:
    status = 200
    try:
        _decode_entry(entry, body)
    except StudioServeError as e:
        status = e.http_status
    assert status == entry["status"], entry["note"]


FAST_CASES = hostile_cases.fast_path_cases()


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: c.name)
def test_fast_path_case(case: Case) -> None:
    """Issue 15's near-misses, decoded whole (the fast path, then the general one if need be)."""
    sentinel.CALLS.clear()
    m = measure(case)
    assert m.status == (case.status or 200), m.message
    assert m.peak <= m.budget
    assert not sentinel.CALLS


def _pickle_cases() -> list[tuple[str, bytes]]:
    cases = [c for c in [*hostile_cases.issue_cases(), *FAST_CASES] if c.content_type != wire.NPZ]
    cases = [c for c in cases if c.content_type != wire.JSON]
    finds = [(entry["file"], body) for entry, body in FINDS if entry["format"] == "pickle"]
    return [(c.name, c.body) for c in cases] + finds


@pytest.mark.parametrize(("name", "body"), _pickle_cases(), ids=[n for n, _ in _pickle_cases()])
def test_hostile_pickles_on_the_fast_path_alone(name: str, body: bytes) -> None:
    """Every hostile pickle, given to the fast path directly: the general path's error (class
    and status), or None; never a global called, and its peak within the budget."""
    fast_pickle._SKELETONS.clear()
    limits = DecodeLimits()
    general: Any
    try:
        general = safe_loads(body, budget=limits.budget(len(body)))
    except StudioServeError as e:
        general = e
    budget = limits.budget(len(body))
    sentinel.CALLS.clear()
    tracemalloc.start()
    try:
        try:
            got: Any = fast_loads(body, REQUEST_ARRAY_KINDS, budget)
        except StudioServeError as e:
            got = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not sentinel.CALLS
    assert peak <= budget.limit
    if isinstance(got, StudioServeError):
        assert type(got) is type(general)
        assert got.http_status == general.http_status
    elif got is not None:
        assert not isinstance(general, StudioServeError), general
        assert list(got) == list(general)


def test_cases_are_what_they_say() -> None:
    assert len(hostile_cases.npz_claiming_1gib()) < 300
    assert len(CASES["8 MiB of EMPTY_SET opcodes"].body) == 8 * MiB
    assert 5_000_000 < len(CASES["JSON with 600,000 keys"].body) < 8_000_000
    assert len(CASES["npz zip bomb (1 GiB of zeros)"].body) < 1.1 * MiB
    assert all(isinstance(c, Case) for c in CASES.values())
