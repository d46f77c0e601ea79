"""GET /v1/loras: the LoRAs a request may name (the files of BEYOND_LORA_DIR), with their size and format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.guard.auth import CallerDep
from server.http.deps import ServicesDep
from server.http.routes.responses import errors, ok
from server.http.schemas import EXTENSION, BodyResponse, LoraList

router = APIRouter()


@router.get(
    "/v1/loras",
    operation_id="list_loras",
    summary="The LoRAs a request may name",
    description=EXTENSION + "the LoRA files of this server (BEYOND_LORA_DIR) that `loras` may name, with their"
    " size, their format (kohya or diffusers), and why one cannot be used when it cannot",
    responses={**ok(LoraList, "every .safetensors file of the folder (none without one)"), **errors(401, 403)},
)
async def list_loras(services: ServicesDep, _: CallerDep) -> Response:
    # Reads each new or changed file's header: a thread's work, not the event loop's.
    return BodyResponse(LoraList.model_validate({"loras": await run_in_threadpool(services.loras.describe)}))
