"""Issue 11's hostile bodies (and issue 15's near-misses of the common pickle) against a real
server: each gets its documented status (never 500, which means "the model raised"), the server
keeps serving, and four at once leave its memory where it was."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from studioserve import wire
from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.tensors import TensorSpec
from studioserve.wire.budget import DecodeLimits
from tests.helpers import error_of, raw_post, running_server
from tests.wire import hostile_cases

MiB = 1 << 20


def _model() -> PipeModel:
    """Doubles float32 rows of any length: the hostile empty array once reached its astype."""
    pipe = ModelPipe(name="double")
    pipe.add(lambda batch: batch * 2, max_batch_size=16)
    return PipeModel(pipe, source="test", inputs=[TensorSpec("x", (None,), "float32")])


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with running_server("hostile", model=_model()) as server:
        yield server


def _post(server: Any, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, out = raw_post(server.url, body, headers)
    return status, out


def _still_serving(server: Any) -> None:
    body = pickle.dumps({"k": np.ones((2, 3), np.float32)})
    status, out = _post(server, body, wire.PICKLE)
    assert status == 200
    np.testing.assert_array_equal(wire.decode_response(out, wire.PICKLE)["k"], 2 * np.ones((2, 3)))


@pytest.mark.parametrize("case", hostile_cases.issue_cases(), ids=lambda c: c.name)
def test_each_issue_case_gets_its_status(server: Any, case: hostile_cases.Case) -> None:
    start = time.perf_counter()
    status, out = _post(server, case.body, case.content_type)
    elapsed = time.perf_counter() - start
    assert status == (case.status or 200), out[:300]
    assert status != 500
    if status != 200:
        error = error_of(out)
        assert error["type"] in {"too_large", "too_many_keys", "unsafe_pickle", "bad_request"}
        assert "--max" in error["message"] or "refused array shape" in error["message"]
    assert elapsed < 5
    _still_serving(server)


@pytest.mark.parametrize("case", hostile_cases.fast_path_cases(), ids=lambda c: c.name)
def test_each_fast_path_case_gets_its_status(server: Any, case: hostile_cases.Case) -> None:
    """Issue 15's near-misses of the common pickle: the fast path refuses them as the general
    path does, or leaves them to it."""
    status, out = _post(server, case.body, case.content_type)
    assert status == (case.status or 200), out[:300]
    if status != 200:
        assert error_of(out)["type"] in {"too_many_keys", "unsafe_pickle", "bad_request"}
    _still_serving(server)


def test_the_npz_claiming_1_gib_is_answered_for_what_it_holds(server: Any) -> None:
    status, out = _post(server, hostile_cases.npz_claiming_1gib(), wire.NPZ)
    assert status == 200
    assert wire.decode_response(out, wire.NPZ)["x"].tolist() == [0.0, 2.0]


@pytest.mark.parametrize(
    "value",
    [
        np.empty((0, 2**62), np.uint8),
        np.empty((3, 0, 2**40), np.int8),
        np.empty((0, 2**31, 2**31), np.bool_),
    ],
    ids=["0x2**62", "3x0x2**40", "0x2**31x2**31"],
)
@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_hostile_empty_arrays_are_400(server: Any, value: np.ndarray, fmt: str) -> None:
    if fmt == "pickle":
        body, content_type = pickle.dumps({"x": value}, protocol=5), wire.PICKLE
    else:
        buf = io.BytesIO()
        np.savez(buf, x=value)
        body, content_type = buf.getvalue(), wire.NPZ
    status, out = _post(server, body, content_type)
    assert status == 400, out
    assert "refused array shape" in error_of(out)["message"]
    _still_serving(server)


def _infer(server: Any, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    status, _, raw = raw_post(server.url, body, headers, path="/v2/models/hostile/infer")
    return status, json.loads(raw)


def _gzip_bomb(size: int = 1 << 30) -> bytes:
    """A gzip body that inflates to ``size`` bytes of spaces (one deflate block, repeated)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    spaces = b" " * MiB
    block = packer.compress(spaces) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // MiB):
        crc = zlib.crc32(spaces, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = (crc & 0xFFFFFFFF).to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    return header + block * (size // MiB) + packer.flush() + trailer


def test_oip_hostile_bodies(server: Any) -> None:
    empty = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**62], "data": []}]}
    status, doc = _infer(server, json.dumps(empty).encode(), {})
    assert status == 400, doc
    assert "refused array shape" in doc["error"]
    binary = {
        "inputs": [
            {
                "name": "x",
                "datatype": "UINT8",
                "shape": [0, 2**62],
                "parameters": {"binary_data_size": 0},
            }
        ]
    }
    head = json.dumps(binary).encode()
    status, doc = _infer(server, head, {wire.oip_codec.HEADER_LENGTH: str(len(head))})
    assert status == 400, doc
    keys = json.dumps({"inputs": [], "parameters": {f"{i:x}": 0 for i in range(600_000)}})
    status, doc = _infer(server, keys.encode(), {})
    assert status == 413, doc
    bomb = _gzip_bomb()
    assert len(bomb) < 1.1 * MiB
    status, doc = _infer(server, bomb, {"Content-Encoding": "gzip"})
    assert status == 413, doc
    fine = gzip.compress(
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
        ).encode()
    )
    status, doc = _infer(server, fine, {"Content-Encoding": "gzip"})
    assert status == 200, doc
    assert doc["outputs"][0]["data"] == [2.0, 4.0]


def _rss() -> int:
    return hostile_cases._rss()


def test_four_hostile_requests_at_once_leave_memory_alone(server: Any) -> None:
    cases = [c for c in hostile_cases.issue_cases() if c.status is not None][:4]
    budget = max(DecodeLimits().budget_for(len(c.body)) for c in cases)
    _still_serving(server)
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda c: _post(server, c.body, c.content_type)[0], cases))
    finally:
        done.set()
        sampler.join()
    assert statuses == [c.status for c in cases]
    growth = peak[0] - before
    assert growth < 4 * budget
    assert growth < 256 * MiB, f"the server grew by {growth / MiB:.0f} MiB"
    assert _rss() - before < 64 * MiB
    _still_serving(server)
