"""Dynamic batching: concurrent requests share one onnxruntime call.

Requests queue their (already decoded) images; a collector task closes a batch when it holds
`max_batch` images or when the oldest request has waited `max_wait_ms`, whichever comes first, and
runs it on a dedicated inference thread, so the event loop never blocks on the model. While a batch
runs, the next one accumulates: under load batches grow by themselves.

The collector only waits for requests it knows are coming: a route announces a request with
`incoming()` before it reads and decodes the upload, and the ticket is handed over when the images
are queued. With nothing announced the batch runs at once, so a lone request never pays
`max_wait_ms` (at concurrency 1 a fixed wait would make batching slower than no batching).
Each caller gets only its own rows back (views into the batch outputs, no copy).

A request is never split across batches; one larger than `max_batch` runs as a batch of its own.
If a batch fails, each of its requests is re-run alone, so one poisonous input fails only its own
request; a run longer than `max_run_s` is terminated (`RunWatchdog`), so an input that makes the
graph loop fails its request instead of holding the inference thread for good. The queue is bounded
(`max_queue_images`): beyond it callers get `OodguardError` `queue_full` (kind `unavailable`). Every failure a
caller sees is an `OodguardError` of kind `unavailable`: `queue_full`, `shutting_down`, `not_ready`,
`model_changed` or `inference_failed`.

With batching off, each request runs alone on the same inference thread (no collector, no wait).
The model comes from `acquire()` (the registry's pin), taken once per batch: every request of a
batch is answered by the same model, and a hot-swap never releases a session a batch still uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ContextManager

import numpy as np

from .errors import OodguardError

log = logging.getLogger(__name__)


def unavailable(code: str, message: str) -> OodguardError:
    """Inference could not be done for a request, through no fault of its own: `code` says why."""
    return OodguardError("unavailable", code, message)


def _shutting_down() -> OodguardError:
    return unavailable("shutting_down", "the service is shutting down; retry on another instance")


@dataclass
class BatchResult:
    """One request's share of a batch: the model that ran it and its rows of every output."""

    model: Any  # LoadedModel (name, version, sha256, manifest, calibration, p_values)
    outputs: dict[str, np.ndarray]
    batch_size: int  # images in the onnxruntime call that produced it


@dataclass
class _Pending:
    images: np.ndarray  # float32 (n, 3, H, W)
    future: asyncio.Future
    enqueued: float  # loop.time()
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = int(self.images.shape[0])


class DynamicBatcher:
    def __init__(
        self,
        acquire: Callable[[], ContextManager[Any]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_images: int = 1024,
        enabled: bool = True,
        metrics=None,
        max_run_s: float | None = None,
    ):
        self._acquire = acquire
        # A run longer than this is stopped (RunOptions.terminate): a graph whose loop an input
        # triggers would otherwise hold the one inference thread for good.
        self._watchdog = RunWatchdog(max_run_s) if max_run_s else None
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue_images = int(max_queue_images)
        self.enabled = bool(enabled)
        self._metrics = metrics
        # One inference thread: onnxruntime parallelises inside a run (intra-op threads); a second
        # concurrent run would only fight it for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oodguard-infer")
        self._pending: deque[_Pending] = deque()
        self._queued = 0  # images accepted and not yet answered (queued or running)
        self._running = 0  # onnxruntime calls in progress
        self._incoming = 0  # requests announced (reading / decoding) and not yet queued
        self._nonempty = asyncio.Event()
        self._enough = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="oodguard-batcher")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, let queued and running requests finish (up to `timeout_s`), then stop."""
        self._closing = True
        self._nonempty.set()
        self._enough.set()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("batcher stop: %d image(s) still queued after %.1fs; failing them", self._queued, timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            self._settle(p, _shutting_down())
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._watchdog is not None:
            self._watchdog.stop()

    @property
    def queued_images(self) -> int:
        return self._queued

    # -- requests -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def incoming(self):
        """Announce a request that will call `infer` soon (wrap its body read + decode + infer).

        While announced requests are on their way, the collector waits (up to `max_wait_ms`) for them
        to join the batch; when none are, it runs what it has immediately.
        """
        ticket = _Ticket(self)
        self._incoming += 1
        try:
            yield ticket
        finally:
            ticket.release()

    def _arrived(self) -> None:
        self._incoming -= 1
        if self._incoming == 0:
            self._enough.set()  # nobody else is coming: no reason to keep the batch waiting

    async def infer(self, images: np.ndarray, ticket: _Ticket | None = None) -> BatchResult:
        """Run `images` (float32 N,3,H,W) through the active model; returns this request's outputs.

        `ticket` (from `incoming()`) is released once the images are queued.
        """
        n = int(images.shape[0])
        if self._closing:
            raise _shutting_down()
        if self._queued + n > self.max_queue_images and self._queued > 0:
            raise unavailable("queue_full", f"inference queue is full ({self._queued} images waiting); retry shortly")
        self._add_queued(n)
        loop = asyncio.get_running_loop()
        if not self.enabled:
            try:
                self._running += 1
                return await loop.run_in_executor(self._executor, self._run_alone, images)
            finally:
                self._running -= 1
                self._add_queued(-n)
        pending = _Pending(images, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._nonempty.set()
        if ticket is not None:
            ticket.release()
        if self._queued >= self.max_batch:
            self._enough.set()
        return await pending.future

    def _add_queued(self, n: int) -> None:
        self._queued += n
        if self._queued == 0 and self._running == 0:
            self._idle.set()
        else:
            self._idle.clear()
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queued)

    # -- the collector ------------------------------------------------------------------------------
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._nonempty.clear()
                await self._nonempty.wait()
                continue
            # Wait for announced requests to join, up to max_wait after the oldest queued one.
            while self._queued < self.max_batch and self._incoming > 0 and self.max_wait > 0 and not self._closing:
                delay = self._pending[0].enqueued + self.max_wait - loop.time()
                if delay <= 0:
                    break
                self._enough.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._enough.wait()
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            self._running += 1
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # the executor itself failed (shut down): answer everyone
                results = [unavailable("inference_failed", f"inference failed: {exc}")] * len(batch)
            finally:
                self._running -= 1
            for pending, result in zip(batch, results):
                self._settle(pending, result)

    def _take(self) -> list[_Pending]:
        """Pop requests for one batch: at most max_batch images, but always at least one request."""
        batch: list[_Pending] = []
        size = 0
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # caller gave up (timeout / disconnect): drop it
                self._pending.popleft()
                self._add_queued(-head.n)
                continue
            if batch and size + head.n > self.max_batch:
                break
            batch.append(self._pending.popleft())
            size += head.n
        return batch

    def _settle(self, pending: _Pending, result: BatchResult | BaseException) -> None:
        self._add_queued(-pending.n)
        if pending.future.done():
            return
        if isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    # -- inference thread ---------------------------------------------------------------------------
    def _run_alone(self, images: np.ndarray) -> BatchResult:
        result = self._run_batch([_PendingLike(images)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_batch(self, batch: list) -> list[BatchResult | BaseException]:
        try:
            with self._acquire() as model:
                return self._run_on(model, batch)
        except Exception as exc:  # no model loaded (or the pin itself failed)
            if isinstance(exc, OodguardError) and exc.code == "not_ready":
                return [exc] * len(batch)
            return [unavailable("inference_failed", getattr(exc, "message", None) or str(exc))] * len(batch)

    def _run_on(self, model, batch: list) -> list[BatchResult | BaseException]:
        spec = model.manifest.input
        expected = (spec.channels, spec.height, spec.width)
        results: list[BatchResult | BaseException | None] = [None] * len(batch)
        runnable = []
        for i, p in enumerate(batch):
            if tuple(p.images.shape[1:]) == expected:
                runnable.append(i)
            else:  # decoded for a model whose input size differed (a swap with a contract change)
                results[i] = unavailable("model_changed", f"the model changed while the request waited (input {expected}); retry")
        if not runnable:
            return results
        images = [batch[i].images for i in runnable]
        x = images[0] if len(images) == 1 else np.concatenate(images)
        try:
            outputs = self._timed_run(model, x)
        except Exception as exc:
            if len(runnable) == 1:
                results[runnable[0]] = self._failure(exc, 1)
                return results
            # Isolate the culprit: re-run each request alone so the others still get answers.
            log.warning("batch of %d requests failed (%s); re-running each alone", len(runnable), _short(exc))
            for i in runnable:
                try:
                    results[i] = BatchResult(model, self._timed_run(model, batch[i].images), batch[i].n)
                except Exception as exc_i:
                    results[i] = self._failure(exc_i, 1)
            return results
        start = 0
        for i in runnable:
            stop = start + batch[i].n
            rows = outputs if len(runnable) == 1 else {k: v[start:stop] for k, v in outputs.items()}
            results[i] = BatchResult(model, rows, int(x.shape[0]))
            start = stop
        return results

    def _timed_run(self, model, x: np.ndarray) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        if self._watchdog is None:
            outputs = model.run(x)
        else:
            with self._watchdog.watch() as options:
                outputs = model.run(x, options)
        if self._metrics is not None:
            self._metrics.inference_duration.observe(time.perf_counter() - t0)
            self._metrics.batch_size.observe(x.shape[0])
        return outputs

    def _failure(self, exc: Exception, n_requests: int) -> OodguardError:
        log.error("inference failed: %s", _short(exc, 500))
        if self._metrics is not None:
            self._metrics.inference_errors.inc(n_requests)
        return unavailable("inference_failed", "inference failed for this request's images; retry later or check the input")


class RunWatchdog:
    """Stops an onnxruntime run that outlives `max_run_s` by setting its `RunOptions.terminate`.

    onnxruntime checks the flag between nodes and between a Loop's iterations, so even a graph that
    loops for 2^62 iterations on some input ends (the run raises, its requests get a 503). One
    watcher thread per batcher, woken per run: a lock and a notify, not a timer thread per run.
    """

    def __init__(self, max_run_s: float):
        self.max_run_s = float(max_run_s)
        self._cond = threading.Condition()
        self._current: tuple[Any, float] | None = None  # (RunOptions, deadline)
        self._stopped = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self):
        import onnxruntime as ort

        options = ort.RunOptions()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="oodguard-run-watchdog", daemon=True)
                self._thread.start()
            self._current = (options, time.monotonic() + self.max_run_s)
            self._cond.notify()
        try:
            yield options
        finally:
            with self._cond:
                self._current = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._current is None:
                    self._cond.wait()
                    continue
                options, deadline = self._current
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                options.terminate = True
                self._current = None
                log.error("an inference run took longer than %.1f s; terminated it", self.max_run_s)


class _Ticket:
    """An announced request; released exactly once (queued, or the request failed before that)."""

    __slots__ = ("_batcher",)

    def __init__(self, batcher: DynamicBatcher):
        self._batcher: DynamicBatcher | None = batcher

    def release(self) -> None:
        if self._batcher is not None:
            batcher, self._batcher = self._batcher, None
            batcher._arrived()


@dataclass
class _PendingLike:
    """The slice of `_Pending` the inference thread needs, for the unbatched path (no future)."""

    images: np.ndarray
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = int(self.images.shape[0])


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
