"""A generator process's main loop, started by :class:`~.pool.Pool` as ``python -c``.

It talks to its parent over two pipes: it reads ``(target, timeout)``, then one
:class:`~.worker.Spec` per phase, and answers each with ``("progress", n)`` messages and a
final ``("done", outcome)``; ``None`` ends it. The worker is chosen once, by the target: HTTP
(:class:`~.worker.Worker`) or gRPC (:class:`~.grpc_load.GrpcWorker`, imported only then).
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from .worker import Worker

__all__ = ["worker_process"]


def worker_process(rfd: int, wfd: int) -> None:
    """Serve the parent's phases until it sends ``None`` or goes away."""
    rconn = Connection(rfd, writable=False)
    wconn = Connection(wfd, readable=False)
    try:
        target, timeout = rconn.recv()
        if target.scheme == "grpc":
            from .grpc_load import GrpcWorker  # imports grpc: only for a gRPC target

            worker: Worker = GrpcWorker(target, timeout, wconn)
        else:
            worker = Worker(target, timeout, wconn)
        while True:
            spec = rconn.recv()
            if spec is None:
                return
            wconn.send(("done", worker.run(spec)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
