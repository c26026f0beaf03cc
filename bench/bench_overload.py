"""Load shedding: ``studio serve`` driven at 4x, 10x and 50x the capacity of a slow model.

What it does (about 75 s with the defaults on a 2-core machine):

1. creates a temporary store with one experiment, "slow", served with
   ``--wrapper bench/slow_wrapper.py``: a ModelPipe stage of at most 8 items per batch that
   sleeps 50 ms per batch (so at most 160 items/s, whatever the machine) and answers ``2 * x``;
2. starts ``studio serve slow --port 0 --killafter 0 --request-timeout 10`` (a subprocess;
   ``--serve-arg`` adds any other option, e.g. the load-shedding ones) and checks one answer;
3. measures the capacity: items/s of 200 answers under a moderate closed loop (16
   connections, twice the batch size, ``--capacity-seconds``);
4. per multiple M of ``--levels`` (4, 10, 50): ``ceil(M x capacity x batch time)``
   connections, each a closed loop paced to at most one request per batch time (so the offered
   load is M x capacity: ``--no-pace`` sends again as soon as an answer comes), for
   ``--duration`` seconds; the server's RSS (VmRSS) is sampled every 0.1 s meanwhile;
5. prints one row per level: requests, counts by status (200, 503, 504, other), connection
   errors (refused, reset, closed early, timed out after ``--client-timeout``), answers that
   came with 200 but a wrong body, p50/p99 of the 200s and of the 503s, goodput, the RSS peak;
   then the targets with PASS/FAIL per level:

   - only 200 and 503 answers (no 504, no 500, no other status), 0 wrong answers;
   - 0 connection errors;
   - 200s' p99 <= 2 x Q + the batch time, Q being the server's bounded queue time:
     ``--queue-ms``, else the value of ``--serve-arg=--max-queue-ms=Q`` (or
     ``--max-queue-time``, seconds) when given, else the server's default, min(1 s, request
     timeout / 4): 1 s, so 2050 ms;
   - RSS peak <= the RSS after the capacity run + ``--rss-margin-mib`` (default 128 MiB);
   - goodput (200s per second) >= half the capacity: shedding must not refuse what it can do.

Usage::

    .venv/bin/python bench/bench_overload.py
    .venv/bin/python bench/bench_overload.py --serve-arg=--max-queue-ms=200 --json over.json
    .venv/bin/python bench/bench_overload.py --duration 3        # smoke run, ~25 s

The exit status is 0 when every target passes at every level, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import pickle
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    MIB,
    PICKLE,
    AsyncHttpConnection,
    RssSampler,
    ServerProcess,
    Target,
    add_experiment,
    add_run_options,
    add_server_options,
    fmt_num,
    http_post,
    load_str,
    loadavg,
    passed,
    percentile,
    python_env,
    rss_bytes,
    serve_arg_value,
    studio_command,
    table,
    wait_for_quiet,
)

from studioserve import wire  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DIM = 4
CAPACITY_CONNECTIONS = 16
OTHER_STATUSES = "other"


# -- one level -----------------------------------------------------------------------------------


@dataclass
class Level:
    """The figures of one run at a number of connections."""

    name: str
    connections: int
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    conn_errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    lat_200: list[float] = field(default_factory=list)
    lat_503: list[float] = field(default_factory=list)
    rss_peak: int = 0
    server_alive: bool = True
    load1: float = float("nan")

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.conn_errors.values())

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)

    @property
    def other(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in (200, 503, 504))

    @property
    def goodput(self) -> float:
        return self.count(200) / self.seconds if self.seconds > 0 else float("nan")

    def figures(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "seconds": self.seconds,
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "connection_errors": dict(self.conn_errors),
            "wrong_answers": self.wrong,
            "p50_200_ms": percentile(self.lat_200, 50) * 1e3,
            "p99_200_ms": percentile(self.lat_200, 99) * 1e3,
            "p50_503_ms": percentile(self.lat_503, 50) * 1e3,
            "p99_503_ms": percentile(self.lat_503, 99) * 1e3,
            "goodput_items_per_s": self.goodput,
            "rss_peak_bytes": self.rss_peak,
            "server_alive": self.server_alive,
            "load1": self.load1,
        }


def expected_answer(x: np.ndarray) -> np.ndarray:
    return x * 2


async def _connection_loop(
    conn: AsyncHttpConnection,
    level: Level,
    body: bytes,
    want: np.ndarray,
    deadline: float,
    period: float,
    timeout: float,
) -> None:
    headers = [("Content-Type", PICKLE)]
    loop = asyncio.get_running_loop()
    next_start = loop.time()
    while loop.time() < deadline:
        if period > 0:
            delay = next_start - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_start = max(next_start + period, loop.time())
        res = await conn.request("POST", "/", headers, body, timeout=timeout)
        if res.status == 0:
            level.conn_errors[res.error] += 1
            if res.error == "connect":
                await asyncio.sleep(0.05)  # do not spin on a refused port
            continue
        level.statuses[res.status] += 1
        if res.status == 200:
            level.lat_200.append(res.seconds)
            try:
                got = wire.decode_response(res.body, res.headers.get("content-type"))["x"]
                ok = np.array_equal(np.asarray(got), want)
            except Exception:  # noqa: BLE001 - any undecodable 200 is a wrong answer
                ok = False
            if not ok:
                level.wrong += 1
        elif res.status == 503:
            level.lat_503.append(res.seconds)
    await conn.close()


async def _run_level(
    host: str,
    port: int,
    level: Level,
    body: bytes,
    want: np.ndarray,
    duration: float,
    period: float,
    timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    conns = [AsyncHttpConnection(host, port) for _ in range(level.connections)]
    tasks = [
        asyncio.ensure_future(
            _connection_loop(c, level, body, want, t0 + duration, period, timeout)
        )
        for c in conns
    ]
    await asyncio.gather(*tasks)
    level.seconds = loop.time() - t0


def run_level(
    srv: ServerProcess,
    sampler: RssSampler,
    name: str,
    connections: int,
    duration: float,
    period: float,
    timeout: float,
) -> Level:
    assert srv.url is not None
    u = urlsplit(srv.url)
    x = np.arange(DIM, dtype=np.float32)
    body = pickle.dumps({"x": x})
    level = Level(name, connections, load1=loadavg()[0])
    sampler.take_window_peak()
    asyncio.run(
        _run_level(
            u.hostname or "127.0.0.1",
            u.port or 80,
            level,
            body,
            expected_answer(x),
            duration,
            period,
            timeout,
        )
    )
    level.rss_peak = sampler.take_window_peak()
    level.server_alive = srv.proc is not None and srv.proc.poll() is None
    return level


# -- targets and tables --------------------------------------------------------------------------


def level_targets(
    lv: Level, p99_bound_ms: float, rss_bound: int, capacity: float
) -> dict[str, Target]:
    return {
        "answers other than 200/503 (504, 500, ...)": (
            float(lv.count(504) + lv.other),
            "<=",
            0,
            "",
        ),
        "wrong answers among the 200s": (float(lv.wrong), "<=", 0, ""),
        "connection errors": (float(sum(lv.conn_errors.values())), "<=", 0, ""),
        "200s p99": (percentile(lv.lat_200, 99) * 1e3, "<=", p99_bound_ms, "ms"),
        "RSS peak": (lv.rss_peak / MIB, "<=", round(rss_bound / MIB), "MiB"),
        "goodput vs capacity": (
            lv.goodput / capacity if capacity else float("nan"),
            ">=",
            0.5,
            "x",
        ),
        "server alive after the level": (float(lv.server_alive), ">=", 1, ""),
    }


HEADERS = [
    "level",
    "conns",
    "requests",
    "200",
    "503",
    "504",
    "other",
    "conn err",
    "wrong",
    "200 p50 ms",
    "200 p99 ms",
    "503 p50 ms",
    "503 p99 ms",
    "goodput/s",
    "RSS peak MiB",
    "load1",
]


def level_row(lv: Level) -> list[str]:
    errs = sum(lv.conn_errors.values())
    err_text = str(errs)
    if errs:
        err_text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(lv.conn_errors.items())) + ")"
    return [
        lv.name,
        str(lv.connections),
        str(lv.requests),
        str(lv.count(200)),
        str(lv.count(503)),
        str(lv.count(504)),
        str(lv.other)
        + (
            " ("
            + ", ".join(
                f"{s}: {n}" for s, n in sorted(lv.statuses.items()) if s not in (200, 503, 504)
            )
            + ")"
            if lv.other
            else ""
        ),
        err_text,
        str(lv.wrong),
        fmt_num(percentile(lv.lat_200, 50) * 1e3, ".1f"),
        fmt_num(percentile(lv.lat_200, 99) * 1e3, ".1f"),
        fmt_num(percentile(lv.lat_503, 50) * 1e3, ".1f"),
        fmt_num(percentile(lv.lat_503, 99) * 1e3, ".1f"),
        fmt_num(lv.goodput, ".0f"),
        fmt_num(lv.rss_peak / MIB, ".0f"),
        fmt_num(lv.load1, ".2f"),
    ]


def targets_table(per_level: dict[str, dict[str, Target]]) -> str:
    rows = []
    for level, tg in per_level.items():
        for name, t in tg.items():
            unit = f" {t[3]}" if t[3] else ""
            rows.append(
                [
                    level,
                    name,
                    f"{fmt_num(t[0], '.2f' if t[3] else '.0f')}{unit}",
                    f"{t[1]} {t[2]:g}{unit}",
                    "PASS" if passed(t) else "FAIL",
                ]
            )
    return table(["level", "target", "value", "want", "result"], rows)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Drive `studio serve` with a 50 ms-per-batch model at 4x, 10x and 50x its "
        "capacity: only 200s and 503s, bounded p99 and RSS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    p.add_argument("--levels", default="4,10,50", help="multiples of the capacity to offer")
    p.add_argument(
        "--capacity-seconds", type=float, default=5.0, help="seconds of the capacity run"
    )
    p.add_argument("--batch-ms", type=float, default=50.0, help="the model's time per batch")
    p.add_argument("--max-batch", type=int, default=8, help="the model's batch size")
    p.add_argument(
        "--request-timeout", type=float, default=10.0, help="passed to studio serve (seconds)"
    )
    p.add_argument(
        "--client-timeout",
        type=float,
        default=None,
        help="seconds the client waits for an answer (default: --request-timeout + 10)",
    )
    p.add_argument(
        "--no-pace",
        action="store_true",
        help="send again as soon as an answer comes (default: each connection sends at most "
        "one request per batch time, so the offered load is exactly the multiple)",
    )
    p.add_argument(
        "--queue-ms",
        type=float,
        default=None,
        help="the server's bounded queue time Q in ms, for the p99 bound 2Q + batch time "
        "(default: the --max-queue-ms or --max-queue-time serve-arg if given, else the server's "
        "default, min(1 s, request timeout / 4))",
    )
    p.add_argument("--rss-margin-mib", type=float, default=128.0, help="RSS bound: warm RSS + this")
    p.add_argument(
        "--rss-guard-mib",
        type=float,
        default=4096.0,
        help="kill the server if its RSS goes above this (protects a shared machine)",
    )
    add_server_options(
        p,
        serve_arg_example="--max-queue-ms=200",
    )
    add_run_options(p)
    args = p.parse_args(argv)
    args.levels = [float(x) for x in args.levels.split(",") if x]
    if args.client_timeout is None:
        args.client_timeout = args.request_timeout + 10.0
    if args.queue_ms is not None:
        args.queue_ms_source = "--queue-ms"
    elif (ms := serve_arg_value(args.serve_arg, "--max-queue-ms")) is not None:
        args.queue_ms, args.queue_ms_source = float(ms), "--max-queue-ms"
    elif (sec := serve_arg_value(args.serve_arg, "--max-queue-time")) is not None:
        args.queue_ms, args.queue_ms_source = float(sec) * 1e3, "--max-queue-time"
    else:
        # the server's default bounded queue time: a quarter of the request timeout, at most 1 s
        args.queue_ms = min(1000.0, args.request_timeout * 1e3 / 4)
        args.queue_ms_source = "the default"
    return args


def start_server(tmp: Path, args: argparse.Namespace, log: Any) -> ServerProcess:
    studio = studio_command(args.studio_cmd)
    store = tmp / "store"
    src = tmp / "src" / "slow"
    src.mkdir(parents=True)
    (src / "README.txt").write_text("bench_overload: served with --wrapper bench/slow_wrapper.py\n")
    add_experiment(studio, store, "slow", src, "numpy")
    cmd = [
        *studio,
        "serve",
        "slow",
        "--store",
        str(store),
        "--wrapper",
        str(HERE / "slow_wrapper.py"),
        "--port",
        "0",
        "--killafter",
        "0",
        "--request-timeout",
        f"{args.request_timeout:g}",
        "--http-server",
        args.http_server,
        "--quiet",
        *args.serve_arg,
    ]
    env = python_env()
    env["SLOW_BATCH_SECONDS"] = f"{args.batch_ms / 1e3:g}"
    env["SLOW_MAX_BATCH"] = str(args.max_batch)
    print(f"# starting: {' '.join(cmd)}", file=log, flush=True)
    srv = ServerProcess(cmd, "studio-slow", url_pattern=r" at (http://\S+)", env=env, cwd=REPO)
    srv.start()
    assert srv.url is not None
    x = np.arange(DIM, dtype=np.float32)
    got = wire.decode_response(http_post(srv.url + "/", pickle.dumps({"x": x})), PICKLE)["x"]
    if not np.array_equal(np.asarray(got), expected_answer(x)):
        srv.stop()
        raise RuntimeError(f"the slow server answered {got!r} to {x!r}")
    return srv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = sys.stderr
    t_start = time.monotonic()
    batch_s = args.batch_ms / 1e3
    wait_for_quiet(args.max_load, args.max_wait, log)
    print(f"# bench_overload: http server {args.http_server}, {load_str()}", file=log, flush=True)
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="studioserve-overload-") as tmp_name:
        srv = start_server(Path(tmp_name), args, log)
        sampler = RssSampler(srv.pid, every=1.0, guard_bytes=int(args.rss_guard_mib * MIB))
        sampler.start()
        try:
            idle_rss = rss_bytes(srv.pid)
            print(
                f"# capacity run: {CAPACITY_CONNECTIONS} connections, closed loop, "
                f"{args.capacity_seconds:g} s",
                file=log,
                flush=True,
            )
            cap = run_level(
                srv,
                sampler,
                "capacity",
                CAPACITY_CONNECTIONS,
                args.capacity_seconds,
                0.0,
                args.client_timeout,
            )
            levels.append(cap)
            capacity = cap.goodput
            warm_rss = rss_bytes(srv.pid)
            print(
                f"  capacity {capacity:.1f} items/s (the model's bound: "
                f"{args.max_batch / batch_s:.0f}); RSS idle {idle_rss / MIB:.0f} MiB, warm "
                f"{warm_rss / MIB:.0f} MiB",
                file=log,
                flush=True,
            )
            if not capacity > 0:
                raise RuntimeError(f"no 200 answers in the capacity run: {cap.figures()}")
            for mult in args.levels:
                conns = max(1, math.ceil(mult * capacity * batch_s))
                name = f"{mult:g}x"
                pace = "unpaced" if args.no_pace else f"paced: 1 request per {args.batch_ms:g} ms"
                print(
                    f"# level {name}: {conns} connections for {args.duration:g} s "
                    f"({pace}; {load_str()})",
                    file=log,
                    flush=True,
                )
                lv = run_level(
                    srv,
                    sampler,
                    name,
                    conns,
                    args.duration,
                    0.0 if args.no_pace else batch_s,
                    args.client_timeout,
                )
                levels.append(lv)
                print(f"  {' '.join(level_row(lv))}", file=log, flush=True)
                if not lv.server_alive:
                    print("# the server is gone: stopping", file=log, flush=True)
                    break
                time.sleep(1.0)
        finally:
            sampler.stop()
            code = srv.stop()
            if sampler.guard_tripped is not None:
                at, rss = sampler.guard_tripped
                print(
                    f"# RSS guard: the server reached {rss / MIB:.0f} MiB at {at:.1f} s and was "
                    "killed",
                    file=log,
                )
    p99_bound_ms = 2 * args.queue_ms + args.batch_ms
    rss_bound = int(warm_rss + args.rss_margin_mib * MIB)
    per_level = {lv.name: level_targets(lv, p99_bound_ms, rss_bound, capacity) for lv in levels[1:]}
    print(
        f"\n## bench_overload: slow model {args.batch_ms:g} ms per batch of {args.max_batch}, "
        f"capacity {capacity:.1f} items/s, http server {args.http_server}, "
        f"serve args {' '.join(args.serve_arg) or '-'}, {load_str()}"
    )
    print(table(HEADERS, [level_row(lv) for lv in levels], left=1))
    print(
        f"bounds: 200s p99 <= 2 x Q + batch time = 2 x {args.queue_ms:g} ms "
        f"(Q: {args.queue_ms_source}) + {args.batch_ms:g} ms = {p99_bound_ms:g} ms; "
        "RSS peak <= warm RSS "
        f"{warm_rss / MIB:.0f} MiB + {args.rss_margin_mib:g} MiB = {rss_bound / MIB:.0f} MiB; "
        "goodput >= 0.5 x capacity"
    )
    print(targets_table(per_level))
    ok = all(passed(t) for tg in per_level.values() for t in tg.values()) and len(per_level) == len(
        args.levels
    )
    print(
        f"server exit code {code}; wall time {time.monotonic() - t_start:.0f} s; "
        f"{'PASS' if ok else 'FAIL'}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "http_server": args.http_server,
                    "serve_args": args.serve_arg,
                    "batch_ms": args.batch_ms,
                    "max_batch": args.max_batch,
                    "capacity_items_per_s": capacity,
                    "idle_rss_bytes": idle_rss,
                    "warm_rss_bytes": warm_rss,
                    "p99_bound_ms": p99_bound_ms,
                    "rss_bound_bytes": rss_bound,
                    "levels": {lv.name: lv.figures() for lv in levels},
                    "targets": {
                        level: {
                            n: {"value": t[0], "want": f"{t[1]} {t[2]:g}", "pass": passed(t)}
                            for n, t in tg.items()
                        }
                        for level, tg in per_level.items()
                    },
                    "rss_guard_tripped": sampler.guard_tripped,
                    "exit_code": code,
                    "pass": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
