"""Which Host headers the server answers (BEYOND_ALLOWED_HOSTS) and which peers may speak for a client
through X-Forwarded-* headers (BEYOND_FORWARDED_ALLOW_IPS).

Without BEYOND_PUBLIC_URL, status_url, response_url and output URLs are built from each request's Host
header, which the client writes: the allow-list keeps them to this server's own names.
"""

from __future__ import annotations

import ipaddress
import re

# Addressed by orchestrators and scrapers by IP, and building no URL: answered whatever the Host.
ANY_HOST_PATHS = frozenset({"/health", "/metrics"})
# A DNS name or an IPv4 address: labels of letters, digits, '-' and '_', joined by dots.
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def split_names(value: str) -> list[str]:
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def check_host_patterns(value: str) -> str:
    """The BEYOND_ALLOWED_HOSTS value, or ValueError naming the entry that is not a host name pattern."""
    names = split_names(value)
    if not names:
        raise ValueError("must name at least one host, e.g. gpu.example.com,*.example.com")
    for name in names:
        bare = name.removeprefix("*.")
        if name == "*" or HOST_NAME.fullmatch(bare) or (bare[:1] == "[" and is_ip(bare[1:-1]) and bare[-1:] == "]"):
            continue
        raise ValueError(f"{name!r} is not a host name without a port (a name, *.domain, an IP address, or *)")
    return value


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_proxy_addresses(value: str) -> str:
    """The BEYOND_FORWARDED_ALLOW_IPS value, or ValueError naming the entry that is not an address."""
    for entry in split_names(value):
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (or *)") from None
    return value


class AllowedHosts:
    """Host names from BEYOND_ALLOWED_HOSTS: exact names, `*.domain` for any name below a domain, `*` for all.
    A port in the Host header is ignored, as is the letter case."""

    def __init__(self, value: str) -> None:
        names = split_names(value)
        self.any = "*" in names
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.com"

    def allows(self, header: bytes | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        host = header.decode("latin-1").lower()
        # Without the port; an IPv6 literal keeps its brackets.
        host = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
        return host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))
