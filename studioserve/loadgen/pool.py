"""The parent's side of the generator processes: starting them, handing out phases, collecting.

Each process is a fresh interpreter (``python -c``, running
:func:`studioserve.loadgen.process.worker_process`) connected by two pipes, so neither the
parent's threads nor its ``__main__`` module come along, whatever the parent is running (a
CLI, a test runner, a notebook). All processes of a phase start sending at the same moment,
given in the :class:`~.worker.Spec` as a ``time.monotonic()`` instant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path

from ..errors import ClientError
from .progress import Progress
from .target import Target
from .worker import Outcome, Spec

#: The folder ``studioserve`` is imported from, put on the processes' ``PYTHONPATH``.
_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_CODE = "from studioserve.loadgen.process import worker_process; worker_process({}, {})"


class Pool:
    """The generator processes of one benchmark run, each told ``(target, timeout)`` at once.

    :raises OSError: when a process cannot be started (those already started are ended).
    """

    def __init__(self, target: Target, timeout: float, processes: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.send_conns: list[Connection] = []
        self.recv_conns: list[Connection] = []
        self.progress: list[int] = []
        try:
            for _ in range(processes):
                self._start(env)
                self.send_conns[-1].send((target, timeout))
        except BaseException:
            self.close()
            raise

    def _start(self, env: dict[str, str]) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE.format(to_child_r, from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.procs.append(proc)
        self.send_conns.append(Connection(to_child_w, readable=False))
        self.recv_conns.append(Connection(from_child_r, writable=False))
        self.progress.append(0)

    def close(self) -> None:
        """End the processes (waiting a few seconds for each, then killing it)."""
        for c in self.send_conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(5)
            except Exception:
                p.kill()
                p.wait(5)
        for c in self.send_conns + self.recv_conns:
            c.close()
        self.procs, self.send_conns, self.recv_conns = [], [], []

    def _died(self, i: int) -> ClientError:
        code = self.procs[i].poll()
        return ClientError(
            f"load generator process {i} died (exit code {code}); see its error above"
        )

    def run(
        self, specs: list[Spec], progress: Progress | None, label: str, total: float
    ) -> list[Outcome]:
        """Run one phase: ``specs[i]`` on process ``i``; their outcomes, in that order.

        :param progress: the bar to draw (recorded phases only), or None.
        :param label: the bar's label.
        :param total: the phase's requests (requests mode) or seconds, for the bar.
        :raises ClientError: when a process dies.
        """
        n = len(specs)
        for i, s in enumerate(specs):
            self.progress[i] = 0
            try:
                self.send_conns[i].send(s)
            except OSError:
                raise self._died(i) from None
        results: dict[int, Outcome] = {}
        index = {id(c): i for i, c in enumerate(self.recv_conns[:n])}
        while len(results) < n:
            pending = [c for i, c in enumerate(self.recv_conns[:n]) if i not in results]
            for c in wait(pending, timeout=0.1):
                i = index[id(c)]
                try:
                    kind, value = self.recv_conns[i].recv()
                except (EOFError, OSError):
                    raise self._died(i) from None
                if kind == "done":
                    results[i] = value
                else:
                    self.progress[i] = int(value)
            if progress is not None and specs[0].record:
                self._show(progress, specs[0], label, total, sum(self.progress[:n]))
        return [results[i] for i in range(n)]

    @staticmethod
    def _show(progress: Progress, spec: Spec, label: str, total: float, done: int) -> None:
        if spec.requests is not None:
            progress.show(label, min(1.0, done / max(total, 1)), done)
        else:
            elapsed = time.monotonic() - spec.start
            progress.show(label, min(1.0, max(0.0, elapsed / total)), done)
