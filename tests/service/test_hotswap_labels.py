"""During a hot-swap every response names the version whose outputs it holds.

Black box, through HTTP only (admin API + /v1/predict + /v2 infer): two bundles of the same contract
whose outputs tell them apart (logit scale 2 vs 5: a saturated red image gets confidence 0.787 from
one and 0.987 from the other, worked out by hand below), so a response can be checked against the
version it names.

The decisive requests are held half-way through their body: the service has already looked up the
active model (it does so before reading the body, to check `top_k` and `operating_point`), then the
admin API activates the other version, then the body completes and the batch runs on the new model.
Such a response must name the new version. Labelling it with the model captured at request start
instead of the model that produced its outputs makes it name the old one (and fails here), whatever
the timing. Background clients keep predicting through every swap and are checked the same way.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import tarfile

import httpx
import pytest

from oodguard.service.app import create_app

from .bundle_factory import encode_image, make_tiny_bundle

TOKEN = "hotswap-labels-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCALES = {"1": 2.0, "2": 5.0}  # logit_scale per version: the tiny colour model's logits are scale * mean RGB
RED = encode_image((255, 0, 0))  # mean RGB (1, 0, 0) -> logits (s, 0, 0)
SWAPS = ["2", "1", "2"]  # versions activated one after the other, starting from "1"
BACKGROUND_CLIENTS = 6


def red_confidence(version: str) -> float:
    """softmax(s, 0, 0)[0] for the version's logit scale s: the probability (and msp) of "red"."""
    s = SCALES[version]
    return 1.0 / (1.0 + 2.0 * math.exp(-s))


def version_holding(confidence: float) -> str | None:
    """Which version's outputs these are (None: neither's)."""
    found = [v for v in SCALES if abs(confidence - red_confidence(v)) < 1e-4]
    return found[0] if len(found) == 1 else None


def _tar(bundle) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    return buf.getvalue()


class HeldBody:
    """A request body sent in two parts; the second only after `release()`.

    `started` is set when the service asks for the first part, that is once the route has begun
    reading the body, after it looked up the active model.
    """

    def __init__(self, body: bytes):
        self.body = body
        self.started = asyncio.Event()
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def __aiter__(self):
        half = len(self.body) // 2
        self.started.set()
        yield self.body[:half]
        await self._released.wait()
        yield self.body[half:]


def _v2_body() -> bytes:
    """/v2 infer of the same red image as a tensor (8x8 like the bundle's input), asking for msp and the verdict."""
    pixels = [1.0] * 64 + [0.0] * 128  # channel-major [1, 3, 8, 8]
    return json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": pixels}],
            "outputs": [{"name": "msp"}, {"name": "p_value"}, {"name": "accept"}],
        }
    ).encode()


@pytest.mark.slow
def test_responses_during_a_swap_name_the_version_whose_outputs_they_hold(make_settings, tmp_path):
    src = {v: make_tiny_bundle(tmp_path / f"src{v}", "tiny", v, logit_scale=s) for v, s in SCALES.items()}
    assert abs(red_confidence("1") - red_confidence("2")) > 0.1
    settings = make_settings(
        bundle=src["1"], models_dir=tmp_path / "models", admin_token=TOKEN, max_batch=8, max_wait_ms=5.0,
        client_timeout_s=300.0, request_timeout_s=120.0,
    )
    app = create_app(settings)
    held_results: list[dict] = []  # one per held request: endpoint, version activated meanwhile, response
    background: list[tuple[int, str | None, float | None]] = []  # (status, version named, confidence)
    stop = asyncio.Event()

    async def predict_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            resp = await client.post("/v1/predict", files={"file": ("red.png", RED, "image/png")})
            if resp.status_code == 200:
                body = resp.json()
                background.append((200, body["model"]["version"], body["predictions"][0]["confidence"]))
            else:
                background.append((resp.status_code, None, None))

    async def held_request(client: httpx.AsyncClient, endpoint: str, activate: str) -> None:
        """Start a request, activate `activate` while its body is held, then let it finish."""
        if endpoint == "v1":
            held = HeldBody(RED)
            sent = client.post("/v1/predict", content=held, headers={"Content-Type": "image/png"})
        else:
            held = HeldBody(_v2_body())
            sent = client.post("/v2/models/tiny/infer", content=held, headers={"Content-Type": "application/json"})
        task = asyncio.ensure_future(sent)
        await asyncio.wait_for(held.started.wait(), 60)
        resp = await client.post(f"/admin/models/tiny/{activate}/activate", headers=AUTH)
        assert resp.status_code == 200, resp.text
        assert resp.json()["current"]["version"] == activate
        held.release()
        answer = await task
        held_results.append({"endpoint": endpoint, "activated": activate, "status": answer.status_code, "body": answer.content})

    async def scenario(client: httpx.AsyncClient) -> None:
        resp = await client.post("/admin/models", content=_tar(src["2"]), headers={**AUTH, "Content-Type": "application/gzip"})
        assert resp.status_code == 201, resp.text
        workers = [asyncio.ensure_future(predict_loop(client)) for _ in range(BACKGROUND_CLIENTS)]
        try:
            for endpoint in ("v1", "v2"):
                for version in SWAPS if endpoint == "v1" else ["1", "2"]:
                    await held_request(client, endpoint, version)
        finally:
            stop.set()
            await asyncio.gather(*workers)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
                await asyncio.wait_for(scenario(client), 600)

    asyncio.run(main())

    assert len(held_results) == len(SWAPS) + 2
    for held in held_results:
        assert held["status"] == 200, held
        body = json.loads(held["body"])
        if held["endpoint"] == "v1":
            named, confidence = body["model"]["version"], body["predictions"][0]["confidence"]
        else:
            outputs = {o["name"]: o["data"] for o in body["outputs"]}
            named, confidence = body["model_version"], outputs["msp"][0]
        # The request began on the other version; the model activated while it waited answered it.
        assert version_holding(confidence) == held["activated"], (held["activated"], body)
        assert named == held["activated"], f"a response holding version {held['activated']}'s outputs names {named}: {body}"

    assert background and all(status == 200 for status, _, _ in background), sorted({s for s, _, _ in background})
    mislabelled = [(named, conf) for _, named, conf in background if version_holding(conf) != named]
    assert not mislabelled, f"{len(mislabelled)} of {len(background)} responses name another version than their outputs', e.g. {mislabelled[:3]}"
    assert {named for _, named, _ in background} == {"1", "2"}
