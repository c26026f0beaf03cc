"""What grpc.aio itself allows on this machine: a ModelInfer that answers fixed bytes.

No studioserve request path runs: the server (grpc.aio on uvloop, one process, as in
``studio serve --grpc-port``) registers ``inference.GRPCInferenceService/ModelInfer`` without
a deserializer and answers every call with one prepared ``ModelInferResponse`` (one FP32
[1, 16] output, the tiny workload's shape). bench_grpc.py drives it with the same load
generator as the real servers, so its gRPC rows are read against this floor.

Usage (bench_grpc.py starts it itself)::

    .venv/bin/python bench/grpc_floor.py [--port 0]   # prints "floor at HOST:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studioserve.grpcapi.proto import grpc_service_pb2 as pb  # noqa: E402
from studioserve.http.servers import new_event_loop  # noqa: E402

SERVICE = "inference.GRPCInferenceService"


def tiny_request() -> bytes:
    """A ModelInferRequest for the tiny workload (what the floor is driven with)."""
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    data: bytes = req.SerializeToString()
    return data


def _response() -> bytes:
    resp = pb.ModelInferResponse(model_name="tiny", model_version="1")
    resp.outputs.add(name="y", datatype="FP32", shape=[1, 16])
    resp.raw_output_contents.append(np.zeros((1, 16), np.float32).tobytes())
    data: bytes = resp.SerializeToString()
    return data


async def serve(port: int) -> None:
    import grpc
    from grpc import aio

    answer = _response()

    async def infer(raw: bytes, context: Any) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"floor at 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.port))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
