"""Per-key rate limits (requests per minute with a burst), from the `limits` library."""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from server.errors import RateLimited


class RateLimiter:
    """`spec` is limits' notation, e.g. "60/minute;10/second": 60 a minute, at most 10 in any second."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, who: str, spec: str | None = None) -> None:
        """Count one submission of `who` against `spec` (a key's own), else the server's limit."""
        spec = spec or self.spec
        for item in parse_many(spec) if spec else []:
            if not self.limiter.hit(item, who):
                reset, _ = self.limiter.get_window_stats(item, who)
                wait = max(1, math.ceil(reset - time.time()))
                raise RateLimited(
                    f"rate limit of {item} exceeded; retry in {wait} s",
                    headers={
                        "Retry-After": str(wait),
                        "X-RateLimit-Limit": str(item.amount),
                        "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": str(int(reset)),
                    },
                )
