"""Model repository: one model vs five behind one server, a hot reload under load, replicas.

What it does (about 5 minutes with the defaults on a 2-core machine; ``--duration 5`` is a
smoke run of 2 to 3 minutes, most of it loading models):

1. builds six copies of the "mlp" workload of bench_server.py (a Keras MLP 512 -> 2048 relu ->
   2048 relu -> 10 softmax, float32, saved as ``.keras``; bench_server's own builder, each copy
   with its own seed) in one worker process, which also computes each copy's outputs for 64
   fixed inputs: the expected answers. Five are added to a temporary local store as ``m1`` ...
   ``m5`` (``studio experiments add``, as a user would), the first once more as ``reload``; the
   sixth is the reload's new checkpoint;
2. **models**, 1 vs 5 models: serves ``m1`` alone and drives ``POST /models/m1`` with
   ``--connections`` (64) closed-loop connections of one-example pickle requests for
   ``--duration`` seconds (30), after ``--warmup`` seconds (2) that are not counted; then serves
   ``m1`` ... ``m5`` in one server and spreads the same connections over the five routes
   (connection i sends to ``/models/m<1 + i mod 5>``); every answer is checked against its
   model's output (rtol 1e-4, atol 1e-5);
3. **reload**, a hot reload under load: serves ``reload`` with ``--watch 0.5`` under the same
   load; a third of the way into the counted time it writes the sixth model into the store as a
   new checkpoint (saved beforehand, then ``Store.put_file("reload", "v2.keras", path)``: version
   2), and all run long it polls ``GET /`` (JSON, every 0.25 s) to see version 2 served and
   version 1 gone (the swap completed). Every answer is classed as the old model's, the new
   model's or neither's. The run goes on past ``--duration`` when needed, until 3 s after the
   swap (at most ``--swap-timeout`` more). The windows: before the write; from the write to 2 s
   after the swap completed; after that (requests by the time they were sent);
4. **replicas**: serves ``m1`` with ``--instances 1``, then ``--instances 2``, under the same
   load, and reads the server's CPU time per thread (``/proc/PID/task/*/stat``, user + system)
   at the start and the end of the counted time, grouped: each model-stage worker
   (``studioserve-<pipe>-<stage>-<i>``: one per replica) apart; granian's ``tokio-rt-worker``
   threads (its runtime, and the threads that run the WSGI app: HTTP parsing, decoding,
   admission, encoding); TensorFlow's Eigen pool (unnamed threads started while the model
   loads: the matmuls) and ``tf_Compute``; the other Python threads by name. Python 3.11 gives
   its threads no OS name, so this section starts the server through a launcher (this file
   with ``--named-threads FILE``) that appends each Python thread's native id and name to FILE
   as the thread starts, then runs ``studio`` as the ``studio`` script does; nothing else about
   the server changes. Rows per model call, the time per call and the model stage's busy time
   (from ``/metrics``), and the batches each instance ran, show how the replicas split the
   work;
5. prints one table per section and the targets with PASS/FAIL; ``--json FILE`` writes every
   figure, the reload's status polls and the busiest threads included.

The columns: ``requests`` (sent in the counted time), ``req/s`` (200 answers per counted
second), ``p50 ms``/``p99 ms`` (of the 200 answers), ``errors`` (by status or kind), ``wrong``
(200 answers that are not the model's output), ``rows/call`` (rows per model call), ``batch
ms`` (time per model call) and ``stage busy`` (seconds of model calls per second, summed over
models and instances: 2.00 = two calls at all times), all three from ``/metrics`` around the
counted time; ``srv cores`` (the server's CPU use, 1.00 = one core busy), ``CPU us/req``
(its CPU time per 200 answer) and ``load1`` (the 1-minute load average at the counted start).

Every server is ``studio serve KEY... --store STORE --port 0 --killafter 0 --request-timeout 10
--quiet`` (plus the section's options and ``--serve-arg``), waited for at ``/readyz``, checked
with one request per model, and stopped (SIGTERM: its drain; SIGKILL after 30 s) before the next
one starts; Ctrl-C or SIGTERM stops the benchmark and the server it runs. The servers' log
lines at WARNING or above are printed at the end.

The load generator is benchlib's asyncio HTTP/1.1 client (``AsyncHttpConnection``) in this
process, sharing the machine's cores with the server (the same for both sides of every ratio):
one keep-alive connection per closed loop, each request one of the 64 inputs at random, as a
pickle. An answer body already classed is not decoded again (a model's answers to an input
repeat byte for byte, but for a few variants from different batch sizes: about one answer in
ten is decoded), so checking every answer costs the client little. Latencies are those
of 200 answers; errors are any other status and any connection error (refused, reset, closed
early, no answer within ``--client-timeout``).

The targets (issue 12), each taken within one run of this script:

=======================================================  ========
5 models' throughput vs 1 model's (the same total load)  >= 0.90
reload: the swap completed (version 2 served, 1 gone)    yes
reload: failed requests (non-200, connection errors)     0
reload: answers neither the old nor the new model's      0
reload: p99 from the write until 2 s after the swap,     <= 2x
vs p99 before the write
=======================================================  ========

Replicas have no bound: the section reports the ratio of 2 to 1 instances' throughput and
where the cores went (CPU seconds per second per thread group; 1.00 = one core busy), which is
what explains the ratio. If the server refuses ``--instances 2`` the section says so and the
others still run.

Usage::

    .venv/bin/python bench/bench_repository.py                        # ~5 minutes
    .venv/bin/python bench/bench_repository.py --json repository.json
    .venv/bin/python bench/bench_repository.py --sections reload --duration 60
    .venv/bin/python bench/bench_repository.py --duration 5 --warmup 1  # smoke run

The exit status is 0 when every target of the sections run passes, 1 otherwise (130 when
interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    PICKLE,
    AsyncHttpConnection,
    HttpResult,
    ServerProcess,
    Target,
    add_experiment,
    add_run_options,
    add_server_options,
    cpu_seconds,
    fmt_num,
    http_post,
    load_str,
    loadavg,
    passed,
    percentile,
    python_env,
    ratio,
    scrape_labelled,
    studio_command,
    table,
    thread_cpu_seconds,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTIONS = ("models", "reload", "replicas")
N_INPUTS = 64
N_MODELS = 5
#: one seed per MLP copy: m1..m5, then the reload's new checkpoint
SEEDS = (101, 102, 103, 104, 105, 106)
RTOL, ATOL = 1e-4, 1e-5
POLL_SECONDS = 0.25  # GET / during the reload
SWAP_TAIL = 2.0  # the swap window ends this long after the swap completed
WATCH_SECONDS = 0.5
HEADERS = [("Content-Type", PICKLE)]
#: /metrics samples read at the start and the end of each counted run
METRICS = (
    "studioserve_model_rows_total",
    "studioserve_instance_executions_total",
    "studioserve_compute_seconds_sum",
    "studioserve_compute_seconds_count",
)
WARN_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")


# -- worker process (model building: it imports Keras) ---------------------------------------------


def build_models(out: Path, inputs: Path, seeds: Sequence[int]) -> None:
    """bench_server's MLP once per seed: ``out/s<seed>/model/mlp.keras``, and its outputs for
    the inputs in ``inputs`` (an .npz of ``one`` and ``bulk``) in ``out/s<seed>/mlp_expected.npz``.
    """
    import bench_server

    keras = bench_server._keras()
    real_seed = keras.utils.set_random_seed
    try:
        for seed in seeds:
            folder = out / f"s{seed}"
            folder.mkdir(parents=True)
            shutil.copy(inputs, folder / "inputs.npz")
            # build_mlp seeds Keras with its one constant; each copy here gets its own seed
            keras.utils.set_random_seed = lambda _constant, s=seed: real_seed(s)
            bench_server.build_mlp(folder / "model", folder / "inputs.npz")
            keras.backend.clear_session()
    finally:
        keras.utils.set_random_seed = real_seed


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_repository.py --worker")
    parser.add_argument("what", choices=["build"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--seeds", required=True)
    args = parser.parse_args(argv)
    build_models(args.out, args.inputs, [int(s) for s in args.seeds.split(",")])
    return 0


def launch_named(mapfile: str, argv: list[str]) -> int:
    """``studio ARGV`` in this process, as the ``studio`` script runs it, each Python thread's
    native id and name appended to ``mapfile`` (``tid<TAB>name``) when the thread starts."""
    lock = threading.Lock()
    run = threading.Thread.run

    def named_run(self: threading.Thread) -> None:
        with contextlib.suppress(OSError), lock, open(mapfile, "a", encoding="utf-8") as f:
            f.write(f"{threading.get_native_id()}\t{self.name}\n")
        run(self)

    threading.Thread.run = named_run  # type: ignore[method-assign]
    from studioserve.cli import main as studio_main

    studio_main(args=argv, prog_name="studio")
    return 0


# -- checking answers ------------------------------------------------------------------------------


class Judge:
    """Classes answers: per route, a few labelled candidate outputs (``{"ok": expected}``, or
    ``{"old": ..., "new": ...}``), each an array of the outputs for the 64 inputs.

    An answer is the first candidate it matches (rtol 1e-4, atol 1e-5), else ``"wrong"``. Each
    answer body already classed is remembered: a model answers an input with the same bytes
    most of the time, so most answers cost one dict lookup instead of a decode."""

    def __init__(self, candidates: Sequence[dict[str, np.ndarray]]) -> None:
        from studioserve import wire

        self.decode = wire.decode_response
        self.candidates = candidates
        self.seen: dict[tuple[int, int, bytes], str] = {}
        self.decoded = 0  # answers that were not seen before

    def __call__(self, route: int, index: int, res: HttpResult) -> str:
        key = (route, index, res.body)
        label = self.seen.get(key)
        if label is None:
            label = self.classify(route, index, res)
            if len(self.seen) < 200_000:
                self.seen[key] = label
        return label

    def classify(self, route: int, index: int, res: HttpResult) -> str:
        self.decoded += 1
        try:
            got = np.asarray(self.decode(res.body, res.headers.get("content-type"))["x"])
        except Exception:  # noqa: BLE001 - any undecodable 200 is a wrong answer
            return "wrong"
        for label, outputs in self.candidates[route].items():
            want = outputs[index]
            if got.shape == want.shape and np.allclose(got, want, rtol=RTOL, atol=ATOL):
                return label
        return "wrong"


# -- the load --------------------------------------------------------------------------------------


class Rec(NamedTuple):
    """One counted request."""

    start: float  # seconds after the counted start
    seconds: float
    status: int  # 0: no answer (see error)
    error: str
    route: int
    verdict: str  # the Judge's label, or "failed" (not 200)


class LoadRun:
    """Closed-loop connections (connection i sends to route i mod len(routes)); keeps the
    requests sent from the counted start on, each with its verdict.

    ``end`` (loop time) may be moved while the run goes on (the reload extends it).
    """

    def __init__(
        self,
        url: str,
        routes: Sequence[str],
        bodies: Sequence[bytes],
        judge: Callable[[int, int, HttpResult], str],
        connections: int,
        timeout: float,
    ) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.routes = list(routes)
        self.bodies = list(bodies)
        self.judge = judge
        self.connections = connections
        self.timeout = timeout
        self.records: list[Rec] = []
        self.t0 = 0.0
        self.end = 0.0
        self.load1 = float("nan")
        self.at_start: dict[str, Any] = {}
        self.at_end: dict[str, Any] = {}
        #: the counted answers other than 200, by status (or error) and the body's start
        self.error_examples: Counter[str] = Counter()

    @property
    def seconds(self) -> float:
        return self.end - self.t0

    async def _client(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(7000 + i)
        route = i % len(self.routes)
        path = self.routes[route]
        conn = AsyncHttpConnection(self.host, self.port)
        try:
            while loop.time() < self.end:
                j = rng.randrange(len(self.bodies))
                start = loop.time()
                res = await conn.request(
                    "POST", path, HEADERS, self.bodies[j], timeout=self.timeout
                )
                if start >= self.t0:
                    verdict = self.judge(route, j, res) if res.status == 200 else "failed"
                    if res.status != 200:
                        what = f"{res.status or res.error} {path}: {res.body[:240]!r}"
                        if what in self.error_examples or len(self.error_examples) < 10:
                            self.error_examples[what] += 1
                    self.records.append(
                        Rec(start - self.t0, res.seconds, res.status, res.error, route, verdict)
                    )
                if res.error == "connect":
                    await asyncio.sleep(0.05)  # do not spin on a refused port
        finally:
            await conn.close()

    async def _marks(self, probe: Callable[[], dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self.t0 - loop.time()))
        self.load1 = loadavg()[0]
        self.at_start = probe()
        while loop.time() < self.end:
            await asyncio.sleep(min(0.05, max(0.0, self.end - loop.time())))
        self.at_end = probe()

    async def run(
        self,
        warmup: float,
        duration: float,
        side: Callable[[LoadRun], Awaitable[None]] | None = None,
        probe: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``warmup`` seconds not counted, then ``duration`` counted (or until ``end``);
        ``side`` runs beside the load; ``probe`` is called at the counted start and end."""
        loop = asyncio.get_running_loop()
        self.t0 = loop.time() + warmup
        self.end = self.t0 + duration
        tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.connections)]
        extra = [asyncio.ensure_future(self._marks(probe or dict))]
        if side is not None:
            extra.append(asyncio.ensure_future(side(self)))
        try:
            await asyncio.gather(*tasks, *extra)
        finally:
            for t in (*tasks, *extra):
                t.cancel()
            await asyncio.gather(*tasks, *extra, return_exceptions=True)


def error_lines(label: str, f: dict[str, Any]) -> list[str]:
    """The run's answers other than 200, by kind and body (the first 10 kinds)."""
    return [f"{label}: {n} x {what}" for what, n in (f.get("error_examples") or {}).items()]


def figures(recs: Sequence[Rec], seconds: float) -> dict[str, Any]:
    """The figures of some counted requests over ``seconds``."""
    ok = [r.seconds for r in recs if r.status == 200]
    kinds = Counter(str(r.status) if r.status else r.error for r in recs if r.status != 200)
    verdicts = Counter(r.verdict for r in recs)
    return {
        "seconds": seconds,
        "requests": len(recs),
        "answered_200": len(ok),
        "req_per_s": len(ok) / seconds if seconds > 0 else float("nan"),
        "p50_ms": percentile(ok, 50) * 1e3,
        "p99_ms": percentile(ok, 99) * 1e3,
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "verdicts": dict(verdicts),
        "wrong": verdicts.get("wrong", 0),
    }


def in_window(recs: Sequence[Rec], lo: float, hi: float) -> list[Rec]:
    return [r for r in recs if lo <= r.start < hi]


# -- servers ---------------------------------------------------------------------------------------


@dataclass
class Env:
    """What every section needs."""

    args: argparse.Namespace
    studio: list[str]
    store: Path
    tmp: Path
    bodies: list[bytes]
    #: expected outputs (64 x 10) by experiment key (m1..m5, reload) and "reload-v2"
    expected: dict[str, np.ndarray]
    new_checkpoint: Path
    log: Any
    exit_codes: list[str] = field(default_factory=list)
    server_warnings: list[str] = field(default_factory=list)


def serve_cmd(env: Env, keys: Sequence[str], *extra: str, studio: Sequence[str] = ()) -> list[str]:
    return [
        *(studio or env.studio),
        "serve",
        *keys,
        "--store",
        str(env.store),
        "--port",
        "0",
        "--killafter",
        "0",
        "--request-timeout",
        f"{env.args.request_timeout:g}",
        "--http-server",
        env.args.http_server,
        "--quiet",
        *extra,
        *env.args.serve_arg,
    ]


def stop_server(srv: ServerProcess) -> int | None:
    """ServerProcess.stop, and SIGKILL for its group if interrupted meanwhile."""
    try:
        return srv.stop()
    except BaseException:
        proc = srv.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        raise


@contextlib.contextmanager
def serving(env: Env, label: str, cmd: list[str], keys: Sequence[str]) -> Iterator[ServerProcess]:
    """Start ``cmd``, check one answer from each of ``keys``, yield it; stop it at the end."""
    print(f"# {label}: starting {' '.join(cmd)} ({load_str()})", file=env.log, flush=True)
    srv = ServerProcess(
        cmd,
        f"studio-{label}",
        url_pattern=r" at (http://\S+)",
        env=python_env(),
        cwd=REPO,
        start_timeout=env.args.start_timeout,
    )
    try:
        srv.start()
        assert srv.url is not None
        judge = Judge([{"ok": env.expected[k]} for k in keys])
        for i, key in enumerate(keys):
            body = http_post(f"{srv.url}/models/{key}", env.bodies[0])
            res = HttpResult(200, 0.0, body, {"content-type": PICKLE})
            if judge(i, 0, res) != "ok":
                raise RuntimeError(f"{label}: /models/{key} answered {body[:200]!r}: not its model")
        yield srv
    finally:
        code = stop_server(srv)
        if srv.proc is not None:
            env.exit_codes.append(f"{label}: {code}")
            warnings = [line for line in srv.lines if WARN_RE.search(line)]
            for line in warnings[:20]:
                env.server_warnings.append(f"{label}: {line}")
            if len(warnings) > 20:
                env.server_warnings.append(f"{label}: ... {len(warnings) - 20} more")


def status_json(url: str) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url + "/", headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def drive(
    env: Env,
    srv: ServerProcess,
    keys: Sequence[str],
    judge: Callable[[int, int, HttpResult], str],
    *,
    side: Callable[[LoadRun], Awaitable[None]] | None = None,
    probe: Callable[[], dict[str, Any]] | None = None,
) -> LoadRun:
    assert srv.url is not None
    args = env.args
    run = LoadRun(
        srv.url,
        [f"/models/{k}" for k in keys],
        env.bodies,
        judge,
        args.connections,
        args.client_timeout,
    )
    print(
        f"  {args.connections} connections over {', '.join(keys)}: {args.warmup:g} s warm-up, "
        f"{args.duration:g} s counted",
        file=env.log,
        flush=True,
    )

    def cpu_probe() -> dict[str, Any]:
        out: dict[str, Any] = {"cpu": cpu_seconds(srv.pid), "t": time.monotonic()}
        out["metrics"] = scrape_labelled(f"{srv.url}/metrics", METRICS)
        if probe is not None:
            out.update(probe())
        return out

    asyncio.run(run.run(args.warmup, args.duration, side, cpu_probe))
    if srv.proc is not None and srv.proc.poll() is not None:
        raise RuntimeError(f"the server exited with {srv.proc.returncode} during the run")
    return run


def metric_delta(run: LoadRun, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A /metrics sample's growth over the counted time, by label values."""
    a = run.at_start.get("metrics", {}).get(name, {})
    b = run.at_end.get("metrics", {}).get(name, {})
    return {labels: v - a.get(labels, 0.0) for labels, v in b.items()}


def run_figures(run: LoadRun) -> dict[str, Any]:
    """A run's figures, with the server's CPU use and (from /metrics) its batches."""
    figs = figures(run.records, run.seconds)
    a, b = run.at_start, run.at_end
    wall = b.get("t", 0.0) - a.get("t", 0.0)
    cpu = b.get("cpu", float("nan")) - a.get("cpu", float("nan"))
    figs["server_cores"] = cpu / wall if wall > 0 else float("nan")
    n = figs["answered_200"]
    figs["cpu_us_per_req"] = cpu / n * 1e6 if n else float("nan")
    figs["load1"] = run.load1
    figs["error_examples"] = dict(run.error_examples)
    figs["answers_decoded"] = getattr(run.judge, "decoded", None)
    rows = {dict(lb).get("model", ""): v for lb, v in metric_delta(run, METRICS[0]).items()}
    execs: dict[str, dict[str, float]] = {}
    for lb, v in metric_delta(run, METRICS[1]).items():
        labels = dict(lb)
        execs.setdefault(labels.get("model", ""), {})[labels.get("instance", "")] = v
    figs["model_rows"] = rows
    figs["batches_by_instance"] = execs
    figs["rows_per_call"] = {
        m: ratio(rows.get(m, float("nan")), sum(e.values())) for m, e in execs.items()
    }
    all_batches = sum(sum(e.values()) for e in execs.values())
    figs["rows_per_call_all"] = ratio(sum(rows.values()), all_batches) if execs else float("nan")
    compute = sum(metric_delta(run, METRICS[2]).values())
    calls = sum(metric_delta(run, METRICS[3]).values())
    figs["compute_s_per_s"] = compute / wall if wall > 0 and calls else float("nan")
    figs["batch_ms"] = compute / calls * 1e3 if calls else float("nan")
    return figs


RUN_HEADERS = [
    "run",
    "routes",
    "requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "wrong",
    "rows/call",
    "batch ms",
    "stage busy",
    "srv cores",
    "CPU us/req",
    "load1",
]


def run_row(label: str, routes: str, f: dict[str, Any]) -> list[str]:
    errs = str(f["errors"])
    if f["errors"]:
        errs += " (" + ", ".join(f"{k} {v}" for k, v in sorted(f["error_kinds"].items())) + ")"
    return [
        label,
        routes,
        str(f["requests"]),
        fmt_num(f["req_per_s"], ".0f"),
        fmt_num(f["p50_ms"], ".1f"),
        fmt_num(f["p99_ms"], ".1f"),
        errs,
        str(f["wrong"]),
        fmt_num(f.get("rows_per_call_all", float("nan")), ".1f"),
        fmt_num(f.get("batch_ms", float("nan")), ".2f"),
        fmt_num(f.get("compute_s_per_s", float("nan")), ".2f"),
        fmt_num(f.get("server_cores", float("nan")), ".2f"),
        fmt_num(f.get("cpu_us_per_req", float("nan")), ".0f"),
        fmt_num(f.get("load1", float("nan")), ".2f"),
    ]


# -- section 1: 1 vs 5 models ----------------------------------------------------------------------


def section_models(env: Env) -> tuple[str, dict[str, Any], dict[str, Target]]:
    keys = [f"m{i + 1}" for i in range(N_MODELS)]
    out: dict[str, Any] = {}
    rows = []
    per_model_rows = []
    for label, served in (("1 model", keys[:1]), (f"{N_MODELS} models", keys)):
        with serving(env, label.replace(" ", "-"), serve_cmd(env, served), served) as srv:
            judge = Judge([{"ok": env.expected[k]} for k in served])
            run = drive(env, srv, served, judge)
        f = run_figures(run)
        if len(served) > 1:
            f["per_model"] = {}
            for i, key in enumerate(served):
                pm = figures([r for r in run.records if r.route == i], run.seconds)
                f["per_model"][key] = pm
                per_model_rows.append(
                    [
                        key,
                        str(sum(1 for c in range(env.args.connections) if c % len(served) == i)),
                        str(pm["requests"]),
                        fmt_num(pm["req_per_s"], ".0f"),
                        fmt_num(pm["p50_ms"], ".1f"),
                        fmt_num(pm["p99_ms"], ".1f"),
                        str(pm["errors"]),
                        str(pm["wrong"]),
                        fmt_num(f["rows_per_call"].get(key, float("nan")), ".1f"),
                    ]
                )
        out[label] = f
        routes = "/models/m1" if len(served) == 1 else f"/models/m1..m{len(served)}"
        rows.append(run_row(label, routes, f))
        print(f"  {'  '.join(rows[-1])}", file=env.log, flush=True)
    r = ratio(out[f"{N_MODELS} models"]["req_per_s"], out["1 model"]["req_per_s"])
    out["ratio_5_vs_1"] = r
    text = [
        f"### 1 vs {N_MODELS} models: {env.args.connections} connections, one-example pickle "
        f"requests, {env.args.duration:g} s each",
        table(RUN_HEADERS, rows),
        "",
        f"{N_MODELS} models, per model:",
        table(
            [
                "model",
                "conns",
                "requests",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "wrong",
                "rows/call",
            ],
            per_model_rows,
            left=1,
        ),
        f"throughput {N_MODELS} models / 1 model: {fmt_num(r, '.3f')}",
    ]
    for label, f in out.items():
        if isinstance(f, dict):
            text.extend(error_lines(label, f))
    tg: dict[str, Target] = {
        f"{N_MODELS} models' throughput vs 1 model's": (r, ">=", 0.90, "x"),
    }
    return "\n".join(text), out, tg


# -- section 2: reload under load ------------------------------------------------------------------


@dataclass
class Swap:
    """What the reload's side task saw (seconds after the counted start)."""

    write_at: float = float("nan")
    written_at: float = float("nan")
    new_served_at: float = float("nan")  # the status page first lists version 2
    done_at: float = float("nan")  # ... and no longer lists version 1
    polls: list[tuple[float, list[int], str, int]] = field(default_factory=list)
    poll_errors: Counter[str] = field(default_factory=Counter)
    write_error: str = ""


def served_versions(doc: dict[str, Any], key: str) -> tuple[list[int], str, int]:
    for m in doc.get("models") or []:
        if m.get("name") == key:
            versions = [int(v["version"]) for v in m.get("versions") or []]
            return versions, str(m.get("state", "")), int(m.get("load_failures") or 0)
    return [], "missing", 0


def section_reload(env: Env) -> tuple[str, dict[str, Any], dict[str, Target]]:
    from studioserve.store import open_store

    args = env.args
    key = "reload"
    swap = Swap()

    def write() -> None:
        with open_store(str(env.store)) as store:
            store.put_file(key, "v2.keras", env.new_checkpoint)

    async def side(run: LoadRun) -> None:
        loop = asyncio.get_running_loop()
        conn = AsyncHttpConnection(run.host, run.port)
        write_at = run.t0 + args.duration / 3
        writer: asyncio.Future[None] | None = None
        try:
            while loop.time() < run.end:
                if writer is None and loop.time() >= write_at:
                    swap.write_at = loop.time() - run.t0
                    print(f"  {swap.write_at:.1f} s: writing v2.keras", file=env.log, flush=True)
                    writer = loop.run_in_executor(None, write)
                    # wait for the swap past the counted time if need be, within --swap-timeout
                    run.end = max(run.end, run.t0 + args.duration + args.swap_timeout)
                if writer is not None and writer.done() and math.isnan(swap.written_at):
                    swap.written_at = loop.time() - run.t0
                    exc = writer.exception()
                    if exc is not None:
                        swap.write_error = f"{type(exc).__name__}: {exc}"
                        run.end = run.t0 + args.duration
                res = await conn.request("GET", "/", [("Accept", "application/json")], timeout=10)
                t = loop.time() - run.t0
                if res.status != 200:
                    swap.poll_errors[str(res.status) if res.status else res.error] += 1
                else:
                    versions, state, failures = served_versions(json.loads(res.body), key)
                    swap.polls.append((t, versions, state, failures))
                    if writer is not None:
                        if math.isnan(swap.new_served_at) and 2 in versions:
                            swap.new_served_at = t
                            print(f"  {t:.1f} s: version 2 served", file=env.log, flush=True)
                        seen = not math.isnan(swap.new_served_at)
                        if seen and math.isnan(swap.done_at) and 1 not in versions:
                            swap.done_at = t
                            print(f"  {t:.1f} s: version 1 gone", file=env.log, flush=True)
                            run.end = max(run.t0 + args.duration, run.t0 + t + SWAP_TAIL + 1.0)
                await asyncio.sleep(POLL_SECONDS)
            if writer is not None:
                await writer
        finally:
            await conn.close()

    cmd = serve_cmd(env, [key], "--watch", f"{WATCH_SECONDS:g}")
    with serving(env, "reload", cmd, [key]) as srv:
        old, new = env.expected[key], env.expected["reload-v2"]
        judge = Judge([{"old": old, "new": new}])
        run = drive(env, srv, [key], judge, side=side)
        final_versions: list[int] = []
        with contextlib.suppress(Exception):
            final_versions = served_versions(status_json(srv.url or ""), key)[0]
    recs = run.records
    done = not math.isnan(swap.done_at)
    wrote = not math.isnan(swap.write_at)
    swap_end = swap.done_at + SWAP_TAIL if done else run.seconds
    before = in_window(recs, 0.0, swap.write_at) if wrote else recs
    during = in_window(recs, swap.write_at, swap_end) if wrote else []
    after = in_window(recs, swap_end, run.seconds + 60)
    f_all = run_figures(run)
    windows = {
        "before the write": (0.0, swap.write_at, before),
        "write .. swap + 2 s": (swap.write_at, swap_end, during),
        "after": (swap_end, run.seconds, after),
    }
    wfigs = {name: figures(rs, hi - lo) for name, (lo, hi, rs) in windows.items()}
    new_ends = [r.start + r.seconds for r in recs if r.verdict == "new"]
    old_ends = [r.start + r.seconds for r in recs if r.verdict == "old"]
    # NaN compares False: none of either before the write, or when version 2 was never seen
    old_after = sum(1 for r in recs if r.verdict == "old" and r.start > swap.new_served_at)
    new_before = sum(1 for r in recs if r.verdict == "new" and r.start + r.seconds < swap.write_at)
    failed = f_all["errors"]
    wrong = f_all["verdicts"].get("wrong", 0)
    p99_ratio = (
        ratio(wfigs["write .. swap + 2 s"]["p99_ms"], wfigs["before the write"]["p99_ms"])
        if done
        else float("nan")
    )
    rows = []
    for name, (lo, hi, _) in windows.items():
        w = wfigs[name]
        v = w["verdicts"]
        rows.append(
            [
                name,
                fmt_num(lo, ".1f"),
                fmt_num(hi, ".1f"),
                str(w["requests"]),
                fmt_num(w["req_per_s"], ".0f"),
                fmt_num(w["p50_ms"], ".1f"),
                fmt_num(w["p99_ms"], ".1f"),
                str(w["errors"]),
                str(v.get("old", 0)),
                str(v.get("new", 0)),
                str(v.get("wrong", 0)),
            ]
        )

    def at(t: float) -> str:
        return "never" if math.isnan(t) else f"{t:.2f} s"

    failures = max((p[3] for p in swap.polls), default=0)
    text = [
        f"### reload under load: {args.connections} connections, --watch {WATCH_SECONDS:g}, "
        f"{run.seconds:.1f} s counted",
        "timeline (seconds after the counted start): "
        f"v2.keras written at {at(swap.write_at)} (put_file returned at {at(swap.written_at)}); "
        f"version 2 served at {at(swap.new_served_at)}; version 1 gone at {at(swap.done_at)}; "
        f"first new answer at {at(min(new_ends, default=float('nan')))}; last old answer at "
        f"{at(max(old_ends, default=float('nan')))}; versions served at the end "
        f"{final_versions}; load failures {failures}",
        table(
            [
                "window (by send time)",
                "from s",
                "to s",
                "requests",
                "req/s",
                "p50 ms",
                "p99 ms",
                "failed",
                "old",
                "new",
                "wrong",
            ],
            rows,
            left=1,
        ),
        f"all: {run_row('reload', '/models/reload', f_all)[2]} requests, failed {failed} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(f_all['error_kinds'].items())) or 'none'}), "
        f"wrong {wrong}; old answers to requests sent after version 2 was seen served: "
        f"{old_after}; new answers before the write: {new_before}; status polls "
        f"{len(swap.polls)} (errors: {dict(swap.poll_errors) or 'none'})",
        f"p99 during the swap / p99 before: {fmt_num(p99_ratio, '.2f')}",
        *error_lines("reload", f_all),
    ]
    if swap.write_error:
        text.append(f"WRITE FAILED: {swap.write_error}")
    out = {
        "all": f_all,
        "windows": {
            name: {"from_s": lo, "to_s": hi, **wfigs[name]} for name, (lo, hi, _) in windows.items()
        },
        "write_at_s": swap.write_at,
        "written_at_s": swap.written_at,
        "new_served_at_s": swap.new_served_at,
        "done_at_s": swap.done_at,
        "first_new_answer_s": min(new_ends, default=float("nan")),
        "last_old_answer_s": max(old_ends, default=float("nan")),
        "old_answers_after_new_served": old_after,
        "new_answers_before_write": new_before,
        "final_versions": final_versions,
        "load_failures": failures,
        "polls": swap.polls,
        "poll_errors": dict(swap.poll_errors),
        "write_error": swap.write_error,
        "p99_ratio": p99_ratio,
    }
    tg: dict[str, Target] = {
        "reload: the swap completed (v2 served, v1 gone)": (1.0 if done else 0.0, ">=", 1, ""),
        "reload: failed requests (non-200, connection errors)": (float(failed), "<=", 0, ""),
        "reload: answers neither the old nor the new model's": (float(wrong), "<=", 0, ""),
        "reload: p99 from the write to swap + 2 s vs before": (p99_ratio, "<=", 2.0, "x"),
    }
    return "\n".join(text), out, tg


# -- section 3: replicas ---------------------------------------------------------------------------


def thread_group(
    tid: int, comm: str, pid: int, own: str, names: dict[int, str], stage: str, http_tid: int
) -> str:
    """The CPU table's group of a thread: each model-stage worker apart, the others by name.

    Threads that no Python ``Thread`` started are native: those that name themselves go by
    their OS name (granian's ``tokio-rt-worker``: its runtime and the threads that run the WSGI
    app; TensorFlow's ``tf_*``); the unnamed ones (with ``own``, the process's name) are split
    at the thread that runs granian (``studioserve-http``). Those started before it, while the
    model loaded, are TensorFlow's Eigen intra-op pool, which runs the matmuls (so gdb shows on
    this workload: ``Eigen::ThreadPoolTempl<tsl::thread::EigenEnvironment>::WorkerLoop``)."""
    if tid == pid:
        return "MainThread"
    name = names.get(tid)
    if name is None and comm == own:
        if http_tid and tid > http_tid:
            return "unnamed native, started after studioserve-http"
        return "unnamed native, started before studioserve-http (TF's Eigen pool: matmuls)"
    if name is None:
        what = {"tokio-rt-worker": "granian: HTTP and the WSGI app", "tf_Compute": "TF"}
        return f"{comm} ({what.get(comm, 'native')})"
    m = re.fullmatch(r"studioserve-(.+)-(\d+)", name)
    if m and stage and m.group(1).endswith("-" + stage):
        return f"{name} (model stage)"
    return re.sub(r"\d+", "N", name)


def thread_cores(
    run: LoadRun, pid: int, mapfile: Path, stage: str, detail: list[dict[str, Any]] | None = None
) -> dict[str, tuple[float, int]]:
    """CPU seconds per second over the counted time, and threads, per :func:`thread_group`
    (each thread of 0.01 cores or more is appended to ``detail``). A thread that ended within
    the counted time is missing (its CPU time went with it)."""
    names: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for line in mapfile.read_text(encoding="utf-8").splitlines():
            tid, _, name = line.partition("\t")
            if tid.isdigit():
                names[int(tid)] = name
    a, b = run.at_start, run.at_end
    wall = b["t"] - a["t"]
    threads0, threads1 = a.get("threads", {}), b.get("threads", {})
    own = threads1.get(pid, ("", 0.0))[0]
    http_tid = min((t for t, nm in names.items() if nm == "studioserve-http"), default=0)
    cpu: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for tid, (comm, secs) in threads1.items():
        group = thread_group(tid, comm, pid, own, names, stage, http_tid)
        cores = (secs - threads0.get(tid, (comm, 0.0))[1]) / wall
        cpu[group] += cores
        count[group] += 1
        if cores >= 0.01 and detail is not None:
            detail.append({"tid": tid, "comm": comm, "name": names.get(tid), "cores": cores})
    return {g: (cpu[g], count[g]) for g in cpu}


def model_stage_stats(doc: dict[str, Any]) -> dict[str, Any]:
    pipe = doc.get("pipe") or {}
    stage = str(pipe.get("model_stage") or "")
    for s in pipe.get("stages") or []:
        if s.get("name") == stage:
            return {"stage": stage, "workers": s.get("workers")}
    return {"stage": stage}


REPLICA_HEADERS = [
    "run",
    "instances",
    "requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "wrong",
    "rows/call",
    "batch ms",
    "stage busy",
    "batches by instance",
    "srv cores",
    "CPU us/req",
    "load1",
]


def section_replicas(env: Env) -> tuple[str, dict[str, Any], dict[str, Target]]:
    args = env.args
    key = "m1"
    out: dict[str, Any] = {}
    rows = []
    groups: dict[str, dict[int, tuple[float, int]]] = {}
    notes = []
    named = not args.studio_cmd
    for n in (1, 2):
        label = f"instances {n}"
        mapfile = env.tmp / f"threads-{n}.tsv"
        launcher = [sys.executable, str(Path(__file__).resolve()), "--named-threads", str(mapfile)]
        cmd = serve_cmd(env, [key], "--instances", str(n), studio=launcher if named else ())
        try:
            with serving(env, f"instances-{n}", cmd, [key]) as srv:
                pid = srv.pid
                doc = status_json(srv.url or "")
                versions = (doc.get("models") or [{}])[0].get("versions") or [{}]
                reported = versions[-1].get("instances", 1)
                stage = model_stage_stats(doc)

                def probe(pid: int = pid) -> dict[str, Any]:
                    return {"threads": thread_cpu_seconds(pid)}

                judge = Judge([{"ok": env.expected[key]}])
                run = drive(env, srv, [key], judge, probe=probe)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()
            notes.append(f"{label}: FAILED: {' | '.join(msg[:1] + msg[-5:])}")
            print(f"  {notes[-1]}", file=env.log, flush=True)
            out[label] = {"error": str(e)}
            continue
        f = run_figures(run)
        f["instances_reported"] = reported
        f["stage"] = stage
        f["busy_threads"] = []
        f["threads"] = thread_cores(
            run, pid, mapfile, str(stage.get("stage", "")), f["busy_threads"]
        )
        for g, v in f["threads"].items():
            groups.setdefault(g, {})[n] = v
        out[label] = f
        by_instance = f["batches_by_instance"].get(key, {})
        rows.append(
            [
                label,
                f"{reported} ({stage.get('workers')} workers)",
                str(f["requests"]),
                fmt_num(f["req_per_s"], ".0f"),
                fmt_num(f["p50_ms"], ".1f"),
                fmt_num(f["p99_ms"], ".1f"),
                str(f["errors"]),
                str(f["wrong"]),
                fmt_num(f["rows_per_call_all"], ".1f"),
                fmt_num(f["batch_ms"], ".2f"),
                fmt_num(f["compute_s_per_s"], ".2f"),
                " ".join(f"{i}:{v:.0f}" for i, v in sorted(by_instance.items())) or "-",
                fmt_num(f["server_cores"], ".2f"),
                fmt_num(f["cpu_us_per_req"], ".0f"),
                fmt_num(f["load1"], ".2f"),
            ]
        )
        print(f"  {'  '.join(rows[-1])}", file=env.log, flush=True)
    r = ratio(
        out.get("instances 2", {}).get("req_per_s", float("nan")),
        out.get("instances 1", {}).get("req_per_s", float("nan")),
    )
    out["ratio_2_vs_1"] = r
    text = [
        f"### replicas: /models/{key} with --instances 1 and 2, {args.connections} connections, "
        f"{args.duration:g} s each",
    ]
    if rows:
        text.append(table(REPLICA_HEADERS, rows, left=1))
    text.extend(notes)
    text.append(f"throughput 2 instances / 1: {fmt_num(r, '.3f')}")
    for label, f in out.items():
        if isinstance(f, dict):
            text.extend(error_lines(label, f))
    if groups:

        def cell(g: str, n: int) -> str:
            v = groups[g].get(n)
            return "-" if v is None else f"{v[0]:.2f} ({v[1]})"

        ordered = sorted(groups, key=lambda g: -max(v[0] for v in groups[g].values()))
        cpu_rows = [
            [g, cell(g, 1), cell(g, 2)]
            for g in ordered
            if max(v[0] for v in groups[g].values()) >= 0.005
        ]
        totals = []
        for n in (1, 2):
            vals = [v[n] for v in groups.values() if n in v]
            totals.append(
                f"{sum(x[0] for x in vals):.2f} ({sum(x[1] for x in vals)})" if vals else "-"
            )
        cpu_rows.append(["all threads", *totals])
        text.append(
            "server CPU by thread group: CPU seconds per second (1.00 = one core busy), "
            "and (threads):"
        )
        text.append(table(["thread group", "instances 1", "instances 2"], cpu_rows, left=1))
        if not named:
            text.append("(--studio-cmd given: Python threads are not named, only native ones)")
    return "\n".join(text), out, {}


# -- setup -----------------------------------------------------------------------------------------


def prepare(
    tmp: Path, studio: list[str], log: Any
) -> tuple[Path, list[bytes], dict[str, np.ndarray], Path]:
    """Build the six MLPs (one worker process) and their outputs; fill a new store."""
    rng = np.random.default_rng(12)
    inputs = rng.standard_normal((N_INPUTS, 512)).astype(np.float32)
    npz = tmp / "inputs.npz"
    np.savez(npz, one=inputs, bulk=inputs[:1])
    built = tmp / "built"
    print(f"# building {len(SEEDS)} MLPs and their outputs ({load_str()})", file=log, flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "build"]
    cmd += ["--out", str(built), "--inputs", str(npz), "--seeds", ",".join(map(str, SEEDS))]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, **python_env()), timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the build worker failed:\n{proc.stdout}\n{proc.stderr}")
    outputs = []
    for seed in SEEDS:
        with np.load(built / f"s{seed}" / "mlp_expected.npz") as exp:
            outputs.append(np.asarray(exp["one"], np.float32))
    for i in range(len(SEEDS)):
        for j in range(i):
            if np.allclose(outputs[i], outputs[j], rtol=RTOL, atol=ATOL):
                raise RuntimeError(f"seeds {SEEDS[i]} and {SEEDS[j]} gave the same model")
    # the reload classes every answer as the old or the new model's: each must tell them apart
    close = np.isclose(outputs[0], outputs[-1], rtol=RTOL, atol=ATOL).all(axis=1)
    if close.any():
        raise RuntimeError(f"the old and new models agree on inputs {np.flatnonzero(close)}")
    store = tmp / "store"
    expected: dict[str, np.ndarray] = {}
    for i in range(N_MODELS):
        add_experiment(studio, store, f"m{i + 1}", built / f"s{SEEDS[i]}" / "model", "keras")
        expected[f"m{i + 1}"] = outputs[i]
    add_experiment(studio, store, "reload", built / f"s{SEEDS[0]}" / "model", "keras")
    expected["reload"] = outputs[0]
    expected["reload-v2"] = outputs[-1]
    bodies = [pickle.dumps({"x": inputs[j]}, 5) for j in range(N_INPUTS)]
    return store, bodies, expected, built / f"s{SEEDS[-1]}" / "model" / "mlp.keras"


def targets_table(tg: dict[str, Target]) -> str:
    rows = []
    for name, t in tg.items():
        spec = ".2f" if t[3] == "x" else ".0f"
        unit = f" {t[3]}" if t[3] else ""
        rows.append(
            [
                name,
                f"{fmt_num(t[0], spec)}{unit}",
                f"{t[1]} {t[2]:g}{unit}",
                "PASS" if passed(t) else "FAIL",
            ]
        )
    return table(["target", "value", "want", "result"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the model repository: 1 vs 5 models, a hot reload under load, "
        "replicas 1 vs 2 (the MLP of bench_server.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=30.0, help="counted seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds before each run")
    p.add_argument("--connections", type=int, default=64, help="client connections")
    p.add_argument(
        "--sections", default="all", help=f"comma-separated, or all: {', '.join(SECTIONS)}"
    )
    p.add_argument(
        "--swap-timeout",
        type=float,
        default=60.0,
        help="seconds past --duration the reload waits for the swap",
    )
    p.add_argument(
        "--request-timeout", type=float, default=10.0, help="passed to studio serve (seconds)"
    )
    p.add_argument("--client-timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument(
        "--start-timeout", type=float, default=300.0, help="seconds for a server to be ready"
    )
    add_server_options(
        p,
        serve_arg_example="--threads=64",
        every=True,
        studio_cmd_help="command that runs `studio` (default: this venv's; the replicas' threads "
        "are then not named)",
    )
    add_run_options(p)
    args = p.parse_args(argv)
    if args.sections == "all":
        args.sections = list(SECTIONS)
    else:
        args.sections = [s for s in args.sections.split(",") if s]
        unknown = set(args.sections) - set(SECTIONS)
        if unknown:
            p.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: the same clean stop as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = sys.stderr
    signal.signal(signal.SIGTERM, _terminate)
    t_start = time.monotonic()
    wait_for_quiet(args.max_load, args.max_wait, log)
    print(f"# bench_repository: sections {', '.join(args.sections)}, {load_str()}", file=log)
    studio = studio_command(args.studio_cmd)
    texts: list[str] = []
    results: dict[str, Any] = {}
    tg: dict[str, Target] = {}
    sections = {"models": section_models, "reload": section_reload, "replicas": section_replicas}
    try:
        with tempfile.TemporaryDirectory(prefix="studioserve-repository-") as tmp_name:
            tmp = Path(tmp_name)
            store, bodies, expected, new_ckpt = prepare(tmp, studio, log)
            env = Env(args, studio, store, tmp, bodies, expected, new_ckpt, log)
            for name in args.sections:
                print(f"# section {name} ({load_str()})", file=log, flush=True)
                try:
                    text, figs, targets = sections[name](env)
                except RuntimeError as e:
                    text = f"### {name}: FAILED: {e}"
                    figs, targets = {"error": str(e)}, {}
                    if name == "models":
                        targets = {
                            f"{N_MODELS} models' throughput vs 1 model's": (
                                float("nan"),
                                ">=",
                                0.90,
                                "x",
                            )
                        }
                    elif name == "reload":
                        targets = {
                            "reload: the swap completed (v2 served, v1 gone)": (
                                float("nan"),
                                ">=",
                                1,
                                "",
                            )
                        }
                print(text, file=log, flush=True)
                texts.append(text)
                results[name] = figs
                tg.update(targets)
    except KeyboardInterrupt:
        print(
            "# interrupted: no server left running, temporary files removed", file=log, flush=True
        )
        return 130
    print(
        f"\n## bench_repository: the MLP of bench_server.py, {args.connections} connections, "
        f"{args.duration:g} s per run, http server {args.http_server}, serve args "
        f"{' '.join(args.serve_arg) or '-'}, {load_str()}"
    )
    for text in texts:
        print(text)
        print()
    if env.server_warnings:
        print("server log lines at WARNING or above:")
        for line in env.server_warnings:
            print(f"  {line}")
    print(targets_table(tg) if tg else "no targets (no section with targets ran)")
    ok = all(passed(t) for t in tg.values())
    print(
        f"server exit codes: {'; '.join(env.exit_codes)}; wall time "
        f"{time.monotonic() - t_start:.0f} s; {'PASS' if ok else 'FAIL'}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "connections": args.connections,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "http_server": args.http_server,
                    "serve_args": args.serve_arg,
                    "sections": results,
                    "server_warnings": env.server_warnings,
                    "exit_codes": env.exit_codes,
                    "targets": {
                        n: {"value": t[0], "want": f"{t[1]} {t[2]:g}", "pass": passed(t)}
                        for n, t in tg.items()
                    },
                    "pass": ok,
                },
                indent=2,
                default=str,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    if sys.argv[1:2] == ["--named-threads"] and len(sys.argv) > 2:
        sys.exit(launch_named(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
