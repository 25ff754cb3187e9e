"""Faults: an onnxruntime failure inside a shared batch, and a process killed in the middle of a swap.

1. The poison bundle (bundle_factory, `poison=True`) makes onnxruntime *raise* for any batch that
   holds an all-white image. Under concurrent load on a real server, batches mix culprit and
   innocent requests; exactly the culprit requests get 503 `inference_failed` with Retry-After
   (v1 and v2 alike), every other request gets its own correct answer, the failures are counted in
   `oodguard_inference_errors_total`, and the server keeps serving. (test_batching.py has the
   5-request in-process version; this is the full stack, at volume, multi-image requests included.)

2. Crash during a swap. test_registry.py kills a bare registry process (mid-validation, and at a
   random point of fast flips). Here a real `oodguard serve` is SIGKILLed while its admin API
   activates version 2, at four well-defined points - during validation, during warm-up, in the
   middle of writing the new ACTIVE state, and after persisting but before switching - reached by a
   test wrapper that patches the named function to announce itself and block (no test hook in the
   service). The persisted state always parses, and a restarted `oodguard serve` serves version 1 -
   or version 2 when the crash came after its (validated) activation was persisted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_process import start_serve

from .bundle_factory import encode_image, make_tiny_bundle

pytestmark = pytest.mark.slow

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
TOKEN = "faults-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _samples(metrics_text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- 1. an onnxruntime failure in one batch ---------------------------------------------------------------


def _request_plan(rng: np.random.Generator, n: int) -> list[list[str]]:
    """n requests of 1-3 images; about one in six requests holds a white (poisonous) image."""
    plan = []
    for i in range(n):
        labels = list(rng.choice(["red", "green", "blue"], size=int(rng.integers(1, 4))))
        if i % 6 == 3:
            labels[int(rng.integers(0, len(labels)))] = "white"
        plan.append(labels)
    return plan


def test_a_failing_batch_fails_only_its_culprits_under_load(poison_bundle, tmp_path):
    rng = np.random.default_rng(0)
    rounds = [_request_plan(rng, 48) for _ in range(3)]
    images = {label: encode_image(color, fmt="PNG") for label, color in COLORS.items()}
    v2_inputs = {"ok": np.full((1, 3, 8, 8), 0.1, np.float32), "white": np.ones((1, 3, 8, 8), np.float32)}
    v2_inputs["ok"][0, 2] = 0.9  # blue

    async def one(client: httpx.AsyncClient, labels: list[str]) -> httpx.Response:
        files = [("files", (f"{i}.png", images[label], "image/png")) for i, label in enumerate(labels)]
        return await client.post("/v1/predict", files=files)

    async def one_v2(client: httpx.AsyncClient, kind: str) -> httpx.Response:
        x = v2_inputs[kind]
        body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        return await client.post("/v2/models/poison/infer", json=body)

    async def load(base: str):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
            results = []
            for plan in rounds:  # each round: everything at once, so batches mix culprits and innocents
                v1 = [one(client, labels) for labels in plan]
                v2 = [one_v2(client, kind) for kind in ("ok", "white", "ok", "ok")]
                responses = await asyncio.gather(*v1, *v2)
                results.append((plan, responses[: len(plan)], responses[len(plan) :]))
            after = await asyncio.gather(*(one(client, ["green"]) for _ in range(16)))
            metrics = (await client.get("/metrics")).text
            return results, after, metrics

    with start_serve(
        ["--bundle", str(poison_bundle), "--max-batch", "64", "--max-wait-ms", "30", "--decode-threads", "1"],
        tmp_path / "serve.log",
    ) as server:
        results, after, metrics_text = asyncio.run(load(server.base))
        assert server.stop() == 0

    culprits = 0
    for plan, v1, v2 in results:
        for labels, r in zip(plan, v1):
            if "white" in labels:
                culprits += 1
                assert r.status_code == 503, (labels, r.text)
                assert r.json()["error"]["code"] == "inference_failed" and r.headers["retry-after"] == "1"
            else:
                assert r.status_code == 200, (labels, r.text)
                assert [p["label"] for p in r.json()["predictions"]] == labels  # its own rows, in order
        assert [r.status_code for r in v2] == [200, 503, 200, 200], [r.text for r in v2]
        assert v2[1].json()["code"] == "inference_failed" and "retry-after" in v2[1].headers
        culprits += 1
    assert all(r.status_code == 200 for r in after)  # the server keeps serving

    samples = _samples(metrics_text)
    assert samples[("oodguard_inference_errors_total", ())] == culprits
    # Batches really were shared (so isolation was needed): fewer onnxruntime calls than requests.
    assert samples[("oodguard_batch_size_count", ())] < samples[("oodguard_batch_size_sum", ())]
    assert samples[("oodguard_requests_total", (("endpoint", "/v1/predict"), ("status", "503")))] == culprits - len(rounds)
    log = server.log()
    assert "re-running each alone" in log and "Traceback" not in log


def test_a_failing_request_with_batching_off(make_client, poison_bundle):
    client = make_client(bundle=poison_bundle, batching=False)
    white = client.post("/v1/predict", content=encode_image(COLORS["white"]), headers={"content-type": "image/png"})
    assert white.status_code == 503 and white.json()["error"]["code"] == "inference_failed"
    assert white.headers["retry-after"] == "1"
    red = client.post("/v1/predict", content=encode_image(COLORS["red"]), headers={"content-type": "image/png"})
    assert red.status_code == 200 and red.json()["predictions"][0]["label"] == "red"
    assert "oodguard_inference_errors_total 1.0" in client.get("/metrics").text


# -- 2. a process killed in the middle of a swap ----------------------------------------------------------

# Runs the real CLI after patching one function so that, when it is reached for version 2, it writes
# FAULT_MARKER and blocks (in the admin API's worker thread) until the test kills the process.
_FAULT_WRAPPER = r"""
import os, sys, time
from pathlib import Path
from oodguard.service import loaded_model as loaded_model_mod, registry as registry_mod, store as store_mod

point, marker = os.environ["FAULT_POINT"], Path(os.environ["FAULT_MARKER"])

def reached():
    marker.write_text(point)
    time.sleep(300)

if point == "validation":
    real_verify = registry_mod.verify_bundle
    def verify(bundle_dir, *a, **k):
        if Path(bundle_dir).parts[-2:] == ("tiny", "2"):
            reached()
        return real_verify(bundle_dir, *a, **k)
    registry_mod.verify_bundle = verify
elif point == "warm-up":
    real_warm = loaded_model_mod.LoadedModel.warm
    def warm(self, batches):
        if self.version == "2":
            reached()
        return real_warm(self, batches)
    loaded_model_mod.LoadedModel.warm = warm
elif point == "state-write":
    real_write = store_mod.atomic_write_text
    def write(path, text):
        if '"active": "tiny/2"' in text:  # the activation's write: half of it lands in a temp file, then death
            Path(path).with_name("." + Path(path).name + ".partial.tmp").write_text(text[: len(text) // 2])
            reached()
        return real_write(path, text)
    store_mod.atomic_write_text = write
elif point == "after-persist":
    real_set_active = store_mod.ModelStore.set_active
    def set_active(self, name, version, *a, **k):
        state = real_set_active(self, name, version, *a, **k)
        if version == "2":
            reached()
        return state
    store_mod.ModelStore.set_active = set_active
else:
    raise SystemExit(f"unknown FAULT_POINT {point}")

from oodguard.cli import main
sys.argv = ["oodguard", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def v1_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("swap") / "v1", "tiny", "1")


def _served_version(base: str) -> str:
    r = httpx.post(f"{base}/v1/predict", content=encode_image(COLORS["red"]), headers={"content-type": "image/png"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["model"]["version"]


@pytest.mark.parametrize(
    "point, after_restart",
    [("validation", "1"), ("warm-up", "1"), ("state-write", "1"), ("after-persist", "2")],
)
def test_killed_mid_swap_restarts_on_a_consistent_version(v1_bundle, tmp_path, point, after_restart):
    models = tmp_path / "models"
    marker = tmp_path / "reached"
    env = {"OODGUARD_ADMIN_TOKEN": TOKEN, "FAULT_POINT": point, "FAULT_MARKER": str(marker)}
    args = ["--bundle", str(v1_bundle), "--models-dir", str(models), "--decode-threads", "1"]
    with start_serve(args, tmp_path / "crashing.log", env=env, python_code=_FAULT_WRAPPER) as server:
        make_tiny_bundle(models / "incoming" / "v2", "tiny", "2")
        registered = httpx.post(f"{server.base}/admin/models", json={"path": "incoming/v2"}, headers=AUTH, timeout=30)
        assert registered.status_code == 201, registered.text

        def activate() -> None:
            try:
                httpx.post(f"{server.base}/admin/models/tiny/2/activate", headers=AUTH, timeout=60)
            except httpx.TransportError:
                pass  # the server dies under it

        activation = threading.Thread(target=activate)
        activation.start()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, f"{point} was never reached:\n{server.log()}"
            time.sleep(0.02)
        # Stuck mid-swap, the server still answers with the version it had.
        assert _served_version(server.base) == "1"
        server.stop(signal.SIGKILL)
        activation.join(timeout=30)

    state = json.loads((models / "ACTIVE").read_text())  # parseable: never half-written
    assert state["active"] == f"tiny/{after_restart}"
    assert {"tiny/1", "tiny/2"} <= set(state["registered"])
    with start_serve(["--models-dir", str(models), "--decode-threads", "1"], tmp_path / "restarted.log") as restarted:
        assert _served_version(restarted.base) == after_restart
        models_list = httpx.get(f"{restarted.base}/v1/models", timeout=10).json()
        assert models_list["active"]["version"] == after_restart
        assert {v["version"] for v in models_list["versions"]} == {"1", "2"}
        assert restarted.stop() == 0
    assert "Traceback" not in restarted.log()
