"""What Compute Engine sells and accepts, known without asking it: the pure tables and
checks behind :mod:`.gce` (which makes the API calls), so this module imports no google
package.

* Machines: the accelerator-optimized types and the GPUs built into them
  (:data:`BUILT_IN_GPUS`, :data:`OTHER_BUILT_IN`), the N1 types GPUs are attached to
  (:data:`N1_ATTACHED`, :data:`N1_ACCELERATORS`), :func:`choose_machine` for ``--gpus`` /
  ``--accelerator`` / ``--machine-type``, and the GPU's description (:func:`gpu_description`).
* What is sold how: the API's provisioning models (:data:`API_PROVISIONING`, what the plan
  notes about them: :data:`PROVISIONING_NOTES`), the shapes not sold on demand
  (:data:`NOT_ON_DEMAND`: a3-highgpu-1g/2g/4g, Spot or Flex-start only; :func:`check_sold`),
  the run limits (:func:`check_run_duration`: 30 s to 120 days, flex-start at most 7 days)
  and the host maintenance policy (:func:`host_maintenance`).
* Approximate us-central1 on-demand prices (:func:`price_per_hour`, :func:`price_note`).
* Images and disks: the default images, image URLs (:func:`parse_image`, :class:`ImageDetails`)
  and the boot disk type (:func:`disk_type_for`).
* Texts: the hints added to API errors (:func:`error_hint`, :data:`CREDENTIALS_HINT`,
  :data:`FORBIDDEN_HINT`), what an instance's status means (:data:`INSTANCE_STATES`), and
  durations for people (:func:`format_duration`).

These are assumptions from Compute Engine's documentation and price pages at the time of
writing; they change without notice.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from ..errors import ConfigError
from .base import GCE_MAX_RUN_DURATION, GCE_MIN_RUN_DURATION

#: logs under the provider's name (what :func:`choose_machine` says belongs to a GCE launch)
logger = logging.getLogger("studioserve.cloud.gce")

#: the zone when ``--zone`` is not given (the prices below are for its region)
DEFAULT_ZONE = "us-central1-a"
#: the image families a launch boots by default: with GPUs (NVIDIA driver and CUDA), without
GPU_IMAGE = (
    "projects/deeplearning-platform-release/global/images/family/"
    "common-cu129-ubuntu-2404-nvidia-580"
)
CPU_IMAGE = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"
#: the machine type without GPUs, and the GPU when ``--gpus`` names no ``--accelerator``
CPU_MACHINE_TYPE = "n2-standard-4"
DEFAULT_ACCELERATOR = "nvidia-l4"
#: the longest run a flex-start VM may have (the flex-start docs: up to seven days)
FLEX_START_MAX_RUN_DURATION = 7 * 24 * 3600.0
#: the API's provisioning models for ``--provisioning-model``
API_PROVISIONING = {"standard": "STANDARD", "spot": "SPOT", "flex-start": "FLEX_START"}

#: what the plan notes about a provisioning model other than on demand
PROVISIONING_NOTES = {
    "spot": "Spot: Compute Engine may preempt it at any time; preemption deletes it",
    "flex-start": (
        "flex-start: the launch fails with a capacity error when the zone has none "
        "(try another --zone); at most 7 days of run time"
    ),
}

#: accelerator-optimized families: the GPUs come with the machine type
BUILT_IN_GPUS: dict[str, dict[int, str]] = {
    "nvidia-l4": {
        1: "g2-standard-4",
        2: "g2-standard-24",
        4: "g2-standard-48",
        8: "g2-standard-96",
    },
    "nvidia-tesla-a100": {
        1: "a2-highgpu-1g",
        2: "a2-highgpu-2g",
        4: "a2-highgpu-4g",
        8: "a2-highgpu-8g",
        16: "a2-megagpu-16g",
    },
    "nvidia-a100-80gb": {
        1: "a2-ultragpu-1g",
        2: "a2-ultragpu-2g",
        4: "a2-ultragpu-4g",
        8: "a2-ultragpu-8g",
    },
    "nvidia-h100-80gb": {
        1: "a3-highgpu-1g",
        2: "a3-highgpu-2g",
        4: "a3-highgpu-4g",
        8: "a3-highgpu-8g",
    },
}
#: built-in GPUs of accelerator-optimized types outside the tables above: {type: (count, acc)}
OTHER_BUILT_IN: dict[str, tuple[int, str]] = {
    "g2-standard-8": (1, "nvidia-l4"),
    "g2-standard-12": (1, "nvidia-l4"),
    "g2-standard-16": (1, "nvidia-l4"),
    "g2-standard-32": (1, "nvidia-l4"),
    "a3-megagpu-8g": (8, "nvidia-h100-mega-80gb"),
    "a3-edgegpu-8g": (8, "nvidia-h100-80gb"),
    "a3-ultragpu-8g": (8, "nvidia-h200-141gb"),
    "a4-highgpu-8g": (8, "nvidia-b200"),
    "g4-standard-48": (1, "nvidia-rtx-pro-6000"),
    "g4-standard-96": (2, "nvidia-rtx-pro-6000"),
    "g4-standard-192": (4, "nvidia-rtx-pro-6000"),
    "g4-standard-384": (8, "nvidia-rtx-pro-6000"),
}
#: the GPU's name as ``nvidia-smi`` and ``gpu()`` say it
ACCELERATOR_NAMES = {
    "nvidia-l4": "NVIDIA L4",
    "nvidia-tesla-a100": "NVIDIA A100 40GB",
    "nvidia-a100-80gb": "NVIDIA A100 80GB",
    "nvidia-h100-80gb": "NVIDIA H100 80GB",
    "nvidia-h100-mega-80gb": "NVIDIA H100 80GB",
    "nvidia-h200-141gb": "NVIDIA H200 141GB",
    "nvidia-b200": "NVIDIA B200",
    "nvidia-rtx-pro-6000": "NVIDIA RTX PRO 6000",
    "nvidia-tesla-t4": "NVIDIA T4",
    "nvidia-tesla-v100": "NVIDIA V100",
    "nvidia-tesla-p4": "NVIDIA P4",
    "nvidia-tesla-p100": "NVIDIA P100",
}
#: GPUs attached to an N1 machine: {GPUs: machine type}
N1_ATTACHED: dict[int, str] = {
    1: "n1-standard-8",
    2: "n1-standard-16",
    4: "n1-standard-32",
    8: "n1-standard-64",
}
N1_ACCELERATORS = ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p4", "nvidia-tesla-p100")
_BUILT_IN_PREFIXES = ("g2-", "a2-", "a3-", "a4-", "g4-")
#: machine series that take Hyperdisk only (no Persistent Disk)
_HYPERDISK_ONLY = ("a3-ultragpu-", "a4-", "a4x-", "g4-", "c4-", "c4a-", "c4d-", "n4-", "x4-")

#: machine types not sold on demand: the provisioning models they are sold with (assumption:
#: Compute Engine's A3 High page lists the 1, 2 and 4 GPU shapes as Spot and Flex-start only)
NOT_ON_DEMAND: dict[str, tuple[str, ...]] = {
    "a3-highgpu-1g": ("spot", "flex-start"),
    "a3-highgpu-2g": ("spot", "flex-start"),
    "a3-highgpu-4g": ("spot", "flex-start"),
}
#: the nearest shape sold on demand, for the error that refuses one of :data:`NOT_ON_DEMAND`
ON_DEMAND_ALTERNATIVE = {name: "a3-highgpu-8g" for name in NOT_ON_DEMAND}

#: approximate us-central1 on-demand USD per hour of the default shapes (machine, with its
#: built-in GPUs); other regions and later price changes differ: see the pricing page
MACHINE_PRICES: dict[str, float] = {
    "n2-standard-4": 0.194,
    "g2-standard-4": 0.707,
    "g2-standard-8": 0.854,
    "g2-standard-24": 2.000,
    "g2-standard-48": 4.000,
    "g2-standard-96": 8.000,
    "a2-highgpu-1g": 3.673,
    "a2-highgpu-2g": 7.347,
    "a2-highgpu-4g": 14.694,
    "a2-highgpu-8g": 29.387,
    "a2-megagpu-16g": 55.739,
    "a2-ultragpu-1g": 5.069,
    "a2-ultragpu-2g": 10.139,
    "a2-ultragpu-4g": 20.277,
    "a2-ultragpu-8g": 40.554,
    "a3-highgpu-8g": 88.254,
    "n1-standard-8": 0.380,
    "n1-standard-16": 0.760,
    "n1-standard-32": 1.520,
    "n1-standard-64": 3.040,
}
#: where the current prices are
PRICING_URL = "https://cloud.google.com/compute/all-pricing"
#: approximate us-central1 on-demand USD per hour of one attached GPU
ACCELERATOR_PRICES: dict[str, float] = {
    "nvidia-tesla-t4": 0.35,
    "nvidia-tesla-p4": 0.60,
    "nvidia-tesla-p100": 1.46,
    "nvidia-tesla-v100": 2.48,
}

_IMAGE_URL = re.compile(
    r"(?:^|/)projects/(?P<project>[^/]+)/global/images/(?:family/(?P<family>[^/]+)|(?P<name>[^/]+))$"
)
_LOCAL_IMAGE = re.compile(r"^global/images/(?:family/(?P<family>[^/]+)|(?P<name>[^/]+))$")


def choose_machine(
    gpus: int, accelerator: str | None = None, machine_type: str | None = None
) -> tuple[str, str | None, int]:
    """``(machine type, attached accelerator type or None, attached count)`` for ``gpus``.

    G2/A2/A3 machine types include their GPUs; N1 machines get T4/V100/... attached.

    :raises ConfigError: no machine of that kind has that many GPUs.
    """
    acc = accelerator.lower() if accelerator else None
    if machine_type:
        if gpus > 0 and machine_type.startswith("n1-"):
            return machine_type, acc or "nvidia-tesla-t4", gpus
        return machine_type, None, 0
    if gpus == 0:
        return CPU_MACHINE_TYPE, None, 0
    acc = acc or DEFAULT_ACCELERATOR
    if acc in BUILT_IN_GPUS:
        table, attached = BUILT_IN_GPUS[acc], False
    elif acc in N1_ACCELERATORS:
        table, attached = N1_ATTACHED, True
    else:
        raise ConfigError(
            f"unknown GCE accelerator {accelerator!r}; use one of "
            f"{', '.join([*BUILT_IN_GPUS, *N1_ACCELERATORS])} or pass --machine-type"
        )
    for count in sorted(table):
        if count >= gpus:
            if count != gpus:
                logger.info("no %s machine has exactly %d GPUs; using %d", acc, gpus, count)
            return (table[count], acc, count) if attached else (table[count], None, 0)
    raise ConfigError(f"no {acc} machine has {gpus} GPUs (at most {max(table)}); use fewer --gpus")


def built_in_gpus(machine_type: str) -> tuple[int, str] | None:
    """``(count, accelerator type)`` of the GPUs an accelerator-optimized type comes with,
    None for a type without built-in GPUs (N1, N2, E2, C3, ...)."""
    for acc, table in BUILT_IN_GPUS.items():
        for count, name in table.items():
            if name == machine_type:
                return count, acc
    if machine_type in OTHER_BUILT_IN:
        return OTHER_BUILT_IN[machine_type]
    if machine_type.startswith(_BUILT_IN_PREFIXES):
        match = re.search(r"-(\d+)g$", machine_type)
        return (int(match.group(1)) if match else 1), ""
    return None


def gpu_description(machine_type: str, accelerator: str | None, count: int) -> str | None:
    """``"COUNTx MODEL"`` for a machine type and its attached GPUs, None without any GPU."""
    if accelerator and count > 0:
        return f"{count}x {ACCELERATOR_NAMES.get(accelerator, accelerator)}"
    built_in = built_in_gpus(machine_type)
    if built_in is None:
        return None
    n, acc = built_in
    return f"{n}x {ACCELERATOR_NAMES.get(acc, acc or 'GPU')}"


def check_sold(machine_type: str, provisioning: str) -> None:
    """Refuse a machine type with a provisioning model it is not sold with.

    :raises ConfigError: naming the provisioning models that work and the nearest shape
        sold on demand.
    """
    allowed = NOT_ON_DEMAND.get(machine_type)
    if allowed is None or provisioning in allowed:
        return
    models = "|".join(allowed)
    alternative = ON_DEMAND_ALTERNATIVE.get(machine_type)
    instead = f", or use {alternative} (sold on demand: --gpus 8)" if alternative else ""
    raise ConfigError(
        f"GCE does not sell {machine_type} with the {provisioning} provisioning model (it is "
        f"sold only as {' or '.join(allowed)}): pass --provisioning-model {models}{instead}"
    )


def check_run_duration(seconds: float, what: str, provisioning: str = "standard") -> int:
    """``seconds`` as whole seconds of a maxRunDuration, checked against what GCE accepts
    (30 s to 120 days; flex-start at most 7 days).

    :raises ConfigError: outside that range, naming the option to change.
    """
    value = int(round(seconds))
    given = f"{what} is {value}s ({format_duration(value)})"
    if value < GCE_MIN_RUN_DURATION:
        raise ConfigError(
            f"{given}, but GCE's max run duration must be at least "
            f"{GCE_MIN_RUN_DURATION:.0f}s: raise it"
        )
    if value > GCE_MAX_RUN_DURATION:
        raise ConfigError(
            f"{given}, but GCE's max run duration is at most {GCE_MAX_RUN_DURATION:.0f}s "
            "(120 days): lower it"
        )
    if provisioning == "flex-start" and value > FLEX_START_MAX_RUN_DURATION:
        raise ConfigError(
            f"{given}, but a flex-start VM runs at most {FLEX_START_MAX_RUN_DURATION:.0f}s "
            "(7 days): lower --max-lifetime"
        )
    return value


def host_maintenance(gpu: bool, provisioning: str) -> str:
    """``onHostMaintenance`` for the instance: ``TERMINATE`` with GPUs or with a provisioning
    model other than ``standard`` (spot, flex-start), else ``MIGRATE``."""
    return "TERMINATE" if gpu or provisioning != "standard" else "MIGRATE"


def disk_type_for(machine_type: str) -> str:
    """The boot disk type: ``pd-balanced`` (the API's default, pd-standard, is refused by
    G2 and A3 machines), ``hyperdisk-balanced`` on series without Persistent Disk."""
    return "hyperdisk-balanced" if machine_type.startswith(_HYPERDISK_ONLY) else "pd-balanced"


def price_per_hour(
    machine_type: str, accelerator: str | None, count: int, provisioning: str = "standard"
) -> float | None:
    """Approximate on-demand USD per hour (us-central1) of the machine and its GPUs; None
    when unknown or not on demand (spot and flex-start prices vary)."""
    if provisioning != "standard" or machine_type not in MACHINE_PRICES:
        return None
    total = MACHINE_PRICES[machine_type]
    if accelerator and count:
        if accelerator not in ACCELERATOR_PRICES:
            return None
        total += ACCELERATOR_PRICES[accelerator] * count
    return round(total, 3)


def price_note(disk_gb: int | None) -> str:
    """The plan's note on :func:`price_per_hour`: what it covers and about what a ``disk_gb``
    GB boot disk adds (approximately $0.10 per GB and month); ``None`` when the price is
    unknown."""
    if disk_gb is None:
        return f"price unknown here (spot, flex-start or an unlisted shape): see {PRICING_URL}"
    return (
        "price: approximate us-central1 on-demand, machine and GPUs only; the boot disk "
        f"adds about ${0.10 * disk_gb / 730:.3f}/h; see {PRICING_URL}"
    )


@dataclasses.dataclass(frozen=True)
class ImageDetails:
    """The image a launch boots: what was asked for, what it resolved to, its size."""

    ref: str
    name: str
    disk_size_gb: int


def parse_image(image: str, project: str) -> tuple[str, str | None, str | None]:
    """``(project, family, name)`` of an image or image family URL (one of family and name).

    :raises ConfigError: not an image URL.
    """
    match = _IMAGE_URL.search(image)
    if match:
        return match["project"], match["family"], match["name"]
    match = _LOCAL_IMAGE.match(image)
    if match:
        return project, match["family"], match["name"]
    raise ConfigError(
        f"--image {image!r} is not a GCE image: write projects/PROJECT/global/images/NAME or "
        "projects/PROJECT/global/images/family/FAMILY"
    )


def error_hint(text: str) -> str:
    """What to do about an API error whose text says the quota or the zone's capacity ran
    out (``"; ..."``), else ``""``."""
    upper = text.upper()
    if "QUOTA" in upper:
        return (
            "; the project's quota is exhausted: request more (IAM & Admin > Quotas), "
            "or try another --zone"
        )
    if "RESOURCE_POOL_EXHAUSTED" in upper or "DOES NOT HAVE ENOUGH RESOURCES" in upper:
        return "; the zone has no capacity for this machine now: try another --zone"
    return ""


#: the hint for a missing credential (google-auth's ``DefaultCredentialsError``)
CREDENTIALS_HINT = (
    "; run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
)
#: the hint for a 403 whose text names neither quota nor capacity
FORBIDDEN_HINT = (
    "; check that the Compute Engine API is enabled and your account may create instances"
)

#: an instance's ``status`` as :meth:`~studioserve.cloud.base.Provider.instance_state`
#: says it (any other status counts as ``running``)
INSTANCE_STATES = {
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "RUNNING": "running",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "REPAIRING": "running",
    "STOPPED": "stopped",
    "SUSPENDED": "stopped",
    "TERMINATED": "stopped",
}


def format_duration(seconds: float) -> str:
    """``seconds`` for a person: in days from two days on, hours from one hour, else
    minutes or seconds."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.4g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.4g} h"
    return f"{seconds / 60:.3g} min" if seconds >= 60 else f"{seconds:g} s"
