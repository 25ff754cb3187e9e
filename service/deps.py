"""FastAPI dependencies as `Annotated` aliases: what a route needs, taken from `app.state`.

`create_app` puts the settings, registry, batcher, metrics, image limits and decode pool on
`app.state`; routes declare e.g. `registry: RegistryDep` instead of reaching into the app.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, Request

from .batching import DynamicBatcher
from .errors import unavailable
from .metrics import ServiceMetrics
from .preprocess import ImageLimits
from .registry import ModelRegistry
from .settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_limits(request: Request) -> ImageLimits:
    return request.app.state.limits


async def get_decode_pool(request: Request) -> ThreadPoolExecutor:
    return request.app.state.decode_pool


async def get_batcher(request: Request) -> DynamicBatcher:
    """The running batcher; 503 while the service starts or shuts down."""
    state = request.app.state
    batcher = getattr(state, "batcher", None)
    if batcher is None or not state.ready:
        raise unavailable("not_ready", "the service is not ready (starting, or shutting down)", state.settings.retry_after_s)
    return batcher


async def get_active_model(request: Request) -> Any:
    """The model serving now (a LoadedModel); 503 when none is loaded."""
    state = request.app.state
    model = state.registry.active
    if model is None or not state.ready:
        raise unavailable("not_ready", "no model is loaded yet", state.settings.retry_after_s)
    return model


async def get_request_id(request: Request) -> str:
    return request.state.request_id


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
LimitsDep = Annotated[ImageLimits, Depends(get_limits)]
DecodePoolDep = Annotated[ThreadPoolExecutor, Depends(get_decode_pool)]
BatcherDep = Annotated[DynamicBatcher, Depends(get_batcher)]
ActiveModelDep = Annotated[Any, Depends(get_active_model)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
