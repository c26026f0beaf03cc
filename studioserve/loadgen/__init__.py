"""The load generator behind ``studio bench URL``: throughput and latency per load level.

The library behind the command (``studioserve.cli`` only parses options)::

    from studioserve.loadgen import BenchConfig, run_bench
    result = run_bench(BenchConfig(url="http://127.0.0.1:5000", concurrency=(1, 8, 64)))
    print(result.table())
    result.write_csv("bench.csv"); result.plot("bench.png")

It is a client: it talks to the server only over HTTP (or, with ``--protocol grpc``, gRPC), so
it measures any studioserve or Open Inference Protocol server, local or remote. The modules, in
the order a run uses them:

- :mod:`.config`: :class:`BenchConfig`, what to measure and how.
- :mod:`.prepare`, :mod:`.target`: the request to send, built from the server's signature or
  a file, and the probe that must succeed before any load.
- :mod:`.pool`, :mod:`.process`, :mod:`.worker`, :mod:`.http11`: the generator processes,
  their closed and open loops, and the bare HTTP/1.1 framing they use.
- :mod:`.grpc_load`: the same over gRPC (the ``ModelInfer`` message and its calls; imported
  only for ``--protocol grpc``, it needs the ``grpc`` extra).
- :mod:`.runner`: :func:`run_bench`, the levels, each a warm-up and a measured phase.
- :mod:`.results`: :class:`BenchResult` and :class:`LevelResult`, the table, CSV and plot, and
  the check that the generator itself was not the bottleneck (:data:`BUSY_LIMIT`).
- :mod:`.progress`: the terminal progress bar.
"""

from __future__ import annotations

from .config import PROTOCOLS, BenchConfig, default_processes, parse_levels
from .prepare import prepare_target
from .progress import is_tty
from .results import BUSY_LIMIT, CSV_FIELDS, BenchResult, LevelResult
from .runner import run_bench
from .target import Target

__all__ = [
    "BUSY_LIMIT",
    "CSV_FIELDS",
    "PROTOCOLS",
    "BenchConfig",
    "BenchResult",
    "LevelResult",
    "Target",
    "default_processes",
    "is_tty",
    "parse_levels",
    "prepare_target",
    "run_bench",
]
