"""Hot-swap under load: ≥2,000 concurrent predictions while the model is activated twice and rolled back once.

Zero non-200 responses, and every response names a version that was active at some point during
that request's lifetime. A swap happens somewhere inside its admin call, so version i is known to
be active no earlier than the start of its activation call and no later than the end of the next
one; a response is correct when its [sent, received] window overlaps that interval.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from oodguard.service.app import create_app

from .bundle_factory import encode_image, make_tiny_bundle

log = logging.getLogger(__name__)

TOKEN = "load-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOTAL_REQUESTS = 2_000
CLIENTS = 24
# (requests completed before the admin action, action, version it makes active)
PLAN = [(400, "activate", "2"), (900, "activate", "3"), (1_400, "rollback", "2")]


@dataclass
class Span:
    start: float
    end: float
    status: int
    version: str | None


def _tar(bundle) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    return buf.getvalue()


@pytest.mark.slow
def test_swaps_under_load_drop_nothing_and_serve_only_active_versions(make_settings, tmp_path):
    src = {v: make_tiny_bundle(tmp_path / f"src{v}", "tiny", v, logit_scale=4.0 + int(v)) for v in ("1", "2", "3")}
    settings = make_settings(
        bundle=src["1"], models_dir=tmp_path / "models", admin_token=TOKEN, max_batch=16, max_wait_ms=2.0
    )
    app = create_app(settings)
    images = [encode_image(tuple(int(c) for c in np.random.default_rng(i).integers(0, 256, 3))) for i in range(32)]
    spans: list[Span] = []
    actions: list[tuple[float, float, str, dict]] = []  # (start, end, version made active, response body)
    issued = 0
    completed = 0

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        nonlocal issued, completed
        while issued < TOTAL_REQUESTS:
            issued += 1
            image = images[(issued + worker) % len(images)]
            t0 = time.monotonic()
            resp = await client.post("/v1/predict", files={"file": ("x.png", image, "image/png")})
            t1 = time.monotonic()
            version = resp.json()["model"]["version"] if resp.status_code == 200 else None
            spans.append(Span(t0, t1, resp.status_code, version))
            completed += 1

    async def admin_loop(client: httpx.AsyncClient) -> None:
        for threshold, action, version in PLAN:
            while completed < threshold:
                await asyncio.sleep(0.005)
            path = f"/admin/models/tiny/{version}/activate" if action == "activate" else "/admin/rollback"
            t0 = time.monotonic()
            resp = await client.post(path, headers=AUTH)
            t1 = time.monotonic()
            assert resp.status_code == 200, resp.text
            assert resp.json()["current"]["version"] == version
            actions.append((t0, t1, version, resp.json()))

    async def scenario(client: httpx.AsyncClient) -> dict:
        for v in ("2", "3"):  # registered (validated) up front; activation validates again
            resp = await client.post("/admin/models", content=_tar(src[v]), headers={**AUTH, "Content-Type": "application/gzip"})
            assert resp.status_code == 201, resp.text
        started = time.monotonic()
        await asyncio.gather(admin_loop(client), *(client_loop(client, w) for w in range(CLIENTS)))
        elapsed = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
        return {"elapsed": elapsed, "metrics": metrics}

    async def main() -> dict:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                return await asyncio.wait_for(scenario(client), 120)

    result = asyncio.run(main())

    statuses = [s.status for s in spans]
    errors = sum(1 for s in statuses if s != 200)
    assert len(spans) >= TOTAL_REQUESTS and errors == 0, f"{errors} non-200 responses: {sorted(set(statuses))}"
    assert len(actions) == len(PLAN)

    # Version i may be active from the start of its activation to the end of the next action.
    intervals = [("1", float("-inf"), actions[0][1])]
    for i, (a_start, _a_end, version, _) in enumerate(actions):
        until = actions[i + 1][1] if i + 1 < len(actions) else float("inf")
        intervals.append((version, a_start, until))
    wrong = [
        s for s in spans
        if not any(v == s.version and s.end >= lo and s.start <= hi for v, lo, hi in intervals)
    ]
    assert not wrong, f"{len(wrong)} responses from a version that was not active then, e.g. {wrong[:3]}"
    assert {s.version for s in spans} == {"1", "2", "3"}
    # The swaps really happened under load: requests were in flight across each admin call.
    for a_start, a_end, _, _ in actions:
        assert any(s.start < a_start and s.end > a_start for s in spans) or any(a_start <= s.start <= a_end for s in spans)

    swaps = {
        line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in result["metrics"].splitlines()
        if line.startswith("oodguard_model_swaps_total{")
    }
    assert swaps.get("success") == 2.0 and swaps.get("rollback") == 1.0 and "failure" not in swaps
    timings = [a[3]["timings_s"] for a in actions]
    summary = (
        f"hot-swap load test: {len(spans)} requests, {errors} errors, {len(spans) / result['elapsed']:.0f} req/s "
        f"over {result['elapsed']:.1f}s with {CLIENTS} clients; swaps (validate/warm s): "
        + ", ".join(f"{t['validate']:.4f}/{t['warm']:.4f}" for t in timings)
    )
    log.warning(summary)
    print(summary)
