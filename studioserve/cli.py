"""The ``studio`` command: a thin click layer over the library (the only module importing click).

Heavy imports (numpy, Flask, Keras, cloud SDKs) happen inside commands so ``studio --help``
answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .config import (
    DEFAULT_HOST,
    DEFAULT_KILLAFTER,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BODY,
    DEFAULT_PORT,
    ServeConfig,
    resolve_store_url,
)
from .errors import StudioServeError

if TYPE_CHECKING:
    from .lifecycle import ModelServer
    from .store import Store

logger = logging.getLogger("studioserve")


def configure_logging(verbose: bool) -> None:
    """Log to stderr: info by default, debug with --verbose; silence TensorFlow's chatter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    root = logging.getLogger("studioserve")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for noisy in ("absl", "tensorflow", "h5py", "granian", "waitress"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)


def _fail(e: StudioServeError) -> NoReturn:
    raise click.ClickException(str(e)) from e


def _store(url: str | None) -> Store:
    from .store import open_store

    try:
        return open_store(resolve_store_url(url))
    except StudioServeError as e:
        _fail(e)


store_option = click.option(
    "--store",
    metavar="URL",
    default=None,
    help="Experiment store: a folder, file://, s3://bucket/prefix or gs://bucket/prefix "
    "(default: $STUDIO_STORE, the config file's 'store', or ~/.studioml/experiments).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="studioserve", prog_name="studio")
def main() -> None:
    """studioserve: serve a trained experiment over HTTP with one command."""


# -- serve -------------------------------------------------------------------------------------


def _print_ready(server: ModelServer, *, cloud_hint: bool = False) -> None:
    service = server.service
    assert service is not None
    model = service.model
    click.echo(f"Serving experiment {server.config.key!r} at {server.url}")
    click.echo(f"  model: {model.kind} from {model.source}")
    ins = ", ".join(s.describe() for s in model.inputs) or "any (no signature)"
    outs = ", ".join(s.describe() for s in model.outputs) or "any"
    click.echo(f"  inputs:  {ins}")
    click.echo(f"  outputs: {outs}")
    if server.token:
        click.echo(f"  token: {server.token}  (send 'Authorization: Bearer <token>')")
    else:
        click.echo("  auth: off (loopback only)" if not server.config.no_auth else "  auth: off")
    if server.config.killafter > 0:
        click.echo(f"  shuts down after {server.config.killafter:g}s without an inference request")
    click.echo("Press Ctrl-C to stop.")


def _read_token(token: str | None, token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            value = token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise click.BadParameter(
                f"cannot read {token_file}: {e}", param_hint="--token-file"
            ) from e
        if not value:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--token-file")
        return value
    return token or os.environ.get("STUDIO_TOKEN") or None


@main.command()
@click.argument("key")
@click.option(
    "--wrapper",
    "-w",
    default=None,
    help="A wrapper .py file or module with create_model(modeldir).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port (0: any free port).",
)
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Address to bind; non-loopback turns on token auth.",
)
@click.option(
    "--killafter",
    type=click.FloatRange(min=0),
    default=DEFAULT_KILLAFTER,
    show_default=True,
    help="Seconds without an inference request before shutdown (0: never).",
)
@store_option
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH_SIZE,
    show_default=True,
    help="Most items per model call.",
)
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="How long a batch waits for more items after its first (0: never wait).",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BODY,
    show_default=True,
    help="Largest request body in bytes (larger: 413).",
)
@click.option(
    "--token",
    default=None,
    help="Bearer token to require (default: generated when auth is on; or $STUDIO_TOKEN).",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Read the bearer token from this file.",
)
@click.option("--no-auth", is_flag=True, help="Serve without a token even on a non-loopback host.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="HTTP worker threads.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0.001),
    default=60.0,
    show_default=True,
    help="Seconds a request may wait for its result (then 504).",
)
@click.option(
    "--http-server",
    type=click.Choice(["granian", "waitress"]),
    default="granian",
    show_default=True,
    help="The WSGI server.",
)
@click.option(
    "--refresh", is_flag=True, help="Fetch a remote experiment again, ignoring the local cache."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging (one line per request).")
@click.option(
    "--cloud",
    type=click.Choice(["ec2", "gcloud"]),
    default=None,
    help="Serve on a cloud instance that ends itself.",
)
@click.option(
    "--gpus", type=click.IntRange(min=0), default=None, help="GPUs for --cloud (0: a CPU instance)."
)
def serve(
    key: str,
    wrapper: str | None,
    port: int,
    host: str,
    killafter: float,
    store: str | None,
    max_batch_size: int,
    max_delay_ms: float,
    max_body: int,
    token: str | None,
    token_file: Path | None,
    no_auth: bool,
    threads: int,
    request_timeout: float,
    http_server: str,
    refresh: bool,
    quiet: bool,
    verbose: bool,
    cloud: str | None,
    gpus: int | None,
) -> None:
    """Serve experiment KEY's latest checkpoint (or --wrapper's model) over HTTP."""
    configure_logging(verbose)
    if cloud is None and gpus is not None:
        raise click.UsageError("--gpus needs --cloud ec2|gcloud")
    if cloud is not None:
        raise click.UsageError(
            f"--cloud {cloud} is not available yet in this version of studioserve; "
            "serve locally (without --cloud) for now"
        )
    from .lifecycle import serve as run_server
    from .store.base import validate_key

    try:
        validate_key(key)
        config = ServeConfig(
            key=key,
            store=store,
            wrapper=wrapper,
            host=host,
            port=port,
            killafter=killafter,
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            max_body=max_body,
            token=_read_token(token, token_file),
            no_auth=no_auth,
            threads=threads,
            request_timeout=request_timeout,
            refresh=refresh,
            quiet=quiet,
            verbose=verbose,
        )
        code = run_server(config, on_ready=_print_ready, http_server=http_server)
    except StudioServeError as e:
        _fail(e)
    sys.exit(code)


# -- experiments -------------------------------------------------------------------------------


@main.group()
def experiments() -> None:
    """Add, list, show and remove experiments in a store."""


@experiments.command("add")
@click.argument("key")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@store_option
@click.option("--description", default="", help="A note kept in experiment.json.")
@click.option("--framework", default="", help="e.g. keras (kept in experiment.json).")
@click.option("--force", is_flag=True, help="Replace an existing experiment with this key.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def experiments_add(
    key: str,
    directory: Path,
    store: str | None,
    description: str,
    framework: str,
    force: bool,
    quiet: bool,
) -> None:
    """Copy DIRECTORY into the store as experiment KEY's modeldir."""
    configure_logging(False)
    s = _store(store)
    try:
        s.add(key, directory, description=description, framework=framework, force=force)
    except StudioServeError as e:
        _fail(e)
    click.echo(f"added {key} to {s.url}")


@experiments.command("list")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiments_list(store: str | None, as_json: bool) -> None:
    """List the experiments in the store."""
    s = _store(store)
    try:
        infos = s.list()
    except StudioServeError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps([i.to_json() for i in infos], indent=2))
        return
    if not infos:
        click.echo(f"no experiments in {s.url}", err=True)
        return
    width = max(len(i.key) for i in infos)
    for i in infos:
        click.echo(f"{i.key:<{width}}  {i.created:<25}  {i.framework:<10}  {i.description}")


@experiments.command("show")
@click.argument("key")
@store_option
def experiments_show(key: str, store: str | None) -> None:
    """Show experiment KEY's metadata and files."""
    s = _store(store)
    try:
        info = s.info(key)
        files = s.files(key)
    except StudioServeError as e:
        _fail(e)
    out: dict[str, Any] = info.to_json()
    out["store"] = s.url
    out["files"] = [{"path": p, "size": n} for p, n in files]
    click.echo(json.dumps(out, indent=2))


@experiments.command("rm")
@click.argument("key")
@store_option
def experiments_rm(key: str, store: str | None) -> None:
    """Remove experiment KEY from the store."""
    s = _store(store)
    try:
        s.remove(key)
    except StudioServeError as e:
        _fail(e)
    click.echo(f"removed {key} from {s.url}")


# -- demo --------------------------------------------------------------------------------------


@main.command()
@click.option("--key", default="demo-mlp", show_default=True, help="Experiment key for the demo.")
@store_option
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--killafter", type=click.FloatRange(min=0), default=DEFAULT_KILLAFTER, show_default=True
)
@click.option("--no-serve", is_flag=True, help="Only add the demo experiment; do not serve it.")
@click.option("--verbose", "-v", is_flag=True)
def demo(
    key: str, store: str | None, port: int, killafter: float, no_serve: bool, verbose: bool
) -> None:
    """Build a small Keras model, add it to the store, and serve it."""
    configure_logging(verbose)
    from .demo import add_demo_experiment, client_snippet
    from .lifecycle import serve as run_server

    try:
        info = add_demo_experiment(key, store)
        click.echo(f"added demo experiment {info.key!r} to {resolve_store_url(store)}")
        if no_serve:
            return
        config = ServeConfig(key=key, store=store, port=port, killafter=killafter)

        def ready(server: ModelServer) -> None:
            _print_ready(server)
            click.echo("")
            click.echo(client_snippet(server.url))

        code = run_server(config, on_ready=ready)
    except StudioServeError as e:
        _fail(e)
    sys.exit(code)
