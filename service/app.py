"""The FastAPI application factory: `create_app(settings) -> FastAPI`.

Composition only: settings, metrics, registry and the inference layer (`InferenceService`: batcher,
decode pool, readiness) are built here and hung on `app.state`; routes live one per file in
`routes/`, each a thin adapter. The lifespan starts the inference layer - which loads, validates and
warms the model (in a thread) before the server accepts traffic, starts the batcher and the
registry's watcher - and on shutdown stops it: no new work, drain what is queued, release everything.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .errors import install_error_handlers
from .inference import InferenceService
from .metrics import ServiceMetrics
from .middleware import ServiceMiddleware
from .preprocess import ImageLimits, configure_pillow
from .registry import ModelRegistry
from .schemas import ErrorResponse
from .security import configured_token
from .routes import admin, health, models, predict, v2
from .routes import metrics as metrics_route
from .routes.health import server_version
from .settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Inference-time out-of-distribution guard. Send an image, get the class **and** whether to trust it:
each prediction carries the bundle's OOD score (higher = more in-distribution), a conformal
p-value against held-out in-distribution calibration scores, and an accept/reject decision at a
calibrated operating point (a target true-positive rate on in-distribution images).

Every error is JSON: `{"error": {"code": "...", "message": "..."}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    metrics = ServiceMetrics(drift_alpha=settings.drift_alpha, drift_jump=settings.drift_jump)
    limits = ImageLimits.from_settings(settings)
    configure_pillow(limits)
    registry = ModelRegistry(settings, metrics=metrics)
    inference = InferenceService(settings, registry, metrics, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await inference.start()
        except Exception as exc:
            # The middleware hands this line (not a traceback) to the server, which logs it and exits.
            app.state.startup_error = f"cannot serve a model: {exc}"
            raise
        try:
            yield
        finally:
            await inference.stop()

    app = FastAPI(
        title="oodguard",
        description=DESCRIPTION,
        version=server_version(),
        lifespan=lifespan,
        responses={
            500: {"model": ErrorResponse, "description": "Unexpected server error (a bug): JSON error with the request id."},
        },
    )
    state = app.state
    state.settings = settings
    state.metrics = metrics
    state.registry = registry
    state.inference = inference
    state.startup_error = None

    install_error_handlers(app)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.client_timeout_s,
    )
    for module in (predict, models, health, metrics_route, v2):
        app.include_router(module.router)
    if configured_token(settings) is not None:
        # Admin off means absent: no /admin in OpenAPI, and every /admin* path and method answers
        # what an unknown path answers (404; no 405 from a matching path, no slash redirect).
        app.include_router(admin.router)
    if settings.fast_predict:
        predict.install_fast_path(app)
    return app

