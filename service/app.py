"""The FastAPI application factory: `create_app(settings) -> FastAPI`.

Composition only: settings, metrics, registry, batcher and decode pool are built here and hung on
`app.state`; routes live one per file in `routes/`. The lifespan loads, validates and warms the
model (in a thread) before the server accepts traffic, starts the batcher and the registry's
watcher, and on shutdown stops taking work, drains what is queued, then releases everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .batching import DynamicBatcher
from .errors import install_error_handlers
from .metrics import ServiceMetrics
from .middleware import ServiceMiddleware
from .preprocess import ImageLimits, configure_pillow
from .registry import ModelRegistry
from .schemas import ErrorResponse
from .security import configured_token
from .routes import admin, health, models, predict, v2
from .routes import metrics as metrics_route
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="oodguard-decode")
        try:
            model = await asyncio.to_thread(registry.load_initial)  # validate + warm: seconds, off the loop
        except Exception as exc:
            # The middleware hands this line (not a traceback) to the server, which logs it and exits.
            state.startup_error = f"cannot serve a model: {exc}"
            state.decode_pool.shutdown(wait=False)
            raise
        batcher = DynamicBatcher(
            registry.acquire,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue_images=settings.max_queue_images,
            enabled=settings.batching,
            metrics=metrics,
            max_run_s=settings.request_timeout_s,  # its requests have been answered 503 timeout by then
        )
        await batcher.start()
        state.batcher = batcher
        registry.start_watch(settings.watch_interval_s)
        state.ready = True
        metrics.ready.set(1)
        log.info(
            "ready: %s/%s (batching %s, max_batch %d, max_wait %.1f ms, intra-op threads %d)",
            model.name, model.version, "on" if settings.batching else "off",
            settings.max_batch, settings.max_wait_ms, settings.intra_op_threads,
        )
        try:
            yield
        finally:
            state.ready = False
            metrics.ready.set(0)
            registry.close()  # stops the watcher and any bundle validation still running
            await batcher.stop(settings.graceful_shutdown_s)
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            log.info("stopped")

    app = FastAPI(
        title="oodguard",
        description=DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
        responses={
            500: {"model": ErrorResponse, "description": "Unexpected server error (a bug): JSON error with the request id."},
        },
    )
    state = app.state
    state.settings = settings
    state.metrics = metrics
    state.registry = registry
    state.limits = limits
    state.batcher = None
    state.decode_pool = None
    state.ready = False
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oodguard")
    except PackageNotFoundError:
        return "0"
