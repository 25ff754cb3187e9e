"""Every Prometheus metric the service exports, declared once, with fixed label sets.

Each app owns one `ServiceMetrics` bound to its own `CollectorRegistry` (not the process-global
default), so several apps in one process (tests) never collide and `/metrics` shows only these.
Names follow Prometheus conventions: prefix `oodguard_`, counters end in `_total`, durations in
`_seconds`.
"""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from .drift import DEFAULT_JUMP, DriftMonitor, DriftState

# Request latency: sub-millisecond loopback hits up to slow multi-image requests.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Scores differ by kind: msp lives in [0, 1], energy / mahalanobis on wider scales.
_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
_P_VALUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# The classic text format (0.0.4): every Prometheus 2.x and 3.x parses it; our names need no escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
DECISIONS = ("accept", "reject")


class ServiceMetrics:
    """The service's metrics. Pass `registry` to share one; by default each instance gets its own."""

    def __init__(self, registry: CollectorRegistry | None = None, drift_alpha: float = 0.01, drift_jump: float = DEFAULT_JUMP):
        disable_created_metrics()  # no `_created` series: noise for dashboards (process-wide, idempotent)
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "oodguard_requests", "HTTP requests by route template and status code.", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "oodguard_request_duration_seconds",
            "Time from request start to response end, by route template.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "oodguard_inference_duration_seconds",
            "onnxruntime time per batch (one session.run).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "oodguard_batch_size", "Images per onnxruntime call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "oodguard_queue_depth", "Images accepted for inference and not yet answered (queued or running).", registry=r
        )
        self.ood_score = Histogram(
            "oodguard_ood_score", "Served OOD score per image (higher = more in-distribution).", buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.p_value = Histogram(
            "oodguard_p_value",
            "Conformal p-value per image; ~uniform for in-distribution traffic, piles up near 0 under shift.",
            buckets=_P_VALUE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter("oodguard_decisions", "Per-image verdicts.", ["decision"], registry=r)
        self.image_rejects = Counter(
            "oodguard_image_rejects", "Images refused before inference, by error code.", ["reason"], registry=r
        )
        # the FPR depends on the form an image arrives in (docs/results.md): which forms arrive, and how each fares
        self.upload_forms = Counter(
            "oodguard_upload_forms",
            "Uploaded images answered, by the upload-form group read from their header and the verdict.",
            ["group", "decision"],
            registry=r,
        )
        self.model_info = Info("oodguard_model", "The active bundle: name, version, sha256.", registry=r)
        self.model_swaps_total = Counter(
            "oodguard_model_swaps", "Model swaps by result (success, rollback, failure, rejected); counted by the registry.", ["result"],
            registry=r,
        )
        self.inference_errors = Counter(
            "oodguard_inference_errors", "Requests answered 503 because onnxruntime failed or timed out.", registry=r
        )
        self.ready = Gauge("oodguard_ready", "1 when a warmed model is serving, else 0.", registry=r)
        self.drift_alarm = Gauge(
            "oodguard_drift_alarm",
            "1 once the active model's p-value test martingale reached 1/alpha (traffic shifted); reset on model swap.",
            registry=r,
        )
        self.drift_log_martingale = Gauge(
            "oodguard_drift_log_martingale",
            "Natural log of the active model's p-value test martingale; the alarm fires at log(1/alpha).",
            registry=r,
        )
        self.drift_observations = Gauge(
            "oodguard_drift_observations", "p-values the drift martingale has seen since the last model change.", registry=r
        )
        self.drift = DriftMonitor(drift_alpha, drift_jump, on_change=self._set_drift)
        # Children of the hottest label sets, resolved once (labels() takes a lock and a dict lookup).
        self._decision = {d: self.decisions.labels(decision=d) for d in DECISIONS}

    def set_model(self, name: str, version: str, sha256: str) -> None:
        """Called whenever the active model changes (startup, swap, rollback)."""
        self.model_info.info({"name": name, "version": version, "sha256": sha256})
        self.drift.reset(sha256)  # a new model starts a new drift test

    def _set_drift(self, state: DriftState) -> None:
        self.drift_alarm.set(1 if state.alarm else 0)
        self.drift_log_martingale.set(state.log_martingale)
        self.drift_observations.set(state.n)

    def observe_predictions(self, scores, p_values, accepted, model_sha256: str | None = None,
                            forms: list[str] | None = None) -> None:
        """Record one request's per-image scores, p-values and verdicts (numpy arrays).

        `model_sha256`: the model that answered; its p-values feed the drift martingale when it is the active one.
        `forms`: each uploaded image's form group (upload_form.py); None for tensors sent already decoded.
        """
        if forms is not None:
            for (group, ok), n in collections.Counter(zip(forms, accepted.tolist())).items():
                self.upload_forms.labels(group, "accept" if ok else "reject").inc(n)
        if model_sha256 is not None:
            self.drift.observe(model_sha256, p_values)
        for s in scores.tolist():
            self.ood_score.observe(s)
        for p in p_values.tolist():
            self.p_value.observe(p)
        n_accept = int(accepted.sum())
        if n_accept:
            self._decision["accept"].inc(n_accept)
        if n_accept != accepted.size:
            self._decision["reject"].inc(accepted.size - n_accept)

    def render(self) -> bytes:
        return generate_latest(self.registry)
