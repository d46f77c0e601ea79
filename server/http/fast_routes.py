"""The fast routes: requests the middleware answers ahead of FastAPI's routing and dependency resolution.

Those cost as much as the status poll's own answer, and as much as all the rest of this server's share of
a small v1 request. The route modules (server/http/routes/) add their fast paths here when they are
imported, next to the documented routes that share their code; the middleware (server/http/middleware.py)
only reads this table, and so knows no route. A path not registered simply goes through the router.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

# A fast route's answer: the request, and the path's parameters by name.
Answer = Callable[..., Awaitable[Response]]
PARAMETER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class RouteTemplate:
    """A fast route's entry in the scope, where Starlette's router puts the route it matched: the logs,
    the metrics and the 500 handler read its path."""

    path: str


@dataclass(frozen=True)
class FastRoute:
    route: RouteTemplate
    answer: Answer
    pattern: re.Pattern[str] | None  # None: the path has no parameter and is matched whole


# By method: the routes without parameters by their path (one dict lookup), then those with.
EXACT: dict[str, dict[str, FastRoute]] = {}
PATTERNS: dict[str, list[FastRoute]] = {}


def add(method: str, path: str, answer: Answer) -> None:
    """Answer `method path` (a route template: /v2/requests/{request_id}/status) with `answer(request,
    **path_params)` ahead of the router."""
    names = PARAMETER.findall(path)
    if not names:
        EXACT.setdefault(method, {})[path] = FastRoute(RouteTemplate(path), answer, None)
        return
    parts = PARAMETER.split(path)  # literal, name, literal, name, ..., literal
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
    PATTERNS.setdefault(method, []).append(FastRoute(RouteTemplate(path), answer, re.compile(regex)))


def match(scope: Scope) -> Callable[[Request], Awaitable[Response]] | None:
    """The answer to a registered fast path (marked in the scope as the router would), else None."""
    method, path = scope["method"], scope["path"]
    exact = EXACT.get(method)
    if exact is not None and (fast := exact.get(path)) is not None:
        scope["route"] = fast.route
        return fast.answer
    for fast in PATTERNS.get(method, ()):
        assert fast.pattern is not None
        if found := fast.pattern.fullmatch(path):
            params = found.groupdict()
            scope["route"], scope["path_params"] = fast.route, params
            answer = fast.answer
            return lambda request: answer(request, **params)
    return None
