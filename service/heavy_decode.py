"""Images that are expensive to decode are decoded in worker processes, not in the server's threads.

A decode thread shares the server's GIL. Pillow and numpy hold it in steps of up to ~10 ms while a
large image is converted (a 50 KB 16-bit 4096² PNG: ~0.4 s of CPU), and every other thread - the
event loop above all - waits up to the switch interval (5 ms) each time it needs it back: in the
hostile soak (bench/soak_hostile.py) such PNGs were among the requests overlapping the slowest
valid ones. In a worker process the decode shares only the cores, and a decoder that crashes or is
killed for memory ends a worker - the request gets a 422, the pool is replaced - never the server.

Workers run at niceness 10: a large image is decoded on CPU the small requests leave over.
What counts as expensive is known from the headers before anything is decoded (`open_images`):
declared pixels at or above `heavy_decode_min_pixels`. Small images, the common case, keep the
cheaper in-process path (inline or a decode thread): sending a CIFAR-size JPEG to a process would
cost more than decoding it.

Workers come from the same fork server as bundle validation (isolate.process_context: numpy and
the service code imported once), apply the same Pillow limits, and return the model tensor
(N x 3 x H x W float32: kilobytes), or the OodguardError's fields.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .errors import OodguardError
from .isolate import process_context
from .manifest import InputSpec
from .preprocess import ImageLimits, configure_pillow, decode_images

log = logging.getLogger(__name__)


# Below the server, above bundle validation (isolate.CHILD_NICENESS, 19): on shared cores a request
# that costs ~0.4 s of CPU yields to the ones that cost milliseconds, which it held up in the hostile
# soak (the p99 of valid requests) at the server's own priority.
WORKER_NICENESS = 10


def _init_worker(limits: ImageLimits) -> None:
    os.nice(WORKER_NICENESS)
    configure_pillow(limits)  # Pillow's bomb guard is per process


def _decode_in_worker(blobs: Sequence[bytes], spec: InputSpec, limits: ImageLimits):
    """("ok", tensor) or ("error", kind, code, message, details): an OodguardError does not pickle as itself."""
    try:
        return ("ok", decode_images(blobs, spec, limits))
    except OodguardError as exc:
        return ("error", exc.kind, exc.code, exc.message, exc.details)


class HeavyDecoder:
    """`processes` workers, started at the first heavy decode and replaced when one dies."""

    def __init__(self, processes: int, limits: ImageLimits):
        if processes < 1:
            raise ValueError("HeavyDecoder needs at least one process")
        self.processes = processes
        self.limits = limits
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=process_context(), initializer=_init_worker, initargs=(self.limits,)
                )
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # another request may have replaced it already
                self._pool = None
                self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    async def decode(self, blobs: Sequence[bytes], spec: InputSpec) -> np.ndarray:
        """The request's images as the model tensor, decoded in a worker; OodguardError as in-process decoding."""
        pool = self._executor()
        try:
            outcome = await asyncio.wrap_future(pool.submit(_decode_in_worker, list(blobs), spec, self.limits))
        except BrokenProcessPool:
            # The worker died under this request (a decoder crash, the OOM killer) or under another
            # one sharing the pool; either way its requests fail and the next one gets a fresh pool.
            self._replace(pool)
            log.warning("an image decoding worker died; its requests are refused and the workers restarted")
            raise OodguardError(
                "invalid_input", "decoder_crashed", "decoding the image ended its worker process (a malformed or hostile image)"
            ) from None
        if outcome[0] == "ok":
            return outcome[1]
        _, kind, code, message, details = outcome
        raise OodguardError(kind, code, message, **details)

    def worker_pids(self) -> list[int]:
        """The running workers' process ids (none before the first heavy decode)."""
        with self._lock:
            return list((getattr(self._pool, "_processes", None) or {}).keys())

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:  # a decode still running is not waited for
            proc.kill()
