"""Seeds: the contract's range, drawing one for seed -1, and each sample's (kept free of torch imports)."""

from __future__ import annotations

import random

MAX_SEED = 999_999_999_999_999


def draw_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def sample_seeds(first: int, samples: int) -> list[int]:
    """Sample i's seed: first + i, wrapping past MAX_SEED to 0, so every seed reported for an image is
    one a request may send to get that image again alone."""
    if not 0 <= first <= MAX_SEED:
        raise ValueError(f"seed: must be -1 or 0 to {MAX_SEED}, not {first}")
    return [(first + i) % (MAX_SEED + 1) for i in range(samples)]
