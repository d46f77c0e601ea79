"""API keys: who is calling. Keys are held only as SHA-256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.errors import Unauthorized

log = logging.getLogger("beyond.auth")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """An authenticated key. `owner` (the digest) is what jobs are stored under: never the key."""

    owner: str
    name: str


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [digest(k) for k in keys if k]

    @classmethod
    def from_text(cls, text: str | None) -> KeyRing:
        return cls([part.strip() for part in (text or "").split(",")])

    @property
    def open(self) -> bool:
        return not self._digests

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
        for known in self._digests:
            if hmac.compare_digest(known, wanted):
                found = known
        if found is None:
            raise Unauthorized("invalid API key")
        return Caller(owner=found, name=f"key-{found[:8]}")


def get_caller(request: Request) -> Caller | None:
    ring: KeyRing = request.app.state.services.keys
    return ring.identify(request.headers.get("x-api-key"), request.headers.get("authorization"))


CallerDep = Annotated[Caller | None, Depends(get_caller)]


def get_submitter(request: Request, caller: CallerDep) -> Caller | None:
    """A caller about to submit work: counted against its rate limit before its body is read."""
    request.app.state.services.limiter.hit(caller.owner if caller else "anonymous")
    return caller


SubmitterDep = Annotated[Caller | None, Depends(get_submitter)]


def owner_of(caller: Caller | None) -> str | None:
    return caller.owner if caller else None
