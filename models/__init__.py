"""The outpainting engine. Knows nothing of HTTP: usable from plain Python.

    from models import OutpaintEngine, OutpaintRequest
    engine = OutpaintEngine.load("random:tiny")
    result = engine.run(OutpaintRequest(image=img, prompt="a beach", left=64))

Heavy imports (torch, diffusers) happen on first use of these names, so light modules such as
`models.names` stay cheap to import for the HTTP process.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Cancelled", "OutpaintEngine", "OutpaintRequest", "OutpaintResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from models import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
