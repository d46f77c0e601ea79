"""The browser playground: GET / answers its page, /static/ its script and style sheet (no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(include_in_schema=False)
router.mount("/static", StaticFiles(directory=STATIC), name="static")


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
