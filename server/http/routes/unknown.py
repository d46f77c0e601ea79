"""POST /v1/{slug} and /v2/{slug}: the hosted API serves many models by name, this server one.

Included last: for any other method, Starlette answers 405 from the first route whose path matches, which
must be the documented one (OPTIONS /v1/styles: Allow GET, not this route's POST).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.http.errors import NotFound
from server.http.routes.responses import not_allowed
from server.http.routes.v1 import SLUG

router = APIRouter(include_in_schema=False)


@router.post("/v1/{slug}")
@router.post("/v2/{slug}")
async def unknown_model(slug: str, request: Request) -> Response:
    raise not_allowed(request) or NotFound(f"model {slug!r} not found; this server serves {SLUG!r}")
