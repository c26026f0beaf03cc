"""The studioserve Flask app on the "tiny" workload, for the WSGI server comparison.

``create()`` is an app factory for servers that import the app themselves (gunicorn:
``'wsgi_app:create()'``; granian: ``--factory wsgi_app:create``), so the app, its ModelPipe and
their threads are made in the worker process, after any fork. Run as a script, it serves the
same app in this process with one of the embedded servers::

    python bench/wsgi_app.py --server granian|waitress|werkzeug [--port 0] [--threads 32]

``granian`` and ``waitress`` are studioserve's own embeddings (``studioserve.http.servers``, as
``studio serve --http-server ...`` runs them); ``werkzeug`` is Flask's threaded development
server. It prints ``listening on http://127.0.0.1:PORT`` and exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_wrapper import build_pipe, make_weights  # noqa: E402


def create() -> Any:
    """A ready studioserve Flask app serving ``y = x @ W`` (W from tiny_wrapper)."""
    from studioserve.http.app import create_app
    from studioserve.models import PipeModel
    from studioserve.serving.service import ModelService

    pipe = build_pipe(make_weights())
    service = ModelService(PipeModel(pipe, source="bench/wsgi_app.py"))
    app = create_app(service)
    service.ready = True
    return app


def state_of(app: Any) -> Any:
    from studioserve.http.state import state_of as _state_of

    return _state_of(app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the tiny studioserve app in-process.")
    parser.add_argument("--server", choices=["granian", "waitress", "werkzeug"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args(argv)

    import logging

    for noisy in ("werkzeug", "waitress", "granian", "_granian"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    app = create()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    if args.server == "werkzeug":
        from werkzeug.serving import make_server

        server = make_server(args.host, args.port, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="bench-werkzeug", daemon=True)
        thread.start()
        port = server.server_port

        def close() -> None:
            server.shutdown()
            server.server_close()
            thread.join(10)
    else:
        from studioserve.http.servers import make_http_server

        http = make_http_server(app, args.host, args.port, args.threads, args.server)
        http.start()
        port = http.port
        close = http.stop

    print(f"listening on http://{args.host}:{port}", flush=True)
    stop.wait()
    close()
    state_of(app).service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
