"""The inference layer (MLServer's data plane): everything a prediction needs between a protocol and the model.

`InferenceService` is the one object that owns readiness, decoding with its limits, the batching
ticket, inference with its deadline, scoring and the prediction metrics. The protocol adapters only
translate: `/v1/predict` (the documented FastAPI route and the plain-ASGI fast path, routes/predict.py)
calls `predict`; the Open Inference Protocol's `/v2/.../infer` (routes/v2.py) decodes its tensors
with `v2_codec` and calls `infer` and `verdict`. Every failure is an `OodguardError`; errors.py alone
turns it into an HTTP status.

A request's way: adapter -> `ready_model()` -> [batcher ticket -> read body -> `decode()`]
-> `infer()` (batcher, deadline) -> `score()` / `verdict()` (+ metrics) -> adapter's response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batching import BatchResult, DynamicBatcher
from .errors import OodguardError, not_ready
from .heavy_decode import HeavyDecoder
from .loaded_model import LoadedModel
from .manifest import BundleManifest, InputSpec, OperatingPoint
from .metrics import ServiceMetrics
from .postprocess import NonFiniteOutput, Scored, score_outputs
from .preprocess import ImageLimits, declared_pixels, load_images, open_images
from .registry import ModelRegistry
from .request_body import read_images
from .settings import Settings
from .upload_form import DEFAULT_GROUPS, UploadForm, read_upload_forms

log = logging.getLogger(__name__)


class InferenceService:
    """One per app: `start()` in the lifespan, then `predict` / `infer` / `verdict` per request, `stop()` at the end."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: ServiceMetrics, limits: ImageLimits):
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.limits = limits
        self.batcher: DynamicBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.heavy_decoder: HeavyDecoder | None = None
        self._serving = False

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> LoadedModel:
        """Load, validate and warm the model (in a thread: seconds), start the batcher and the watcher."""
        settings = self.settings
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="oodguard-decode")
        if settings.heavy_decode_processes:
            self.heavy_decoder = HeavyDecoder(settings.heavy_decode_processes, self.limits)
        try:
            model = await asyncio.to_thread(self.registry.load_initial)
        except Exception:
            self.decode_pool.shutdown(wait=False)
            raise
        self.batcher = DynamicBatcher(
            self.registry.acquire,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue_images=settings.max_queue_images,
            enabled=settings.batching,
            metrics=self.metrics,
            max_run_s=settings.request_timeout_s,  # its requests have been answered 503 timeout by then
        )
        await self.batcher.start()
        self.registry.start_watch()
        self._serving = True
        self.metrics.ready.set(1)
        log.info(
            "ready: %s/%s (batching %s, max_batch %d, max_wait %.1f ms, intra-op threads %d)",
            model.name, model.version, "on" if settings.batching else "off",
            settings.max_batch, settings.max_wait_ms, settings.intra_op_threads,
        )
        return model

    async def stop(self) -> None:
        """Stop taking work, drain what is queued (up to graceful_shutdown_s), release everything."""
        self._serving = False
        self.metrics.ready.set(0)
        self.registry.close()  # stops the watcher and any bundle validation still running
        if self.batcher is not None:
            await self.batcher.stop(self.settings.graceful_shutdown_s)
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.heavy_decoder is not None:
            self.heavy_decoder.close()
        log.info("stopped")

    # -- readiness ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._serving and self.registry.active is not None

    def ready_model(self) -> LoadedModel:
        """The model serving now; `not_ready` (503) while starting, shutting down, or with no model."""
        model = self.registry.active
        if model is None or not self._serving:
            raise not_ready()
        return model

    def model_named(self, name: str, version: str | None = None) -> LoadedModel:
        """The serving model if it is `name` (and `version`, if given); 404 `model_not_found` otherwise."""
        model = self.ready_model()
        if name != model.name:
            raise OodguardError("not_found", "model_not_found", f"unknown model {name!r}; this server serves {model.name!r}")
        if version is not None and version != model.version:
            raise OodguardError(
                "not_found", "model_not_found", f"model {name!r} version {version!r} is not being served (active: {model.version!r})"
            )
        return model

    # -- /v1/predict: encoded images in, predictions out -------------------------------------------
    async def predict(
        self,
        content_type: str,
        stream: Callable[[], AsyncIterator[bytes]],
        body: Callable[[], Awaitable[bytes]],
        top_k: int,
        operating_point: str | None,
    ) -> tuple[LoadedModel, Scored]:
        """Read the images a body carries, decode, infer, score: (the model that answered, its predictions).

        `stream()` yields the body's chunks, `await body()` returns it whole (Starlette Request's methods).
        """
        model = self.ready_model()
        manifest = model.manifest
        if top_k > len(manifest.classes):
            raise OodguardError("invalid_input", "invalid_top_k", f"top_k must be between 1 and {len(manifest.classes)} (the number of classes)")
        resolve_operating_point(manifest, operating_point)  # fail fast, before reading the body
        with self.batcher.incoming() as ticket:  # lets the batcher wait for this request instead of running without it
            blobs = await read_images(content_type, stream, body, self.settings.max_images_per_request)
            images, forms = await self.decode(blobs, manifest.input)
            del blobs
            result = await self.infer(images, ticket)
        return result.model, self.score(result, top_k, operating_point, forms)

    async def decode(self, blobs: list[bytes], spec: InputSpec) -> tuple[np.ndarray, list[UploadForm]]:
        """A request's encoded images -> (float32 (N, 3, H, W), each image's upload form read from its header:
        upload_form.py); refusals are counted by code.

        Where, by what the request costs: small images on the event loop, large ones in worker
        processes (heavy_decode.py), the rest in the decode threads. Handing a CIFAR-size JPEG to a
        thread costs more than decoding it (a future, two wake-ups and a GIL hand-off each way;
        +10-15% throughput inline, bench/serve.py), so requests whose images are small in bytes
        (bounded header parsing) *and* in declared pixels (65,536 pixels take about a millisecond)
        are decoded inline. Headers of larger bodies are read in a thread. A request declaring at
        least heavy_decode_min_pixels goes to a worker process, whose decode cannot hold the server's
        GIL; anything between is decoded in a thread. Nothing large runs on the loop.
        """
        settings = self.settings
        try:
            loop = asyncio.get_running_loop()
            if sum(map(len, blobs)) > settings.inline_decode_max_bytes:
                images, forms = await loop.run_in_executor(self.decode_pool, self._decode_unless_heavy, blobs, spec)
                return (images if images is not None else await self.heavy_decoder.decode(blobs, spec)), forms
            opened = open_images(blobs, self.limits)
            forms = read_upload_forms(opened, spec)
            if declared_pixels(opened) <= settings.inline_decode_max_pixels:
                return load_images(opened, spec), forms
            if self._is_heavy(opened):
                return await self.heavy_decoder.decode(blobs, spec), forms
            return await loop.run_in_executor(self.decode_pool, load_images, opened, spec), forms
        except OodguardError as exc:
            self.metrics.image_rejects.labels(exc.code).inc()
            raise

    def _is_heavy(self, opened: list) -> bool:
        """Whether the opened images go to the worker processes (then they are closed here: only bytes travel)."""
        if self.heavy_decoder is None or declared_pixels(opened) < self.settings.heavy_decode_min_pixels:
            return False
        for img in opened:
            img.close()
        return True

    def _decode_unless_heavy(self, blobs: list[bytes], spec: InputSpec) -> tuple[np.ndarray | None, list[UploadForm]]:
        """In a decode thread: (the tensor, or None when the headers say the request is for the workers; the forms)."""
        opened = open_images(blobs, self.limits)
        forms = read_upload_forms(opened, spec)
        return (None if self._is_heavy(opened) else load_images(opened, spec)), forms

    # -- every protocol -----------------------------------------------------------------------------
    async def infer(self, images: np.ndarray, ticket=None) -> BatchResult:
        """Run decoded images through the batcher within request_timeout_s (else 503 `timeout`).

        `ticket`: from `incoming()`, when the request announced itself before reading its body.
        """
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await self.batcher.infer(images, ticket)
        except TimeoutError:
            self.metrics.inference_errors.inc()
            raise OodguardError("unavailable", "timeout", f"inference took longer than {self.settings.request_timeout_s}s") from None

    def score(self, result: BatchResult, top_k: int, operating_point: str | None,
              forms: list[UploadForm] | None = None) -> Scored:
        """Predictions of the model that answered (a hot-swap may have happened meanwhile), recorded in the metrics.

        `forms`: each image's upload form (None: tensors sent already decoded), mapped to the form groups of
        the model that answered: its thresholds and p-values are its own groups'."""
        return self._score(result, top_k, operating_point, required=True, forms=forms)

    def verdict(self, result: BatchResult, operating_point: str | None, required: bool) -> dict[str, np.ndarray] | None:
        """The verdict as tensors (`ood_score`, `p_value`, `accept`, `label_index`), scored as `score` scores.

        When no verdict can be given (outputs not finite; after a swap, a model without the
        operating point) a request that asked for it gets the error, and one that did not gets None.
        """
        scored = self._score(result, 1, operating_point, required)
        if scored is None:
            return None
        return {
            "ood_score": np.asarray(scored.scores, dtype=np.float32),
            "p_value": np.asarray(scored.p_values, dtype=np.float64),
            "accept": np.asarray(scored.accepted, dtype=np.bool_),
            "label_index": np.asarray([p["class_index"] for p in scored.predictions], dtype=np.int64),
        }

    def _score(self, result: BatchResult, top_k: int, operating_point: str | None, required: bool,
               forms: list[UploadForm] | None = None) -> Scored | None:
        served = result.model
        # the groups of the model that answered; a bundle without forms reports the default groups in the metrics
        groups = None if forms is None else (served.form_groups or DEFAULT_GROUPS).groups_of(forms)
        try:
            op = resolve_operating_point(served.manifest, operating_point, swapped=True)
            scored = score_outputs(served, result.outputs, top_k, op, groups)
        except NonFiniteOutput as exc:
            if not required:
                return None
            self.metrics.inference_errors.inc()
            raise OodguardError("unavailable", "inference_failed", str(exc)) from None
        except OodguardError:
            if not required:
                return None
            raise
        self.metrics.observe_predictions(scored.scores, scored.p_values, scored.accepted, served.sha256, groups)
        return scored


def resolve_operating_point(manifest: BundleManifest, name: str | None, swapped: bool = False) -> OperatingPoint:
    """The manifest's operating point `name` (None: its default); 422 if unknown, 503 model_changed after a swap."""
    try:
        return manifest.operating_point(name)
    except KeyError:
        known = ", ".join(op.name for op in manifest.operating_points)
        if swapped:  # valid when the request arrived; the model that answered lacks it
            raise OodguardError("unavailable", "model_changed", f"the model changed and has no operating point {name!r}; retry") from None
        raise OodguardError("invalid_input", "unknown_operating_point", f"unknown operating_point {name!r}; this model has: {known}") from None
