"""Benchmark the Open Inference Protocol over gRPC against HTTP binary tensors, in one run.

What it does (about 2 x 2 x 3 x (warm-up + duration) seconds per repeat, plus start-up):

1. builds the same store as bench_server.py: "tiny" (``y = x @ W``, W float32 16x16, through
   bench/tiny_wrapper.py: the HTTP/gRPC path dominates) and "mlp" (a Keras MLP 512 -> 2048
   relu -> 2048 relu -> 10 softmax, ``.keras``);
2. starts one ``studio serve WORKLOAD --port 0 --grpc-port 0`` per workload (a subprocess;
   both protocols served by the same process, the same model and batching pipe);
3. per repeat, workload and level (1, 8 and 64 concurrent calls, one example per call): drives
   the server with ``studio bench``'s load generator (studioserve.loadgen) over HTTP
   (``POST /v2/models/{name}/infer``, binary tensors, keep-alive HTTP/1.1 connections) and
   over gRPC (``ModelInfer``, raw tensors, one HTTP/2 channel per generator process), one
   after the other, and reads the server's CPU time from /proc around each;
4. drives, the same way, the floor (bench/grpc_floor.py: grpc.aio alone, answering every
   ModelInfer with fixed bytes, no studioserve request path): what gRPC in Python allows on
   this machine, next to the tiny rows;
5. prints each repeat's table (req/s, p50, p99, server CPU per request, the gRPC/HTTP
   ratios and the floor), the medians over repeats, and the issue's target with PASS/FAIL: at
   64 concurrent calls gRPC serves at least as many tiny requests per second as HTTP binary
   tensors (and the floor's own ratio to HTTP, which bounds it).

Usage::

    .venv/bin/python bench/bench_grpc.py                    # one repeat, 5 s per point
    .venv/bin/python bench/bench_grpc.py --repeat 3 --json grpc.json
    .venv/bin/python bench/bench_grpc.py --duration 1 --warmup 0.5 --workloads tiny   # smoke

``CPU us/req`` is the server process's CPU time per request (from /proc), ``gen us/req`` the
load generator's: the same generator drives both protocols, but its own cost differs with
the client library (prepared bytes on a raw socket for HTTP, grpcio's blocking stub for gRPC),
and on a small machine it shares the cores with the server. A point where a generator
process was too busy to describe the server is marked ``(gen)``, as in ``studio bench``.
Ratios are taken within one repeat (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import HERE, REPO, prepare, studio_cmd  # noqa: E402
from benchlib import (  # noqa: E402
    ServerProcess,
    add_run_options,
    add_server_options,
    cpu_seconds,
    fmt_num,
    load_str,
    median,
    passed,
    python_env,
    ratio,
    table,
    wait_for_quiet,
)

from studioserve.loadgen import BenchConfig, LevelResult, run_bench  # noqa: E402

PROTOCOLS = ("oip", "grpc")
NAMES = {"oip": "HTTP", "grpc": "gRPC"}
_GRPC_LINE = re.compile(r"gRPC \(KServe v2\): (\S+)")


def start_server(workload: str, store: Path, args: argparse.Namespace, log: Any) -> ServerProcess:
    cmd = [
        *studio_cmd(),
        "serve",
        workload,
        "--store",
        str(store),
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--killafter",
        "0",
        "--http-server",
        args.http_server,
        "--quiet",
        *args.serve_arg,
    ]
    if workload == "tiny":
        cmd += ["--wrapper", str(HERE / "tiny_wrapper.py")]
    print(f"# starting: {' '.join(cmd)}", file=log, flush=True)
    server = ServerProcess(
        cmd, workload, url_pattern=r" at (http://\S+)", env=python_env(), cwd=REPO
    ).start()
    deadline = time.monotonic() + 30
    while grpc_address(server) is None:
        if time.monotonic() > deadline:
            server.fail("printed no gRPC address")
        time.sleep(0.05)
    return server


def grpc_address(server: ServerProcess) -> str | None:
    for line in list(server.lines):
        m = _GRPC_LINE.search(line)
        if m:
            return m.group(1)
    return None


class Floor:
    """bench/grpc_floor.py as a subprocess: its address and the request it is driven with."""

    def __init__(self, tmp: Path, log: Any) -> None:
        from grpc_floor import tiny_request

        self.body = tmp / "floor-request.bin"
        self.body.write_bytes(tiny_request())
        cmd = [sys.executable, str(HERE / "grpc_floor.py")]
        print(f"# starting the floor: {' '.join(cmd)}", file=log, flush=True)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env=python_env(), cwd=REPO
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("floor at "):
            self.stop()
            raise RuntimeError(f"bench/grpc_floor.py did not start: {line!r}")
        self.address = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(
    server: ServerProcess | Floor,
    workload: str,
    protocol: str,
    level: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One point: the load generator at ``level`` concurrent calls, and the server's CPU."""
    body_file = None
    if isinstance(server, Floor):
        url: str | None = server.address
        body_file = server.body
    else:
        url = grpc_address(server) if protocol == "grpc" else server.url
    assert url is not None
    cfg = BenchConfig(
        url=url,
        protocol=protocol,
        concurrency=(level,),
        duration=args.duration,
        warmup=args.warmup,
        model=workload,
        binary=True,
        processes=args.processes,
        body_file=body_file,
    )
    cpu0 = cpu_seconds(server.pid)
    result = run_bench(cfg)
    cpu = cpu_seconds(server.pid) - cpu0
    lv: LevelResult = result.levels[0]
    answered = lv.requests * (1 + args.warmup / args.duration)  # warm-up requests used CPU too
    return {
        "req_s": lv.throughput,
        "p50_ms": lv.p50_ms,
        "p99_ms": lv.p99_ms,
        "errors": lv.errors,
        "gen_bound": lv.generator_bound,
        "cpu_us": cpu / answered * 1e6 if answered else float("nan"),
        "gen_cpu_us": lv.generator_cpu_per_request_us,
    }


def run_repeat(
    servers: dict[str, ServerProcess], floor: Floor | None, args: argparse.Namespace, log: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for wl, server in servers.items():
        for level in args.levels:
            for protocol in PROTOCOLS:
                print(f"# {wl} {NAMES[protocol]} c={level} ({load_str()})", file=log, flush=True)
                out[f"{wl}/{protocol}/c{level}"] = measure(server, wl, protocol, level, args)
            if floor is not None and wl == "tiny":
                print(f"# floor gRPC c={level} ({load_str()})", file=log, flush=True)
                out[f"floor/grpc/c{level}"] = measure(floor, wl, "grpc", level, args)
    return out


def _cell(point: dict[str, Any], key: str, spec: str = ".0f") -> str:
    text = fmt_num(point.get(key), spec)
    return text + (" (gen)" if key == "req_s" and point.get("gen_bound") else "")


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    headers = [
        "workload",
        "c",
        "HTTP req/s",
        "gRPC req/s",
        "gRPC/HTTP",
        "HTTP p50 ms",
        "gRPC p50 ms",
        "HTTP p99 ms",
        "gRPC p99 ms",
        "HTTP CPU us/req",
        "gRPC CPU us/req",
        "HTTP gen us/req",
        "gRPC gen us/req",
        "floor req/s",
        "floor CPU us/req",
        "floor/HTTP",
    ]
    blocks = []
    summary: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs):
        rows = []
        for wl in args.workloads:
            for level in args.levels:
                h, g = run[f"{wl}/oip/c{level}"], run[f"{wl}/grpc/c{level}"]
                f = run.get(f"floor/grpc/c{level}", {}) if wl == "tiny" else {}
                r = ratio(g["req_s"], h["req_s"])
                fr = ratio(f["req_s"], h["req_s"]) if f else None
                point = summary.setdefault(
                    f"{wl}/c{level}", {"ratio": [], "http": [], "grpc": [], "floor": []}
                )
                point["ratio"].append(r)
                point["http"].append(h["req_s"])
                point["grpc"].append(g["req_s"])
                if fr is not None:
                    point["floor"].append(fr)
                rows.append(
                    [
                        wl,
                        str(level),
                        _cell(h, "req_s"),
                        _cell(g, "req_s"),
                        fmt_num(r, ".2f"),
                        _cell(h, "p50_ms", ".2f"),
                        _cell(g, "p50_ms", ".2f"),
                        _cell(h, "p99_ms", ".2f"),
                        _cell(g, "p99_ms", ".2f"),
                        _cell(h, "cpu_us"),
                        _cell(g, "cpu_us"),
                        _cell(h, "gen_cpu_us"),
                        _cell(g, "gen_cpu_us"),
                        _cell(f, "req_s") if f else "-",
                        _cell(f, "cpu_us") if f else "-",
                        fmt_num(fr, ".2f") if fr is not None else "-",
                    ]
                )
        blocks.append(f"repeat {i + 1}:\n" + table(headers, rows))
    med_rows = [
        [
            key.split("/")[0],
            key.split("/")[1][1:],
            fmt_num(median(v["http"])),
            fmt_num(median(v["grpc"])),
            fmt_num(median(v["ratio"]), ".2f"),
            fmt_num(median(v["floor"]), ".2f") if v["floor"] else "-",
        ]
        for key, v in summary.items()
    ]
    blocks.append(
        f"medians over {len(runs)} repeat(s):\n"
        + table(["workload", "c", "HTTP req/s", "gRPC req/s", "gRPC/HTTP", "floor/HTTP"], med_rows)
    )
    top = max(args.levels)
    key = f"tiny/c{top}"
    if key in summary:
        target = (median(summary[key]["ratio"]), ">=", 1.0, "x")
        verdict = "PASS" if passed(target) else "FAIL"
        blocks.append(
            f"target: gRPC tiny req/s at c={top} >= HTTP binary tensors': "
            f"{fmt_num(target[0], '.2f')}x  {verdict}"
        )
        if summary[key]["floor"]:
            blocks.append(
                f"floor: grpc.aio alone (fixed answers, no request path) at c={top}: "
                f"{fmt_num(median(summary[key]['floor']), '.2f')}x HTTP binary tensors"
            )
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each")
    p.add_argument("--levels", default="1,8,64", help="concurrent calls, comma-separated")
    p.add_argument("--workloads", default="tiny,mlp", help="tiny, mlp or both")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--processes", type=int, default=None, help="load generator processes")
    p.add_argument(
        "--no-floor", action="store_true", help="skip the grpc.aio floor (bench/grpc_floor.py)"
    )
    add_server_options(p, serve_arg_example="--max-delay-ms=1")
    add_run_options(p)
    args = p.parse_args(argv)
    args.levels = [int(v) for v in args.levels.split(",") if v.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    log = sys.stderr
    wait_for_quiet(args.max_load, args.max_wait, log)
    servers: dict[str, ServerProcess] = {}
    floor: Floor | None = None
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        store, _, _ = prepare(Path(tmp), log)
        try:
            for wl in args.workloads:
                servers[wl] = start_server(wl, store, args, log)
            if "tiny" in args.workloads and not args.no_floor:
                floor = Floor(Path(tmp), log)
            runs = [run_repeat(servers, floor, args, log) for _ in range(args.repeat)]
        finally:
            for server in servers.values():
                server.stop()
            if floor is not None:
                floor.stop()
    print(report(runs, args))
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
