"""What a benchmark measured: per-level figures, and the table, CSV and plot made of them.

Latency percentiles are over successful (2xx) requests; anything else (another status, a
timeout, a connection error) counts as an error, by kind. Throughput is successful requests
over the level's wall time.

A level whose busiest generator process used more than :data:`BUSY_LIMIT` of its wall time in
CPU is *generator-bound*: that process could not have sent faster, so the figures may describe
the generator rather than the server. The table marks such levels (``!``) and its notes say so.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Final

import numpy as np

from ..errors import ConfigError
from .config import BenchConfig
from .target import Target
from .worker import Outcome, merge_counts

#: A generator process busy more than this share of the wall time is the bottleneck.
BUSY_LIMIT: Final = 0.85

#: The columns of :meth:`BenchResult.write_csv`, in order.
CSV_FIELDS: Final = (
    "protocol",
    "mode",
    "level",
    "requests",
    "ok",
    "errors",
    "seconds",
    "req_per_s",
    "rows_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "processes",
    "generator_busy",
    "generator_cpu_us_per_request",
    "generator_bound",
)


def level_label(mode: str, level: float) -> str:
    """``"c=8"`` (closed loop) or ``"50 req/s"`` (open loop)."""
    if mode == "rate":
        return f"{level:g} req/s"
    return f"c={int(level)}"


def fmt(value: float | None, digits: int = 2) -> str:
    """``value`` with thousands separators, ``"-"`` for None."""
    return "-" if value is None else f"{value:,.{digits}f}"


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclasses.dataclass(frozen=True)
class LevelResult:
    """One level's figures. Latencies in milliseconds over successful requests."""

    mode: str
    level: float
    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    throughput: float
    rows_per_second: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    processes: int
    generator_busy: float
    generator_cpu_per_request_us: float | None

    @property
    def generator_bound(self) -> bool:
        """Whether a generator process was too busy for the figures to describe the server."""
        return self.generator_busy > BUSY_LIMIT

    @property
    def label(self) -> str:
        """The level as the table's notes name it (``c=64``, ``100 req/s``)."""
        return level_label(self.mode, self.level)


def _error_kinds(outcomes: list[Outcome]) -> dict[str, int]:
    """Errors by kind: connection errors and timeouts, then ``"HTTP {status}"`` for non-2xx."""
    kinds = merge_counts(o.errors for o in outcomes)
    for s, n in merge_counts(o.statuses for o in outcomes).items():
        if not 200 <= s < 300:
            kinds[f"HTTP {s}"] = kinds.get(f"HTTP {s}", 0) + n
    return kinds


def summarise(
    mode: str, level: float, outcomes: list[Outcome], rows: int, offered_seconds: float | None
) -> LevelResult:
    """One level's figures from its generator processes' outcomes.

    :param rows: examples per request (for rows per second).
    :param offered_seconds: the level's duration (duration mode), or None (requests mode).
    """
    lat = np.concatenate(
        [np.frombuffer(o.latencies, dtype=np.float64) for o in outcomes] or [np.empty(0)]
    )
    kinds = _error_kinds(outcomes)
    ok = int(lat.size)
    errors = sum(kinds.values())
    total = ok + errors
    seconds = max((o.wall for o in outcomes), default=0.0)
    if offered_seconds is not None:
        seconds = max(seconds, 1e-9)
    busy = max((o.cpu / o.wall for o in outcomes if o.wall > 0), default=0.0)
    cpu = sum(o.cpu for o in outcomes)
    pct: list[float | None] = [None, None, None]
    if ok:
        pct = [float(v) * 1000 for v in np.percentile(lat, [50, 90, 99])]
    return LevelResult(
        mode=mode,
        level=level,
        requests=total,
        ok=ok,
        errors=errors,
        error_kinds=kinds,
        seconds=seconds,
        throughput=ok / seconds if seconds > 0 else 0.0,
        rows_per_second=ok * rows / seconds if seconds > 0 else 0.0,
        p50_ms=pct[0],
        p90_ms=pct[1],
        p99_ms=pct[2],
        max_ms=float(lat.max()) * 1000 if ok else None,
        mean_ms=float(lat.mean()) * 1000 if ok else None,
        processes=len(outcomes),
        generator_busy=busy,
        generator_cpu_per_request_us=cpu / total * 1e6 if total else None,
    )


@dataclasses.dataclass
class BenchResult:
    """What :func:`~studioserve.loadgen.run_bench` measured."""

    config: BenchConfig
    target: Target
    levels: list[LevelResult]
    cpu_count: int

    def notes(self) -> list[str]:
        """Warnings about the measurement itself."""
        out = []
        bound = [r for r in self.levels if r.generator_bound]
        if bound:
            which = ", ".join(r.label for r in bound)
            worst = max(r.generator_busy for r in bound)
            out.append(
                f"the load generator was the bottleneck at {which}: a generator process was "
                f"busy {worst:.0%} of the time (limit {BUSY_LIMIT:.0%}), so these figures may "
                "describe the generator, not the server. Pass more --processes, or run the "
                "generator on another machine."
            )
        local = self.target.host in ("127.0.0.1", "localhost", "::1")
        if local and self.levels:
            used = max(r.generator_busy * r.processes for r in self.levels)
            if used > 0.5:
                out.append(
                    f"the generator ran on the server's machine and used up to {used:.1f} of "
                    f"its {self.cpu_count} CPU cores; the server had the rest."
                )
        for r in self.levels:
            if r.errors:
                kinds = ", ".join(f"{k} x{n}" for k, n in sorted(r.error_kinds.items()))
                out.append(f"{r.label}: {r.errors} error(s): {kinds}")
        return out

    def table(self) -> str:
        """The results as a text table with a header line and notes."""
        cfg = self.config
        per = f"{cfg.requests:,} requests" if cfg.requests else f"{cfg.duration:g} s"
        head = (
            f"studio bench {cfg.url}: {self.target.description}\n"
            f"{per} per level, {cfg.warmup:g} s warm-up"
        )
        level_name = "req/s offered" if cfg.mode == "rate" else "concurrency"
        cols = [level_name, "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "gen busy"]
        if cfg.batch > 1:
            cols.insert(3, "rows/s")
        rows = [self._table_row(r) for r in self.levels]
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
        lines += [f"note: {n}" for n in self.notes()]
        return "\n".join(lines)

    def _table_row(self, r: LevelResult) -> list[str]:
        row = [
            f"{r.level:g}",
            f"{r.requests:,}",
            fmt(r.throughput, 1),
            fmt(r.p50_ms),
            fmt(r.p90_ms),
            fmt(r.p99_ms),
            f"{r.errors:,}",
            f"{r.generator_busy:.0%}" + (" !" if r.generator_bound else ""),
        ]
        if self.config.batch > 1:
            row.insert(3, fmt(r.rows_per_second, 1))
        return row

    def rows(self) -> list[dict[str, Any]]:
        """One dict per level, with the :data:`CSV_FIELDS` keys."""
        return [
            {
                "protocol": self.config.protocol,
                "mode": r.mode,
                "level": r.level,
                "requests": r.requests,
                "ok": r.ok,
                "errors": r.errors,
                "seconds": round(r.seconds, 4),
                "req_per_s": round(r.throughput, 2),
                "rows_per_s": round(r.rows_per_second, 2),
                "p50_ms": _rounded(r.p50_ms, 4),
                "p90_ms": _rounded(r.p90_ms, 4),
                "p99_ms": _rounded(r.p99_ms, 4),
                "max_ms": _rounded(r.max_ms, 4),
                "mean_ms": _rounded(r.mean_ms, 4),
                "processes": r.processes,
                "generator_busy": round(r.generator_busy, 4),
                "generator_cpu_us_per_request": _rounded(r.generator_cpu_per_request_us, 2),
                "generator_bound": r.generator_bound,
            }
            for r in self.levels
        ]

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`rows` as CSV."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
            w.writeheader()
            for row in self.rows():
                w.writerow({k: "" if v is None else v for k, v in row.items()})

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw throughput and latency percentiles per level into a PNG (matplotlib, Agg).

        :raises ConfigError: when matplotlib is not installed.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ConfigError("--plot needs matplotlib: pip install 'studioserve[bench]'") from e
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
        try:
            self._draw(ax1, ax2)
            fig.suptitle(f"{self.config.url} · {self.target.description}"[:110], fontsize=9)
            fig.tight_layout()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)

    def _draw(self, ax1: Any, ax2: Any) -> None:
        """Throughput bars on ``ax1``, latency percentile lines on ``ax2``."""
        labels = [f"{r.level:g}" for r in self.levels]
        x = list(range(len(labels)))
        ax1.bar(x, [r.throughput for r in self.levels], color="#2f6fde")
        ax1.set_ylabel("requests / s")
        ax1.set_title("throughput")
        for name, color in (("p50_ms", "#2f6fde"), ("p90_ms", "#8a5bd6"), ("p99_ms", "#e0673a")):
            ys = [getattr(r, name) for r in self.levels]
            ax2.plot(
                x,
                [float("nan") if y is None else y for y in ys],
                marker="o",
                color=color,
                label=name[:3],
            )
        ax2.set_ylabel("latency (ms)")
        ax2.set_title("latency")
        ax2.legend()
        xlabel = "offered req/s" if self.config.mode == "rate" else "concurrency"
        for ax in (ax1, ax2):
            ax.set_xticks(x, labels)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        for i, r in enumerate(self.levels):
            if r.generator_bound:
                ax1.annotate("generator-bound", (i, r.throughput), ha="center", fontsize=8)
