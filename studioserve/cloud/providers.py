"""The provider for a cloud, its SDK imported only here and only when asked for."""

from __future__ import annotations

from ..errors import ConfigError
from .base import CloudOptions, Overrides, Provider


def make_provider(options: CloudOptions, overrides: Overrides | None = None) -> Provider:
    """The provider for ``options.cloud`` (imports its SDK here, lazily).

    :raises ConfigError: the SDK is not installed (naming the extra that installs it).
    """
    if options.cloud == "ec2":
        try:
            from .ec2 import Ec2Provider
        except ImportError as e:
            raise ConfigError(
                f"--cloud ec2 needs boto3 and paramiko ({e}); pip install 'studioserve[aws]'"
            ) from e
        return Ec2Provider(options, overrides)
    try:
        from .gce import GceProvider
    except ImportError as e:
        raise ConfigError(
            f"--cloud gcloud needs google-cloud-compute and paramiko ({e}); "
            "pip install 'studioserve[gcp]'"
        ) from e
    return GceProvider(options, overrides)
