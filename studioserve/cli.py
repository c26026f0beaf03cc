"""The ``studio`` command: a thin click layer over the library (the only module importing click).

Heavy imports (numpy, Flask, Keras, cloud SDKs) happen inside commands so ``studio --help``
answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .config import ServeConfig, resolve_store_url
from .errors import StudioServeError

if TYPE_CHECKING:
    from .cloud import CloudOptions
    from .cloud import Overrides as CloudOverrides
    from .rayserve.backend import RayBackend
    from .runtime import ModelServer
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


# -- the one error exit ------------------------------------------------------------------------


@contextmanager
def _library_errors() -> Iterator[None]:
    """A :class:`StudioServeError` becomes click's one-line ``Error: ...`` on stderr, exit 1."""
    try:
        yield
    except StudioServeError as e:
        raise click.ClickException(str(e)) from e


class StudioCommand(click.Command):
    """A command whose library errors end the program with one line (see _library_errors)."""

    def invoke(self, ctx: click.Context) -> Any:
        with _library_errors():
            return super().invoke(ctx)


class StudioGroup(click.Group):
    """A group like StudioCommand whose subcommands and subgroups are StudioCommand/Group."""

    command_class = StudioCommand
    group_class = type  # subgroups are StudioGroups too

    def invoke(self, ctx: click.Context) -> Any:
        with _library_errors():
            return super().invoke(ctx)


_SERVE_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(ServeConfig)
    if f.default is not dataclasses.MISSING
}


def _default(name: str) -> Any:
    """ServeConfig's default for field ``name``: the one source of the serving options' defaults."""
    return _SERVE_DEFAULTS[name]


def _store(url: str | None) -> Store:
    from .store import open_store

    return open_store(resolve_store_url(url))


store_option = click.option(
    "--store",
    metavar="URL",
    default=None,
    help="Experiment store: a folder, file://, s3://bucket/prefix or gs://bucket/prefix "
    "(default: $STUDIO_STORE, the config file's 'store', or ~/.studioml/experiments).",
)


@click.group(cls=StudioGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="studioserve", prog_name="studio")
def main() -> None:
    """studioserve: serve a trained experiment over HTTP with one command."""


# -- serve -------------------------------------------------------------------------------------


def _print_ready(server: ModelServer, *, token_shown: bool = True) -> None:
    service = server.service
    assert service is not None
    entries = service.repository.models()
    if len(entries) == 1:
        click.echo(f"Serving experiment {entries[0].name!r} at {server.url}")
    else:
        click.echo(f"Serving {len(entries)} models at {server.url}")
    for entry in entries:
        latest = entry.latest
        if latest is None:
            click.echo(f"  {entry.name}: not loaded ({entry.reason})")
            continue
        model = latest.model
        if len(entries) > 1:
            click.echo(f"  {entry.name}: {server.url}/models/{entry.name}")
            prefix = "    "
        else:
            prefix = "  "
        versions = ", ".join(str(v) for v in entry.versions)
        click.echo(f"{prefix}model: {model.kind} from {model.source} (version {versions})")
        ins = ", ".join(s.describe() for s in model.inputs) or "any (no signature)"
        outs = ", ".join(s.describe() for s in model.outputs) or "any"
        click.echo(f"{prefix}inputs:  {ins}")
        click.echo(f"{prefix}outputs: {outs}")
    if server.grpc_address is not None:
        click.echo(f"  gRPC (KServe v2): {server.grpc_address}")
    if server.config.watch is not None:
        click.echo(f"  watching the store every {server.config.watch:g}s for new checkpoints")
    if server.token and token_shown:
        click.echo(f"  token: {server.token}  (send 'Authorization: Bearer <token>')")
    elif server.token:
        click.echo("  token: the one in --token-file (send 'Authorization: Bearer <token>')")
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class CloudArgs:
    """``studio serve``'s --cloud and the options that only mean something with it.

    Each field is the option of the same name (``instance_type``: ``--instance-type``); None
    means not given, so :class:`~studioserve.cloud.CloudOptions` keeps its own default.
    """

    cloud: str | None = None
    gpus: int | None = None
    instance_type: str | None = None
    machine_type: str | None = None
    accelerator: str | None = None
    region: str | None = None
    subnet: str | None = None
    zone: str | None = None
    project: str | None = None
    image: str | None = None
    allow_cidr: str | None = None
    max_lifetime: float | None = None
    ssh_user: str | None = None
    disk_gb: int | None = None
    provisioning_model: str | None = None
    service_account: str | None = None
    allow_cpu_fallback: bool | None = None
    dry_run: bool | None = None

    def __post_init__(self) -> None:
        given = [
            "--" + name.replace("_", "-")
            for name, value in self._cloud_only().items()
            if value is not None
        ]
        if self.cloud is None and given:
            raise click.UsageError(f"{', '.join(given)} need(s) --cloud ec2|gcloud")

    def _cloud_only(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["cloud"]
        return values

    def options(self) -> CloudOptions:
        """The library's CloudOptions (which checks them, e.g. --subnet only with ec2)."""
        from .cloud import CloudOptions

        assert self.cloud is not None
        given = {name: value for name, value in self._cloud_only().items() if value is not None}
        given.pop("dry_run", None)
        return CloudOptions(cloud=self.cloud, **{"gpus": 1, **given})


_CLOUD_OPTIONS = (
    click.option(
        "--cloud",
        type=click.Choice(["ec2", "gcloud"]),
        default=None,
        help="Serve on a cloud instance that ends itself.",
    ),
    click.option(
        "--gpus",
        type=click.IntRange(min=0),
        default=None,
        help="GPUs for --cloud (0: a CPU instance; default 1).",
    ),
    click.option(
        "--instance-type",
        default=None,
        help="EC2 instance type, or a comma-separated list tried in order when EC2 has no "
        "capacity (g6.xlarge,g5.xlarge); overrides --gpus.",
    ),
    click.option("--machine-type", default=None, help="GCE machine type (overrides --gpus)."),
    click.option(
        "--accelerator",
        default=None,
        help="GPU model: a GCE accelerator type, or an EC2 family hint "
        "(l4, a10g, l40s, a100, h100).",
    ),
    click.option("--region", default=None, help="EC2 region."),
    click.option(
        "--subnet",
        default=None,
        help="EC2 subnet id to launch in (default: the region's default VPC).",
    ),
    click.option("--zone", default=None, help="GCE zone."),
    click.option("--project", default=None, help="GCE project."),
    click.option(
        "--image",
        default=None,
        help="Machine image (AMI id, ssm:/PARAM, or a GCE image/family URL) instead of the lookup.",
    ),
    click.option(
        "--allow-cidr",
        default=None,
        help="Who may reach the port and SSH (default: your own public address as a /32).",
    ),
    click.option(
        "--max-lifetime",
        type=click.FloatRange(min=60),
        default=None,
        help="Seconds after which the instance ends whatever happens (default 86400).",
    ),
    click.option("--ssh-user", default=None, help="Login user on the instance."),
    click.option(
        "--disk-gb",
        type=click.IntRange(min=10),
        default=None,
        help="Boot disk size at least, in GB (default 100; a larger image's size wins).",
    ),
    click.option(
        "--provisioning-model",
        type=click.Choice(["standard", "spot", "flex-start"]),
        default=None,
        help="GCE: on demand (standard, the default), spot or flex-start; some GPU shapes "
        "are sold only as spot or flex-start.",
    ),
    click.option(
        "--service-account",
        default=None,
        help="GCE: the account the instance deletes itself with: default (the project's "
        "compute account, broad rights), create (a dedicated account that may only delete "
        "studioserve's instances and firewall rules), an email, or none.",
    ),
    click.option(
        "--allow-cpu-fallback",
        is_flag=True,
        default=None,
        help="On a GPU instance, serve (with a warning) even when the framework sees no GPU.",
    ),
    click.option(
        "--dry-run",
        is_flag=True,
        default=None,
        help="Print what --cloud would create (type, image, price, firewall, backstops) and "
        "create nothing.",
    ),
)
_CLOUD_FIELDS = tuple(f.name for f in dataclasses.fields(CloudArgs))


def cloud_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --cloud and the cloud-only options; ``f`` gets them as one ``cloud: CloudArgs``."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backend") == "ray":  # --gpus is each Ray replica's
            if kwargs.get("cloud") is not None:
                raise click.UsageError("--cloud and --backend ray do not go together")
            kwargs["ray_gpus"] = kwargs.pop("gpus")
            kwargs["gpus"] = None
        cloud = CloudArgs(**{name: kwargs.pop(name) for name in _CLOUD_FIELDS})
        return f(*args, cloud=cloud, **kwargs)

    for option in reversed(_CLOUD_OPTIONS):  # click lists options top-down as decorated
        wrapper = option(wrapper)
    return wrapper


@main.command()
@click.argument("keys", nargs=-1, metavar="KEY[@VERSION]...")
@click.option(
    "--all",
    "all_models",
    is_flag=True,
    help="Serve every experiment in the store (with --watch: new ones appear, removed ones go).",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    is_flag=False,
    flag_value=5.0,
    default=None,
    metavar="[SECONDS]",
    help="Poll the store every SECONDS (default 5) and hot-reload new checkpoints with no "
    "failed request.",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=None,
    help="Copies of each model's batched stage fed by one queue (default: serving.toml, else "
    "1; on a GPU machine spread over the GPUs).",
)
@click.option(
    "--version-policy",
    default=None,
    help="Versions to serve for every model: latest, latest:N, all or specific:1,3 "
    "(default: serving.toml, else latest). KEY@V pins one model's version.",
)
@click.option(
    "--wrapper",
    "-w",
    default=None,
    help="A wrapper .py file or module with create_model(modeldir).",
)
@click.option(
    "--framework",
    default=None,
    help="Load only this framework's model from modeldir when it holds several (keras, "
    "savedmodel, torchscript, torch_export, onnx, sklearn, xgboost, lightgbm, closure, spark, "
    "...; default: what modeldir holds).",
)
@click.option(
    "--trust-artifact",
    is_flag=True,
    help="Load formats that run code when they load (pickle, joblib, cloudpickle closures, "
    "pickled torch modules). Only for files you made or trust.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=_default("port"),
    show_default=True,
    help="TCP port (0: any free port).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve the Open Inference Protocol over gRPC (KServe v2, tritonclient.grpc) on "
    "this port (Triton uses 8001; 0: any free port). Needs the grpc extra.",
)
@click.option(
    "--host",
    default=_default("host"),
    show_default=True,
    help="Address to bind; non-loopback turns on token auth.",
)
@click.option(
    "--killafter",
    type=click.FloatRange(min=0),
    default=_default("killafter"),
    show_default=True,
    help="Seconds without an inference request before shutdown (0: never).",
)
@store_option
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=_default("max_batch_size"),
    show_default=True,
    help="Most items per model call.",
)
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=_default("max_delay_ms"),
    show_default=True,
    help="How long a batch waits for more items after its first (0: never wait).",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1),
    default=_default("max_body"),
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
    default=_default("threads"),
    show_default=True,
    help="threads for the status page, probes, management routes and models without a pipe "
    "(every request on waitress); with several models and no --threads: 16 per model, 32 to "
    "128. Requests to batching models wait on the event loop, holding none.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0.001),
    default=_default("request_timeout"),
    show_default=True,
    help="Seconds a request may wait for its result (then 504).",
)
@click.option(
    "--max-keys",
    type=click.IntRange(min=1),
    default=_default("max_keys"),
    show_default=True,
    help="Most dict keys a request may hold in all (JSON members, pickled dicts, npz members; "
    "OIP: inputs and outputs); more is 413.",
)
@click.option(
    "--max-queue-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=_default("max_queue_ms"),
    show_default="auto",
    help="Shed load: answer 503 + Retry-After at once when the work queued ahead of a request "
    "would keep it waiting longer than this (default: a quarter of --request-timeout, at most "
    "1000). Requests that hold a thread (models without a pipe; all on waitress) are also capped "
    "at --threads minus an eighth.",
)
@click.option(
    "--http-server",
    type=click.Choice(["granian", "waitress"]),
    default=_default("http_server"),
    show_default=True,
    help="The WSGI server.",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default=_default("backend"),
    show_default=True,
    help="local: this process serves; ray: a Ray Serve application on a Ray cluster (a local "
    "one unless --ray-address), the same routes behind Ray's HTTP proxy on --host/--port.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="With --backend ray: replicas per model (default: --instances, serving.toml, else 1).",
)
@click.option(
    "--autoscale",
    default=None,
    metavar="MIN:MAX",
    help="With --backend ray: let Ray scale each model between MIN and MAX replicas on its "
    "queue length.",
)
@click.option(
    "--ray-address",
    default=None,
    help="With --backend ray: the cluster to join (auto, ray://HOST:10001); default: start a "
    "local Ray instance for as long as it serves.",
)
@click.option(
    "--refresh", is_flag=True, help="Fetch a remote experiment again, ignoring the local cache."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging (one line per request).")
@cloud_options
def serve(
    keys: tuple[str, ...],
    token: str | None,
    token_file: Path | None,
    cloud: CloudArgs,
    ray_gpus: int | None = None,
    **settings: Any,
) -> None:
    """Serve experiment KEY's latest checkpoint (or --wrapper's model) over HTTP.

    Several KEYs (or --all) serve several models, each at /models/KEY and /v2/models/KEY;
    KEY@V pins version V. With --cloud ec2|gcloud it runs on a new cloud instance that
    deletes itself after --killafter seconds without inference requests (and at
    --max-lifetime at the latest).
    """
    # every option but --token-file and the cloud ones is named after its ServeConfig field
    configure_logging(settings["verbose"])
    from .runtime import serve as run_server
    from .store import validate_key

    if not keys and not settings["all_models"]:
        raise click.UsageError("name the experiment(s) to serve (KEY [KEY ...]) or pass --all")
    for spec in keys:
        validate_key(spec.partition("@")[0])
    ctx = click.get_current_context()
    explicit = frozenset(
        name
        for name in settings
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    )
    if settings["autoscale"] is not None:
        from .rayserve.options import parse_autoscale

        settings["autoscale"] = parse_autoscale(settings["autoscale"])
    if settings["version_policy"] is not None:
        from .model_config import parse_version_policy

        parse_version_policy(settings["version_policy"], source="--version-policy")
    config = ServeConfig(
        keys=keys, token=_read_token(token, token_file), explicit=explicit, **settings
    )
    if cloud.cloud is not None:
        if len(config.keys) != 1 or config.all_models:
            raise click.UsageError("--cloud serves one experiment: name exactly one KEY")
        overrides = ctx.obj.get("cloud_overrides") if isinstance(ctx.obj, dict) else None
        _serve_on_cloud(config, cloud.options(), overrides=overrides, dry_run=bool(cloud.dry_run))
        return
    if config.backend == "ray":
        from .rayserve import RayOptions, serve_on_ray

        options = RayOptions.from_config(config, gpus=float(ray_gpus or 0))
        sys.exit(
            serve_on_ray(
                config,
                options,
                on_ready=lambda backend: _print_ray_ready(backend, token_file is None),
            )
        )
    code = run_server(
        config,
        on_ready=lambda server: _print_ready(server, token_shown=token_file is None),
        http_server=config.http_server,
    )
    sys.exit(code)


def _print_ray_ready(backend: RayBackend, token_shown: bool) -> None:
    keys = backend.keys
    where = "Ray Serve" + (f" at {backend.options.address}" if backend.options.address else "")
    if len(keys) == 1:
        click.echo(f"Serving experiment {keys[0]!r} on {where} at {backend.url}")
    else:
        click.echo(f"Serving {len(keys)} models on {where} at {backend.url}")
        for key in keys:
            click.echo(f"  {key}: {backend.url}/models/{key}")
    click.echo(f"  application: {backend.app_name} (see 'studio ray status')")
    if backend.token and token_shown:
        click.echo(f"  token: {backend.token}  (send 'Authorization: Bearer <token>')")
    elif backend.token:
        click.echo("  token: the one in --token-file (send 'Authorization: Bearer <token>')")


def _serve_on_cloud(
    config: ServeConfig,
    options: CloudOptions,
    *,
    overrides: CloudOverrides | None = None,
    dry_run: bool = False,
) -> None:
    """Fetch the modeldir here (options are checked already), deploy it, say where it is.

    ``overrides`` come from the click context's ``obj["cloud_overrides"]`` (tests pass them).
    """
    from .cloud import deploy, plan_deployment

    with _store(config.store) as store:
        modeldir = store.fetch(config.key, refresh=config.refresh, quiet=config.quiet)
    if dry_run:
        plan = plan_deployment(config, modeldir, options, overrides=overrides)
        click.echo("\n".join(plan.lines()))
        return
    click.echo(f"Launching {config.key!r} on {options.cloud}...", err=True)
    dep = deploy(config, modeldir, options, overrides=overrides)
    click.echo(f"Serving experiment {config.key!r} at {dep.url}")
    if dep.grpc_address is not None:
        click.echo(f"  gRPC (KServe v2): {dep.grpc_address}")
    gpu = f", GPU: {dep.gpu}" if dep.gpu else ", no GPU"
    click.echo(
        f"  instance: {dep.instance_id} ({dep.instance_type}{gpu}) in {dep.zone or dep.region}"
    )
    click.echo(f"  token: {dep.token}  (send 'Authorization: Bearer <token>')")
    if dep.killafter > 0:
        click.echo(f"  ends after {dep.killafter:g}s without an inference request")
    click.echo(f"  ends at the latest at {dep.expires_at.isoformat()} (--max-lifetime)")
    click.echo(f"  stop it now with: studio instances stop {dep.id}")


# -- instances ---------------------------------------------------------------------------------


@main.group()
def instances() -> None:
    """List and stop the cloud instances studioserve started."""


@instances.command("list")
@click.option("--cloud", type=click.Choice(["ec2", "gcloud"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def instances_list(cloud: str | None, as_json: bool) -> None:
    """What studioserve started: id, cloud, where, URL, age, expiry (ended ones are cleaned up)."""
    configure_logging(False)
    from .cloud import list_instances

    records = list_instances(cloud)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in records], indent=2, default=str))
        return
    if not records:
        click.echo("no studioserve instances", err=True)
        return
    click.echo(f"{'ID':<14} {'CLOUD':<7} {'STATE':<10} {'WHERE':<16} {'AGE':<10} EXPIRES / URL")
    for r in records:
        age = str(r.age).split(".")[0]
        click.echo(
            f"{r.id:<14} {r.cloud:<7} {r.state:<10} {r.location:<16} {age:<10} "
            f"{r.expires_at} {r.url}"
        )


@instances.command("stop")
@click.argument("ids", nargs=-1)
@click.option("--all", "stop_all", is_flag=True, help="Stop every instance studioserve started.")
def instances_stop(ids: tuple[str, ...], stop_all: bool) -> None:
    """Delete instances (and their firewall rules and keys) by id, or --all."""
    configure_logging(False)
    if not ids and not stop_all:
        raise click.UsageError("name instance ids (see 'studio instances list') or pass --all")
    from .cloud import stop_instances

    for line in stop_instances(list(ids) or None, all=stop_all):
        click.echo(line)


# -- ray ---------------------------------------------------------------------------------------


@main.group("ray")
def ray_group() -> None:
    """See and stop the studioserve applications on a Ray cluster (--backend ray)."""


_ADDRESS = click.option(
    "--address",
    default="auto",
    show_default=True,
    help="The Ray cluster (auto: the one this machine runs or $RAY_ADDRESS; ray://HOST:10001).",
)


@ray_group.command("status")
@_ADDRESS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ray_status_command(address: str, as_json: bool) -> None:
    """List the studioserve applications on the cluster: models, replicas, URL."""
    configure_logging(False)
    from .rayserve import ray_status

    apps = ray_status(address)
    if as_json:
        click.echo(json.dumps(apps, indent=2))
        return
    if not apps:
        click.echo("no studioserve application on this Ray cluster", err=True)
        return
    for app in apps:
        click.echo(f"{app['name']}: {app['status']} at {app['url']}")
        for key, model in app["models"].items():
            replicas = ", ".join(f"{n} {state}" for state, n in model["replicas"].items())
            click.echo(f"  {key}: {model['status']} ({replicas or 'no replica'})")


@ray_group.command("stop")
@click.argument("names", nargs=-1)
@_ADDRESS
def ray_stop_command(names: tuple[str, ...], address: str) -> None:
    """Delete studioserve applications by name (all of them when none is named)."""
    configure_logging(False)
    from .rayserve import ray_stop

    for line in ray_stop(list(names), address):
        click.echo(line)


# -- experiments -------------------------------------------------------------------------------


@main.group()
def experiments() -> None:
    """Add, list, show and remove experiments in a store."""


@experiments.command("add")
@click.argument("key")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@store_option
@click.option("--description", default="", help="A note kept in experiment.json.")
@click.option(
    "--framework",
    default="",
    help="e.g. keras (kept in experiment.json; default: detected from DIRECTORY's files).",
)
@click.option("--force", is_flag=True, help="Replace an existing experiment with this key.")
@click.option(
    "--serving-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A serving.toml to keep beside the modeldir (batching, versions, instances, ensembles).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def experiments_add(
    key: str,
    directory: Path,
    store: str | None,
    description: str,
    framework: str,
    force: bool,
    serving_config: Path | None,
    quiet: bool,
) -> None:
    """Copy DIRECTORY into the store as experiment KEY's modeldir."""
    configure_logging(False)
    if serving_config is not None:  # refuse a broken file before anything is copied
        from .model_config import ModelConfig

        ModelConfig.from_toml(serving_config.read_bytes(), source=str(serving_config))
    if not framework:
        framework = _detect_framework(directory)
    with _store(store) as s:
        s.add(
            key,
            directory,
            description=description,
            framework=framework,
            force=force,
            quiet=quiet,
            serving_config=serving_config,
        )
    click.echo(f"added {key} to {s.url}")


def _detect_framework(directory: Path) -> str:
    """The framework of the newest model artifact in ``directory`` ("" for none or several)."""
    from .errors import ModelLoadError
    from .models.artifacts import choose, scan

    try:
        found = choose(scan(directory), where=directory)
    except ModelLoadError as e:
        click.echo(f"warning: {e}", err=True)
        return ""
    return found[-1].framework.name if found else ""


@experiments.command("list")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiments_list(store: str | None, as_json: bool) -> None:
    """List the experiments in the store."""
    with _store(store) as s:
        infos = s.list()
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
    with _store(store) as s:
        info = s.info(key)
        files = s.files(key)
    out: dict[str, Any] = info.to_json()
    out["store"] = s.url
    out["files"] = [{"path": p, "size": n} for p, n in files]
    click.echo(json.dumps(out, indent=2))


@experiments.command("rm")
@click.argument("key")
@store_option
def experiments_rm(key: str, store: str | None) -> None:
    """Remove experiment KEY from the store."""
    with _store(store) as s:
        s.remove(key)
    click.echo(f"removed {key} from {s.url}")


# -- demo --------------------------------------------------------------------------------------


@main.command()
@click.option("--key", default="demo-mlp", show_default=True, help="Experiment key for the demo.")
@store_option
@click.option("--port", type=click.IntRange(0, 65535), default=_default("port"), show_default=True)
@click.option(
    "--killafter", type=click.FloatRange(min=0), default=_default("killafter"), show_default=True
)
@click.option("--no-serve", is_flag=True, help="Only add the demo experiment; do not serve it.")
@click.option(
    "--framework",
    type=click.Choice(
        ["keras", "torch", "onnx", "sklearn", "xgboost", "lightgbm", "closure", "spark"]
    ),
    default="keras",
    show_default=True,
    help="The framework of the demo model (each needs its extra, e.g. studioserve[torch]).",
)
@click.option("--verbose", "-v", is_flag=True)
def demo(
    key: str,
    store: str | None,
    port: int,
    killafter: float,
    no_serve: bool,
    framework: str,
    verbose: bool,
) -> None:
    """Build a small model (Keras, or --framework's), add it to the store, and serve it."""
    configure_logging(verbose)
    from .demo import add_demo_experiment, client_snippet
    from .runtime import serve as run_server

    info = add_demo_experiment(key, store, framework=framework)
    click.echo(
        f"added demo experiment {info.key!r} ({info.framework}) to {resolve_store_url(store)}"
    )
    if no_serve:
        return
    # the demo's closure is the file it just wrote: trusting it is trusting this command
    config = ServeConfig(
        key=key,
        store=store,
        port=port,
        killafter=killafter,
        trust_artifact=framework == "closure",
    )

    def ready(server: ModelServer) -> None:
        _print_ready(server)
        click.echo("")
        click.echo(client_snippet(server.url))

    code = run_server(config, on_ready=ready)
    sys.exit(code)


# -- bench -------------------------------------------------------------------------------------


def _levels(kind: type[int] | type[float]) -> Any:
    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        from .loadgen import parse_levels

        try:
            return parse_levels(value, kind)
        except ValueError as e:
            raise click.BadParameter(f"{value!r}: {e}; give numbers like 1,8,64") from e

    return convert


def _header(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    out = []
    for h in value:
        name, sep, val = h.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{h!r} is not 'Name: value'")
        out.append((name.strip(), val.strip()))
    return tuple(out)


@main.command()
@click.argument("url")
@click.option(
    "--concurrency",
    "-c",
    default="1,8,64",
    show_default=True,
    callback=_levels(int),
    help="Closed-loop levels: connections sending back to back, comma-separated.",
)
@click.option(
    "--request-rate",
    "-r",
    default=None,
    callback=_levels(float),
    help="Open-loop levels in requests/s, comma-separated (instead of --concurrency).",
)
@click.option(
    "--duration",
    "-d",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds per level.",
)
@click.option(
    "--requests", "-n", type=click.IntRange(min=1), default=None, help="Requests per level."
)
@click.option(
    "--protocol",
    "-p",
    type=click.Choice(["pickle", "oip", "grpc"]),
    default="pickle",
    show_default=True,
    help="POST / with a pickle, the Open Inference Protocol's infer, or its gRPC ModelInfer "
    "(URL: host:port of --grpc-port; needs the grpc extra).",
)
@click.option(
    "--body",
    "body_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Send this file as the request body instead of one built from the signature.",
)
@click.option("--content-type", default=None, help="The --body file's Content-Type.")
@click.option(
    "--header", "-H", multiple=True, callback=_header, help="An extra header 'Name: value'."
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Examples per synthesised request.",
)
@click.option(
    "--json-tensors", is_flag=True, help="OIP: send tensors as JSON lists, not binary data."
)
@click.option(
    "--model", default=None, help="OIP/gRPC model name (default: the server's experiment)."
)
@click.option("--token", default=None, help="Bearer token (default: $STUDIO_TOKEN).")
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds of discarded load before each level.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="Load generator processes (default: CPU count, at most 4).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds before a request counts as an error.",
)
@click.option(
    "--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a CSV."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw a PNG (needs matplotlib).",
)
@click.option("--verbose", "-v", is_flag=True)
def bench(
    url: str,
    concurrency: tuple[int, ...],
    request_rate: tuple[float, ...] | None,
    duration: float,
    requests: int | None,
    protocol: str,
    body_file: Path | None,
    content_type: str | None,
    header: tuple[tuple[str, str], ...],
    batch: int,
    json_tensors: bool,
    model: str | None,
    token: str | None,
    warmup: float,
    processes: int | None,
    timeout: float,
    csv_path: Path | None,
    plot_path: Path | None,
    verbose: bool,
) -> None:
    """Measure throughput and latency of the server at URL, per load level."""
    configure_logging(verbose)
    from .loadgen import BenchConfig, is_tty, run_bench

    config = BenchConfig(
        url=url,
        concurrency=concurrency,
        request_rates=request_rate or (),
        duration=duration,
        requests=requests,
        protocol=protocol,
        body_file=body_file,
        content_type=content_type,
        headers=header,
        batch=batch,
        binary=not json_tensors,
        model=model,
        token=token or os.environ.get("STUDIO_TOKEN") or None,
        warmup=warmup,
        processes=processes,
        timeout=timeout,
    )
    result = run_bench(config, progress=sys.stderr if is_tty(sys.stderr) else None)
    click.echo(result.table())
    if csv_path is not None:
        result.write_csv(csv_path)
        click.echo(f"wrote {csv_path}")
    if plot_path is not None:
        result.plot(plot_path)
        click.echo(f"wrote {plot_path}")
