"""Dynamic batching: grouping, per-caller results, failure isolation, bounds, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from oodguard.service.app import create_app
from oodguard.service.batching import DynamicBatcher
from oodguard.service.errors import OodguardError, not_ready
from oodguard.service.manifest import InputSpec
from oodguard.service.metrics import ServiceMetrics

from .bundle_factory import encode_image
from .conftest import run_app

SPEC = InputSpec(height=2, width=2)


class FakeModel:
    """Returns, per image, its own mean (so each caller can check it got its own rows back)."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None):
        self.manifest = SimpleNamespace(input=SPEC)
        self.name, self.version, self.sha256 = "fake", "1", "0" * 64
        self.delay = delay
        self.fail_on = fail_on
        self.batch_sizes: list[int] = []
        self.lock = threading.Lock()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.batch_sizes.append(images.shape[0])
        time.sleep(self.delay)
        means = images.reshape(images.shape[0], -1).mean(axis=1)
        if self.fail_on is not None and np.any(np.isclose(means, self.fail_on)):
            raise RuntimeError("poisoned input")
        return {"mean": means, "double": means * 2}


def _acquire(model):
    @contextlib.contextmanager
    def acquire():
        yield model

    return acquire


def _images(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 3, 2, 2), value, dtype=np.float32)


async def _with_batcher(model, coro_fn, **kw):
    metrics = ServiceMetrics()
    batcher = DynamicBatcher(_acquire(model), metrics=metrics, **kw)
    await batcher.start()
    try:
        return await coro_fn(batcher), metrics
    finally:
        await batcher.stop(5.0)


def test_concurrent_requests_are_grouped_and_each_gets_its_rows():
    model = FakeModel()

    async def go(b):
        values = [i / 100 for i in range(20)]
        results = await asyncio.gather(*(b.infer(_images(v, n=1 + i % 2)) for i, v in enumerate(values)))
        return values, results

    (values, results), metrics = asyncio.run(_with_batcher(model, go, max_batch=8, max_wait_ms=50))
    for i, (v, r) in enumerate(zip(values, results)):
        assert r.outputs["mean"].shape == (1 + i % 2,)
        np.testing.assert_allclose(r.outputs["mean"], v, atol=1e-6)
        np.testing.assert_allclose(r.outputs["double"], 2 * v, atol=1e-6)
    assert max(model.batch_sizes) > 1 and max(model.batch_sizes) <= 8
    assert sum(model.batch_sizes) == sum(1 + i % 2 for i in range(20))
    assert metrics.registry.get_sample_value("oodguard_queue_depth") == 0


def test_batch_waits_for_announced_requests_at_most_max_wait():
    model = FakeModel()

    async def go(b):
        with b.incoming(), b.incoming() as mine:  # two announced, only one ever arrives
            t0 = time.perf_counter()
            await b.infer(_images(0.5), mine)
            return time.perf_counter() - t0

    elapsed, _ = asyncio.run(_with_batcher(model, go, max_batch=32, max_wait_ms=200))
    # It waited (at least max_wait) and then ran without the missing one (not forever: a generous
    # bound that a loaded machine cannot break; the bug it guards against never ends).
    assert 0.19 <= elapsed < 30.0
    assert model.batch_sizes == [1]


def test_a_lone_request_does_not_wait_for_the_batch_to_fill():
    # Nothing else announced: waiting could not grow the batch, so it runs at once. max_wait is 10
    # minutes: a request that waited for it would time out here (after 60 s, however loaded the machine).
    model = FakeModel()

    async def go(b):
        for v in (0.1, 0.2, 0.3, 0.4, 0.5):
            with b.incoming() as ticket:
                await asyncio.wait_for(b.infer(_images(v), ticket), 60)

    asyncio.run(_with_batcher(model, go, max_batch=32, max_wait_ms=600_000))
    assert model.batch_sizes == [1] * 5


def test_announced_requests_join_the_batch_when_they_arrive():
    model = FakeModel()

    async def go(b):
        async def late(v, ticket, delay):
            await asyncio.sleep(delay)  # "decoding"
            return await b.infer(_images(v), ticket)

        with b.incoming() as t1, b.incoming() as t2, b.incoming() as t3:
            return await asyncio.gather(late(0.1, t1, 0.0), late(0.2, t2, 0.02), late(0.3, t3, 0.04))

    results, _ = asyncio.run(_with_batcher(model, go, max_batch=32, max_wait_ms=500))
    assert model.batch_sizes == [3]  # the first waited for the two announced ones, then ran at once
    for v, r in zip((0.1, 0.2, 0.3), results):
        np.testing.assert_allclose(r.outputs["mean"], v, atol=1e-6)


def test_full_batch_does_not_wait():
    model = FakeModel()

    async def go(b):  # max_wait is 10 minutes: waiting for it would time out here
        await asyncio.wait_for(asyncio.gather(*(b.infer(_images(0.1)) for _ in range(4))), 60)

    asyncio.run(_with_batcher(model, go, max_batch=4, max_wait_ms=600_000))
    assert model.batch_sizes == [4]


def test_a_request_larger_than_max_batch_runs_alone():
    model = FakeModel()

    async def go(b):
        return await asyncio.gather(b.infer(_images(0.2, n=5)), b.infer(_images(0.3, n=1)))

    (big, small), _ = asyncio.run(_with_batcher(model, go, max_batch=4, max_wait_ms=20))
    assert big.outputs["mean"].shape == (5,) and small.outputs["mean"].shape == (1,)
    assert sorted(model.batch_sizes) == [1, 5]


def test_a_failing_request_fails_alone():
    model = FakeModel(fail_on=0.9)

    async def go(b):
        return await asyncio.gather(*(b.infer(_images(v)) for v in (0.1, 0.9, 0.2, 0.3)), return_exceptions=True)

    results, metrics = asyncio.run(_with_batcher(model, go, max_batch=8, max_wait_ms=50))
    assert isinstance(results[1], OodguardError) and results[1].code == "inference_failed" and results[1].kind == "unavailable"
    for i in (0, 2, 3):
        np.testing.assert_allclose(results[i].outputs["mean"], [0.1, 0.9, 0.2, 0.3][i], atol=1e-6)
    assert model.batch_sizes[0] == 4  # they really were one batch, which then failed and was split
    assert metrics.registry.get_sample_value("oodguard_inference_errors_total") == 1


def test_unbatched_mode_runs_each_request_alone():
    model = FakeModel(delay=0.01)

    async def go(b):
        return await asyncio.gather(*(b.infer(_images(v)) for v in (0.1, 0.2, 0.3)))

    results, _ = asyncio.run(_with_batcher(model, go, enabled=False, max_batch=8, max_wait_ms=50))
    assert model.batch_sizes == [1, 1, 1]
    assert [float(r.outputs["mean"][0]) for r in results] == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("enabled", [True, False])
def test_bounded_queue_refuses_with_queue_full(enabled):
    model = FakeModel(delay=0.2)

    async def go(b):
        first = asyncio.ensure_future(b.infer(_images(0.1, n=3)))
        await asyncio.sleep(0.05)
        with pytest.raises(OodguardError) as err:
            await b.infer(_images(0.2, n=2))
        assert (err.value.kind, err.value.code) == ("unavailable", "queue_full")
        return await first

    result, _ = asyncio.run(_with_batcher(model, go, enabled=enabled, max_batch=8, max_wait_ms=0, max_queue_images=4))
    assert result.outputs["mean"].shape == (3,)


def test_stop_drains_queued_requests_then_refuses_new_ones():
    model = FakeModel(delay=0.05)

    async def main():
        b = DynamicBatcher(_acquire(model), max_batch=2, max_wait_ms=1)
        await b.start()
        pending = [asyncio.ensure_future(b.infer(_images(v))) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
        await asyncio.sleep(0)
        await b.stop(10.0)
        results = [await p for p in pending]
        with pytest.raises(OodguardError) as err:
            await b.infer(_images(0.6))
        assert (err.value.kind, err.value.code) == ("unavailable", "shutting_down")
        return results

    results = asyncio.run(main())
    assert [float(r.outputs["mean"][0]) for r in results] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_a_cancelled_caller_does_not_break_the_batch():
    model = FakeModel(delay=0.05)

    async def go(b):
        slow = asyncio.ensure_future(b.infer(_images(0.1)))
        await asyncio.sleep(0)
        slow.cancel()
        return await b.infer(_images(0.2))

    result, _ = asyncio.run(_with_batcher(model, go, max_batch=8, max_wait_ms=10))
    assert float(result.outputs["mean"][0]) == pytest.approx(0.2)


def test_no_model_means_not_ready():
    @contextlib.contextmanager
    def acquire():
        raise RuntimeError("the pin itself failed")
        yield

    @contextlib.contextmanager
    def acquire_not_ready():  # what the registry's pin raises with no model loaded
        raise not_ready()
        yield

    async def main(acq):
        b = DynamicBatcher(acq, max_batch=2, max_wait_ms=0)
        await b.start()
        try:
            await b.infer(_images(0.1))
        finally:
            await b.stop(1.0)

    with pytest.raises(OodguardError) as err:
        asyncio.run(main(acquire_not_ready))
    assert err.value.code == "not_ready"
    with pytest.raises(OodguardError) as err:
        asyncio.run(main(acquire))
    assert err.value.code == "inference_failed"


# -- through the HTTP app -------------------------------------------------------------------------


def _metric(text: str, name: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_http_requests_are_batched_and_answered_individually(make_settings):
    app = create_app(make_settings(max_batch=16, max_wait_ms=100))
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    order = [list(colors)[i % 3] for i in range(12)]

    async def go(ac):
        async def one(label):
            r = await ac.post("/v1/predict", content=encode_image(colors[label], fmt="PNG"), headers={"content-type": "image/png"})
            return label, r

        results = await asyncio.gather(*(one(label) for label in order))
        return results, (await ac.get("/metrics")).text

    results, metrics_text = run_app(app, go)
    for label, r in results:
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == label
    ids = {r.json()["request_id"] for _, r in results}
    assert len(ids) == len(results)
    count = _metric(metrics_text, "oodguard_batch_size_count")[()]
    total = _metric(metrics_text, "oodguard_batch_size_sum")[()]
    assert total >= 12 and total / count > 1, (total, count)


def test_http_poisoned_image_fails_only_its_request(make_settings, poison_bundle):
    app = create_app(make_settings(bundle=poison_bundle, max_batch=16, max_wait_ms=100))
    white = encode_image((255, 255, 255), fmt="PNG")
    red = encode_image((255, 0, 0), fmt="PNG")

    async def go(ac):
        bodies = [red, red, white, red, red]
        rs = await asyncio.gather(
            *(ac.post("/v1/predict", content=b, headers={"content-type": "image/png"}) for b in bodies)
        )
        after = await ac.post("/v1/predict", content=red, headers={"content-type": "image/png"})
        return rs, after, (await ac.get("/metrics")).text

    rs, after, metrics_text = run_app(app, go)
    assert [r.status_code for r in rs] == [200, 200, 503, 200, 200]
    assert rs[2].json()["error"]["code"] == "inference_failed" and "retry-after" in rs[2].headers
    assert after.status_code == 200
    assert _metric(metrics_text, "oodguard_inference_errors_total")[()] == 1
