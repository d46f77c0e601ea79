"""The error answers each route can give, documented with the one `{"error"}` body."""

from __future__ import annotations

from typing import Any

from server.http.schemas import ErrorBody, FailedBody

MEANING = {
    400: "invalid parameters or request format; the message starts with the field's name",
    401: "missing or invalid API key",
    403: "this key may not use this endpoint",
    404: "unknown or expired request, or unknown model",
    406: "insufficient credits",
    409: "the request cannot change any more (already finished), or was cancelled",
    413: "the body is larger than the limit",
    422: "the request FAILED; the body says why",
    500: "the request failed in the engine (v1); the message says why",
    429: "rate limited, or the queue is full (Retry-After says when to try again)",
    502: "the engine is not available",
    503: "the job store is unavailable",
    504: "not done within the synchronous timeout; the request was cancelled",
    507: "the server's disk is full",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": FailedBody if code == 422 else ErrorBody, "description": MEANING[code]} for code in codes}


SUBMIT = errors(400, 401, 403, 406, 413, 429, 503, 507)
READ = errors(401, 403, 404, 422, 503)
