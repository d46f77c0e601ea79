"""API keys: who is calling. Keys are held only as SHA-256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from server.errors import Forbidden, Unauthorized

log = logging.getLogger("beyond.auth")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """An authenticated key. `owner` (the digest) is what jobs are stored under: never the key."""

    owner: str
    name: str
    endpoints: frozenset[str] | None = None  # "v1", "v2"; None: all
    rate_limit: str | None = None  # limits' notation; None: the server's BEYOND_RATE_LIMIT
    credits: float | None = None  # starting balance; None: unmetered


class KeyRing:
    def __init__(self, callers: dict[str, Caller]) -> None:
        self._callers = callers  # by digest

    @classmethod
    def load(cls, text: str | None, file: Path | None) -> KeyRing:
        """Keys from BEYOND_API_KEYS (comma-separated) and BEYOND_API_KEYS_FILE (JSON, see docs/guard.md)."""
        callers: dict[str, Caller] = {}
        for key in (part.strip() for part in (text or "").split(",")):
            if key:
                callers[digest(key)] = Caller(owner=digest(key), name=f"key-{digest(key)[:8]}")
        if file is not None:
            try:
                entries = json.loads(Path(file).read_text())["keys"]
                for entry in entries:
                    owner = digest(entry["key"])
                    endpoints = entry.get("endpoints")
                    callers[owner] = Caller(
                        owner=owner,
                        name=str(entry.get("name") or f"key-{owner[:8]}"),
                        endpoints=frozenset(endpoints) if endpoints is not None else None,
                        rate_limit=entry.get("rate_limit"),
                        credits=float(entry["credits"]) if entry.get("credits") is not None else None,
                    )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # The message names the file and the problem, never a key.
                raise ValueError(f"cannot read the keys file {file}: {type(exc).__name__}") from None
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


def get_caller(request: Request) -> Caller | None:
    ring: KeyRing = request.app.state.services.keys
    caller = ring.identify(request.headers.get("x-api-key"), request.headers.get("authorization"))
    endpoint = request.url.path.split("/")[1]  # "v1" or "v2"
    if caller is not None and caller.endpoints is not None and endpoint not in caller.endpoints:
        raise Forbidden(f"this key may not use /{endpoint}")
    request.state.caller = caller  # for the x-remaining-credits header
    return caller


CallerDep = Annotated[Caller | None, Depends(get_caller)]


def get_submitter(request: Request, caller: CallerDep) -> Caller | None:
    """A caller about to submit work: counted against its rate limit before its body is read."""
    request.app.state.services.limiter.hit(caller.owner if caller else "anonymous", caller and caller.rate_limit)
    return caller


SubmitterDep = Annotated[Caller | None, Depends(get_submitter)]


def owner_of(caller: Caller | None) -> str | None:
    return caller.owner if caller else None
