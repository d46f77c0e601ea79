"""`random:tiny` and `random:sdxl`: seeded random weights, no files at all (built by `models.random_models`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.errors import ModelSpecError
from models.loading.source import ACCEPTED_FORMS, sdxl_configs

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

    def configs(self) -> dict[str, dict[str, Any]]:
        from models import architectures as arch

        self.check()
        if self.name == "random:sdxl":
            return sdxl_configs()
        return {
            "unet": arch.TINY_UNET,
            "text_encoder": arch.TINY_TEXT_ENCODER,
            "text_encoder_2": arch.TINY_TEXT_ENCODER_2,
        }

    def load(self, *, progress: bool = True) -> Components:
        from models.random_models import build_random

        self.check()
        return build_random(self.name)
