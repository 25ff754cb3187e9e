"""Liveness and readiness probes.

`/healthz`: the process answers (no dependency checked: a liveness probe must not restart a pod
for a slow model). `/readyz`: a validated, warmed model is serving and the batcher runs; 503
while starting, while shutting down, or with no model.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import error_response
from ..schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])

_NOT_READY = {503: {"model": ErrorResponse, "description": "No warmed model is serving (starting or shutting down)."}}


def is_ready(request: Request) -> bool:
    state = request.app.state
    return bool(getattr(state, "ready", False)) and state.registry.active is not None


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process is up")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", response_model=ReadyResponse, responses=_NOT_READY, summary="Readiness: a warmed model serves")
async def readyz(request: Request) -> JSONResponse:
    if not is_ready(request):
        return error_response(
            503, "not_ready", "no warmed model is serving yet", headers={"Retry-After": str(request.app.state.settings.retry_after_s)}
        )
    model = request.app.state.registry.active
    return JSONResponse({"status": "ready", "model": {"name": model.name, "version": model.version, "sha256": model.sha256}})
