"""Per-key rate limits (requests per minute with a burst), from the `limits` library."""

from __future__ import annotations

import math
import time
from functools import lru_cache

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from server.http.errors import RateLimited


@lru_cache(maxsize=256)
def check_rate_limit(spec: str) -> tuple[RateLimitItem, ...]:
    """The parsed limits; raises ValueError on bad notation, so a typo stops startup, not a request."""
    items = tuple(parse_many(spec))
    if not items:
        raise ValueError(f"no rate limit in {spec!r}")
    return items


class RateLimiter:
    """`spec` is limits' notation, e.g. "60/minute;10/second": 60 a minute, at most 10 in any second."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        if spec:
            check_rate_limit(spec)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, who: str, spec: str | None = None) -> dict[str, str]:
        """Count one submission of `who` against `spec` (a key's own), else the server's limit.

        Returns the X-RateLimit-* headers of the tightest limit; raises RateLimited (429) past one."""
        spec = spec or self.spec
        items = check_rate_limit(spec) if spec else ()
        for item in items:
            # Tested before any is hit, so a refused request does not use up the other windows.
            if not self.limiter.test(item, who):
                reset, _ = self.limiter.get_window_stats(item, who)
                wait = max(1, math.ceil(reset - time.time()))
                raise RateLimited(
                    f"rate limit of {item} exceeded; retry in {wait} s",
                    headers={
                        "Retry-After": str(wait),
                        "X-RateLimit-Limit": str(item.amount),
                        "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": str(math.ceil(reset)),
                    },
                )
        headers: dict[str, str] = {}
        tightest = math.inf
        for item in items:
            self.limiter.hit(item, who)
            reset, remaining = self.limiter.get_window_stats(item, who)
            if remaining < tightest:
                tightest = remaining
                headers = {
                    "X-RateLimit-Limit": str(item.amount),
                    "X-RateLimit-Remaining": str(remaining),
                    "X-RateLimit-Reset": str(math.ceil(reset)),
                }
        return headers
