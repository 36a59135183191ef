"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.errors import error_envelope
from chatbot_api.llm.base import Provider

router = APIRouter(tags=["health"])

READY_DB_TIMEOUT = 2.0


@router.get("/health", summary="Liveness: the process is serving")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _database_ok(engine: AsyncEngine) -> bool:
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT), engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:
        return False
    return True


@router.get(
    "/health/ready",
    summary="Readiness: the database answers and the provider is configured",
    responses={503: {"description": "Not ready: see `details`."}},
)
async def ready(request: Request) -> JSONResponse:
    provider: Provider = request.app.state.provider
    checks: dict[str, Any] = {
        "database": "ok" if await _database_ok(request.app.state.engine) else "unavailable",
        "provider": "ok" if provider.is_ready() else "not_configured",
        "model": provider.model,
    }
    if getattr(request.app.state, "shutting_down", False):
        checks["server"] = "shutting_down"
    if checks["database"] == "ok" and checks["provider"] == "ok" and "server" not in checks:
        return JSONResponse({"status": "ready", **checks})
    body = error_envelope("not_ready", "The service is not ready.", [checks])
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
