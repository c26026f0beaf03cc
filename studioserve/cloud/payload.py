"""What a launch sends to the instance and runs there, as pure functions: the wrapper to
upload, the modeldir's frameworks (what to install), the modeldir's tar, the remote
``studio serve`` command line, and the commands that probe and stop the server."""

from __future__ import annotations

import logging
import secrets
import shlex
import tarfile
from pathlib import Path

from ..config import ServeConfig

logger = logging.getLogger(__name__)


def resolve_wrapper(wrapper: str | None) -> tuple[Path | None, str | None]:
    """``(local file to upload, name to pass through)`` for ``--wrapper``."""
    import importlib.util

    if not wrapper:
        return None, None
    path = Path(wrapper).expanduser()
    if path.is_file():
        return path.resolve(), None
    try:
        spec = importlib.util.find_spec(wrapper)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin), None
    logger.warning(
        "wrapper %r is not a local file or module; passing the name through: it must be "
        "importable on the instance",
        wrapper,
    )
    return None, wrapper


def model_families(modeldir: Path, framework: str | None = None) -> tuple[str, ...]:
    """The framework families of the modeldir's artifacts (what the instance must install)."""
    from ..models.artifacts import scan  # the detection table (stdlib only; models' package
    # __init__ imports numpy, so only when a launch needs it)

    found = scan(modeldir)
    if framework:
        found = [a for a in found if a.framework.name == framework]
    return tuple(sorted({a.framework.family for a in found}))


def serve_args(
    config: ServeConfig,
    *,
    remote_dir: str,
    port: int,
    wrapper_arg: str | None,
    bind_host: str,
    grpc_port: int | None = None,
) -> list[str]:
    """The remote ``studio serve`` command line (the token is a 0600 file, not an argument)."""
    defaults = ServeConfig(key=config.key)
    args = [
        f"{remote_dir}/venv/bin/studio",
        "serve",
        config.key,
        "--store",
        f"{remote_dir}/store",
        "--host",
        bind_host,
        "--port",
        str(port),
        "--killafter",
        f"{config.killafter:g}",
        "--token-file",
        f"{remote_dir}/token",
        "--max-batch-size",
        str(config.max_batch_size),
        "--max-delay-ms",
        f"{config.max_delay_ms:g}",
        "--quiet",
    ]
    if grpc_port is not None:
        args += ["--grpc-port", str(grpc_port)]
    if wrapper_arg:
        args += ["--wrapper", wrapper_arg]
    if config.max_body != defaults.max_body:
        args += ["--max-body", str(config.max_body)]
    if config.threads != defaults.threads:
        args += ["--threads", str(config.threads)]
    if config.request_timeout != defaults.request_timeout:
        args += ["--request-timeout", f"{config.request_timeout:g}"]
    if config.framework:
        args += ["--framework", config.framework]
    if config.trust_artifact:
        args.append("--trust-artifact")
    if config.verbose:
        args.append("--verbose")
    return args


def tar_modeldir(modeldir: Path, dest: Path) -> tuple[int, int]:
    """Write ``modeldir`` as ``modeldir/...`` into the tar file ``dest``; (files, bytes)."""
    count = size = 0
    with tarfile.open(dest, "w", dereference=True) as tar:
        tar.add(modeldir, arcname="modeldir", recursive=False)
        for path in sorted(modeldir.rglob("*")):
            tar.add(
                path, arcname=f"modeldir/{path.relative_to(modeldir).as_posix()}", recursive=False
            )
            if path.is_file():
                count += 1
                size += path.stat().st_size
    return count, size


def new_deployment_id() -> str:
    """A fresh deployment id: ``ss-`` and 8 hex digits."""
    return "ss-" + secrets.token_hex(4)


def http_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<token>") if secret else text


def stop_command(pid: int) -> str:
    group = f"-- -{pid}"
    return (
        f"kill -TERM {group} 2>/dev/null || kill -TERM {pid} 2>/dev/null; "
        f"for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 {group} 2>/dev/null || exit 0; "
        f"sleep 0.5; done; kill -KILL {group} 2>/dev/null; exit 0"
    )


def probe_command(python: str, url: str) -> str:
    """Prints the HTTP status of ``url`` as seen on the instance (or the error)."""
    code = (
        "import sys, urllib.request as u, urllib.error as e\n"
        "o = u.build_opener(u.ProxyHandler({}))\n"
        "try:\n"
        "    print(o.open(sys.argv[1], timeout=5).status)\n"
        "except e.HTTPError as x:\n"
        "    print(x.code)\n"
        "except Exception as x:\n"
        "    print('error', x)\n"
    )
    return f"{shlex.quote(python)} -c {shlex.quote(code)} {shlex.quote(url)}"
