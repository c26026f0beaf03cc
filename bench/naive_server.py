"""The naive baseline: Flask's development server calling the model once per request.

What a user gets by wrapping a model in a few lines of Flask: werkzeug's threaded development
server (HTTP/1.0, a thread per connection), every request decoded and answered on its own with
one ``model.predict_on_batch`` call (no batching across requests). It speaks the same wire
format as ``studio serve`` (a pickled dict of numpy arrays in, the same keys out; decoded by
studioserve's restricted unpickler), so the load generator cannot tell them apart::

    python bench/naive_server.py --workload mlp --modeldir DIR [--port 0]

It prints ``naive server listening on http://127.0.0.1:PORT`` once it is warm, and exits 0 on
SIGTERM or Ctrl-C. ``--workload tiny`` serves ``y = x @ W`` (W from ``DIR/W.npy``, as
bench/tiny_wrapper.py does); ``--workload mlp`` serves the newest ``*.keras`` file in ``DIR``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

Predict = Callable[[np.ndarray], np.ndarray]


def tiny_model(modeldir: Path) -> tuple[Predict, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_wrapper import DIM, load_weights

    w = load_weights(modeldir)

    def predict_on_batch(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x @ w
        return out

    return predict_on_batch, DIM


def mlp_model(modeldir: Path) -> tuple[Predict, int]:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    import keras

    paths = sorted(modeldir.glob("*.keras"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise SystemExit(f"no .keras file in {modeldir}")
    model = keras.models.load_model(paths[-1], compile=False)
    dim = int(model.inputs[0].shape[-1])

    def predict_on_batch(x: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(x))

    return predict_on_batch, dim


def create_app(predict: Predict, dim: int) -> Any:
    from flask import Flask, Response, request

    from studioserve import wire
    from studioserve.errors import StudioServeError

    app = Flask("naive")

    @app.get("/readyz")
    def readyz() -> Response:
        return Response('{"status": "ready"}', mimetype="application/json")

    @app.post("/")
    def predict_route() -> Response:
        try:
            data, fmt = wire.decode_request(request.get_data(), request.headers.get("Content-Type"))
        except StudioServeError as e:
            return Response(wire.error_body(e.error_type, str(e)), e.http_status)
        out = {}
        for key, value in data.items():
            x = np.asarray(value, dtype=np.float32)
            single = x.ndim == 1
            y = predict(x[np.newaxis] if single else x)
            out[key] = y[0] if single else y
        payload, content_type = wire.encode_response(out, fmt)
        return Response(payload, 200, content_type=content_type)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["tiny", "mlp"], required=True)
    parser.add_argument("--modeldir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    predict, dim = (tiny_model if args.workload == "tiny" else mlp_model)(args.modeldir)
    for _ in range(3):  # warm up (Keras builds its predict function on the first call)
        predict(np.zeros((1, dim), np.float32))
    app = create_app(predict, dim)

    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = make_server(args.host, args.port, app, threaded=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"naive server listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
