"""The one error hierarchy of the API, and the one place it becomes HTTP.

Every error body is `{"error": "..."}` (the official SDK reads exactly that key), rendered from its documented
model in server/http/schemas.py: ErrorBody, or FailedBody for a FAILED request (422).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.http.schemas import Body, BodyResponse, ErrorBody, FailedBody, Status, WebhookStatus
from server.jobs.store import DiskFull, StoreError
from server.logs import RateLimitedLog

log = logging.getLogger("beyond.errors")
unavailable = RateLimitedLog(log)


class ApiError(Exception):
    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> Body:
        return ErrorBody(error=self.message)


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401


class Forbidden(ApiError):
    status_code = 403


class NotFound(ApiError):
    status_code = 404


class InsufficientCredits(ApiError):
    status_code = 406


class Conflict(ApiError):
    status_code = 409

    def __init__(self, message: str, *, status: Status | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status = status  # the state a request is already in

    def body(self) -> Body:
        return ErrorBody(status=self.status, error=self.message)


class PayloadTooLarge(ApiError):
    status_code = 413


class FailedRequest(ApiError):
    """A FAILED request, served as 422 with its status in the body (as the hosted API does)."""

    status_code = 422

    def __init__(self, message: str, *, request_id: str, webhook: WebhookStatus | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.webhook = webhook

    def body(self) -> Body:
        return FailedBody(status="FAILED", request_id=self.request_id, webhook=self.webhook, error=self.message)


class RateLimited(ApiError):
    status_code = 429


class InternalError(ApiError):
    status_code = 500


class BadGateway(ApiError):
    status_code = 502


class InsufficientStorage(ApiError):
    status_code = 507


class GatewayTimeout(ApiError):
    status_code = 504


def describe_validation_error(errors: list[dict]) -> str:
    """'<field>: <reason>' for the first problem, the way clients want to read it."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{field}: {message}"


def error_response(exc: ApiError | StoreError) -> BodyResponse:
    """The answer to one of our own errors (the API's, or the store's: 507 for a full disk, else 503)."""
    if isinstance(exc, ApiError):
        return BodyResponse(exc.body(), exc.status_code, exc.headers)
    unavailable.error("%s", exc)
    if isinstance(exc, DiskFull):
        return BodyResponse(ErrorBody(error="the server's disk is full; try again later"), 507)
    return BodyResponse(ErrorBody(error="the job store is unavailable; try again later"), 503, {"Retry-After": "5"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> BodyResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> BodyResponse:
        return BodyResponse(ErrorBody(error=describe_validation_error(list(exc.errors()))), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> BodyResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = "not found"
        return BodyResponse(ErrorBody(error=message), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> BodyResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> BodyResponse:
        # The route template only: the path can carry ids, the query string keys.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        log.exception("unhandled error on %s %s", request.method, route)
        return BodyResponse(ErrorBody(error="internal server error"), 500)
