"""Liveness and readiness probes.

`/healthz`: the process answers (no dependency checked: a liveness probe must not restart a pod
for a slow model). `/readyz`: a validated, warmed model is serving and the batcher runs; 503
`not_ready` while starting, while shutting down, or with no model (`InferenceService.ready_model`,
the one place that decides it).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import InferenceDep
from ..schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])

_NOT_READY = {503: {"model": ErrorResponse, "description": "No warmed model is serving (starting or shutting down)."}}


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oodguard")
    except PackageNotFoundError:
        return "0"


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process is up")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", response_model=ReadyResponse, responses=_NOT_READY, summary="Readiness: a warmed model serves")
async def readyz(inference: InferenceDep) -> JSONResponse:
    model = inference.ready_model()
    return JSONResponse({"status": "ready", "model": {"name": model.name, "version": model.version, "sha256": model.sha256}})
