"""`random:tiny` and `random:sdxl`: seeded random weights, no files at all (built by `models.random_models`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.errors import ModelSpecError
from models.loading.source import ACCEPTED_FORMS

if TYPE_CHECKING:
    from models.components import Components

# Spelled out rather than imported: models.random_models imports torch, and check() must not.
RANDOM_SPECS = ("random:tiny", "random:sdxl")


@dataclass(frozen=True)
class RandomSource:
    name: str

    def check(self) -> None:
        if self.name not in RANDOM_SPECS:
            raise ModelSpecError(f"Unknown random model {self.name!r}.\n{ACCEPTED_FORMS}")

    def load(self, *, progress: bool = True) -> Components:
        from models.random_models import build_random

        self.check()
        return build_random(self.name)
