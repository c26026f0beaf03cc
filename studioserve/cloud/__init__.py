"""``studio serve --cloud ec2|gcloud``: a GPU endpoint in one command that ends itself.

Usage::

    from studioserve.cloud import CloudOptions, deploy, list_instances, stop_instances

    dep = deploy(serve_config, modeldir, CloudOptions(cloud="ec2", gpus=1))
    print(dep.url, dep.token, dep.expires_at)
    for record in list_instances():
        print(record.id, record.location, record.url, record.age)
    stop_instances([dep.id])

Importing this package imports no cloud SDK; :func:`deploy` imports boto3 (``[aws]`` extra)
or google-cloud-compute (``[gcp]`` extra) and paramiko when it needs them.
"""

from __future__ import annotations

from ..errors import DeploymentFailed as DeploymentFailed
from ..errors import HostKeyMismatch as HostKeyMismatch
from .base import CLOUDS as CLOUDS
from .base import DEFAULT_MAX_LIFETIME as DEFAULT_MAX_LIFETIME
from .base import STEPS as STEPS
from .base import CloudOptions as CloudOptions
from .base import Hook as Hook
from .base import InstanceInfo as InstanceInfo
from .base import Provider as Provider
from .base import Resource as Resource
from .base import StepContext as StepContext
from .deploy import Deployment as Deployment
from .deploy import InstanceRecord as InstanceRecord
from .deploy import build_wheel as build_wheel
from .deploy import deploy as deploy
from .deploy import list_instances as list_instances
from .deploy import make_provider as make_provider
from .deploy import stop_instances as stop_instances

__all__ = [
    "CLOUDS",
    "DEFAULT_MAX_LIFETIME",
    "STEPS",
    "CloudOptions",
    "Deployment",
    "DeploymentFailed",
    "HostKeyMismatch",
    "Hook",
    "InstanceInfo",
    "InstanceRecord",
    "Provider",
    "Resource",
    "StepContext",
    "build_wheel",
    "deploy",
    "list_instances",
    "make_provider",
    "stop_instances",
]
