"""How ``studio serve --backend ray``'s options become Ray Serve deployment options.

Nothing here imports Ray: :class:`RayOptions` is checked and turned into plain dicts
(``num_replicas`` or ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``,
``max_queued_requests``) that :mod:`.app` hands to ``serve.deployment``.

- Replicas: ``--replicas N``, else ``--autoscale MIN:MAX``, else ``--instances`` or the
  model's ``serving.toml`` ``instances`` (a local server's copies of the model become Ray
  replicas; each replica runs one copy), else 1.
- ``--gpus N``: each replica asks Ray for N GPUs (``ray_actor_options.num_gpus``), so Ray
  places it on a node that has them and sets ``CUDA_VISIBLE_DEVICES``.
- ``max_ongoing_requests`` is twice the model's batch size, so one batch can fill while the
  previous one computes; ``max_queued_requests`` is the pipe's queue bound (``--queue-size``):
  past it the ingress answers 503 with Retry-After.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import ServeConfig
from ..errors import ConfigError

__all__ = ["APP_NAME", "RayOptions", "parse_autoscale"]

#: the Ray Serve application name studioserve uses unless told otherwise
APP_NAME = "studioserve"
#: the most ongoing requests any one replica is sent (whatever the batch size)
MAX_ONGOING_CAP = 1024
#: seconds Ray's autoscaler averages the ongoing requests over (Ray requires more than its
#: metrics interval, 10 s by default; a local Ray instance started here pushes every second),
#: and waits before scaling up and before scaling down
AUTOSCALE_LOOK_BACK = 12.0
AUTOSCALE_UPSCALE_DELAY = 2.0
AUTOSCALE_DOWNSCALE_DELAY = 10.0

_APP = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` as two replica counts.

    :raises ConfigError: when it is not two whole numbers with ``1 <= MIN <= MAX``.
    """
    low, colon, high = text.partition(":")
    if not colon or not low.strip().isdigit() or not high.strip().isdigit():
        raise ConfigError(f"--autoscale {text!r}: give MIN:MAX replicas, such as 1:4")
    lo, hi = int(low), int(high)
    if lo < 1 or hi < lo:
        raise ConfigError(f"--autoscale {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where and how the Ray backend runs.

    :param address: the cluster (``auto``, ``ray://HOST:PORT`` or a GCS address); None starts
        a local Ray instance on this machine (stopped again on exit).
    :param replicas: replicas per model (None: ``--instances``, serving.toml, else 1).
    :param autoscale: ``(min, max)`` replicas per model, scaled by Ray on queue length.
    :param app_name: the Ray Serve application's name (one per cluster at ``/``).
    :param target_ongoing: the ongoing requests per replica Ray's autoscaler aims at (None:
        half of ``max_ongoing_requests``).
    :param cpus: CPUs each model replica asks Ray for.
    :param gpus: GPUs each model replica asks Ray for (``--gpus``).
    :param scale_delays: seconds the autoscaler waits before adding and before removing a
        replica.
    """

    address: str | None = None
    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    app_name: str = APP_NAME
    target_ongoing: float | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    scale_delays: tuple[float, float] = (AUTOSCALE_UPSCALE_DELAY, AUTOSCALE_DOWNSCALE_DELAY)

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError("--replicas must be >= 1")
        if self.replicas is not None and self.autoscale is not None:
            raise ConfigError("give --replicas or --autoscale, not both")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if lo < 1 or hi < lo:
                raise ConfigError(f"--autoscale {lo}:{hi}: need 1 <= MIN <= MAX")
        if not _APP.fullmatch(self.app_name):
            raise ConfigError(f"Ray application name {self.app_name!r}: use [A-Za-z0-9._-]")
        if self.cpus < 0 or self.gpus < 0:
            raise ConfigError("a replica's CPUs and GPUs must be >= 0")

    @classmethod
    def from_config(cls, config: ServeConfig, *, gpus: float = 0.0) -> RayOptions:
        """The Ray options a :class:`~studioserve.config.ServeConfig` carries."""
        return cls(
            address=config.ray_address,
            replicas=config.replicas,
            autoscale=config.autoscale,
            gpus=gpus,
        )

    def deployment(
        self, config: ServeConfig, *, instances: int | None, max_batch_size: int
    ) -> dict[str, Any]:
        """``serve.deployment`` options for one model's deployment.

        :param instances: the model's serving.toml ``instances``, if any.
        :param max_batch_size: the model's batch bound (serving.toml's, else the server's).
        """
        ongoing = min(MAX_ONGOING_CAP, max(8, 2 * max_batch_size))
        out: dict[str, Any] = {
            "max_ongoing_requests": ongoing,
            "max_queued_requests": config.queue_size,
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            "health_check_period_s": 5.0,
            "graceful_shutdown_timeout_s": max(5.0, min(60.0, config.request_timeout)),
            # a model that cannot load fails the same way again: say so at once
            "max_constructor_retry_count": 1,
        }
        if self.autoscale is not None:
            lo, hi = self.autoscale
            out["autoscaling_config"] = {
                "min_replicas": lo,
                "initial_replicas": lo,
                "max_replicas": hi,
                "target_ongoing_requests": self.target_ongoing or max(1.0, ongoing / 2),
                "look_back_period_s": AUTOSCALE_LOOK_BACK,
                "upscale_delay_s": self.scale_delays[0],
                "downscale_delay_s": self.scale_delays[1],
            }
        else:
            given = self.replicas or (config.instances if config.is_explicit("instances") else None)
            out["num_replicas"] = given or instances or 1
        return out
