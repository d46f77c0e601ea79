"""GET /v1/styles: the style names a request may use, with their templates."""

from __future__ import annotations

from fastapi import APIRouter

from server.http.deps import ServicesDep

router = APIRouter()


@router.get("/v1/styles", summary="The styles a request may name")
async def list_styles(services: ServicesDep) -> dict:
    return {"styles": services.styles.describe()}
