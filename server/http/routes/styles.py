"""GET /v1/styles: the style names a request may use, with their templates."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.http.deps import ServicesDep
from server.http.routes.responses import ok
from server.http.schemas import BodyResponse, StyleList

router = APIRouter()


@router.get(
    "/v1/styles",
    operation_id="list_styles",
    responses=ok(StyleList, "every style this server knows, built-in and its own"),
    summary="The styles a request may name",
)
async def list_styles(services: ServicesDep) -> Response:
    return BodyResponse(StyleList.model_validate({"styles": services.styles.describe()}))
