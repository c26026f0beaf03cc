"""What Ray Serve itself allows on this machine: a deployment that only echoes the body.

No studioserve code runs: Ray's HTTP proxy hands a 100-byte POST body to one deployment
("one hop"), or to a front deployment that passes it to a second one through a handle ("two
hops", the shape of ``studio serve --backend ray``: proxy, ingress, model replica). wrk drives
each at the given connections; access logs are off. bench_ray.py's Ray rows are read against
these figures.

Usage::

    .venv/bin/python bench/ray_floor.py               # c1 and c8, 6 s each
    .venv/bin/python bench/ray_floor.py --levels 1,8,64 --duration 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import free_port, parse_wrk, table  # noqa: E402

HERE = Path(__file__).resolve().parent
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8", help="wrk connection counts")
    p.add_argument("--duration", type=int, default=6, help="seconds of wrk per point")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(max_ongoing_requests=256, logging_config=QUIET)
    class Echo:
        async def __call__(self, body: bytes) -> bytes:
            return body

    @serve.deployment(max_ongoing_requests=256, logging_config=QUIET)
    class Front:
        def __init__(self, echo: Any, hop: bool) -> None:
            self.echo, self.hop = echo, hop

        async def __call__(self, request: Any) -> Response:
            body = await request.body()
            if self.hop:
                body = await self.echo.remote(body)
            return Response(body)

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(b"x" * 100)
        env = dict(os.environ, WRK_BODY=str(body), WRK_CONTENT_TYPE="application/octet-stream")
        try:
            for hop in (False, True):
                serve.run(Front.bind(Echo.bind(), hop), name="floor", route_prefix="/")
                for c in [int(x) for x in args.levels.split(",") if x]:
                    out = subprocess.run(
                        ["wrk", "-t1", f"-c{c}", f"-d{args.duration}s", "--latency"]
                        + ["-s", str(HERE / "wrk_post.lua"), f"http://127.0.0.1:{port}/"],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    r = parse_wrk(out)
                    rows.append(
                        [
                            "two hops" if hop else "one hop",
                            str(c),
                            f"{r.req_per_s:.0f}",
                            f"{r.p50_ms:.2f} / {r.p99_ms:.2f}",
                        ]
                    )
                serve.delete("floor")
        finally:
            serve.shutdown()
            ray.shutdown()
    print(table(["Ray Serve echo", "conns", "req/s", "p50 / p99 ms"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
