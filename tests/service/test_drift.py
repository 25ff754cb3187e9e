"""Drift alarm: the conformal test martingale (pure update), its monitor, the gauges, reset on swap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oodguard.service import drift
from oodguard.service.metrics import ServiceMetrics
from oodguard.service.registry import ModelRegistry
from oodguard.service.settings import Settings

from .bundle_factory import encode_image, make_tiny_bundle

N_CAL = 5000  # conformal p-values of a bundle calibrated on 5,000 images: k / 5001


def _conformal_uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1 + rng.integers(0, N_CAL + 1, n)) / (N_CAL + 1)


def test_update_is_pure_and_counts():
    s0 = drift.initial_state()
    s1 = drift.update(s0, [0.5, 0.25], alpha=0.01)
    assert s0 == drift.initial_state() and s1 is not s0
    assert s1.n == 2 and s0.n == 0
    assert s0.log_martingale == pytest.approx(0.0, abs=1e-12)  # capital 1 to start
    assert drift.update(s1, [], alpha=0.01) == s1


def test_one_step_is_a_supermartingale_under_conformal_p_values():
    """E[M_{n+1} | past] <= M_n when p is uniform on {1/(n+1), ..., 1}: the bet is fair (Ville applies)."""
    state = drift.update(drift.initial_state(), _conformal_uniform(np.random.default_rng(3), 50), alpha=0.01)
    grid = np.arange(1, N_CAL + 2) / (N_CAL + 1)
    nxt = np.array([drift.update(state, [p], alpha=0.01).log_martingale for p in grid])
    expected = math.exp(state.log_martingale)
    mean = float(np.mean(np.exp(nxt)))
    assert mean <= expected * (1 + 1e-9)
    assert mean >= expected * 0.95  # and not trivially: the bets are (almost) fair, not discarded


def test_no_alarm_in_10000_uniform_p_values_then_alarm_on_shift():
    rng = np.random.default_rng(0)
    state = drift.initial_state()
    for chunk in np.array_split(_conformal_uniform(rng, 10_000), 100):
        state = drift.update(state, chunk, alpha=0.01)
        assert not state.alarm
    assert state.n == 10_000 and state.log_martingale < math.log(100)
    steps = 0
    while not state.alarm:  # every p-value below the whole calibration set, as Gaussian noise gets
        state = drift.update(state, [1 / (N_CAL + 1)], alpha=0.01)
        steps += 1
    assert steps <= 10
    # A milder shift (p-values Beta(0.3, 1): small, but not all at the floor) is caught too.
    state = drift.update(drift.initial_state(), _conformal_uniform(rng, 10_000), alpha=0.01)
    shifted = rng.beta(0.3, 1.0, 500)
    assert drift.update(state, shifted, alpha=0.01).alarm


def test_alarm_latches():
    state = drift.update(drift.initial_state(), [1e-4] * 3, alpha=0.05)
    assert state.alarm
    # p = 1 loses every bet but "hold cash"; with a large jump rate the capital falls fast, the alarm stays.
    back = drift.update(state, [1.0] * 1000, alpha=0.05, jump=0.5)
    assert back.alarm and back.log_martingale < math.log(20)


def test_false_alarm_rate_is_at_most_alpha():
    """Ville: P(sup M >= 1/alpha) <= alpha. 400 uniform streams of 500 at alpha = 0.2."""
    rng = np.random.default_rng(1)
    alarms = sum(drift.update(drift.initial_state(), _conformal_uniform(rng, 500), alpha=0.2).alarm for _ in range(400))
    assert alarms / 400 <= 0.2 + 3 * math.sqrt(0.2 * 0.8 / 400)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2.0])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        drift.update(drift.initial_state(), [0.5], alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        drift.DriftMonitor(alpha)


def test_monitor_resets_and_ignores_other_models():
    seen = []
    mon = drift.DriftMonitor(0.01, on_change=seen.append)
    mon.reset("a")
    mon.observe("a", [1e-4] * 10)
    assert mon.state.alarm and seen[-1].alarm
    mon.observe("b", [0.5])  # a request that finished on another model: not this test's data
    assert mon.state.n == 10
    mon.reset("b")
    assert mon.model == "b" and not mon.state.alarm and mon.state.n == 0


def test_metrics_gauges_follow_the_monitor():
    m = ServiceMetrics(drift_alpha=0.01)
    m.set_model("m", "1", "sha-1")
    m.observe_predictions(np.zeros(3), np.full(3, 1e-4), np.zeros(3, bool), "sha-1")
    m.observe_predictions(np.zeros(3), np.full(3, 1e-4), np.zeros(3, bool), "sha-1")
    assert m.registry.get_sample_value("oodguard_drift_alarm") == 1
    assert m.registry.get_sample_value("oodguard_drift_log_martingale") >= math.log(100)
    assert m.registry.get_sample_value("oodguard_drift_observations") == 6
    m.set_model("m", "2", "sha-2")
    assert m.registry.get_sample_value("oodguard_drift_alarm") == 0
    assert m.registry.get_sample_value("oodguard_drift_log_martingale") == pytest.approx(0.0, abs=1e-12)


def test_registry_swap_resets_the_drift_test(tmp_path):
    b1 = make_tiny_bundle(tmp_path / "b1", "tiny", "1")
    b2 = make_tiny_bundle(tmp_path / "b2", "tiny", "2", logit_scale=8.0)
    metrics = ServiceMetrics(drift_alpha=0.01)
    reg = ModelRegistry(Settings(bundle=b1, models_dir=tmp_path / "models", max_batch=2), metrics=metrics)
    first = reg.load_initial()
    assert metrics.drift.model == first.sha256
    metrics.observe_predictions(np.zeros(5), np.full(5, 1e-4), np.zeros(5, bool), first.sha256)
    assert metrics.drift.state.alarm
    reg.register_path(b2, trusted=True)
    assert reg.activate("tiny", "2").result == "success"
    assert metrics.drift.model == reg.active.sha256 != first.sha256
    assert not metrics.drift.state.alarm and metrics.registry.get_sample_value("oodguard_drift_alarm") == 0


def test_service_alarms_on_out_of_distribution_traffic(make_client):
    """Through /v1/predict: saturated colours (in-distribution) keep it quiet, grey images (OOD) raise it."""
    client = make_client(drift_alpha=0.01)

    def gauge(name: str) -> float:
        line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(name + " "))
        return float(line.split()[-1])

    reds = [("files", (f"{i}.png", encode_image((200 + i, 10 * i, 0)), "image/png")) for i in range(5)]
    assert client.post("/v1/predict", files=reds).status_code == 200
    assert gauge("oodguard_drift_alarm") == 0 and gauge("oodguard_drift_observations") == 5
    grey = [("files", ("g.png", encode_image((128, 128, 128)), "image/png"))]
    for n in range(1, 51):
        assert client.post("/v1/predict", files=grey).status_code == 200
        if gauge("oodguard_drift_alarm") == 1:
            break
    assert gauge("oodguard_drift_alarm") == 1 and n <= 20
    assert gauge("oodguard_drift_log_martingale") >= math.log(100)
