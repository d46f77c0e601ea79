"""Seeds: the contract's range, and drawing one for seed -1 (kept free of torch imports)."""

from __future__ import annotations

import random

MAX_SEED = 999_999_999_999_999


def draw_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)
