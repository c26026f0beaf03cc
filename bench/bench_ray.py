"""Benchmark the Ray backend beside the local server: ``studio serve --backend ray`` with one
and with two replicas per model, and plain ``studio serve``, in one run.

What it does (about 4 minutes on a 2-core machine):

1. builds the same store and request bodies as bench_server.py ("tiny": a numpy matmul
   through bench/tiny_wrapper.py, so the serving path dominates; "mlp": the Keras MLP
   512 -> 2048 -> 2048 -> 10);
2. for each workload, starts one server at a time (each Ray server starts its own local Ray
   instance, as a user's laptop would): ``studio serve`` (local), ``--backend ray --replicas
   1`` and ``--backend ray --replicas 2``; checks one answer, then drives it with wrk at 1, 8
   and 64 connections, one example per request;
3. prints req/s, p50, p99 and the CPU of the whole server (the process and its descendants:
   for Ray, the GCS, raylet, proxy, ingress and replicas) per request, the Ray rows' ratios to
   the local server, and the issue's targets with PASS/FAIL.

Usage::

    .venv/bin/python bench/bench_ray.py
    .venv/bin/python bench/bench_ray.py --duration 5 --workloads mlp --json ray.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import REPO, Workload, check_answer, prepare, studio_cmd  # noqa: E402
from benchlib import (  # noqa: E402
    ServerProcess,
    Target,
    WrkResult,
    fmt_num,
    free_port,
    load_str,
    passed,
    python_env,
    ratio,
    run_wrk,
    table,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
#: (label, extra serve arguments); None: the local server
SERVERS: list[tuple[str, list[str] | None]] = [
    ("local", None),
    ("ray x1", ["--backend", "ray", "--replicas", "1"]),
    ("ray x2", ["--backend", "ray", "--replicas", "2"]),
]


def server_cmd(wl: str, store: Path, extra: list[str] | None, port: int) -> list[str]:
    cmd = [*studio_cmd(), "serve", wl, "--store", str(store), "--killafter", "0", "--quiet"]
    cmd += ["--port", str(port)] + (extra or [])
    if wl == "tiny":
        cmd += ["--wrapper", str(HERE / "tiny_wrapper.py")]
    return cmd


def measure(
    wl: Workload, store: Path, args: argparse.Namespace, log: Any
) -> dict[str, dict[int, WrkResult]]:
    out: dict[str, dict[int, WrkResult]] = {}
    for label, extra in SERVERS:
        cmd = server_cmd(wl.name, store, extra, free_port())
        print(f"# {wl.name} / {label}: {' '.join(cmd)} ({load_str()})", file=log, flush=True)
        srv = ServerProcess(
            cmd,
            f"{label}-{wl.name}",
            url_pattern=r"^Serving .* at (http://\S+)",
            env=python_env(),
            cwd=REPO,
            start_timeout=240.0,
        )
        with srv:
            assert srv.url is not None
            check_answer(srv.url, wl, bulk=False)
            points = out[label] = {}
            for c in args.levels:
                points[c] = res = run_wrk(
                    srv.url,
                    wl.body,
                    connections=c,
                    duration=args.duration,
                    warmup=args.warmup,
                    server_pid=srv.pid,
                )
                print(
                    f"#   c{c}: {res.req_per_s:.0f} req/s, p50 {res.p50_ms:.2f} ms, "
                    f"p99 {res.p99_ms:.2f} ms, {res.errors} errors",
                    file=log,
                    flush=True,
                )
    return out


def rows(results: dict[str, dict[str, dict[int, WrkResult]]]) -> list[list[str]]:
    out = []
    for wl, per_server in results.items():
        local = per_server["local"]
        for label, points in per_server.items():
            for c, r in points.items():
                base = local[c]
                out.append(
                    [
                        wl,
                        label,
                        str(c),
                        fmt_num(r.req_per_s),
                        f"{r.p50_ms:.2f} / {r.p99_ms:.2f}",
                        fmt_num(r.cpu_us_per_req),
                        "" if label == "local" else f"{ratio(r.req_per_s, base.req_per_s):.2f}",
                        "" if label == "local" else f"{r.p50_ms - base.p50_ms:+.2f}",
                        str(r.errors),
                    ]
                )
    return out


def targets(results: dict[str, dict[str, dict[int, WrkResult]]]) -> dict[str, Target]:
    tg: dict[str, Target] = {}
    mlp = results.get("mlp")
    if mlp and 64 in mlp["local"]:
        tg["ray x1 mlp c64 / local mlp c64"] = (
            ratio(mlp["ray x1"][64].req_per_s, mlp["local"][64].req_per_s),
            ">=",
            0.6,
            "x",
        )
    for wl, per in results.items():
        if 1 in per["local"]:
            tg[f"ray x1 {wl} c1 p50 - local"] = (
                per["ray x1"][1].p50_ms - per["local"][1].p50_ms,
                "<=",
                3.0,
                "ms",
            )
    return tg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The Ray backend (1 and 2 replicas) beside the local server, with wrk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=4.0, help="seconds of wrk per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted load first")
    p.add_argument("--levels", default="1,8,64", help="wrk connection counts")
    p.add_argument("--workloads", default="tiny,mlp", help="tiny, mlp or both")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load below this")
    p.add_argument("--max-wait", type=float, default=0.0, help="seconds to wait for --max-load")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.workloads = [w for w in args.workloads.split(",") if w]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = sys.stderr
    wait_for_quiet(args.max_load, args.max_wait, log)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        store, workloads, _ = prepare(Path(tmp), log)
        results = {wl: measure(workloads[wl], store, args, log) for wl in args.workloads}
    headers = [
        "workload",
        "server",
        "conns",
        "req/s",
        "p50 / p99 ms",
        "CPU us/req",
        "x local",
        "p50 - local ms",
        "errors",
    ]
    print(table(headers, rows(results)))
    tg = targets(results)
    print()
    print(
        table(
            ["target", "measured", "goal", "result"],
            [
                [name, f"{v:.2f} {unit}", f"{op} {goal:g} {unit}", "PASS" if passed(t) else "FAIL"]
                for name, t in tg.items()
                for v, op, goal, unit in [t]
            ],
        )
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    wl: {s: {str(c): r.to_json() for c, r in pts.items()} for s, pts in per.items()}
                    for wl, per in results.items()
                },
                indent=2,
            )
        )
    return 0 if all(passed(t) for t in tg.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
