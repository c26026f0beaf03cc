"""The URL factory: :func:`open_store` picks the store implementation from a URL's scheme.

The only module in the package that knows every implementation. The cloud SDKs stay lazy:
:mod:`.s3` (boto3) is imported only when an ``s3://`` URL is opened, :mod:`.gcs`
(google-cloud-storage) only for a ``gs://`` URL.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import ConfigError
from .base import Store
from .local import LocalStore


def open_store(url: str) -> Store:
    """The store for ``url``: a path or ``file://`` URL, ``s3://bucket/prefix``, ``gs://bucket/prefix``.

    :raises ConfigError: for an unknown scheme, or a missing optional dependency.
    """
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        path = url
        if scheme == "file":
            # file:///abs and file://localhost/abs are absolute; file://rel/dir and file:rel
            # are read as the relative path people meant, not as a host name
            host = parsed.netloc
            path = unquote(parsed.path)
            if host and host.lower() != "localhost":
                path = unquote(host) + path
        return LocalStore(Path(path).expanduser())
    if scheme == "s3":
        try:
            from .s3 import S3Store
        except ImportError as e:
            raise ConfigError(
                f"store {url} needs boto3: pip install 'studioserve[aws]' ({e})"
            ) from e
        return S3Store(url)
    if scheme == "gs":
        try:
            from .gcs import GCSStore
        except ImportError as e:
            raise ConfigError(
                f"store {url} needs google-cloud-storage: pip install 'studioserve[gcp]' ({e})"
            ) from e
        return GCSStore(url)
    raise ConfigError(
        f"unknown store URL {url!r}: use a folder path, file://PATH, s3://BUCKET/PREFIX "
        "or gs://BUCKET/PREFIX"
    )
