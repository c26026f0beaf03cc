"""``studio serve --cloud ec2|gcloud``: a GPU endpoint in one command that ends itself.

Usage::

    from studioserve.cloud import CloudOptions, deploy, list_instances, stop_instances

    print("\n".join(plan_deployment(serve_config, modeldir, CloudOptions(cloud="ec2")).lines()))
    dep = deploy(serve_config, modeldir, CloudOptions(cloud="ec2", gpus=1))
    print(dep.url, dep.token, dep.gpu, dep.expires_at)
    for record in list_instances():
        print(record.id, record.location, record.url, record.age)
    stop_instances([dep.id])

The modules: ``base`` (the provider interface, options, overrides, resources), ``launch``
(one deployment: a method per step and the rollback), ``teardown`` (deleting what a deployment
made), ``signals`` (Ctrl-C, SIGTERM and SIGHUP during a launch and its rollback), ``payload``
(what goes to the instance), ``scripts`` (everything that runs on it), ``plan`` (the dry
run), ``wheel`` (the package the instance installs), ``network`` (your address, HTTP checks),
``registry`` and ``instances`` (``studio instances``), ``providers`` (which SDK for which
cloud), ``ec2`` and ``gce`` (the only importers of boto3 and google-cloud) with
``ec2_catalog`` and ``gce_catalog`` (their tables, prices and hints, no SDK),
``gce_scripts`` and ``gce_iam`` (the GCE instance's self-deletion and its dedicated account),
and ``ssh`` (the only importer of paramiko).

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
from .base import Overrides as Overrides
from .base import Plan as Plan
from .base import Provider as Provider
from .base import Resource as Resource
from .base import StepContext as StepContext
from .instances import list_instances as list_instances
from .instances import stop_instances as stop_instances
from .launch import Deployment as Deployment
from .launch import Launch as Launch
from .launch import deploy as deploy
from .launch import plan_deployment as plan_deployment
from .plan import DeploymentPlan as DeploymentPlan
from .providers import make_provider as make_provider
from .registry import InstanceRecord as InstanceRecord
from .wheel import build_wheel as build_wheel

__all__ = [
    "CLOUDS",
    "DEFAULT_MAX_LIFETIME",
    "STEPS",
    "CloudOptions",
    "Deployment",
    "DeploymentFailed",
    "DeploymentPlan",
    "HostKeyMismatch",
    "Hook",
    "InstanceInfo",
    "InstanceRecord",
    "Launch",
    "Overrides",
    "Plan",
    "Provider",
    "Resource",
    "StepContext",
    "build_wheel",
    "deploy",
    "list_instances",
    "make_provider",
    "plan_deployment",
    "stop_instances",
]
