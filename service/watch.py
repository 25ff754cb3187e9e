"""Watch mode: poll the models directory's `ACTIVE` pointer and swap when it names another version.

`oodguard deploy --models-dir` (or an operator's editor) writes the pointer; a service started with
`--watch-interval N` picks it up within N seconds. A pointer that failed (unreadable, or a version
that does not validate) is not retried until the state file is written again.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .errors import OodguardError
from .store import ModelStore, split_ref

if TYPE_CHECKING:
    from .registry import ModelRegistry, SwapResult

log = logging.getLogger(__name__)


class PointerWatcher:
    """One poll (`check`) and a daemon thread running it every `interval_s` (`start` / `stop`)."""

    def __init__(self, registry: ModelRegistry, store: ModelStore):
        self._registry = registry
        self._store = store
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The state-file signature whose pointer failed: not retried until the file is rewritten.
        self._failed: tuple[int, int, int] | None = None

    def skip_current(self) -> None:
        """Do not act on the pointer as it is now (it failed at start-up; the operator must rewrite it)."""
        self._failed = self._store.state_signature()

    def check(self) -> SwapResult | None:
        """One poll: swap if the pointer names another version than the one served; the swap's result, or None."""
        signature = self._store.state_signature()
        if signature is None or signature == self._failed:
            return None
        try:
            pointer = self._store.pointer()
        except OodguardError as exc:
            log.warning("watch: cannot read %s: %s", self._store.state_path, exc)
            self._failed = signature
            return None
        active = self._registry.active
        if pointer is None or (active is not None and pointer[0] == active.ref):
            return None
        name, version = split_ref(pointer[0])
        log.info("watch: ACTIVE changed to %s", pointer[0])
        try:
            return self._registry.activate(name, version, allow_contract_change=pointer[1], action="watch")
        except OodguardError as exc:
            # Taken after the failure: recording the failed attempt rewrote the state file itself.
            self.skip_current()
            log.error("watch: not switching to %s: %s", pointer[0], exc)
            return None

    def start(self, interval_s: float) -> None:
        if self._thread is not None or interval_s <= 0:
            return
        self._stop.clear()

        def _loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check()
                except Exception:  # the watcher must never die silently
                    log.exception("watch: unexpected error")

        self._thread = threading.Thread(target=_loop, name="oodguard-watch", daemon=True)
        self._thread.start()
        log.info("watching %s every %.1fs", self._store.state_path, interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
