"""The outpainting engine. Knows nothing of HTTP: usable from plain Python.

    from models import OutpaintEngine, OutpaintRequest
    engine = OutpaintEngine.load("random:tiny")
    result = engine.run(OutpaintRequest(image=img, prompt="a beach", left=64))

An `OutpaintRequest` is the image plus the parameters of `models.params.OutpaintParams`, the one list
of a request's parameters with their defaults and ranges.

Heavy imports (torch, diffusers) happen on first use of these names, so light modules such as
`models.names` stay cheap to import for the HTTP process. The errors (`models.errors`) are torch-free.
"""

from __future__ import annotations

from typing import Any

_ENGINE = ("OutpaintEngine", "OutpaintRequest", "OutpaintResult")
_ERRORS = ("Cancelled", "EngineError", "ModelSpecError", "NonFiniteOutput", "OutOfMemory", "UnknownStyle")
__all__ = [*_ERRORS, *_ENGINE]


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        from models import engine

        return getattr(engine, name)
    if name in _ERRORS:
        from models import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
