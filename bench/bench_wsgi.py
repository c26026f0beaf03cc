"""Compare WSGI servers on the same studioserve Flask app (the "tiny" workload), with wrk.

The app is studioserve's own (``studioserve.http.app.create_app`` over a ModelService whose
ModelPipe runs ``y = x @ W``, W float32 16x16; see bench/wsgi_app.py), one ``(16,)`` example
per request, so the HTTP server's cost dominates. Servers, each in its own process, one at a
time:

==================  =====================================================================
granian-embedded    granian's Rust HTTP, WSGI interface, embedded in-process the way
                    ``studio serve`` runs it (``studioserve.http.servers``), 32 blocking threads
granian-cli         ``granian --interface wsgi --factory wsgi_app:create`` (1 worker,
                    32 blocking threads)
waitress            waitress, 32 threads, as ``studio serve --http-server waitress`` runs it
gunicorn-gthread    ``gunicorn -k gthread -w 1 --threads 32 'wsgi_app:create()'``
werkzeug            Flask's threaded development server (the reference; not for production)
==================  =====================================================================

Each is driven by wrk (bench/wrk_post.lua) at 64 and 1 connections; the table shows req/s,
p50 and p99 and the ratio of req/s to waitress's at the same level in the same repeat::

    .venv/bin/python bench/bench_wsgi.py                # one repeat, about a minute
    .venv/bin/python bench/bench_wsgi.py --repeat 3     # medians of three
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    PICKLE,
    ServerProcess,
    fmt_num,
    free_port,
    http_post,
    load_str,
    loadavg,
    median,
    python_env,
    ratio,
    run_wrk,
    table,
    wait_for_quiet,
)
from tiny_wrapper import make_weights  # noqa: E402

from studioserve import wire  # noqa: E402

HERE = Path(__file__).resolve().parent
SERVERS = ("granian-embedded", "granian-cli", "waitress", "gunicorn-gthread", "werkzeug")
REFERENCE = "waitress"


def server_command(name: str, threads: int) -> tuple[list[str], str | None, str | None]:
    """(command, URL regex or None, fixed URL or None) for one server."""
    venv_bin = Path(sys.executable).parent
    if name in ("granian-embedded", "waitress", "werkzeug"):
        kind = {"granian-embedded": "granian"}.get(name, name)
        cmd = [sys.executable, str(HERE / "wsgi_app.py"), "--server", kind]
        return cmd + ["--threads", str(threads)], r"listening on (http://\S+)", None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if name == "granian-cli":
        granian = venv_bin / "granian"
        cmd = [
            str(granian) if granian.exists() else "granian",
            "--interface",
            "wsgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--blocking-threads",
            str(threads),
            "--backlog",
            "2048",
            "--no-log",
            "--working-dir",
            str(HERE),
            "wsgi_app:create",
        ]
        return cmd, None, url
    if name == "gunicorn-gthread":
        gunicorn = venv_bin / "gunicorn"
        cmd = [
            str(gunicorn) if gunicorn.exists() else "gunicorn",
            "-k",
            "gthread",
            "-w",
            "1",
            "--threads",
            str(threads),
            "-b",
            f"127.0.0.1:{port}",
            "--backlog",
            "2048",
            "--log-level",
            "warning",
            "--chdir",
            str(HERE),
            "wsgi_app:create()",
        ]
        return cmd, None, url
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Compare WSGI servers on the studioserve app with wrk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repeat", type=int, default=1, help="repeats; the summary takes medians")
    p.add_argument("--duration", type=float, default=4.0, help="seconds of wrk per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted load first")
    p.add_argument("--levels", default="64,1", help="wrk connection counts")
    p.add_argument("--servers", default=",".join(SERVERS), help="which servers, in order")
    p.add_argument("--threads", type=int, default=32, help="server worker threads")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load below this")
    p.add_argument("--max-wait", type=float, default=0.0, help="seconds to wait for --max-load")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    names = [s for s in args.servers.split(",") if s]
    unknown = set(names) - set(SERVERS)
    if unknown:
        p.error(f"unknown server(s) {', '.join(sorted(unknown))}; choose from {', '.join(SERVERS)}")

    log = sys.stderr
    t_start = time.monotonic()
    wait_for_quiet(args.max_load, args.max_wait, log)
    print(f"# bench_wsgi ({load_str()})", file=log, flush=True)
    x = np.random.default_rng(3).standard_normal(16).astype(np.float32)
    expected = x @ make_weights()
    results: list[dict[tuple[str, int], dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="studioserve-bench-wsgi-") as tmp:
        body = Path(tmp) / "tiny.pkl"
        body.write_bytes(pickle.dumps({"x": x}))
        for rep in range(args.repeat):
            print(f"# repeat {rep + 1}/{args.repeat} ({load_str()})", file=log, flush=True)
            figs: dict[tuple[str, int], dict[str, float]] = {}
            for name in names:
                cmd, pattern, url = server_command(name, args.threads)
                srv = ServerProcess(
                    cmd, name, url_pattern=pattern, url=url, env=python_env([HERE]), cwd=HERE
                )
                with srv:
                    assert srv.url is not None
                    got = wire.decode_response(http_post(srv.url + "/", body.read_bytes()), PICKLE)
                    if not np.allclose(got["x"], expected, rtol=1e-5):
                        raise RuntimeError(f"{name} answered wrongly: {got!r}")
                    for conns in levels:
                        load1 = loadavg()[0]
                        r = run_wrk(
                            srv.url + "/",
                            body,
                            connections=conns,
                            duration=args.duration,
                            threads=args.wrk_threads,
                            warmup=args.warmup,
                            server_pid=srv.pid,
                        )
                        figs[(name, conns)] = {
                            "req_per_s": r.req_per_s,
                            "p50_ms": r.p50_ms,
                            "p99_ms": r.p99_ms,
                            "errors": float(r.errors),
                            "server_cores": r.server_cores,
                            "cpu_us_per_req": r.cpu_us_per_req,
                            "load1": load1,
                        }
                        print(
                            f"  {name:<17} c{conns:<3} {r.req_per_s:8.0f} req/s  p50 "
                            f"{r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  errors {r.errors}  "
                            f"server {r.server_cores:.2f} cores {r.cpu_us_per_req:.0f} us/req  "
                            f"(load1 {load1:.2f})",
                            file=log,
                            flush=True,
                        )
            for (_name, conns), f in figs.items():
                ref = figs.get((REFERENCE, conns))
                f["vs_ref"] = ratio(f["req_per_s"], ref["req_per_s"]) if ref else float("nan")
            results.append(figs)
            print(f"\n## repeat {rep + 1} ({load_str()})")
            print(render(figs, names, levels))

    keys = list(results[0])
    med = {k: {f: median(r[k][f] for r in results if k in r) for f in results[0][k]} for k in keys}
    print(f"\n## medians of {len(results)} repeat(s) ({load_str()})")
    print(render(med, names, levels))
    print(f"wall time {time.monotonic() - t_start:.0f} s")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "repeats": [{f"{n}/c{c}": v for (n, c), v in r.items()} for r in results],
                    "medians": {f"{n}/c{c}": v for (n, c), v in med.items()},
                },
                indent=2,
            )
        )
    return 0


def render(figs: dict[tuple[str, int], dict[str, Any]], names: list[str], levels: list[int]) -> str:
    rows = []
    for conns in levels:
        for name in names:
            f = figs.get((name, conns))
            if f is None:
                continue
            rows.append(
                [
                    name,
                    str(conns),
                    fmt_num(f["req_per_s"]),
                    fmt_num(f["p50_ms"], ".2f"),
                    fmt_num(f["p99_ms"], ".2f"),
                    fmt_num(f["vs_ref"], ".2f"),
                    fmt_num(f["server_cores"], ".2f"),
                    fmt_num(f["cpu_us_per_req"]),
                    fmt_num(f["errors"]),
                    fmt_num(f["load1"], ".2f"),
                ]
            )
    headers = [
        "server",
        "conns",
        "req/s",
        "p50 ms",
        "p99 ms",
        f"x {REFERENCE}",
        "srv cores",
        "CPU us/req",
        "errors",
        "load1",
    ]
    return table(headers, rows, left=1)


if __name__ == "__main__":
    sys.exit(main())
