"""Which `input_image` URLs may be fetched: their shape, and the class of every address their host resolves to.

Nothing here connects anywhere; the only traffic is the DNS lookup of the URL's host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from server.guard.input_limits import ImageLimits, InputImageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges Python's `ipaddress` counts as global (or does not single out) that must still never be reached.
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # 0.x.y.z reaches the local host on Linux
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: always the /96 layout (RFC 6052)
# Local-use NAT64 (RFC 8215) may use any RFC 6052 layout (/48 to /96), and the address does not say which:
# the IPv4 address inside cannot be told, so the range is refused.
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, but stacks still route it inside the site

LABEL = re.compile(r"[a-z0-9_-]{1,63}", re.IGNORECASE)  # underscores occur in real host names

# DNS lookups block; they run on threads of their own, so a fetch deadline can abandon one that hangs.
RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="beyond-dns")


@dataclass(frozen=True)
class Target:
    """A URL that passed the shape checks: `host` is the ASCII name or IP literal (no brackets) to resolve."""

    url: httpx.URL
    host: str
    port: int


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and may be routed to (mapped, 6to4, NAT64, v4-compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def classify(ip: IPAddress) -> str:
    """One of: public; private (private, loopback, carrier-grade NAT: allowed for in-house servers);
    forbidden (link-local with the cloud metadata services, multicast, reserved, unspecified, site-local,
    Teredo and local-use NAT64, whose far end cannot be told from the address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None or ip in NAT64_LOCAL or ip in SITE_LOCAL:
            return "forbidden"
        ip = embedded_ipv4(ip) or ip
    if ip.is_loopback:
        return "private"  # before is_reserved, which covers ::1 too
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip in THIS_NETWORK:
        return "forbidden"
    return "public" if ip.is_global else "private"


def valid_host(host: str) -> bool:
    """An IP literal or a DNS name of ASCII labels (httpx has already IDNA-encoded it)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)  # zone ids ("%eth0") are refused below with every other "%"
        except ValueError:
            return False
        return "%" not in host
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(LABEL.fullmatch(label) for label in name.split("."))


def parse_url(url: str) -> Target:
    """The URL's scheme, host and port, or InputImageError: no other exception escapes, whatever the text."""
    if "\\" in url:
        raise InputImageError("a URL may not contain a backslash")
    try:
        parsed = httpx.URL(url)
        # A second parser's view too: a URL that either of them reads as carrying a user is refused.
        netloc = urlsplit(url).netloc
    except (httpx.InvalidURL, ValueError):  # ValueError covers UnicodeError (IDNA) and urlsplit's complaints
        raise InputImageError("not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise InputImageError("only http and https URLs are accepted")
    if parsed.userinfo or "@" in netloc:
        raise InputImageError("a URL may not carry a user name or password")
    host = parsed.raw_host.decode("ascii", errors="replace")
    if not host:
        raise InputImageError("the URL has no host")
    if not valid_host(host):
        raise InputImageError("the URL's host is not a valid host name or IP address")
    port = parsed.port if parsed.port is not None else 443 if parsed.scheme == "https" else 80
    if not 0 < port < 65536:
        raise InputImageError(f"the URL's port {port} is out of range")
    return Target(parsed, host, port)


def resolve(host: str) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):  # gaierror is an OSError
        raise InputImageError(f"cannot resolve host {host!r}") from None


def judge(host: str, infos: list[tuple], allow_private: bool) -> list[str]:
    """The addresses to connect to; raises when any address of the host is one that may not be reached.

    Private and loopback addresses are allowed only with allow_private (in-house asset servers);
    forbidden ones (link-local, where cloud metadata services live) never are.
    """
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        kind = classify(ip)
        if kind == "forbidden":
            raise InputImageError(f"host {host!r} resolves to a forbidden address")
        if kind == "private" and not allow_private:
            raise InputImageError(f"host {host!r} resolves to a private or loopback address, which is refused")
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        addresses.append(str(mapped or ip))
    if not addresses:
        raise InputImageError(f"cannot resolve host {host!r}")
    return addresses


def check_address(host: str, allow_private: bool) -> list[str]:
    """Resolve `host` and refuse addresses that are not on the public internet."""
    return judge(host, resolve(host), allow_private)


def check_url(url: str, limits: ImageLimits) -> list[str]:
    """The URL's addresses, each one checked; raises InputImageError when any of them may not be reached."""
    target = parse_url(url)
    return check_address(target.host, limits.allow_private_urls)


async def check_url_async(url: str, limits: ImageLimits) -> list[str]:
    """check_url with the DNS lookup on a resolver thread, so the event loop never waits on it."""
    target = parse_url(url)
    infos = await asyncio.get_running_loop().run_in_executor(RESOLVER, resolve, target.host)
    return judge(target.host, infos, limits.allow_private_urls)


def pinned_request(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The request aimed at the address that was checked, so a second DNS answer cannot redirect it
    (DNS rebinding); Host and TLS SNI still name the host, so virtual hosts and certificates work."""
    target = parse_url(url)
    name = f"[{target.host}]" if ":" in target.host else target.host
    host = name if target.url.port is None else f"{name}:{target.url.port}"
    return target.url.copy_with(host=address), {"Host": host}, {"sni_hostname": target.host}
