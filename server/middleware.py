"""The one middleware: access log, metrics and the guard's response headers, as plain ASGI.

Plain ASGI rather than `@app.middleware("http")`: no extra task and stream per request, request
disconnects reach the endpoints, and an error answer leaves the connection usable.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, error_response
from server.jobs.contract import from_units
from server.jobs.store import StoreError
from server.metrics import Metrics

access = logging.getLogger("beyond.access")
# The status poll is answered here, ahead of FastAPI's routing and dependency resolution, which cost
# as much as the answer itself; the route in server/routes/v2.py documents it and shares its code.
STATUS_PATH = re.compile(r"/v2/requests/([^/]+)/status")
STATUS_ROUTE = "/v2/requests/{request_id}/status"


class ServingMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, balance: Callable[[str], int | None]) -> None:
        self.app = app
        self.metrics = metrics
        self.balance = balance

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

        status_poll = STATUS_PATH.fullmatch(scope["path"]) if scope["method"] == "GET" else None
        try:
            if status_poll is None:
                await self.app(scope, receive, send_with_headers)
            else:
                await self.answer_status(scope, receive, send_with_headers, status_poll.group(1))
        finally:
            # The route template, not the path: request ids would make every path its own series.
            route = STATUS_ROUTE if status_poll else getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            method = scope["method"]
            self.metrics.observe_request(method, route, status, seconds)
            caller = state.get("caller")
            request_id = request_id or (scope.get("path_params") or {}).get("request_id")
            if status_poll:
                request_id = status_poll.group(1)
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

    async def answer_status(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        from server.routes.v2 import answer_status  # the routes import this module's app wiring

        request = Request(scope, receive)  # scope["app"] is the application: Starlette set it
        try:
            response = await answer_status(request, request_id)
        except (ApiError, StoreError) as exc:
            response = error_response(exc)
        await response(scope, receive, send)
