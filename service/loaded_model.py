"""One validated, warmed bundle as the service runs it, and what two bundles differ in for a client.

`LoadedModel` is created by the registry only after `verify_bundle` passed on the very session it
holds. It counts its own users: `pin()` / `unpin()` around every batch, `retire()` when a swap
replaces it; its session is released when it is retired and its last pin ends, never earlier.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BundleError, bundle_summary, conformal_p_values
from .manifest import BundleManifest
from .store import ref
from .upload_form import NATIVE

log = logging.getLogger(__name__)


class LoadedModel:
    """One validated, warmed bundle with its onnxruntime session."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, sha256: str, session, calibration: np.ndarray,
                 form_calibration: dict[str, np.ndarray] | None = None):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.sha256 = sha256
        # float64 once here: conformal_p_values compares in float64, and would otherwise convert per request.
        self.calibration = np.asarray(calibration, dtype=np.float64)
        # form-conditional bundles: each upload-form group's own calibration scores (upload_form.py)
        self.form_calibration = None if form_calibration is None else {
            group: np.asarray(scores, dtype=np.float64) for group, scores in form_calibration.items()}
        self.form_groups = manifest.form_groups  # how an upload's form maps to those groups (upload_form.py)
        self.output_names: list[str] = [o.name for o in session.get_outputs()]
        self.input_name: str = manifest.input.name
        self.loaded_at = time.time()
        self._session = session
        self._lock = threading.Lock()  # tiny critical sections: safe to take on the event loop
        self._inflight = 0
        self._retired = False

    @property
    def ref(self) -> str:
        return ref(self.name, self.version)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def released(self) -> bool:
        return self._session is None

    def pin(self) -> bool:
        """Count one more user (a batch about to run); False if the model is retired: take the active one instead."""
        with self._lock:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def unpin(self) -> None:
        """One user is done; the last one out of a retired model releases its session."""
        with self._lock:
            self._inflight -= 1
            release = self._retired and self._inflight == 0
        if release:
            self._release()

    def retire(self) -> None:
        """No new user will pin it (a swap replaced it); released now if nobody uses it, else by the last `unpin`."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            release = self._inflight == 0
        if release:
            self._release()

    def warm(self, batches: tuple[int, ...]) -> None:
        """Run a zero batch of each size once (onnxruntime allocates and plans on first use). Raises BundleError."""
        spec = self.manifest.input
        for batch in batches:
            dummy = np.zeros((batch, spec.channels, spec.height, spec.width), dtype=np.float32)
            try:
                self.run(dummy)
            except Exception as exc:
                raise BundleError("warm", f"warm-up batch of {batch} failed: {exc}") from None

    def run(self, images: np.ndarray, run_options=None) -> dict[str, np.ndarray]:
        """float32 NCHW in [0,1] -> {output name: array}. Thread-safe (onnxruntime sessions are).

        `run_options`: an `onnxruntime.RunOptions` whose `terminate` another thread may set to stop it.
        """
        session = self._session
        if session is None:
            raise RuntimeError(f"model {self.ref} was released; acquire() the active model before running it")
        outputs = session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)}, run_options)
        return dict(zip(self.output_names, outputs))

    def p_values(self, scores: np.ndarray, forms: list[str] | None = None) -> np.ndarray:
        """Conformal p-values; in a form-conditional bundle each against its upload-form group's scores
        (`forms`: one group per score; None: images sent already decoded, the `native` group)."""
        if self.form_calibration is None:
            return conformal_p_values(self.calibration, scores)
        scores = np.asarray(scores)
        groups = np.asarray(forms if forms is not None else [NATIVE] * scores.size)
        out = np.empty(scores.shape, dtype=np.float64)
        for group in np.unique(groups):
            mask = groups == group
            out[mask] = conformal_p_values(self.form_calibration[str(group)], scores[mask])
        return out

    def summary(self) -> dict[str, Any]:
        return bundle_summary(self.manifest, self.sha256)

    def _release(self) -> None:
        self._session = None  # onnxruntime frees the session's memory when the last reference goes
        log.info("released session of %s (sha256 %s…)", self.ref, self.sha256[:12])


def key_metrics(manifest: BundleManifest) -> dict[str, Any]:
    """The few numbers worth printing next to a version: its operating point and evaluation metrics."""
    op = manifest.operating_point()
    return {
        "method": manifest.training.get("method"),
        "score": manifest.score.name,
        "operating_point": op.name,
        "threshold": op.threshold,
        "realised_tpr": op.realised_tpr,
        "fpr": dict(op.fpr),
        "metrics": manifest.metrics,
    }


def contract_diff(old: BundleManifest, new: BundleManifest) -> dict[str, dict[str, Any]]:
    """Contract fields (classes, input, outputs, score) that changed incompatibly: {field: {"old", "new"}}.

    Adding graph outputs is compatible (every output a client used is still there, e.g. a retrained
    bundle that also exports `mahalanobis`); removing or renaming one is not.
    """
    a, b = old.contract, new.contract
    diff = {k: {"old": a.get(k), "new": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    if "outputs" in diff and set(a.get("outputs") or []) <= set(b.get("outputs") or []):
        del diff["outputs"]
    return diff
