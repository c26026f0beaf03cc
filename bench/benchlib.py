"""Shared pieces of the benchmarks: wrk runs and their parsing, subprocess servers, tables.

Nothing here imports studioserve, numpy's heavy friends or Keras; the benchmark driver stays
light so that it does not compete with the server for the machine's two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "wrk_post.lua"
PICKLE = "application/x-pickle"


# -- the machine ---------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def load_str() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*loadavg())


def wait_for_quiet(max_load: float, max_wait: float, log: IO[str] = sys.stderr) -> None:
    """Wait (up to ``max_wait`` seconds) until the 1-minute load average is below ``max_load``."""
    deadline = time.monotonic() + max_wait
    first = True
    while loadavg()[0] > max_load and time.monotonic() < deadline:
        if first:
            print(f"# waiting for the 1-min load to drop below {max_load} ({load_str()})", file=log)
            first = False
        time.sleep(5)
    if loadavg()[0] > max_load:
        print(f"# warning: starting anyway at {load_str()}", file=log)


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its live descendants, from /proc (Linux).

    Returns NaN where /proc is not available.
    """
    try:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
                except (OSError, IndexError):
                    continue
        total = 0.0
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                fields = _stat(p)
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
            todo.extend(children.get(p, []))
        return total / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of process ``pid``: ``tid -> (its OS name, CPU seconds user + system)``,
    from /proc/PID/task (Linux); empty when the process is gone or /proc is not available.

    The OS name is the kernel's ``comm`` (at most 15 characters): what native threads set
    (``tf_Compute``, ``tokio-rt-worker``); Python threads before 3.14 all show the process's
    own name."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        tick = os.sysconf("SC_CLK_TCK")
    except OSError:
        return out
    for entry in tids:
        try:
            with open(f"/proc/{pid}/task/{entry}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


def mapped_files(pid: int) -> set[str]:
    """The files process ``pid`` has mapped (its shared libraries among them), from
    /proc/PID/maps (Linux); empty when the process is gone or /proc is not available."""
    out: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].strip())
    except OSError:
        pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit(
            "wrk is not installed: run 'apt-get install -y wrk' (or install it from "
            "https://github.com/wg/wrk) and try again"
        )
    return wrk


# -- wrk -----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """One wrk run. Latencies in milliseconds."""

    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    errors: int  # socket errors + timeouts + non-2xx/3xx answers
    status_errors: int
    #: the server's CPU use during the run, in cores (1.0 = one core busy), when its pid was given
    server_cores: float = float("nan")
    #: the server's CPU time per request in microseconds, when its pid was given
    cpu_us_per_req: float = float("nan")
    raw: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_duration_ms(text: str) -> float:
    """wrk's latency notation (``215.00us``, ``1.02ms``, ``2.00s``, ``1.00m``) in ms."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Parse ``wrk --latency`` output (and the WRKJSON line that wrk_post.lua prints)."""
    pct: dict[int, float] = {}
    block = output.split("Latency Distribution", 1)
    if len(block) == 2:
        for m in re.finditer(r"^\s+(\d+(?:\.\d+)?)%\s+(\S+)\s*$", block[1], re.M):
            pct[round(float(m.group(1)))] = parse_duration_ms(m.group(2))
    rps_m = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.M)
    req_m = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m)", output, re.M)
    if not rps_m or not req_m or 50 not in pct or 99 not in pct:
        raise RuntimeError(f"could not parse wrk's output:\n{output}")
    errors = 0
    status_errors = 0
    js = re.search(r"^WRKJSON (\{.*\})\s*$", output, re.M)
    if js:
        d = json.loads(js.group(1))
        status_errors = int(d["status_errors"])
        errors = status_errors + sum(
            int(d[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
        )
    else:
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
        status_errors = int(non2xx.group(1)) if non2xx else 0
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
        )
        errors = status_errors + (sum(int(g) for g in sock.groups()) if sock else 0)
    return WrkResult(
        requests=int(req_m.group(1)),
        seconds=parse_duration_ms(req_m.group(2) + req_m.group(3)) / 1e3,
        req_per_s=float(rps_m.group(1)),
        p50_ms=pct[50],
        p75_ms=pct.get(75, float("nan")),
        p90_ms=pct.get(90, float("nan")),
        p99_ms=pct[99],
        errors=errors,
        status_errors=status_errors,
        raw=output,
    )


def run_wrk(
    url: str,
    body_file: Path,
    *,
    connections: int,
    duration: float,
    threads: int = 1,
    content_type: str = PICKLE,
    warmup: float = 0.0,
    timeout: str = "10s",
    server_pid: int | None = None,
) -> WrkResult:
    """POST ``body_file`` to ``url`` with wrk; ``warmup`` seconds of load first (not counted).

    With ``server_pid``, the server's CPU time (with its child processes) is read around the
    counted run.
    """
    wrk = find_wrk()
    env = dict(os.environ, WRK_BODY=str(body_file), WRK_CONTENT_TYPE=content_type)
    threads = max(1, min(threads, connections))

    def cmd(seconds: float) -> list[str]:
        return [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout}",
            "--latency",
            "-s",
            str(LUA_SCRIPT),
            url,
        ]

    if warmup > 0:
        subprocess.run(cmd(warmup), env=env, capture_output=True, text=True, check=False)
    cpu0 = cpu_seconds(server_pid) if server_pid else float("nan")
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd(duration), env=env, capture_output=True, text=True, timeout=duration + 60
    )
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(server_pid) if server_pid else float("nan")) - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    res = parse_wrk(proc.stdout)
    res.server_cores = cpu / elapsed
    res.cpu_us_per_req = cpu / res.requests * 1e6 if res.requests else float("nan")
    return res


# -- HTTP ----------------------------------------------------------------------------------------


def http_post(url: str, body: bytes, content_type: str = PICKLE, timeout: float = 30.0) -> bytes:
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: bytes = resp.read()
            return data
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode("utf-8", "replace")
        raise RuntimeError(f"POST {url} answered {e.code}: {detail}") from None


def scrape_metrics(url: str, names: Iterable[str]) -> dict[str, float]:
    """GET ``url`` (Prometheus text) and sum each named sample over its labels.

    Returns an empty dict when the server has no metrics endpoint.
    """
    wanted = set(names)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) in wanted:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
            except ValueError:
                continue
    return out


def scrape_labelled(
    url: str, names: Iterable[str]
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET ``url`` (Prometheus text): each named sample's value by its labels, as sorted
    ``(name, value)`` pairs (``{"m_total": {(("model", "mlp"),): 12.0}}``; no labels: ``()``).

    Returns an empty dict when the server has no metrics endpoint.
    """
    wanted = set(names)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)", line)
        if m and m.group(1) in wanted:
            pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or "")
            labels = tuple(sorted(pairs))
            try:
                out.setdefault(m.group(1), {})[labels] = float(m.group(3))
            except ValueError:
                continue
    return out


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll GET ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s (last error: {last})")


# -- server subprocesses -------------------------------------------------------------------------


class ServerProcess:
    """A server started as a subprocess; its output is collected in the background.

    :param cmd: the command line.
    :param name: for messages.
    :param url_pattern: a regex with one group matching the URL in its output (else ``url``).
    :param url: the URL when known in advance.
    :param ready_path: polled until 200 before :meth:`start` returns.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        name: str,
        *,
        url_pattern: str | None = None,
        url: str | None = None,
        ready_path: str = "/readyz",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.cmd = list(cmd)
        self.name = name
        self.url_pattern = re.compile(url_pattern) if url_pattern else None
        self.url = url
        self.ready_path = ready_path
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._url_seen = threading.Event()
        self._reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.url_pattern is not None and not self._url_seen.is_set():
                m = self.url_pattern.search(line)
                if m:
                    self.url = m.group(1)
                    self._url_seen.set()

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"bench-{self.name}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        if self.url_pattern is not None:
            while not self._url_seen.wait(0.1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.fail("did not print its URL")
        assert self.url is not None
        try:
            wait_http_ok(
                self.url.rstrip("/") + self.ready_path, deadline - time.monotonic(), self.proc
            )
        except RuntimeError as e:
            self.fail(str(e))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self, last: int = 40) -> str:
        return "\n".join(self.lines[-last:])

    def fail(self, why: str) -> None:
        self.stop()
        raise RuntimeError(
            f"{self.name} ({' '.join(self.cmd)}) {why}; its output:\n{self.output()}"
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- numbers and tables --------------------------------------------------------------------------

#: a benchmark's target: (value, comparison, threshold, unit)
Target = tuple[float, str, float, str]


def passed(t: Target) -> bool:
    """Whether a target is met (NaN, not measured, never is)."""
    value, op, threshold, _ = t
    if value != value:  # NaN: not measured
        return False
    return {"<": value < threshold, "<=": value <= threshold, ">=": value >= threshold}[op]


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def fmt_num(v: Any, spec: str = ".0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """A plain aligned text table: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if i < left else c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def python_env(extra_path: Sequence[Path] = ()) -> dict[str, str]:
    """Environment for Python subprocesses: quiet TensorFlow, bench/ importable."""
    paths = [str(p) for p in extra_path]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "PYTHONPATH": os.pathsep.join(paths),
    }


# -- setup helpers -------------------------------------------------------------------------------


def studio_command(studio_cmd: str | None = None) -> list[str]:
    """The command that runs ``studio``: ``studio_cmd`` split like a shell line, else the
    studio script next to this Python (else ``python -m studioserve``)."""
    if studio_cmd:
        import shlex

        return shlex.split(studio_cmd)
    script = Path(sys.executable).with_name("studio")
    return [str(script)] if script.exists() else [sys.executable, "-m", "studioserve"]


def add_experiment(
    studio: Sequence[str],
    store: Path,
    key: str,
    folder: Path,
    framework: str,
    *,
    serving_config: Path | None = None,
) -> None:
    """``studio experiments add KEY FOLDER --store STORE --framework FW`` (as a user would),
    with ``--serving-config FILE`` when ``serving_config`` is given."""
    extra = ["--serving-config", str(serving_config)] if serving_config is not None else []
    subprocess.run(
        [*studio, "experiments", "add", key, str(folder), "--store", str(store)]
        + ["--framework", framework, "--quiet", *extra],
        check=True,
        capture_output=True,
        env=dict(os.environ, **python_env()),
    )


def serve_arg_value(serve_args: Sequence[str], option: str) -> str | None:
    """The value given to ``option`` in pass-through ``studio serve`` arguments (the last one,
    as click takes it): ``--opt=V`` or ``--opt V``; None when absent."""
    found = None
    for i, arg in enumerate(serve_args):
        if arg.startswith(option + "="):
            found = arg[len(option) + 1 :]
        elif arg == option and i + 1 < len(serve_args):
            found = serve_args[i + 1]
    return found


# -- the server's memory -------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """The resident set size (VmRSS) of process ``pid`` in bytes; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


MIB = 1 << 20


class RssSampler:
    """Samples a process's RSS in a background thread, keeps the peak, and guards the machine.

    Every ``every`` seconds it records ``(seconds since start, rss bytes)``; it checks the
    guard ten times as often. Above ``guard_bytes`` it kills the process's group with SIGKILL
    (the benchmark's hostile inputs may make a server allocate without bound; on a shared
    machine that must not become the kernel's OOM killer's problem) and sets ``guard_tripped``.
    """

    def __init__(self, pid: int, *, every: float = 1.0, guard_bytes: int = 0) -> None:
        self.pid = pid
        self.every = every
        self.guard_bytes = guard_bytes
        self.samples: list[tuple[float, int]] = []
        self.peak = 0
        self.guard_tripped: tuple[float, int] | None = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._window_peak = 0
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def start(self) -> RssSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        tick = max(0.02, self.every / 10)
        next_record = time.monotonic()
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            now = time.monotonic()
            with self._lock:
                self.peak = max(self.peak, rss)
                self._window_peak = max(self._window_peak, rss)
                if now >= next_record and rss:
                    self.samples.append((now - self.t0, rss))
                    next_record = now + self.every
            if self.guard_bytes and rss > self.guard_bytes and self.guard_tripped is None:
                self.guard_tripped = (now - self.t0, rss)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
            self._stop.wait(tick)

    def take_window_peak(self) -> int:
        """The peak since the last call (and the current RSS), then start a new window."""
        with self._lock:
            peak = max(self._window_peak, rss_bytes(self.pid))
            self._window_peak = 0
            return peak

    def at(self, seconds: float) -> int:
        """The recorded sample nearest to ``seconds`` after :meth:`start` (0 if none)."""
        with self._lock:
            if not self.samples:
                return 0
            return min(self.samples, key=lambda s: abs(s[0] - seconds))[1]

    def low_before(self, seconds: float, window: float) -> int:
        """The smallest sample recorded in ``[seconds - window, seconds]`` after :meth:`start`,
        the current RSS included when ``seconds`` is now (0 if there is none): a level that
        one request's short-lived buffer does not decide."""
        now = time.monotonic() - self.t0
        with self._lock:
            vals = [rss for t, rss in self.samples if seconds - window <= t <= seconds + 0.5]
        if abs(now - seconds) < 1.0:
            current = rss_bytes(self.pid)
            if current:
                vals.append(current)
        return min(vals, default=0)

    def last(self) -> int:
        with self._lock:
            return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


# -- a small asyncio HTTP/1.1 client -------------------------------------------------------------


@dataclass
class HttpResult:
    """One request's outcome: ``status`` 0 means no response (see ``error``)."""

    status: int
    seconds: float
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: "" or what went wrong: "connect", "reset", "eof", "timeout", "bad-response"
    error: str = ""


_UPLOAD_GRACE = 3.0  # seconds to wait for the answer after the server stopped reading a body


class AsyncHttpConnection:
    """One keep-alive HTTP/1.1 connection to ``host:port`` on an asyncio loop.

    :meth:`request` reconnects when needed: after a ``Connection: close`` answer, an error or a
    timeout, the next request opens a new connection. Bodies are sent with Content-Length, or
    chunked from an iterable of chunks; while a large or chunked body is being sent the answer
    is read at the same time, so a server that answers early (413) and stops reading is seen
    answering, not just as a reset.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: Any = None
        self.writer: Any = None
        self.connects = 0

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        chunks: Iterable[bytes] | None = None,
        timeout: float = 30.0,
    ) -> HttpResult:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if self.writer is None:
                    try:
                        self.reader, self.writer = await asyncio.open_connection(
                            self.host, self.port
                        )
                    except OSError:
                        return HttpResult(0, time.perf_counter() - t0, error="connect")
                    self.connects += 1
                    sock = self.writer.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
                head += [f"{k}: {v}" for k, v in headers]
                if chunks is not None:
                    head.append("Transfer-Encoding: chunked")
                elif body or method in ("POST", "PUT"):
                    head.append(f"Content-Length: {len(body)}")
                raw_head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                status, hdrs, data, keep = await self._exchange(raw_head, body, chunks)
        except TimeoutError:
            await self.close()
            return HttpResult(0, time.perf_counter() - t0, error="timeout")
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            await self.close()
            kind = "eof" if isinstance(e, asyncio.IncompleteReadError) else "reset"
            return HttpResult(0, time.perf_counter() - t0, error=kind)
        except (ValueError, asyncio.LimitOverrunError):
            await self.close()
            return HttpResult(0, time.perf_counter() - t0, error="bad-response")
        if not keep:
            await self.close()
        return HttpResult(status, time.perf_counter() - t0, data, hdrs)

    async def _exchange(
        self, raw_head: bytes, body: bytes, chunks: Iterable[bytes] | None
    ) -> tuple[int, dict[str, str], bytes, bool]:
        writer = self.writer
        if chunks is None and len(body) < (256 << 10):
            writer.write(raw_head + body)
            await writer.drain()
            return await self._read_response()

        async def send() -> None:
            writer.write(raw_head)
            if chunks is None:
                writer.write(body)
            else:
                for chunk in chunks:
                    writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()

        sender = asyncio.ensure_future(send())
        reader = asyncio.ensure_future(self._read_response())
        try:
            await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                if sender.exception() is None:
                    return await reader
                # the server stopped reading (it may have answered and closed): a short grace
                await asyncio.wait({reader}, timeout=_UPLOAD_GRACE)
                if not reader.done():
                    raise sender.exception()  # type: ignore[misc]
            status, hdrs, data, keep = reader.result()
            if not sender.done() or sender.exception() is not None:
                keep = False  # answered before the body was all sent: the connection is spent
            return status, hdrs, data, keep
        finally:
            for task in (sender, reader):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                elif not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" warning

    async def _read_response(self) -> tuple[int, dict[str, str], bytes, bool]:
        reader = self.reader
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
            status = int(parts[1])
            hdrs: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            if status != 100:
                break
        keep = "close" not in hdrs.get("connection", "").lower() and parts[0] != "HTTP/1.0"
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                out += await reader.readexactly(size)
                await reader.readexactly(2)
            data = bytes(out)
        elif "content-length" in hdrs:
            data = await reader.readexactly(int(hdrs["content-length"]))
        elif status in (204, 304):
            data = b""
        else:
            data = await reader.read()
            keep = False
        return status, hdrs, data, keep


def add_server_options(
    p: argparse.ArgumentParser,
    *,
    serve_arg_example: str,
    every: bool = False,
    studio_cmd_help: str = "command that runs `studio` (default: this venv's)",
) -> None:
    """The options of every benchmark that starts ``studio serve``: --http-server,
    --serve-arg (repeatable; ``every``: for each of several servers) and --studio-cmd."""
    p.add_argument("--http-server", default="granian", help="passed to studio serve")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help=f"extra argument for {'every ' if every else ''}studio serve (repeatable), "
        f"e.g. --serve-arg={serve_arg_example}",
    )
    p.add_argument("--studio-cmd", default=None, help=studio_cmd_help)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """--max-load and --max-wait (start on a quiet machine) and --json (every figure)."""
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load below this")
    p.add_argument("--max-wait", type=float, default=0.0, help="seconds to wait for --max-load")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
