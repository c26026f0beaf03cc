"""What a launch would do, as ``--dry-run`` prints it: the provider's :class:`~.base.Plan`
(what it creates, what it costs) and the launch's own part (who may reach it, what is
installed, every way it ends)."""

from __future__ import annotations

import dataclasses

from .base import Plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeploymentPlan:
    """What :func:`deploy` would do (``--dry-run``): the provider's :class:`Plan` and ours."""

    plan: Plan
    experiment: str
    port: int
    allow_cidr: str
    #: the gRPC port (``--grpc-port``), None for none
    grpc_port: int | None = None
    frameworks: tuple[str, ...]
    requirements: tuple[str, ...]
    killafter: float
    lease: float
    max_lifetime: float

    def lines(self) -> list[str]:
        """The plan as the CLI prints it."""
        p = self.plan
        price = (
            f", about ${p.price_per_hour:.2f}/hour on demand"
            if p.price_per_hour is not None
            else " (price: see the provider's price list)"
        )
        gpu = f" with {p.gpu}" if p.gpu else " (no GPU)"
        out = [
            f"Dry run: nothing was created. `studio serve {self.experiment} --cloud {p.cloud}` "
            f"would launch, in {p.location}:",
            f"  instance: {p.instance_type}{gpu}{price}",
            f"  image: {p.image}",
            "  creates:",
            *[f"    - {line}" for line in p.creates],
            f"  reachable only from {self.allow_cidr} (TCP 22 and {self.port}"
            + (f", gRPC on {self.grpc_port}" if self.grpc_port is not None else "")
            + "); requests need the bearer token it prints",
            "  installs: the studioserve wheel"
            + (f", {', '.join(self.requirements)}" if self.requirements else "")
            + (f" (model: {', '.join(self.frameworks)})" if self.frameworks else ""),
            "  ends:",
        ]
        if self.killafter > 0:
            out.append(f"    - after {self.killafter:g}s without an inference request")
        out += [
            f"    - {self.lease:g}s after boot if the server is not ready by then (launch lease)",
            f"    - {self.max_lifetime:g}s after boot at the latest (--max-lifetime)",
            *[f"    - {line}" for line in p.backstops],
            "    - on any failure, Ctrl-C, SIGTERM or SIGHUP during the launch: everything "
            "created is deleted",
        ]
        out += [f"  note: {line}" for line in p.notes]
        return out
