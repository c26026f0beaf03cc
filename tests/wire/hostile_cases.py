"""The bodies of issue 11's adversarial test, built in code (none is committed: some are MiBs).

Used by ``tests/wire/test_corpus.py`` (each decoded in-process: status, time, tracemalloc's
peak) and ``tests/http/test_hostile.py`` (each sent to a real server). Run as a script, it
prints the measurements of the issue's table::

    .venv/bin/python -m tests.wire.hostile_cases
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import pickle
import resource
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from studioserve import wire
from studioserve.errors import StudioServeError
from studioserve.wire.budget import DecodeLimits

CORPUS = Path(__file__).parent / "corpus"


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile body: what it is, how it is sent, and the status a server answers with
    (None: decoded; the model decides)."""

    name: str
    body: bytes
    content_type: str | None
    status: int | None
    note: str = ""


def _zip(name: str, data: bytes, method: int, *, size: int, crc: int) -> bytes:
    """A one-member zip archive, written by hand so that its sizes can say anything."""
    raw = name.encode()
    version = 20
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", version, 0, method, 0, 0, crc, len(data), size, len(raw), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        version,
        version,
        0,
        method,
        0,
        0,
        crc,
        len(data),
        size,
        len(raw),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    directory = central + raw
    head = local + raw + data
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(head), 0)
    return head + directory + end


def npz_claiming_1gib() -> bytes:
    """~300 bytes: a stored .npy member of 16 bytes of data whose zip directory (local header
    and central directory) says it is 1 GiB once extracted. The old decoder allocated the
    claimed size before reading a byte."""
    member = io.BytesIO()
    np.lib.format.write_array(member, np.arange(2, dtype=np.float64))
    data = member.getvalue()
    return _zip("x.npy", data, zipfile.ZIP_STORED, size=1 << 30, crc=zlib.crc32(data))


@functools.lru_cache(maxsize=1)
def zip_bomb() -> bytes:
    """~1 MiB: an npz whose one member inflates to 1 GiB of zeros (a uint8 array of 2**30
    elements, with a true header and a true CRC). Built from one compressed block of 1 MiB of
    zeros repeated (a full flush makes each block stand alone), so it takes a second."""
    member = io.BytesIO()
    count = 1 << 30
    np.lib.format.write_array_header_1_0(
        member, {"descr": "|u1", "fortran_order": False, "shape": (count,)}
    )
    header = member.getvalue()
    zeros = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.flush()
    crc = zlib.crc32(header)
    for _ in range(count >> 20):
        crc = zlib.crc32(zeros, crc)
    data = head + block * (count >> 20) + tail
    return _zip("x.npy", data, zipfile.ZIP_DEFLATED, size=len(header) + count, crc=crc)


def empty_container_pickle(size: int = 8 << 20, op: bytes = b"\x8f") -> bytes:
    """``size`` bytes of one-byte opcodes that each create an empty container (EMPTY_SET, 216
    bytes each; the old decoder took 11 s and ~1.9 GB for 8 MiB)."""
    return b"\x80\x04" + op * (size - 3) + b"."


def many_keys_json(keys: int = 600_000) -> bytes:
    """~7 MB: a JSON object of 600,000 tiny keys (the old server took 15 s and kept 1.25 GB)."""
    return json.dumps({f"{i:x}": 0 for i in range(keys)}, separators=(",", ":")).encode()


def hostile_empty_array_pickle() -> bytes:
    """An empty uint8 array with a huge second dimension: converting it to float32 (a model's
    dtype) asked numpy for more than it can address, and the server answered 500."""
    return pickle.dumps({"x": np.empty((0, 2**62), np.uint8)}, protocol=5)


def hostile_empty_array_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.empty((0, 2**62), np.uint8))
    return buf.getvalue()


def issue_cases() -> list[Case]:
    """The issue's cases, in its order (the zip bomb is built once, then cached)."""
    return [
        Case(
            "npz claiming a 1 GiB member",
            npz_claiming_1gib(),
            wire.NPZ,
            None,
            "decoded: the 16 bytes it holds, never the size it claims",
        ),
        Case("8 MiB of EMPTY_SET opcodes", empty_container_pickle(), wire.PICKLE, 413),
        Case("8 MiB of EMPTY_LIST opcodes", empty_container_pickle(op=b"]"), wire.PICKLE, 413),
        Case("JSON with 600,000 keys", many_keys_json(), wire.JSON, 413),
        Case("npz zip bomb (1 GiB of zeros)", zip_bomb(), wire.NPZ, 413),
        Case("pickle of an empty (0, 2**62) array", hostile_empty_array_pickle(), wire.PICKLE, 400),
        Case("npz of an empty (0, 2**62) array", hostile_empty_array_npz(), wire.NPZ, 400),
    ]


def _common(protocol: int = 4, **values: Any) -> bytes:
    """A common body, as ``pickle.dumps`` writes a dict of arrays."""
    return pickle.dumps(values, protocol=protocol)


def _edit(body: bytes, old: bytes, new: bytes) -> bytes:
    """``body`` with its first ``old`` made ``new``, its first frame's length fixed to fit."""
    assert old in body
    body = body.replace(old, new, 1)
    if body[2] == 0x95:  # FRAME
        body = body[:3] + struct.pack("<Q", len(body) - 11) + body[11:]
    return body


class _Trip:
    """Pickles as a call of the sentinel global."""

    def __reduce__(self) -> Any:
        from tests.wire import sentinel

        return (sentinel.trip, (b"x" * 64,))


def fast_path_cases() -> list[Case]:
    """Issue 15's bodies: built to look like the common pickle the fast path reads, each wrong
    in one way. The fast path must refuse each with the general path's error, or leave it to
    the general path (None), which decides."""
    row = np.zeros(16, np.float32)
    x = _common(x=row)
    reconstruct = b"\x8c\x16numpy._core.multiarray\x94\x8c\x0c_reconstruct"
    two = _common(x=row, y=np.ones(16, np.float32))
    return [
        Case("common body calling the sentinel", _common(x=_Trip()), wire.PICKLE, 400),
        Case(
            "the sentinel in place of _reconstruct",
            _edit(x, reconstruct, b"\x8c\x13tests.wire.sentinel\x94\x8c\x04trip"),
            wire.PICKLE,
            400,
        ),
        Case("an object dtype", _edit(x, b"\x8c\x02f4", b"\x8c\x02O8"), wire.PICKLE, 400),
        Case("a shape its data does not fill", _edit(x, b"K\x10\x85", b"K\x11\x85"), None, 400),
        Case(
            "an empty (0, 2**62) array, protocol 4",
            _common(x=np.empty((0, 2**62), np.uint8)),
            None,
            400,
        ),
        Case(
            "a frame longer than the body", x[:3] + struct.pack("<Q", 1 << 40) + x[11:], None, 400
        ),
        Case(
            "a memo index pointing at ndarray",
            two.replace(b"h\x04", b"h\x07", 1),
            wire.PICKLE,
            400,
            "the dtype of the second array, replaced by numpy.ndarray",
        ),
        Case(
            "5000 keys of common arrays",
            _common(**{f"k{i}": np.zeros(1, np.float32) for i in range(5000)}),
            wire.PICKLE,
            413,
        ),
        Case(
            "the same key twice",
            two.replace(b"\x8c\x01y", b"\x8c\x01x"),
            wire.PICKLE,
            None,
            "decoded by the general path: the last value wins",
        ),
        Case("bytes after STOP", x + b"garbage", None, None, "decoded by the general path"),
    ]


def corpus_cases() -> list[tuple[dict[str, Any], bytes]]:
    """The fuzzer's finds: ``(entry of corpus/index.json, body)``."""
    index = json.loads((CORPUS / "index.json").read_text())
    return [(entry, (CORPUS / entry["file"]).read_bytes()) for entry in index]


def _rss() -> int:
    """This process's resident set size, in bytes."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak, which only grows
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class Measured:
    status: int
    milliseconds: float
    peak: int
    rss_before: int
    rss_after: int
    budget: int
    message: str


def measure(case: Case, limits: DecodeLimits | None = None) -> Measured:
    """Decode ``case`` in-process: its status (200: decoded), time, tracemalloc's peak and the
    resident set size before and after."""
    limits = limits or DecodeLimits()
    rss_before = _rss()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        wire.decode_request(case.body, case.content_type, limits=limits)
        status, message = 200, "decoded"
    except StudioServeError as e:
        status, message = e.http_status, str(e)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return Measured(
        status,
        1000 * elapsed,
        peak,
        rss_before,
        _rss(),
        limits.budget_for(len(case.body)),
        message,
    )


def main() -> None:
    mib = float(1 << 20)
    print(
        f"{'case':38} {'body':>10} {'status':>6} {'ms':>8} {'peak MiB':>9} "
        f"{'RSS before':>11} {'RSS after':>10} {'budget MiB':>10}"
    )
    for case in issue_cases():
        m = measure(case)
        print(
            f"{case.name:38} {len(case.body):>10} {m.status:>6} {m.milliseconds:>8.1f} "
            f"{m.peak / mib:>9.2f} {m.rss_before / mib:>11.1f} {m.rss_after / mib:>10.1f} "
            f"{m.budget / mib:>10.1f}"
        )
        print(f"    {m.message[:150]}")


if __name__ == "__main__":
    main()
