"""Running a benchmark: each level's warm-up and measured phase, on the generator processes.

Each level runs a warm-up (``--warmup`` seconds, discarded), then ``--duration`` seconds or
``--requests`` requests. A level's connections (closed loop), request rate (open loop) and
request quota are split evenly over the generator processes, which start each phase together
a moment after it is handed out.
"""

from __future__ import annotations

import logging
import os
import time
from typing import IO

from .config import BenchConfig, default_processes
from .pool import Pool
from .prepare import prepare_target
from .progress import Progress
from .results import BenchResult, LevelResult, fmt, level_label, summarise
from .worker import Spec

logger = logging.getLogger(__name__)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _specs(
    cfg: BenchConfig, level: float, processes: int, record: bool, seconds: float | None
) -> list[Spec]:
    """One phase's work for each generator process (``seconds`` None: ``cfg.requests``)."""
    start = time.monotonic() + 0.05 * processes + 0.05
    end = None if seconds is None else start + seconds
    if cfg.mode == "concurrency":
        nproc = min(processes, int(level))
        conns = _split(int(level), nproc)
    else:
        nproc = processes
        conns = [0] * nproc
    quotas: list[int | None] = [None] * nproc
    if seconds is None and cfg.requests is not None:
        quotas = list(_split(cfg.requests, nproc))
    return [
        Spec(
            mode=cfg.mode,
            connections=conns[i],
            rate=level / nproc,
            start=start,
            end=end,
            requests=quotas[i],
            record=record,
        )
        for i in range(nproc)
        if cfg.mode == "rate" or conns[i] > 0
    ]


def _run_level(
    cfg: BenchConfig, level: float, pool: Pool, processes: int, bar: Progress | None, rows: int
) -> LevelResult:
    """Warm up at ``level``, then measure it."""
    label = level_label(cfg.mode, level)
    if cfg.warmup > 0:
        warm = _specs(cfg, level, processes, False, cfg.warmup)
        pool.run(warm, bar, label + " warm-up", cfg.warmup)
    seconds = None if cfg.requests is not None else cfg.duration
    specs = _specs(cfg, level, processes, True, seconds)
    total = float(cfg.requests) if cfg.requests is not None else cfg.duration
    outcomes = pool.run(specs, bar, label, total)
    if bar is not None:
        bar.clear()
    result = summarise(cfg.mode, level, outcomes, rows, seconds)
    logger.debug(
        "%s: %.1f req/s, p50 %s ms, p99 %s ms, %d errors",
        result.label,
        result.throughput,
        fmt(result.p50_ms),
        fmt(result.p99_ms),
        result.errors,
    )
    return result


def run_bench(cfg: BenchConfig, *, progress: IO[str] | None = None) -> BenchResult:
    """Measure ``cfg.url`` at each level of ``cfg``.

    :param cfg: what to measure.
    :param progress: a terminal stream to draw a progress bar on (None: no bar).
    :raises ClientError: when the server cannot be reached or the probe request fails.
    :raises ConfigError: for bad settings.

    Example::

        result = run_bench(BenchConfig(url="http://127.0.0.1:5000", duration=5))
        print(result.table())
    """
    target = prepare_target(cfg)
    processes = default_processes(cfg)
    bar = Progress(progress) if progress is not None else None
    results: list[LevelResult] = []
    pool = Pool(target, cfg.timeout, processes)
    try:
        for level in cfg.levels:
            results.append(_run_level(cfg, level, pool, processes, bar, target.rows))
    finally:
        pool.close()
        if bar is not None:
            bar.clear()
    return BenchResult(cfg, target, results, os.cpu_count() or 1)
