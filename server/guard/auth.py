"""API keys: who is calling. Keys are held only as SHA-256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from server.guard.ratelimit import check_rate_limit
from server.http.errors import Forbidden, Unauthorized

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("beyond.auth")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# What a key may be allowed: the two API versions, and /metrics when BEYOND_METRICS_REQUIRE_KEY is on.
Endpoint = Literal["v1", "v2", "metrics"]


@dataclass(frozen=True)
class Caller:
    """An authenticated key. `owner` (the digest) is what jobs are stored under: never the key."""

    owner: str
    name: str
    endpoints: frozenset[str] | None = None  # None: all
    rate_limit: str | None = None  # limits' notation; None: the server's BEYOND_RATE_LIMIT
    credits: float | None = None  # the grant; None: unmetered


class KeyEntry(BaseModel):
    """One key of BEYOND_API_KEYS_FILE: the key itself, or only its SHA-256 digest (hex)."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr | None = None
    sha256: str | None = Field(None, pattern="^[0-9a-fA-F]{64}$")
    name: str | None = Field(None, min_length=1, max_length=100)
    endpoints: list[Endpoint] | None = None
    rate_limit: str | None = None
    credits: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key and sha256")
        if self.key is not None and not self.key.get_secret_value():
            raise ValueError("key: empty")
        if self.rate_limit is not None:
            check_rate_limit(self.rate_limit)
        return self

    def caller(self) -> Caller:
        owner = digest(self.key.get_secret_value()) if self.key is not None else (self.sha256 or "").lower()
        return Caller(
            owner=owner,
            name=self.name or f"key-{owner[:8]}",
            endpoints=frozenset(self.endpoints) if self.endpoints is not None else None,
            rate_limit=self.rate_limit,
            credits=self.credits,
        )


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry]


def read_keys_file(file: Path) -> list[Caller]:
    """A JSON or TOML (by the .toml suffix) keys file; see docs/guard.md. Errors never quote values."""
    try:
        text = Path(file).read_text()
        data = tomllib.loads(text) if Path(file).suffix.lower() == ".toml" else json.loads(text)
        return [entry.caller() for entry in KeysFile.model_validate(data).keys]
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        # Field names only: an unknown field's name could itself be a pasted key.
        known = set(KeyEntry.model_fields) | {"keys"}
        where = ".".join(str(p) if isinstance(p, int) or p in known else "?" for p in first["loc"])
        problem = f"{where or 'file'}: {str(first['msg']).removeprefix('Value error, ')}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # JSON and TOML parse errors can quote the offending text: name the kind of problem only.
        problem = type(exc).__name__
    raise ValueError(f"cannot read the keys file {file}: {problem}")


class KeyRing:
    def __init__(self, callers: dict[str, Caller]) -> None:
        self._callers = callers  # by digest

    @classmethod
    def load(cls, text: str | None, file: Path | None) -> KeyRing:
        """Keys from BEYOND_API_KEYS (comma-separated) and BEYOND_API_KEYS_FILE (its entries win)."""
        callers: dict[str, Caller] = {}
        for key in (part.strip() for part in (text or "").split(",")):
            if key:
                callers[digest(key)] = Caller(owner=digest(key), name=f"key-{digest(key)[:8]}")
        for caller in read_keys_file(file) if file is not None else []:
            callers[caller.owner] = caller
        return cls(callers)

    @property
    def open(self) -> bool:
        return not self._callers

    def metered(self) -> list[Caller]:
        return [c for c in self._callers.values() if c.credits is not None]

    def identify(self, key: str | None, authorization: str | None = None) -> Caller | None:
        if self.open:
            return None
        if not key:
            if authorization:
                raise Unauthorized("the API key goes in the x-api-key header, not in Authorization")
            raise Unauthorized("missing API key: send it in the x-api-key header")
        wanted = digest(key)
        # Compare against every key, so the time taken says nothing about which one nearly matched.
        found = None
        for known in self._callers:
            if hmac.compare_digest(known, wanted):
                found = known
        if found is None:
            raise Unauthorized("invalid API key")
        return self._callers[found]


# The scheme the OpenAPI page offers (its Authorize button); server/http/openapi.py declares it on the routes
# that take a key. Not a FastAPI security dependency: the check is ours, for our error bodies, and the
# status path, polled all the time, resolves no more dependencies than it must.
API_KEY_SCHEME = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "an API key of this server"}
}


async def get_caller(request: Request) -> Caller | None:
    ring: KeyRing = request.app.state.services.keys
    caller = ring.identify(request.headers.get("x-api-key"), request.headers.get("authorization"))
    endpoint = request.scope["path"].split("/")[1]  # "v1", "v2" or "metrics"
    if caller is not None and caller.endpoints is not None and endpoint not in caller.endpoints:
        raise Forbidden(f"this key may not use /{endpoint}")
    request.state.caller = caller  # for the x-remaining-credits header and the access log
    return caller


CallerDep = Annotated[Caller | None, Depends(get_caller)]


async def get_submitter(request: Request, caller: CallerDep) -> Caller | None:
    """A caller about to submit work: counted against its rate limit before its body is read."""
    limiter = request.app.state.services.limiter
    request.state.rate_headers = limiter.hit(caller.owner if caller else "anonymous", caller and caller.rate_limit)
    return caller


SubmitterDep = Annotated[Caller | None, Depends(get_submitter)]


async def get_metrics_reader(request: Request) -> Caller | None:
    """/metrics is open unless BEYOND_METRICS_REQUIRE_KEY is on; then it takes a key allowed "metrics"
    (or one with no endpoint list)."""
    if not request.app.state.services.settings.metrics_require_key:
        return None
    return await get_caller(request)


MetricsReaderDep = Annotated[Caller | None, Depends(get_metrics_reader)]


def owner_of(caller: Caller | None) -> str | None:
    return caller.owner if caller else None
