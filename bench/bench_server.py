"""Benchmark ``studio serve`` end to end with wrk, against a naive Flask baseline.

What it does, in one run (about 90 s for one repeat, 160 s for two, on a 2-core machine):

1. creates a temporary store with two experiments, as a user would (``studio experiments
   add``): "tiny" (``y = x @ W``, W float32 16x16, served through bench/tiny_wrapper.py, a
   ModelPipe around one numpy matmul, so the HTTP path dominates) and "mlp" (a Keras MLP
   512 -> 2048 relu -> 2048 relu -> 10 softmax, float32, saved as ``.keras``);
2. starts ``studio serve`` for each (subprocesses, ``--port 0``) and the naive baseline for
   each (bench/naive_server.py: Flask's threaded development server, one ``predict_on_batch``
   per request, the same wire format);
3. per repeat: measures the MLP offline in a separate process (``predict_on_batch`` at batch
   sizes 1..128: items/s at each, and the batch-1 call's latency), then drives every server
   with wrk (bench/wrk_post.lua POSTing a prepared pickle body) at 1, 8 and 64 connections,
   one example per request, plus the bulk case (64 MLP rows per request, 4 connections);
4. prints each repeat's table, the medians over repeats, and the issue's targets with
   PASS/FAIL.

Usage::

    .venv/bin/python bench/bench_server.py                 # one repeat
    .venv/bin/python bench/bench_server.py --repeat 3      # medians of three
    .venv/bin/python bench/bench_server.py --http-server waitress --json out.json
    # before/after in one run: a checkout of the previous commit as a second studioserve
    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/bench_server.py --before-cmd \
        "env PYTHONPATH=/tmp/before $PWD/.venv/bin/python -P -m studioserve"

(``-P``: without it the current folder, this checkout, comes first on ``sys.path``.)

Every point reports the server's CPU per request (``CPU us/item``: user + system time of the
server process from /proc, over the requests it answered) next to req/s, p50 and p99.

Ratios are always taken within one repeat (the machine is shared and noisy); the summary shows
the median of each figure and of each ratio over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    PICKLE,
    ServerProcess,
    Target,
    WrkResult,
    add_run_options,
    add_server_options,
    fmt_num,
    http_post,
    load_str,
    loadavg,
    median,
    passed,
    python_env,
    ratio,
    run_wrk,
    scrape_metrics,
    table,
    wait_for_quiet,
)

from studioserve import wire  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINY_DIM = 16
MLP_IN = 512
MLP_HIDDEN = 2048
MLP_OUT = 10
BULK_ROWS = 64
BULK_CONCURRENCY = 4
OFFLINE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


# -- worker processes (model building and the offline measurement; they import Keras) -------------


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    import keras

    return keras


def build_mlp(modeldir: Path, inputs: Path) -> None:
    """Save the MLP as ``modeldir/mlp.keras`` and its outputs for ``inputs`` (an .npz)."""
    keras = _keras()
    keras.utils.set_random_seed(512)
    model = keras.Sequential(
        [
            keras.Input((MLP_IN,), dtype="float32"),
            keras.layers.Dense(MLP_HIDDEN, activation="relu"),
            keras.layers.Dense(MLP_HIDDEN, activation="relu"),
            keras.layers.Dense(MLP_OUT, activation="softmax"),
        ]
    )
    modeldir.mkdir(parents=True, exist_ok=True)
    model.save(modeldir / "mlp.keras")
    with np.load(inputs) as data:
        expected = {k: np.asarray(model.predict_on_batch(data[k])) for k in data.files}
    np.savez(inputs.with_name("mlp_expected.npz"), one=expected["one"], bulk=expected["bulk"])


def offline_mlp(path: Path, seconds_per_size: float) -> dict[str, Any]:
    """Items/s of ``predict_on_batch`` at each batch size, and the batch-1 call's latency."""
    keras = _keras()
    model = keras.models.load_model(path, compile=False)
    rng = np.random.default_rng(0)
    per_size: dict[int, float] = {}
    for bs in OFFLINE_BATCH_SIZES:
        x = rng.standard_normal((bs, MLP_IN)).astype(np.float32)
        for _ in range(3):
            model.predict_on_batch(x)
        calls = 0
        start = time.perf_counter()
        while True:
            model.predict_on_batch(x)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds_per_size and calls >= 5:
                break
        per_size[bs] = calls * bs / elapsed
    x1 = rng.standard_normal((1, MLP_IN)).astype(np.float32)
    times = []
    for _ in range(300):
        t0 = time.perf_counter()
        model.predict_on_batch(x1)
        times.append(time.perf_counter() - t0)
    times.sort()
    best_bs = max(per_size, key=lambda b: per_size[b])
    return {
        "items_per_s": per_size,
        "best_items_per_s": per_size[best_bs],
        "best_batch_size": best_bs,
        "b1_p50_ms": times[len(times) // 2] * 1e3,
        "b1_p99_ms": times[int(len(times) * 0.99)] * 1e3,
    }


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_server.py --worker")
    parser.add_argument("what", choices=["build", "offline"])
    parser.add_argument("--modeldir", type=Path)
    parser.add_argument("--inputs", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--seconds", type=float, default=0.6)
    args = parser.parse_args(argv)
    if args.what == "build":
        build_mlp(args.modeldir, args.inputs)
    else:
        print("OFFLINE " + json.dumps(offline_mlp(args.model, args.seconds)), flush=True)
    return 0


def run_worker(*args: str, timeout: float = 300.0) -> str:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **python_env()),
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def measure_offline(model: Path, seconds: float) -> dict[str, Any]:
    out = run_worker("offline", "--model", str(model), "--seconds", str(seconds))
    for line in out.splitlines():
        if line.startswith("OFFLINE "):
            d: dict[str, Any] = json.loads(line[len("OFFLINE ") :])
            d["items_per_s"] = {int(k): v for k, v in d["items_per_s"].items()}
            return d
    raise RuntimeError(f"the offline worker printed no result:\n{out}")


# -- setup -------------------------------------------------------------------------------------


def studio_cmd() -> list[str]:
    script = Path(sys.executable).with_name("studio")
    return [str(script)] if script.exists() else [sys.executable, "-m", "studioserve"]


@dataclass
class Workload:
    name: str
    body: Path  # one example per request
    expected: np.ndarray
    bulk_body: Path | None = None
    bulk_expected: np.ndarray | None = None


def prepare(tmp: Path, log: Any) -> tuple[Path, dict[str, Workload], Path]:
    """Build the store with both experiments and the request bodies."""
    store = tmp / "store"
    src = tmp / "src"
    rng = np.random.default_rng(7)

    tiny_dir = src / "tiny"
    tiny_dir.mkdir(parents=True)
    w = rng.standard_normal((TINY_DIM, TINY_DIM)).astype(np.float32)
    np.save(tiny_dir / "W.npy", w)
    x_tiny = rng.standard_normal(TINY_DIM).astype(np.float32)

    x_mlp = rng.standard_normal(MLP_IN).astype(np.float32)
    x_bulk = rng.standard_normal((BULK_ROWS, MLP_IN)).astype(np.float32)
    inputs = tmp / "mlp_inputs.npz"
    np.savez(inputs, one=x_mlp[np.newaxis], bulk=x_bulk)
    mlp_dir = src / "mlp"
    print(f"# building the MLP ({load_str()})", file=log, flush=True)
    run_worker("build", "--modeldir", str(mlp_dir), "--inputs", str(inputs))
    with np.load(tmp / "mlp_expected.npz") as exp:
        mlp_expected, bulk_expected = exp["one"][0], exp["bulk"]

    for key, folder, fw in (("tiny", tiny_dir, "numpy"), ("mlp", mlp_dir, "keras")):
        subprocess.run(
            [*studio_cmd(), "experiments", "add", key, str(folder), "--store", str(store)]
            + ["--framework", fw, "--quiet"],
            check=True,
            capture_output=True,
            env=dict(os.environ, **python_env()),
        )

    bodies = tmp / "bodies"
    bodies.mkdir()
    files = {
        "tiny": {"x": x_tiny},
        "mlp": {"x": x_mlp},
        "mlp_bulk": {"x": x_bulk},
    }
    for name, data in files.items():
        (bodies / f"{name}.pkl").write_bytes(pickle.dumps(data))
    workloads = {
        "tiny": Workload("tiny", bodies / "tiny.pkl", x_tiny @ w),
        "mlp": Workload(
            "mlp",
            bodies / "mlp.pkl",
            mlp_expected,
            bodies / "mlp_bulk.pkl",
            bulk_expected,
        ),
    }
    return store, workloads, mlp_dir / "mlp.keras"


def start_servers(
    store: Path,
    modeldirs: dict[str, Path],
    args: argparse.Namespace,
    log: Any,
    servers: dict[tuple[str, str], ServerProcess],
) -> None:
    """Start studio serve and the naive server per workload, adding each to ``servers``."""
    env = python_env()
    studios = [("studio", shlex.split(args.studio_cmd) if args.studio_cmd else studio_cmd())]
    if args.before_cmd:
        studios.append(("before", shlex.split(args.before_cmd)))
    for wl, (kind, launcher) in [(w, k) for w in args.workloads for k in studios]:
        cmd = [
            *launcher,
            "serve",
            wl,
            "--store",
            str(store),
            "--port",
            "0",
            "--killafter",
            "0",
            "--http-server",
            args.http_server,
            "--quiet",
            *args.serve_arg,
        ]
        if wl == "tiny":
            cmd += ["--wrapper", str(HERE / "tiny_wrapper.py")]
        print(f"# starting: {' '.join(cmd)}", file=log, flush=True)
        servers[(wl, kind)] = srv = ServerProcess(
            cmd, f"{kind}-{wl}", url_pattern=r" at (http://\S+)", env=env, cwd=REPO
        )
        srv.start()
        if not args.no_naive and kind == "studio":
            ncmd = [
                sys.executable,
                str(HERE / "naive_server.py"),
                "--workload",
                wl,
                "--modeldir",
                str(modeldirs[wl]),
            ]
            print(f"# starting: {' '.join(ncmd)}", file=log, flush=True)
            servers[(wl, "naive")] = srv = ServerProcess(
                ncmd, f"naive-{wl}", url_pattern=r"listening on (http://\S+)", env=env, cwd=REPO
            )
            srv.start()


def check_answer(url: str, wl: Workload, bulk: bool) -> None:
    """One request before the load: the server must answer correctly."""
    body = (wl.bulk_body if bulk else wl.body).read_bytes()  # type: ignore[union-attr]
    got = wire.decode_response(http_post(url, body), PICKLE)["x"]
    want = wl.bulk_expected if bulk else wl.expected
    assert want is not None
    if np.shape(got) != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"{url} answered {wl.name} wrongly: shape {np.shape(got)} vs {want.shape}"
        )


# -- one repeat ----------------------------------------------------------------------------------


@dataclass
class Point:
    workload: str
    server: str  # "studio" or "naive"
    connections: int
    rows: int  # examples per request
    wrk: WrkResult
    load1: float
    batching: dict[str, float]

    @property
    def items_per_s(self) -> float:
        return self.wrk.req_per_s * self.rows

    def key(self) -> tuple[str, str, int, int]:
        return (self.workload, self.server, self.connections, self.rows)


METRICS = (
    "studioserve_batch_size_sum",
    "studioserve_batch_size_count",
    "studioserve_compute_seconds_sum",
    "studioserve_queue_wait_seconds_sum",
    "studioserve_queue_wait_seconds_count",
)


def batch_figures(m0: dict[str, float], m1: dict[str, float], seconds: float) -> dict[str, float]:
    """From two /metrics scrapes: rows per model call, model busy fraction, queue wait."""
    nan = float("nan")
    if not m0 or not m1 or seconds <= 0:
        return {"rows_per_call": nan, "model_busy": nan, "queue_wait_ms": nan}

    def d(name: str) -> float:
        return m1.get(name, nan) - m0.get(name, nan)

    return {
        "rows_per_call": ratio(d("studioserve_batch_size_sum"), d("studioserve_batch_size_count")),
        "model_busy": d("studioserve_compute_seconds_sum") / seconds,
        "queue_wait_ms": 1e3
        * ratio(d("studioserve_queue_wait_seconds_sum"), d("studioserve_queue_wait_seconds_count")),
    }


def run_repeat(
    servers: dict[tuple[str, str], ServerProcess],
    workloads: dict[str, Workload],
    model_path: Path,
    args: argparse.Namespace,
    log: Any,
) -> tuple[list[Point], dict[str, Any] | None]:
    offline = None
    points: list[Point] = []
    plan: list[tuple[str, int, int]] = []
    for wl in args.workloads:
        if wl == "mlp" and not args.no_bulk:
            # first, right after the offline sweep it is compared with
            plan.append((wl, BULK_CONCURRENCY, BULK_ROWS))
        plan += [(wl, c, 1) for c in args.levels]
    for wl_name, conns, rows in plan:
        if wl_name == "mlp" and offline is None:  # measured next to the MLP points
            print(f"# offline MLP sweep ({load_str()})", file=log, flush=True)
            offline = measure_offline(model_path, args.offline_seconds)
            print(f"  {offline_line(offline)}", file=log, flush=True)
        wl = workloads[wl_name]
        body = wl.body if rows == 1 else wl.bulk_body
        assert body is not None
        for kind in ("studio", "before", "naive"):
            srv = servers.get((wl_name, kind))
            if srv is None:
                continue
            assert srv.url is not None
            url = srv.url + "/"
            kw: dict[str, Any] = {"connections": conns, "threads": args.wrk_threads}
            if args.warmup > 0:
                run_wrk(url, body, duration=args.warmup, **kw)
            load1 = loadavg()[0]
            m0 = scrape_metrics(srv.url + "/metrics", METRICS) if kind != "naive" else {}
            res = run_wrk(url, body, duration=args.duration, server_pid=srv.pid, **kw)
            m1 = scrape_metrics(srv.url + "/metrics", METRICS) if m0 else {}
            p = Point(wl_name, kind, conns, rows, res, load1, batch_figures(m0, m1, res.seconds))
            points.append(p)
            print(
                f"  {wl_name:<5} {kind:<6} c{conns:<3} rows {rows:<3} {res.req_per_s:9.0f} req/s "
                f"p50 {res.p50_ms:7.2f} ms  p99 {res.p99_ms:7.2f} ms  errors {res.errors}  "
                f"server {res.server_cores:.2f} cores, {res.cpu_us_per_req:.0f} us CPU/req, "
                f"{p.batching['rows_per_call']:.1f} rows/call, model busy "
                f"{p.batching['model_busy']:.0%}  (load1 {load1:.2f})",
                file=log,
                flush=True,
            )
            if args.profile is not None and kind == "studio" and conns == max(args.levels):
                profile(srv, body, conns, args, f"{wl_name}-c{conns}-r{rows}", log)
    return points, offline


def profile(
    srv: ServerProcess, body: Path, conns: int, args: argparse.Namespace, name: str, log: Any
) -> None:
    """An extra, uncounted wrk run with py-spy recording the server (--profile DIR)."""
    import shutil

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = args.profile / f"{name}.txt"
    args.profile.mkdir(parents=True, exist_ok=True)
    rec = subprocess.Popen(
        [pyspy, "record", "-p", str(srv.pid), "-d", str(int(args.duration) + 1), "-r", "200"]
        + ["-f", "raw", "-o", str(out), "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    res = run_wrk(srv.url + "/", body, connections=conns, duration=args.duration)  # type: ignore[operator]
    rec.wait(60)
    print(f"  (profiled {name}: {res.req_per_s:.0f} req/s under py-spy -> {out})", file=log)


# -- reporting -----------------------------------------------------------------------------------


def figures(
    points: list[Point], offline: dict[str, Any] | None
) -> dict[tuple[Any, ...], dict[str, float]]:
    """Per point: absolute figures and the within-repeat ratios."""
    by_key = {p.key(): p for p in points}
    out: dict[tuple[Any, ...], dict[str, float]] = {}
    best = offline["best_items_per_s"] if offline else float("nan")
    for p in points:
        naive = by_key.get((p.workload, "naive", p.connections, p.rows))
        before = by_key.get((p.workload, "before", p.connections, p.rows))
        f = {
            "req_per_s": p.wrk.req_per_s,
            "items_per_s": p.items_per_s,
            "p50_ms": p.wrk.p50_ms,
            "p99_ms": p.wrk.p99_ms,
            "errors": float(p.wrk.errors),
            "server_cores": p.wrk.server_cores,
            "rows_per_call": p.batching["rows_per_call"],
            "model_busy": p.batching["model_busy"],
            "queue_wait_ms": p.batching["queue_wait_ms"],
            "cpu_us_per_item": p.wrk.cpu_us_per_req / p.rows,
            "load1": p.load1,
            "vs_naive": ratio(p.items_per_s, naive.items_per_s) if naive else float("nan"),
            "vs_before": ratio(p.items_per_s, before.items_per_s) if before else float("nan"),
            "vs_offline": ratio(p.items_per_s, best) if p.workload == "mlp" else float("nan"),
        }
        out[p.key()] = f
    return out


def targets(
    figs: dict[tuple[Any, ...], dict[str, float]], offline: dict[str, Any] | None, top: int
) -> dict[str, Target]:
    """The issue's targets for one repeat: name -> (value, comparison, threshold, unit).

    A target whose figures were not measured (a workload, level or case left out) is left out.
    """
    nan = float("nan")
    best = offline["best_items_per_s"] if offline else nan
    b1_p50 = offline["b1_p50_ms"] if offline else nan

    def get(workload: str, server: str, conns: int, rows: int, field: str) -> float:
        return figs.get((workload, server, conns, rows), {}).get(field, nan)

    tiny_top = get("tiny", "studio", top, 1, "req_per_s")
    mlp_top = get("mlp", "studio", top, 1, "items_per_s")
    bound = 1.0 / (1.0 / best + 1.0 / tiny_top) if tiny_top > 0 and best > 0 else nan
    candidates: dict[str, Target] = {
        f"tiny c{top} req/s vs naive": (get("tiny", "studio", top, 1, "vs_naive"), ">=", 6.0, "x"),
        f"mlp c{top} items/s vs naive": (get("mlp", "studio", top, 1, "vs_naive"), ">=", 6.0, "x"),
        f"mlp c{top} items/s vs 1/(1/offline_best + 1/tiny_c{top})": (
            ratio(mlp_top, bound),
            ">=",
            0.8,
            "x",
        ),
        "bulk mlp items/s vs offline best": (
            get("mlp", "studio", BULK_CONCURRENCY, BULK_ROWS, "vs_offline"),
            ">=",
            0.85,
            "x",
        ),
        "tiny c1 p50": (get("tiny", "studio", 1, 1, "p50_ms"), "<", 0.5, "ms"),
        f"tiny c{top} server CPU per request": (
            get("tiny", "studio", top, 1, "cpu_us_per_item"),
            "<",
            100.0,
            "us",
        ),
        f"tiny c{top} p99 / p50": (
            ratio(get("tiny", "studio", top, 1, "p99_ms"), get("tiny", "studio", top, 1, "p50_ms")),
            "<=",
            2.5,
            "x",
        ),
        f"mlp c{top} p99 / p50": (
            ratio(get("mlp", "studio", top, 1, "p99_ms"), get("mlp", "studio", top, 1, "p50_ms")),
            "<=",
            2.5,
            "x",
        ),
        f"mlp c{top} items/s vs offline best": (
            get("mlp", "studio", top, 1, "vs_offline"),
            ">=",
            0.5,
            "x",
        ),
        "mlp c1 p50 minus model batch-1 p50": (
            get("mlp", "studio", 1, 1, "p50_ms") - b1_p50,
            "<=",
            0.5,
            "ms",
        ),
    }
    return {name: t for name, t in candidates.items() if t[0] == t[0]}


def point_rows(figs: dict[tuple[Any, ...], dict[str, float]]) -> list[list[str]]:
    rows = []
    order = {"studio": 0, "before": 1, "naive": 2}
    for key in sorted(figs, key=lambda k: (k[0] != "tiny", k[3], k[2], order.get(k[1], 3))):
        wl, server, conns, nrows = key
        f = figs[key]
        rows.append(
            [
                wl if nrows == 1 else f"{wl} bulk",
                server,
                str(conns),
                str(nrows),
                fmt_num(f["req_per_s"]),
                fmt_num(f["items_per_s"]),
                fmt_num(f["p50_ms"], ".2f"),
                fmt_num(f["p99_ms"], ".2f"),
                fmt_num(f["vs_naive"], ".2f") if server != "naive" else "1",
                fmt_num(f["vs_before"], ".2f") if server == "studio" else "",
                fmt_num(f["vs_offline"], ".2f"),
                fmt_num(f["rows_per_call"], ".1f"),
                fmt_num(f["model_busy"] * 100, ".0f"),
                fmt_num(f["server_cores"], ".2f"),
                fmt_num(f["cpu_us_per_item"]),
                fmt_num(f["errors"]),
                fmt_num(f["load1"], ".2f"),
            ]
        )
    return rows


HEADERS = [
    "workload",
    "server",
    "conns",
    "rows",
    "req/s",
    "items/s",
    "p50 ms",
    "p99 ms",
    "x naive",
    "x before",
    "x offline",
    "rows/call",
    "busy %",
    "srv cores",
    "CPU us/item",
    "errors",
    "load1",
]


def offline_line(off: dict[str, Any]) -> str:
    sweep = ", ".join(f"{b}: {v:.0f}" for b, v in sorted(off["items_per_s"].items()))
    return (
        f"offline MLP predict_on_batch items/s by batch size: {sweep}; best "
        f"{off['best_items_per_s']:.0f} (batch {off['best_batch_size']}); batch-1 call p50 "
        f"{off['b1_p50_ms']:.2f} ms, p99 {off['b1_p99_ms']:.2f} ms"
    )


def targets_table(tg: dict[str, Target]) -> str:
    rows = [
        [name, f"{t[0]:.2f} {t[3]}", f"{t[1]} {t[2]:g} {t[3]}", "PASS" if passed(t) else "FAIL"]
        for name, t in tg.items()
    ]
    return table(["target", "value", "want", "result"], rows)


def summarize(
    repeats: list[tuple[dict[tuple[Any, ...], dict[str, float]], dict[str, Any] | None]], top: int
) -> tuple[dict[tuple[Any, ...], dict[str, float]], dict[str, Any] | None, dict[str, Target]]:
    keys = list(repeats[0][0])
    med = {
        k: {f: median(r[0][k][f] for r in repeats if k in r[0]) for f in repeats[0][0][k]}
        for k in keys
    }
    offs = [r[1] for r in repeats if r[1]]
    off_med = None
    if offs:
        off_med = {
            "items_per_s": {
                b: median(o["items_per_s"][b] for o in offs) for b in offs[0]["items_per_s"]
            },
            "best_items_per_s": median(o["best_items_per_s"] for o in offs),
            "best_batch_size": statistics.mode(o["best_batch_size"] for o in offs),
            "b1_p50_ms": median(o["b1_p50_ms"] for o in offs),
            "b1_p99_ms": median(o["b1_p99_ms"] for o in offs),
        }
    per_repeat = [targets(r[0], r[1], top) for r in repeats]
    names = list(dict.fromkeys(n for t in per_repeat for n in t))
    tg: dict[str, Target] = {}
    for name in names:
        found = [t[name] for t in per_repeat if name in t]
        _, op, threshold, unit = found[0]
        tg[name] = (median(v[0] for v in found), op, threshold, unit)
    return med, off_med, tg


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark `studio serve` with wrk against a naive Flask baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repeat", type=int, default=1, help="repeats; the summary takes medians")
    p.add_argument("--duration", type=float, default=3.0, help="seconds of wrk per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted load first")
    p.add_argument("--levels", default="1,8,64", help="wrk connection counts")
    p.add_argument("--workloads", default="tiny,mlp", help="tiny, mlp or both")
    add_server_options(
        p,
        serve_arg_example="--max-delay-ms=1",
        studio_cmd_help="command that runs `studio serve` (default: the studio script of this "
        "Python), e.g. to benchmark another checkout or a patched launcher",
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t")
    p.add_argument("--offline-seconds", type=float, default=0.6, help="per offline batch size")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument(
        "--before-cmd",
        default=None,
        help="command that runs another studioserve (e.g. the previous commit) measured "
        "beside this one in the same run ('x before' = this one's items/s over its)",
    )
    p.add_argument("--no-bulk", action="store_true", help="skip the bulk case")
    add_run_options(p)
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder: record the studio server with py-spy in an extra run at the top level",
    )
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not set(args.workloads) <= {"tiny", "mlp"}:
        p.error("--workloads takes tiny, mlp or tiny,mlp")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)
    log = sys.stderr
    top = max(args.levels)
    t_start = time.monotonic()
    wait_for_quiet(args.max_load, args.max_wait, log)
    print(f"# bench_server: http server {args.http_server}, {load_str()}", file=log, flush=True)
    repeats = []
    with tempfile.TemporaryDirectory(prefix="studioserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store, workloads, model_path = prepare(tmp, log)
        modeldirs = {"tiny": tmp / "src" / "tiny", "mlp": tmp / "src" / "mlp"}
        servers: dict[tuple[str, str], ServerProcess] = {}
        codes: dict[str, int | None] = {}
        try:
            start_servers(store, modeldirs, args, log, servers)
            for (wl, _kind), srv in servers.items():
                assert srv.url is not None
                check_answer(srv.url + "/", workloads[wl], bulk=False)
                if wl == "mlp":
                    check_answer(srv.url + "/", workloads[wl], bulk=True)
            for i in range(args.repeat):
                print(f"# repeat {i + 1}/{args.repeat} ({load_str()})", file=log, flush=True)
                points, offline = run_repeat(servers, workloads, model_path, args, log)
                figs = figures(points, offline)
                repeats.append((figs, offline))
                print(f"\n## repeat {i + 1} ({load_str()})")
                if offline:
                    print(offline_line(offline))
                print(table(HEADERS, point_rows(figs)))
                print(targets_table(targets(figs, offline, top)), flush=True)
        finally:
            for (wl, kind), srv in servers.items():
                codes[f"{kind}-{wl}"] = srv.stop()
    med, off_med, tg = summarize(repeats, top)
    print(f"\n## medians of {len(repeats)} repeat(s), http server {args.http_server}, {load_str()}")
    if off_med:
        print(offline_line(off_med))
    print(table(HEADERS, point_rows(med)))
    print(targets_table(tg))
    print(
        f"server exit codes: {', '.join(f'{k} {v}' for k, v in codes.items())}; "
        f"wall time {time.monotonic() - t_start:.0f} s"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "http_server": args.http_server,
                    "repeats": [
                        {
                            "points": {"/".join(map(str, k)): v for k, v in r[0].items()},
                            "offline": r[1],
                        }
                        for r in repeats
                    ],
                    "medians": {"/".join(map(str, k)): v for k, v in med.items()},
                    "offline_median": off_med,
                    "targets": {
                        n: {"value": t[0], "want": f"{t[1]} {t[2]:g}", "pass": passed(t)}
                        for n, t in tg.items()
                    },
                    "exit_codes": codes,
                },
                indent=2,
            )
        )
    return 0 if all(passed(t) for t in tg.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
