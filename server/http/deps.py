"""What the routers depend on, each as an `Annotated` dependency."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated

from fastapi import Depends, Request
from pydantic import ValidationError

from models.lora_files import LoraLibrary
from models.styles import StyleRegistry
from server.guard.auth import KeyRing
from server.guard.images import ImageLimits
from server.guard.ratelimit import RateLimiter
from server.http.errors import BadRequest, PayloadTooLarge, describe_validation_error
from server.http.schemas import SegBeyondRequest
from server.jobs.inputs import InputStage
from server.jobs.registry import Heartbeat, WorkerRegistry
from server.jobs.results_cache import FinishedJobs
from server.jobs.store import JobStore
from server.jobs.supervisor import Supervisor
from server.metrics import Metrics
from server.settings import Settings
from server.webhooks import Webhooks


@dataclass
class Services:
    settings: Settings
    store: JobStore
    supervisor: Supervisor | None  # None on an API node (`beyond serve --no-worker`)
    inputs: InputStage
    finished: FinishedJobs
    limits: ImageLimits
    styles: StyleRegistry
    loras: LoraLibrary  # BEYOND_LORA_DIR (none: a request with loras is refused)
    keys: KeyRing
    limiter: RateLimiter
    metrics: Metrics
    workers: WorkerRegistry  # the live workers /health and v1 see: the local one, or all of them (Redis)
    heartbeat: Heartbeat | None = None  # publishes the local worker's card (Redis only)
    webhooks: Webhooks | None = None  # with BEYOND_WEBHOOK_SECRET only


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


# Python turns no more than 4300 digits into an int (a longer one is a ValueError: the conversion takes
# quadratic time). Every integer field of the contract is bounded far inside +-10**100, so a number with more
# digits than that is read as +-10**100: it fails the same bound, with the same words, as its real value would.
LONG_INT_DIGITS = 100
LONG_INT = 10**LONG_INT_DIGITS


def read_int(text: str) -> int:
    if len(text) <= LONG_INT_DIGITS:
        return int(text)
    return -LONG_INT if text.startswith("-") else LONG_INT


def read_float(text: str) -> float | int:
    """A JSON number with a fraction or an exponent. One whose value is a whole number (30.0, 3e1) is that
    integer, as JSON Schema's "integer" (the OpenAPI document's) takes it; any other is a float. float()
    reads any length, and a huge exponent is an infinity, which the schema refuses."""
    value = float(text)
    if not value.is_integer():
        return value
    # The number as written, not the float nearest to it: 20.0000000000000001 and 1e-400 are fractions.
    try:
        exact = Decimal(text)
    except InvalidOperation:  # an exponent of more than 18 digits: 1e-99999999999999999999 is no integer
        return value
    if exact != exact.to_integral_value():
        return value
    return int(exact) if abs(exact) < LONG_INT else (-LONG_INT if exact < 0 else LONG_INT)


JSON = json.JSONDecoder(parse_int=read_int, parse_float=read_float)


async def parse_body(request: Request, services: ServicesDep) -> SegBeyondRequest:
    """The JSON body as the contract's model; every problem is a 400 that names the field."""
    limit = services.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body: larger than the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body: larger than the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = JSON.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # what json.loads does
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("body: not valid JSON") from None
    except RecursionError:
        raise BadRequest("body: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body: must be a JSON object")
    try:
        body = SegBeyondRequest.model_validate(data, context={"registry": services.styles, "loras": services.loras})
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc.errors(include_url=False))) from None
    limit = services.settings.max_prompt_chars
    for field in ("prompt", "negative_prompt"):
        if len(getattr(body, field) or "") > limit:
            raise BadRequest(f"{field}: longer than the limit of {limit} characters")
    return body


BodyDep = Annotated[SegBeyondRequest, Depends(parse_body)]


def disk_problem(settings: Settings) -> str | None:
    """Words for /health and submissions when the data directory has less than BEYOND_MIN_FREE_BYTES left."""
    try:
        free = shutil.disk_usage(settings.data_dir).free
    except OSError:
        return None  # the store reports a missing folder itself
    if free < settings.min_free_bytes:
        return f"the disk is full ({free // 1024} KiB free)"
    return None


def public_base(request: Request, settings: Settings) -> str:
    """The absolute URL clients reach this server at (BEYOND_PUBLIC_URL behind a proxy)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")
