"""The one error hierarchy of the API, and the one place it becomes HTTP.

Every error body is `{"error": "..."}`: the official SDK reads exactly that key.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.jobs.store import DiskFull, StoreError
from server.logs import RateLimitedLog

log = logging.getLogger("beyond.errors")
unavailable = RateLimitedLog(log)


class ApiError(Exception):
    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = body or {}

    def body(self) -> dict:
        return {**self.extra, "error": self.message}


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


class PayloadTooLarge(ApiError):
    status_code = 413


class FailedRequest(ApiError):
    """A FAILED request, served as 422 with its status in the body (as the hosted API does)."""

    status_code = 422

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message, body={"status": "FAILED", **fields})


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


def error_response(exc: ApiError | StoreError) -> JSONResponse:
    """The answer to one of our own errors (the API's, or the store's: 507 for a full disk, else 503)."""
    if isinstance(exc, ApiError):
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
    unavailable.error("%s", exc)
    if isinstance(exc, DiskFull):
        return JSONResponse({"error": "the server's disk is full; try again later"}, status_code=507)
    return JSONResponse(
        {"error": "the job store is unavailable; try again later"}, status_code=503, headers={"Retry-After": "5"}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": describe_validation_error(list(exc.errors()))}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = "not found"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The route template only: the path can carry ids, the query string keys.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        log.exception("unhandled error on %s %s", request.method, route)
        return JSONResponse({"error": "internal server error"}, status_code=500)
