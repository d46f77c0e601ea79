"""What each route answers, for the OpenAPI document: every status code it can give, with the model its body
is rendered from (server/http/schemas.py), and the links from a submission to the request's own endpoints."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException

from server.http.schemas import Body, ErrorBody, FailedBody

MEANING = {
    400: "invalid parameters or request format; the message starts with the field's name",
    401: "missing or invalid API key",
    403: "this key may not use this endpoint",
    404: "unknown or expired request",
    406: "insufficient credits",
    409: "the request was cancelled",
    413: "the body is larger than the limit",
    422: "the request FAILED; the body says why",
    500: "the request failed in the engine (v1); the message says why",
    429: "rate limited, or the queue is full (Retry-After says when to try again)",
    502: "the engine is not available",
    503: "the job store is unavailable",
    504: "not done within the synchronous timeout; the request was cancelled",
    507: "the server's disk is full",
}
MODELS: dict[int, type[Body]] = {422: FailedBody}


def errors(*codes: int, **meanings: str) -> dict[int | str, dict[str, Any]]:
    """The error answers `codes`; `meanings` (`e404="..."`) words one for this route."""
    return {
        code: {"model": MODELS.get(code, ErrorBody), "description": meanings.get(f"e{code}", MEANING[code])}
        for code in codes
    }


def ok(model: type[Body], description: str, **extra: Any) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": description, **extra}}


def follow(operation_id: str, description: str, **parameters: object) -> dict[str, Any]:
    """A link from an answer that carries a request_id to another operation on that request."""
    return {
        "operationId": operation_id,
        "parameters": {"request_id": "$response.body#/request_id", **parameters},
        "description": description,
    }


# Where a submission leads: tools (and fuzzers) follow these from POST /v2/seg-beyond to the request itself.
SUBMITTED_LINKS = {
    "status": follow("get_status", "poll the request"),
    "result": follow("get_result", "the request's result"),
    "cancel": follow("cancel_request", "cancel the request"),
    "events": follow("get_events", "the request's progress as server-sent events"),
    "output": follow(
        "get_output",
        "its first image (jpg unless output_format asked for png or webp)",
        index=0,
        extension="jpg",
    ),
    "preview": follow("get_preview", "its live preview while it runs"),
}

SUBMIT = errors(400, 401, 403, 406, 413, 429, 503, 507)
READ = errors(401, 403, 404, 422, 503)
CANCEL = errors(401, 403, 404, 409, 503, e409="the request already ended (COMPLETED, or FAILED but not cancelled)")


def not_allowed(request: Request) -> HTTPException | None:
    """For the catch-all routes that answer unknown model names: a 405 (with Allow, as for any method a route
    does not take) when the path is a documented one that takes other methods, e.g. POST /v1/styles."""
    documented = request.app.openapi()["paths"].get(request.scope["path"])
    if documented is None:
        return None
    return HTTPException(405, headers={"Allow": ", ".join(sorted(method.upper() for method in documented))})
