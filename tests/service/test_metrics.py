"""/metrics: Prometheus text that prometheus_client's own parser reads, with counters that move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from oodguard.service.metrics import ServiceMetrics

from .bundle_factory import encode_image

EXPECTED_FAMILIES = {
    "oodguard_requests": "counter",
    "oodguard_request_duration_seconds": "histogram",
    "oodguard_inference_duration_seconds": "histogram",
    "oodguard_batch_size": "histogram",
    "oodguard_queue_depth": "gauge",
    "oodguard_ood_score": "histogram",
    "oodguard_p_value": "histogram",
    "oodguard_decisions": "counter",
    "oodguard_image_rejects": "counter",
    "oodguard_model_info": "gauge",  # an Info metric: a constant-1 gauge in the text format
    "oodguard_model_swaps": "counter",
    "oodguard_inference_errors": "counter",
    "oodguard_ready": "gauge",
}


def _samples(client) -> dict[str, dict[tuple, float]]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = family.type
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    out["__families__"] = families
    return out


def test_every_metric_is_declared_with_its_type(client):
    families = _samples(client)["__families__"]
    for name, kind in EXPECTED_FAMILIES.items():
        assert families.get(name) == kind, (name, families.get(name))
    assert all(name.startswith("oodguard_") for name in families)


def test_counters_move_with_traffic(client):
    png = lambda c: encode_image(c, fmt="PNG")  # noqa: E731
    before = _samples(client)
    for _ in range(3):
        assert client.post("/v1/predict", content=png((255, 0, 0)), headers={"content-type": "image/png"}).status_code == 200
    files = [("files", ("g.png", png((128, 128, 128)), "image/png")), ("files", ("b.png", png((0, 0, 255)), "image/png"))]
    assert client.post("/v1/predict", files=files).status_code == 200
    assert client.post("/v1/predict", content=b"junk", headers={"content-type": "image/png"}).status_code == 415
    assert client.get("/v1/nope").status_code == 404
    after = _samples(client)

    def delta(name, **labels):
        key = tuple(sorted(labels.items()))
        return after.get(name, {}).get(key, 0) - before.get(name, {}).get(key, 0)

    assert delta("oodguard_requests_total", endpoint="/v1/predict", status="200") == 4
    assert delta("oodguard_requests_total", endpoint="/v1/predict", status="415") == 1
    assert delta("oodguard_requests_total", endpoint="unmatched", status="404") == 1
    assert delta("oodguard_request_duration_seconds_count", endpoint="/v1/predict") == 5
    assert delta("oodguard_decisions_total", decision="accept") == 4
    assert delta("oodguard_decisions_total", decision="reject") == 1
    assert delta("oodguard_image_rejects_total", reason="unsupported_image_format") == 1
    assert delta("oodguard_ood_score_count") == 5 and delta("oodguard_p_value_count") == 5
    assert delta("oodguard_batch_size_sum") == 5
    assert delta("oodguard_inference_duration_seconds_count") == delta("oodguard_batch_size_count") >= 1
    assert after["oodguard_queue_depth"][()] == 0
    assert after["oodguard_ready"][()] == 1


def test_model_info_names_the_active_bundle(client):
    model = client.app.state.registry.active
    info = _samples(client)["oodguard_model_info"]
    assert info == {(("name", "tiny"), ("sha256", model.sha256), ("version", "1")): 1.0}


def test_each_metrics_object_has_its_own_registry():
    a, b = ServiceMetrics(), ServiceMetrics()  # would raise "Duplicated timeseries" on a shared registry
    a.decisions.labels(decision="accept").inc()
    assert b.registry is not a.registry
    text = b.render().decode()
    assert 'oodguard_decisions_total{decision="accept"} 0.0' in text
