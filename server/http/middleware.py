"""The one middleware: access log, metrics and the guard's response headers, as plain ASGI.

Plain ASGI rather than `@app.middleware("http")`: no extra task and stream per request, request
disconnects reach the endpoints, and an error answer leaves the connection usable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.guard.hosts import ANY_HOST_PATHS, AllowedHosts
from server.http import fast_routes
from server.http.errors import ApiError, BadRequest, error_response
from server.jobs.contract import from_units
from server.jobs.store import StoreError
from server.metrics import Metrics

access = logging.getLogger("beyond.access")
WRONG_HOST = "host: not a name this server answers to"


class ServingMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        balance: Callable[[str], int | None],
        hosts: AllowedHosts | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.balance = balance
        self.hosts = hosts  # BEYOND_ALLOWED_HOSTS; None: any Host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict = scope.setdefault("state", {})
        status = 500
        request_id: str | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                for key, value in headers:
                    if key == b"x-request-id":
                        request_id = value.decode("latin-1")
                # x-remaining-credits for metered keys, X-RateLimit-* for rate-limited submissions, on
                # every answer, errors included.
                extra = dict(state.get("rate_headers") or {})
                caller = state.get("caller")
                if caller is not None and caller.credits is not None:
                    try:
                        units = self.balance(caller.owner)
                    except Exception:  # a broken store is reported by the answer itself, not here
                        units = None
                    if units is not None:
                        extra["x-remaining-credits"] = f"{from_units(units):g}"
                if extra:
                    headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()]
                    message = {**message, "headers": headers}
            await send(message)

        # The status poll and the v1 request, registered by their routes (server/http/fast_routes.py).
        fast = fast_routes.match(scope)
        try:
            if self.hosts is not None and not self.allowed(scope):
                await error_response(BadRequest(WRONG_HOST))(scope, receive, send_with_headers)
            elif fast is None:
                await self.app(scope, receive, send_with_headers)
            else:
                await answer(fast, scope, receive, send_with_headers)
        finally:
            # The route template, not the path: request ids would make every path its own series.
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            method = scope["method"]
            self.metrics.observe_request(method, route, status, seconds)
            caller = state.get("caller")
            request_id = request_id or (scope.get("path_params") or {}).get("request_id")
            access.info(
                "%s %s %s %.1fms%s",
                method,
                route,
                status,
                seconds * 1000,
                f" {request_id}" if request_id else "",
                extra={
                    "event": "request",
                    "method": method,
                    "route": route,
                    "status": status,
                    "request_id": request_id,
                    "seconds": round(seconds, 4),
                    "caller": caller.name if caller else None,
                },
            )

    def allowed(self, scope: Scope) -> bool:
        """Whether the request's Host is one of BEYOND_ALLOWED_HOSTS (health checks and scrapes: any)."""
        if scope["path"] in ANY_HOST_PATHS:
            return True
        host = next((value for key, value in scope["headers"] if key == b"host"), None)
        assert self.hosts is not None
        return self.hosts.allows(host)


async def answer(route: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive, send: Send) -> None:
    """Through the same code as the documented route, without FastAPI's routing and dependency resolution."""
    request = Request(scope, receive)  # scope["app"] is the application: Starlette set it
    try:
        response = await route(request)
    except (ApiError, StoreError) as exc:
        response = error_response(exc)
    await response(scope, receive, send)
