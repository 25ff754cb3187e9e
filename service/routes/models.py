"""GET /v1/models: what is served now, and what can be rolled back to."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from ..bundle import bundle_summary
from ..deps import ReadyModelDep, RegistryDep
from ..schemas import ErrorResponse, ModelsResponse

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={503: {"model": ErrorResponse, "description": "No model is loaded yet."}},
    summary="Active bundle (classes, input spec, operating points, metrics) and versions available for rollback",
)
async def list_models(model: ReadyModelDep, registry: RegistryDep) -> dict:
    # versions() reads manifests from the models directory: file I/O, so off the event loop.
    versions = await asyncio.to_thread(registry.versions)
    return {"active": bundle_summary(model.manifest, model.sha256), "versions": [v.to_dict() for v in versions]}
