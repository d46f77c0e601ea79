"""The yardstick of benchmarks/api.py: the smallest FastAPI endpoint, served by the same uvicorn."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/status")
async def status() -> dict:
    return {"status": "COMPLETED", "request_id": "0123456789abcdef0123456789abcdef"}
