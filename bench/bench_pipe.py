"""ModelPipe benchmark: a Keras MLP behind the pipe vs the same model called directly.

Run it on a machine that is otherwise quiet (it prints the load average)::

    .venv/bin/python bench/bench_pipe.py            # about a minute
    .venv/bin/python bench/bench_pipe.py --quick    # shorter, for a smoke run

It prints:

1. the Keras call paths (``predict_on_batch``, ``model(x, training=False)``, ``tf.function``,
   its concrete function) at a few batch sizes; the pipe's Keras stage uses the concrete
   function (see :mod:`studioserve.pipelines.keras_stage`);
2. the model's offline items/s through direct calls at batch sizes 1..128 (the physical limit);
3. ModelPipe items/s and latency with 1, 8 and 64 closed-loop submitter threads of one item
   each. The submitter threads start once per level and run in windows; between two windows
   they are all parked outside the pipe and the reference is measured on the quiet machine
   (the best offline items/s at batch sizes up to the pipe's max batch size, or the model's
   own batch-1 latency). It reports medians of the per-window ratios: a shared machine's speed
   drifts by up to 2x within a minute, so only ratios measured side by side mean anything.
   One submitter's latency is also measured call by call: one direct batch-1 call, then one
   item through the pipe, from the same thread, alternating. At 64 submitters, each window
   of the pipe is paired with one of an "oracle" batcher (:class:`OracleBatcher`): the least
   any batcher can do between two calls, which shows the load generator's own ceiling;
4. the per-item overhead of a trivial function through a batching stage;
5. the targets with PASS/FAIL.

Model: Input 512 -> Dense 2048 relu -> Dense 2048 relu -> Dense 10 softmax, float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from queue import Empty, SimpleQueue
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from studioserve.pipelines import ModelPipe  # noqa: E402
from studioserve.pipelines.keras_stage import KerasRunner  # noqa: E402

MAX_BATCH = 64
SUBMITTERS = (1, 8, 64)


def build_model() -> Any:
    import logging

    import keras

    logging.getLogger("absl").setLevel(logging.ERROR)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(512,), dtype="float32")
    h = keras.layers.Dense(2048, activation="relu")(inputs)
    h = keras.layers.Dense(2048, activation="relu")(h)
    outputs = keras.layers.Dense(10, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def time_calls(fn: Callable[[], Any], seconds: float, min_calls: int = 5) -> list[float]:
    """Per-call seconds of ``fn`` for about ``seconds`` (after two warm calls)."""
    fn()
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


class Submitters:
    """``threads`` closed-loop submitters (submit one item, wait for it, repeat) that can pause.

    Paused, every thread is parked outside the pipe, so a reference measurement can run on a
    quiet machine right between two windows of load: the pairs are what make ratios trustworthy
    on a machine whose speed drifts.
    """

    def __init__(
        self, pipe: ModelPipe | OracleBatcher, make_item: Callable[[], Any], threads: int
    ) -> None:
        self.n = threads
        self._go = threading.Event()
        self._parked = threading.Semaphore(0)
        self._stop = False
        self.lat: list[list[float]] = [[] for _ in range(threads)]
        self._threads = [
            threading.Thread(
                target=self._run, args=(pipe, make_item, i), name=f"bench-submitter-{i}"
            )
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        self._wait_parked()

    def _run(self, pipe: ModelPipe | OracleBatcher, make_item: Callable[[], Any], i: int) -> None:
        item = make_item()
        mine = self.lat[i]
        submit = pipe.submit
        pc = time.perf_counter
        go = self._go
        while True:
            if not go.is_set():
                self._parked.release()
                go.wait()
            if self._stop:
                return
            t = pc()
            submit(item).result()
            mine.append(pc() - t)

    def _wait_parked(self) -> None:
        for _ in range(self.n):
            self._parked.acquire()

    def window(self, seconds: float, ramp: float = 0.1) -> tuple[float, list[float]]:
        """Run for ``ramp + seconds``, park; -> (items/s over ``seconds``, their latencies)."""
        self._go.set()
        time.sleep(ramp)
        marks = [len(x) for x in self.lat]
        t1 = time.perf_counter()
        time.sleep(seconds)
        ends = [len(x) for x in self.lat]
        t2 = time.perf_counter()
        self._go.clear()
        self._wait_parked()
        lats = [v for x, a, b in zip(self.lat, marks, ends, strict=True) for v in x[a:b]]
        return (sum(ends) - sum(marks)) / (t2 - t1), lats

    def close(self) -> None:
        self._stop = True
        self._go.set()
        for t in self._threads:
            t.join()

    def __enter__(self) -> Submitters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_loop(
    pipe: ModelPipe | OracleBatcher, make_item: Callable[[], Any], threads: int, seconds: float
) -> tuple[float, list[float]]:
    """One window of ``threads`` closed-loop submitters. -> (items/s, latencies)."""
    with Submitters(pipe, make_item, threads) as subs:
        return subs.window(seconds * 0.8, ramp=seconds * 0.2)


def paired_latency(
    direct: Callable[[], Any], piped: Callable[[], Any], pairs: int
) -> tuple[float, float]:
    """Alternate one direct call and one call through the pipe. -> (p50 direct, p50 piped)."""
    d: list[float] = []
    p: list[float] = []
    pc = time.perf_counter
    for _ in range(pairs):
        t = pc()
        direct()
        t2 = pc()
        piped()
        t3 = pc()
        d.append(t2 - t)
        p.append(t3 - t2)
    return statistics.median(d), statistics.median(p)


class OracleBatcher:
    """The ceiling for closed-loop submitters: the least a batcher can do between two calls.

    It knows how many submitters there are and waits for exactly that many items (no timers,
    no checks, no stats, no failure handling), stacks them, makes one call and sets the
    futures. What it loses against the offline figure is the load generator's own cost:
    setting the futures and waiting for every submitter thread to wake up and submit again.
    Not a usable batcher (it waits for a full batch forever but for a 50 ms fallback that
    only the pauses between windows hit); a yardstick for ModelPipe.
    """

    def __init__(self, fn: Callable[[Any], Any], batch: int) -> None:
        self._q: SimpleQueue[tuple[Any, Future[Any]] | None] = SimpleQueue()
        self.compute = 0.0
        self.calls = 0
        self.rows = 0
        self._t = threading.Thread(target=self._run, args=(fn, batch), name="bench-oracle")
        self._t.start()

    def submit(self, item: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._q.put((item, fut))
        return fut

    def _run(self, fn: Callable[[Any], Any], batch: int) -> None:
        get = self._q.get
        pc = time.perf_counter
        while True:
            entry = get()
            if entry is None:
                return
            entries = [entry]
            while len(entries) < batch:
                try:
                    entry = get(timeout=0.05)
                except Empty:
                    break
                if entry is None:
                    return
                entries.append(entry)
            x = np.concatenate([e[0] for e in entries])
            t = pc()
            out = fn(x)
            self.compute += pc() - t
            self.calls += 1
            self.rows += len(entries)
            for i, (_, fut) in enumerate(entries):
                fut.set_result(out[i : i + 1])

    def close(self) -> None:
        self._q.put(None)
        self._t.join()

    def __enter__(self) -> OracleBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fmt_hist(hist: dict[int, int]) -> str:
    total = sum(hist.values()) or 1
    rows = sum(k * v for k, v in hist.items())
    top = sorted(hist.items(), key=lambda kv: -kv[1])[:3]
    return f"mean {rows / total:5.1f}; most: " + ", ".join(f"{k}x{v}" for k, v in top)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter measurements (smoke run)")
    ap.add_argument("--rounds", type=int, default=8, help="windows per submitter level")
    ap.add_argument("--linger", type=float, default=None, help="the model stage's linger")
    args = ap.parse_args()
    level_s = 0.5 if args.quick else 1.0
    sweep_s = 0.3 if args.quick else 0.6
    ref_s = 0.25 if args.quick else 0.4

    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} (cores: {os.cpu_count()})")
    t_start = time.perf_counter()
    model = build_model()
    rng = np.random.default_rng(0)

    # 1. call paths ------------------------------------------------------------------------
    print("\n1. Keras call paths: ms per call (median)")
    names = {
        "predict_on_batch": "predict_on_batch",
        "call": "model(x)",
        "tf_function": "tf.function",
        "concrete": "concrete fn",
    }
    print(f"{'batch':>6} | " + " | ".join(f"{n:>16}" for n in names.values()))
    runners = {m: KerasRunner(model, method=m) for m in names}
    for r in runners.values():
        r.warm()
    total_by_method = dict.fromkeys(runners, 0.0)
    for b in (1, 8, 64):
        x = rng.random((b, 512), dtype=np.float32)
        cells = []
        for m, r in runners.items():

            def call(r: KerasRunner = r, x: Any = x) -> Any:
                return r(x)

            med = statistics.median(time_calls(call, sweep_s / 2))
            total_by_method[m] += med
            cells.append(f"{med * 1e3:16.3f}")
        print(f"{b:>6} | " + " | ".join(cells))
    fastest = min(total_by_method, key=lambda m: total_by_method[m])
    runner = KerasRunner(model)
    print(f"fastest overall: {names[fastest]}; the pipe's Keras stage uses: {names[runner.method]}")

    def offline(b: int, seconds: float) -> tuple[float, list[float]]:
        x = rng.random((b, 512), dtype=np.float32)
        times = time_calls(lambda: runner(x), seconds)
        return b / statistics.median(times), times

    # 2. offline sweep --------------------------------------------------------------------
    print("\n2. Model offline (direct calls, fastest path): items/s by batch size")
    sweep: dict[int, float] = {}
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        sweep[b], times = offline(b, sweep_s)
        print(
            f"  batch {b:>4}: {sweep[b]:9.0f} items/s  ({statistics.median(times) * 1e3:7.3f} ms"
            " per call)"
        )
    best_b = max((b for b in sweep if b <= MAX_BATCH), key=lambda b: sweep[b])
    print(
        f"  best up to the pipe's max batch size ({MAX_BATCH}): {sweep[best_b]:.0f} items/s at "
        f"batch {best_b}; overall best {max(sweep.values()):.0f}"
    )
    ref_sizes = sorted({best_b, MAX_BATCH, MAX_BATCH // 2})

    # 3. the pipe -------------------------------------------------------------------------
    linger = {} if args.linger is None else {"linger": args.linger}
    print(
        f"\n3. ModelPipe (one Keras stage, max_batch_size={MAX_BATCH}, max_delay=0"
        f"{', linger=' + str(args.linger) if linger else ''}): closed-loop submitters of one "
        f"item each; {args.rounds} windows of {level_s:.1f} s per level, each right after a "
        f"reference measured while the submitters are parked (best offline items/s at batch "
        f"{ref_sizes}, or the batch-1 latency); medians over windows"
    )
    print(
        f"{'submitters':>10} | {'items/s':>9} | {'vs best':>7} | {'p50 ms':>7} | "
        f"{'p99 ms':>7} | {'model b1':>8} | batch sizes"
    )
    ratio: dict[int, float] = {}
    item = rng.random((1, 512), dtype=np.float32)
    with ModelPipe(name="bench") as pipe:
        pipe.add(model, max_batch_size=MAX_BATCH, **linger)
        stage = pipe.stage_names[0]
        pipe.submit(item).result()
        for n in SUBMITTERS:
            ips_l, ratio_l, p50_l, p99_l, b1_l, oracle_l, oracle_gap = [], [], [], [], [], [], []
            before = dict(pipe.stats().stages[stage].batch_sizes)
            with ExitStack() as stack:
                subs = stack.enter_context(Submitters(pipe, item.copy, n))
                oracle_subs = None
                if n == MAX_BATCH:
                    oracle = stack.enter_context(OracleBatcher(runner, n))
                    oracle_subs = stack.enter_context(Submitters(oracle, item.copy, n))
                for _ in range(args.rounds):
                    # the reference runs while every submitter is parked, right before its pair
                    if n == 1:
                        _, b1_times = offline(1, ref_s)
                        ref = 1 / statistics.median(b1_times)
                        b1_l.append(statistics.median(b1_times))
                    else:
                        ref = max(offline(b, ref_s / len(ref_sizes))[0] for b in ref_sizes)
                    ips, lat = subs.window(level_s)
                    lat.sort()
                    ips_l.append(ips)
                    ratio_l.append(ips / ref)
                    p50_l.append(lat[len(lat) // 2])
                    p99_l.append(lat[min(len(lat) - 1, int(len(lat) * 0.99))])
                    if oracle_subs is not None:
                        c0, k0 = oracle.compute, oracle.calls
                        o_ips, _ = oracle_subs.window(level_s)
                        oracle_l.append(o_ips / ref)
                        mean_call = (oracle.compute - c0) / max(1, oracle.calls - k0)
                        oracle_gap.append(n / o_ips - mean_call)
            after = pipe.stats().stages[stage].batch_sizes
            hist = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
            ratio[n] = statistics.median(ratio_l)
            b1 = f"{statistics.median(b1_l) * 1e3:8.3f}" if b1_l else f"{'':8}"
            print(
                f"{n:>10} | {statistics.median(ips_l):9.0f} | {ratio[n]:6.0%} | "
                f"{statistics.median(p50_l) * 1e3:7.3f} | {statistics.median(p99_l) * 1e3:7.3f} "
                f"| {b1} | {fmt_hist(hist)}"
            )
            print(
                f"{'':>10}   windows: items/s {[round(v) for v in ips_l]}, vs best "
                f"{[f'{v:.0%}' for v in ratio_l]}"
            )
            if oracle_l:
                oracle_ratio = statistics.median(oracle_l)
                gap = statistics.median(oracle_gap)
                print(
                    f"{'':>10}   oracle batcher (see OracleBatcher), windows paired with the "
                    f"pipe's: vs best {[f'{v:.0%}' for v in oracle_l]}, median "
                    f"{oracle_ratio:.0%}; it spends {gap * 1e3:.2f} ms per round between two "
                    f"calls (setting {n} futures, {n} threads waking and resubmitting); "
                    f"ModelPipe reaches {ratio[n] / oracle_ratio:.0%} of it"
                )
        # one submitter's latency, paired call by call with the model's own batch-1 call
        pairs = 500 if args.quick else 1500
        d_p50, p_p50 = paired_latency(
            lambda: runner(item), lambda: pipe.submit(item).result(), pairs
        )
    d1 = p_p50 - d_p50
    print(
        f"  one submitter, {pairs} pairs of (direct batch-1 call, one item through the pipe) "
        f"from one thread: p50 {d_p50 * 1e3:.3f} ms direct, {p_p50 * 1e3:.3f} ms through the "
        f"pipe ({d1 * 1e3:+.3f} ms)"
    )

    # 4. trivial function overhead --------------------------------------------------------
    print("\n4. Per-item overhead of a trivial function (lambda x: x) in a batching stage")
    n_items = 10_000 if args.quick else 30_000
    items = [np.zeros((1, 512), np.float32) for _ in range(n_items)]
    bulk_l = []
    with ModelPipe(name="trivial", queue_size=4096) as pipe:
        pipe.add(lambda x: x, max_batch_size=MAX_BATCH)
        pipe.apply_ordered(items[:1000])
        for _ in range(3):
            t = time.perf_counter()
            out = pipe.apply_ordered(items)
            bulk_l.append((time.perf_counter() - t) / n_items)
            assert len(out) == n_items
        ips64, _ = closed_loop(pipe, lambda: np.zeros((1, 512), np.float32), 64, level_s)
    bulk = statistics.median(bulk_l)
    print(
        f"  pipe.apply_ordered({n_items} arrays of (1, 512)): {bulk * 1e6:6.1f} us per item "
        f"(median of 3; {', '.join(f'{v * 1e6:.1f}' for v in bulk_l)})"
    )
    print(
        f"  64 closed-loop submitters: {1e6 / ips64:6.1f} us per item (mostly the submitters' "
        f"own thread wake-ups, see the oracle batcher above)"
    )

    # 5. targets ----------------------------------------------------------------------------
    rows = [
        ("64 submitters items/s vs best offline", f"{ratio[64]:.0%}", ">= 85%", ratio[64] >= 0.85),
        ("1 submitter p50 - batch-1 call (paired)", f"{d1 * 1e3:+.3f} ms", "<= 0.3 ms", d1 <= 3e-4),
        ("trivial fn per-item overhead", f"{bulk * 1e6:.1f} us", "< 30 us", bulk < 30e-6),
    ]
    print("\n5. Targets")
    print(f"{'measure':<40} | {'value':>10} | {'target':>9} | result")
    for name, val, target, ok in rows:
        print(f"{name:<40} | {val:>10} | {target:>9} | {'PASS' if ok else 'FAIL'}")
    load = os.getloadavg()
    print(f"\n(total {time.perf_counter() - t_start:.0f} s; load average now {load[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
