"""The laptop's side of the network: its public address (the firewall's only source) and
HTTP checks of the instance.

Every request here goes direct, never through ``HTTPS_PROXY``/``HTTP_PROXY``: SSH and the
readiness check cannot use a proxy, so the address the firewall allows must be the one they
come from. Behind a proxy the direct lookup may fail (or see a NAT address other than the
proxy's); the error and a warning say to pass ``--allow-cidr`` then.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import urllib.error
import urllib.request

from ..errors import CloudError

logger = logging.getLogger(__name__)

#: where your public address is looked up when --allow-cidr is not given
IP_ECHO_URL = "https://checkip.amazonaws.com"
#: the variables that send urllib, pip and browsers through a proxy
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def direct_opener() -> urllib.request.OpenerDirector:
    """A urllib opener that ignores the proxy variables."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def proxy_variables() -> list[str]:
    """The proxy variables set in this environment."""
    return [name for name in PROXY_VARIABLES if os.environ.get(name)]


def detect_public_cidr(url: str | None = None, timeout: float = 10.0) -> str:
    """Your public address as a one-address CIDR (``/32`` or ``/128``), asked over HTTPS
    directly (not through a proxy: SSH and the readiness check do not use one either).

    :raises CloudError: when it cannot be found (pass ``--allow-cidr`` then).
    """
    url = url or IP_ECHO_URL
    proxies = proxy_variables()
    if proxies:
        logger.warning(
            "%s set: your public address is looked up directly, not through the proxy, since "
            "SSH and the readiness check go direct too. If your network only reaches the "
            "internet through the proxy, pass --allow-cidr with the address your SSH "
            "connections come from",
            ", ".join(proxies),
        )
    try:
        with direct_opener().open(url, timeout=timeout) as response:
            text = response.read(64).decode("ascii", "replace").strip()
        address = ipaddress.ip_address(text)
    except (OSError, ValueError) as e:
        behind = f" (directly: {', '.join(proxies)} is not used)" if proxies else ""
        raise CloudError(
            f"could not find your public IP address at {url}{behind}: {e}. It limits who may "
            "reach the instance; pass --allow-cidr with your address (e.g. 203.0.113.7/32) or "
            "your network's range"
        ) from e
    cidr = f"{address}/{address.max_prefixlen}"
    logger.info("allowing access from your public address %s only (--allow-cidr)", cidr)
    return cidr


def http_status(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """``(status, detail)`` of a GET of ``url`` directly; status None when nothing answered."""
    try:
        with direct_opener().open(url, timeout=timeout) as response:
            return int(response.status), f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, str(reason)
