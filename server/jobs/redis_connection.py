"""How every part of beyond reaches Redis (the job store, its event listener, the worker registry), and
what Redis's failures mean, in one place.

`connect` builds the client from BEYOND_REDIS_URL (`redis://[user:password@]host:port/db`, `rediss://`
for TLS, or `unix://`) and the TLS files; `store_error` turns Redis's failures into the store's own.
A failure that waiting cannot mend (wrong credentials, a certificate not trusted, a user without the
commands beyond needs) is `RedisRefused`: a starting node stops at once and says why, instead of
waiting for a Redis that is there. The URL's password never reaches a message: every message names
the server by host and port only (`where`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from server.jobs.store import DiskFull, StoreError, StoreUnavailable

SCHEMES = ("redis", "rediss", "unix")


class RedisRefused(StoreUnavailable):
    """Redis is up but turns this node away (credentials, TLS, permissions): waiting will not help."""


@dataclass(frozen=True)
class RedisTLS:
    """The files of a rediss:// connection: the CA bundle that signed the server's certificate (unset:
    the system's CAs, as for a managed Redis with a public certificate) and, for mutual TLS, this node's
    certificate and key (the key may be in the certificate's file)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __bool__(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def options(self) -> dict[str, Any]:
        """redis-py's arguments for these files, checked now, so a wrong file stops a node at start with the
        setting's name rather than failing every connection later."""
        if self.key_file and not self.cert_file:
            raise ValueError("BEYOND_REDIS_KEY_FILE needs BEYOND_REDIS_CERT_FILE (the certificate of that key)")
        context = ssl.create_default_context()
        for setting, path in (("BEYOND_REDIS_CA_FILE", self.ca_file), ("BEYOND_REDIS_CERT_FILE", self.cert_file)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{setting}: {path} is not a file")
        if self.key_file is not None and not Path(self.key_file).is_file():
            raise ValueError(f"BEYOND_REDIS_KEY_FILE: {self.key_file} is not a file")
        try:
            if self.ca_file:
                context.load_verify_locations(cafile=str(self.ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"BEYOND_REDIS_CA_FILE: {self.ca_file} holds no PEM certificate ({exc})") from None
        try:
            if self.cert_file:
                context.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                f"BEYOND_REDIS_CERT_FILE/BEYOND_REDIS_KEY_FILE: not a certificate and its unencrypted key ({exc})"
            ) from None
        return {
            "ssl_ca_certs": str(self.ca_file) if self.ca_file else None,
            "ssl_certfile": str(self.cert_file) if self.cert_file else None,
            "ssl_keyfile": str(self.key_file) if self.key_file else None,
            "ssl_cert_reqs": "required",
            # redis-py before 6 did not check the name by default; a certificate must name the host it serves.
            "ssl_check_hostname": True,
        }


def where(url: str) -> str:
    """The server's address for messages: host and port only, never a password from the URL."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or "a unix socket"
    try:
        port = parts.port or 6379
    except ValueError:
        port = "?"
    return f"{parts.hostname or 'localhost'}:{port}"


def connect(url: str, tls: RedisTLS | None = None, **options: Any) -> redis.Redis:
    """A client of the Redis at `url` with the TLS files `tls` (rediss:// only); `options` are redis-py's
    (timeouts, retries, decode_responses). Connects lazily, on the first command. Raises ValueError for a
    URL or TLS setting that cannot work, in words that never quote the URL (it may hold a password)."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError("BEYOND_REDIS_URL must start with redis://, rediss:// (TLS) or unix://")
    if scheme == "rediss":
        options.update((tls or RedisTLS()).options())
    elif tls:
        raise ValueError(
            "BEYOND_REDIS_CA_FILE, BEYOND_REDIS_CERT_FILE and BEYOND_REDIS_KEY_FILE are for TLS:"
            " BEYOND_REDIS_URL must start with rediss://"
        )
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError:  # redis-py's or urllib's words may quote the URL
        raise ValueError(f"BEYOND_REDIS_URL is not a valid Redis URL (Redis at {where(url)})") from None


def probe(url: str, tls: RedisTLS | None, what: str) -> None:
    """One PING on a fresh connection without retries; raises `store_error`'s error. Whether Redis is up
    and takes this node is told by the first failure: a retry can hide a refusal (a TLS alert) behind
    the closed connection that follows it."""
    client = connect(url, tls, socket_connect_timeout=2.0, socket_timeout=5.0, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    except RedisError as exc:
        raise store_error(exc, what) from None
    finally:
        client.close()


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from or while handling (redis-py wraps socket and ssl errors)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return chain


def refusal(exc: RedisError) -> str | None:
    """Why Redis turned this node away, when it did; None for an outage or a failed command."""
    if isinstance(exc, AuthenticationError):
        # Our words, not Redis's ("WRONGPASS ...", "NOAUTH ..."): the same for a wrong and a missing password.
        return "refused this node: authentication failed (check the user name and password in BEYOND_REDIS_URL)"
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or "certificate verify failed"
            return (
                f"sent a TLS certificate this node does not trust: certificate verification failed ({reason});"
                " set BEYOND_REDIS_CA_FILE to the CA bundle that signed it"
            )
        # A handshake refused (no client certificate, no common protocol); not a connection cut short
        # (SSLEOFError, SSLZeroReturnError), which a restarting Redis also causes.
        if type(cause) is ssl.SSLError:
            return f"refused the TLS handshake: {cause.reason or cause}"
    if isinstance(exc, (NoPermissionError, AuthorizationError)):
        return f"refused a command beyond needs (see the ACL rules in docs/scaling.md): {str(exc)[:200]}"
    return None


def store_error(exc: RedisError, what: str) -> StoreError:
    """Redis's failure as the store's own (retries with backoff are done by then). `what` names the thing
    that failed, e.g. "the job store (Redis at host:port)"."""
    refused = refusal(exc)
    if refused is not None:
        return RedisRefused(f"{what} {refused}")
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return StoreUnavailable(f"{what} is unreachable: {type(exc).__name__}")
    if isinstance(exc, ResponseError):
        if isinstance(exc, OutOfMemoryError) or "maxmemory" in str(exc):  # from a script: a plain error
            return DiskFull(f"{what} is out of memory")
        return StoreUnavailable(f"{what} failed: {str(exc)[:200]}")
    return StoreUnavailable(f"{what} failed: {type(exc).__name__}")
