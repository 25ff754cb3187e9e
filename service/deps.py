"""FastAPI dependencies as `Annotated` aliases: what a route needs, taken from `app.state`.

`create_app` puts the settings, registry, metrics and the inference layer on `app.state`; routes
declare e.g. `inference: InferenceDep` instead of reaching into the app. The hot path
(`/v1/predict`) reads `app.state.inference` directly: a dependency costs tens of microseconds.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .inference import InferenceService
from .loaded_model import LoadedModel
from .registry import ModelRegistry


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_inference(request: Request) -> InferenceService:
    return request.app.state.inference


async def get_ready_model(request: Request) -> LoadedModel:
    """The model serving now; 503 `not_ready` when none is (see `InferenceService.ready_model`)."""
    return request.app.state.inference.ready_model()


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
InferenceDep = Annotated[InferenceService, Depends(get_inference)]
ReadyModelDep = Annotated[LoadedModel, Depends(get_ready_model)]
