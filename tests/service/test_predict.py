"""POST /v1/predict: every input form, the response schema, and every error path with its status."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from oodguard.service.errors import OodguardError
from oodguard.service.bundle import conformal_p_values
from oodguard.service.manifest import load_manifest
from oodguard.service.schemas import ErrorResponse, PredictResponse

from .bundle_factory import encode_image

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def _png(color=RED, size=(8, 8)) -> bytes:
    return encode_image(color, size=size, fmt="PNG")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _labels(response) -> list[str]:
    return [p["label"] for p in response.json()["predictions"]]


def _assert_error(response, status: int, code: str, *in_message: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = ErrorResponse.model_validate(response.json())
    assert body.error.code == code, body
    for part in in_message:
        assert part in body.error.message, body.error.message
    return response.json()


# -- input forms ----------------------------------------------------------------------------------


def test_multipart_single_file_full_response(client, tiny_bundle):
    r = client.post("/v1/predict", files={"file": ("red.png", _png(RED), "image/png")})
    assert r.status_code == 200, r.text
    body = PredictResponse.model_validate(r.json())
    manifest = load_manifest(tiny_bundle)
    assert body.model.name == "tiny" and body.model.version == "1" and len(body.model.sha256) == 64
    assert body.request_id == r.headers["x-request-id"]
    (pred,) = body.predictions
    assert (pred.label, pred.class_index) == ("red", 0)
    assert pred.confidence == pytest.approx(np.exp(10) / (np.exp(10) + 2), rel=1e-5)
    assert [t.label for t in pred.top_k] == ["red", "green", "blue"]
    assert pred.top_k[0].probability == pred.confidence
    assert pred.score_name == "msp" and pred.ood_score == pytest.approx(pred.confidence)
    assert pred.operating_point == manifest.default_operating_point
    assert pred.threshold == pytest.approx(manifest.operating_point().threshold)
    assert pred.decision == "accept"
    calibration = np.load(tiny_bundle / "calibration.npy")
    assert pred.p_value == pytest.approx(float(conformal_p_values(calibration, np.array([pred.ood_score]))[0]))


def test_multipart_repeated_files_keep_order(client):
    files = [("files", (f"{i}.png", _png(c), "image/png")) for i, c in enumerate([GREEN, BLUE, RED])]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert _labels(r) == ["green", "blue", "red"]


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "application/octet-stream"])
def test_raw_body(client, content_type):
    r = client.post("/v1/predict", content=_png(BLUE), headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert _labels(r) == ["blue"]


def test_json_base64_and_data_url(client):
    images = [_b64(_png(GREEN)), "data:image/png;base64," + _b64(_png(RED))]
    r = client.post("/v1/predict", json={"images": images})
    assert r.status_code == 200, r.text
    assert _labels(r) == ["green", "red"]


def test_grey_image_is_rejected_and_decision_follows_threshold(client):
    r = client.post("/v1/predict", content=_png(GREY), headers={"content-type": "image/png"})
    (pred,) = r.json()["predictions"]
    assert pred["ood_score"] == pytest.approx(1 / 3, abs=1e-6)
    assert pred["decision"] == "reject" and pred["ood_score"] < pred["threshold"]
    assert pred["p_value"] == pytest.approx(1 / 201)  # below every calibration score: (1 + 0) / (200 + 1)


def test_operating_point_and_top_k(client, tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    r = client.post("/v1/predict?operating_point=tpr99&top_k=1", content=_png(RED), headers={"content-type": "image/png"})
    (pred,) = r.json()["predictions"]
    assert pred["operating_point"] == "tpr99"
    assert pred["threshold"] == pytest.approx(manifest.operating_point("tpr99").threshold)
    assert len(pred["top_k"]) == 1
    r = client.post("/v1/predict?top_k=3", content=_png(GREY), headers={"content-type": "image/png"})
    probs = [t["probability"] for t in r.json()["predictions"][0]["top_k"]]
    assert probs == sorted(probs, reverse=True) and len(probs) == 3


def test_request_id_is_echoed_or_generated(client):
    r = client.post("/v1/predict", content=_png(), headers={"content-type": "image/png", "x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    r = client.post("/v1/predict", content=_png(), headers={"content-type": "image/png", "x-request-id": "bad id\t!"})
    assert r.headers["x-request-id"] != "bad id\t!" and len(r.headers["x-request-id"]) == 32
    err = client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain", "x-request-id": "e-1"})
    assert err.headers["x-request-id"] == "e-1"


# -- errors -----------------------------------------------------------------------------------------


def test_body_too_large_by_content_length(make_client):
    c = make_client(max_body_bytes=2048)
    r = c.post("/v1/predict", content=b"\0" * 4096, headers={"content-type": "image/png"})
    _assert_error(r, 413, "body_too_large", "4096")


def test_body_too_large_while_streaming(make_client):
    c = make_client(max_body_bytes=2048)

    def chunks():  # no Content-Length: the limit must be enforced by counting
        for _ in range(8):
            yield b"\0" * 1024

    r = c.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in r.request.headers
    _assert_error(r, 413, "body_too_large")
    m = c.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    _assert_error(m, 413, "body_too_large")


def test_too_many_pixels_and_side(make_client):
    c = make_client(max_pixels=1000, max_image_side=100)
    r = c.post("/v1/predict", content=_png(size=(40, 40)), headers={"content-type": "image/png"})
    _assert_error(r, 413, "too_many_pixels", "image 0", "40x40")
    r = c.post("/v1/predict", content=_png(size=(101, 1)), headers={"content-type": "image/png"})
    _assert_error(r, 413, "image_too_large")


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded"])
def test_unsupported_content_type(client, content_type):
    _assert_error(client.post("/v1/predict", content=b"abc", headers={"content-type": content_type}), 415, "unsupported_media_type")


def test_missing_content_type(client):
    _assert_error(client.post("/v1/predict", content=b"abc"), 415, "unsupported_media_type", "(none)")


def test_not_an_image(client):
    r = client.post("/v1/predict", files={"file": ("x.png", b"\x89PNX garbage bytes", "image/png")})
    _assert_error(r, 415, "unsupported_image_format", "image 0")


def test_one_bad_image_fails_the_request_naming_its_index(client):
    truncated = encode_image(RED, size=(32, 32), fmt="PNG")[:70]
    files = [("files", ("a.png", _png(), "image/png")), ("files", ("b.png", truncated, "image/png"))]
    _assert_error(client.post("/v1/predict", files=files), 422, "invalid_image", "image 1")
    r = client.post("/v1/predict", json={"images": [_b64(_png()), _b64(_png()), _b64(b"junk")]})
    _assert_error(r, 415, "unsupported_image_format", "image 2")


def test_too_many_images(make_client):
    c = make_client(max_images_per_request=2)
    files = [("files", (f"{i}.png", _png(), "image/png")) for i in range(3)]
    _assert_error(c.post("/v1/predict", files=files), 422, "too_many_images", "2")
    _assert_error(c.post("/v1/predict", json={"images": [_b64(_png())] * 3}), 422, "too_many_images")
    assert c.post("/v1/predict", files=files[:2]).status_code == 200


def test_no_images(client):
    _assert_error(client.post("/v1/predict", json={"images": []}), 422, "no_images")
    r = client.post("/v1/predict", files={"other": ("a.png", _png(), "image/png")})
    _assert_error(r, 422, "no_images", "file")
    _assert_error(client.post("/v1/predict", content=b"", headers={"content-type": "image/png"}), 422, "invalid_image", "empty")


def test_text_field_named_file(client):
    r = client.post("/v1/predict", data={"file": "not a file"}, files={"x": ("a.txt", b"1", "text/plain")})
    _assert_error(r, 422, "invalid_multipart", "file")


def test_malformed_multipart(client):
    r = client.post("/v1/predict", content=b"--nope\r\n", headers={"content-type": "multipart/form-data"})
    _assert_error(r, 422, "invalid_multipart")


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", "invalid_json"),
        (b'["a list"]', "invalid_json"),
        (b'{"images": "not a list"}', "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        (json.dumps({"images": ["!!!not base64!!!"]}).encode(), "invalid_base64"),
        (json.dumps({"images": [42]}).encode(), "invalid_base64"),
        (json.dumps({"images": ["data:image/png;base64"]}).encode(), "invalid_base64"),
        # issue 18 #6: an integer beyond Python's int-to-str limit (4300 digits) raised ValueError -> 500
        (b'{"x": ' + b"9" * 5000 + b', "images": []}', "invalid_json"),
        # a body of numbers costs ~30x its size once parsed: refused from its separators, unparsed
        (b'{"images": [], "x": [' + b"0," * 100_000 + b"0]}", "too_many_values"),
    ],
    ids=["syntax", "list", "images-not-list", "deep-nesting", "bad-base64", "not-string", "bad-data-url",
         "5000-digit-int", "many-values"],
)
def test_bad_json(client, body, code):
    _assert_error(client.post("/v1/predict", content=body, headers={"content-type": "application/json"}), 422, code)


def test_a_request_declaring_more_pixels_than_max_request_pixels_is_413_before_decoding(make_client, monkeypatch):
    from oodguard.service import preprocess

    c = make_client(max_request_pixels=100)
    decoded, real = [], preprocess.load_image
    monkeypatch.setattr(preprocess, "load_image", lambda *a: decoded.append(1) or real(*a))
    files = [("files", (f"{i}.png", encode_image((255, 0, 0), fmt="PNG"), "image/png")) for i in range(2)]  # 2 x 8x8
    r = c.post("/v1/predict", files=files)
    _assert_error(r, 413, "too_many_pixels", "128", "100")
    assert not decoded
    assert c.post("/v1/predict", files=files[:1]).status_code == 200  # 64 pixels: within


def test_unknown_operating_point_and_bad_top_k(client):
    ok = {"content": _png(), "headers": {"content-type": "image/png"}}
    _assert_error(client.post("/v1/predict?operating_point=tpr50", **ok), 422, "unknown_operating_point", "tpr90", "tpr95")
    _assert_error(client.post("/v1/predict?top_k=4", **ok), 422, "invalid_top_k", "3")
    _assert_error(client.post("/v1/predict?top_k=0", **ok), 422, "validation_error", "top_k")
    _assert_error(client.post("/v1/predict?top_k=abc", **ok), 422, "validation_error", "top_k")


def test_not_ready_before_startup(make_settings):
    from fastapi.testclient import TestClient

    from oodguard.service.app import create_app

    c = TestClient(create_app(make_settings()))  # no `with`: the lifespan never ran
    r = c.post("/v1/predict", content=_png(), headers={"content-type": "image/png"})
    _assert_error(r, 503, "not_ready")
    assert r.headers["retry-after"] == "1"
    assert c.get("/readyz").status_code == 503
    assert c.get("/healthz").status_code == 200


def test_queue_full_answers_503(client, monkeypatch):
    async def full(images, ticket=None):
        raise OodguardError("unavailable", "queue_full", "inference queue is full (1024 images waiting); retry shortly")

    monkeypatch.setattr(client.app.state.inference.batcher, "infer", full)
    r = client.post("/v1/predict", content=_png(), headers={"content-type": "image/png"})
    _assert_error(r, 503, "queue_full")
    assert r.headers["retry-after"] == "1"


def test_inference_timeout_answers_503(make_client):
    c = make_client(request_timeout_s=0.05, retry_after_s=3)
    model = c.app.state.registry.active
    original = model.run

    def slow(images, run_options=None):
        import time

        time.sleep(0.5)
        return original(images, run_options)

    model.run = slow
    r = c.post("/v1/predict", content=_png(), headers={"content-type": "image/png"})
    _assert_error(r, 503, "timeout")
    assert r.headers["retry-after"] == "3"


def test_inference_failure_answers_503(make_client, poison_bundle):
    c = make_client(bundle=poison_bundle)
    white = encode_image((255, 255, 255), fmt="PNG")
    r = c.post("/v1/predict", content=white, headers={"content-type": "image/png"})
    _assert_error(r, 503, "inference_failed")
    assert "retry-after" in r.headers
    assert c.post("/v1/predict", content=_png(), headers={"content-type": "image/png"}).status_code == 200


def test_unexpected_exception_is_a_json_500_not_a_traceback(client, monkeypatch):
    from oodguard.service import inference

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(inference, "score_outputs", boom)
    r = client.post("/v1/predict", content=_png(), headers={"content-type": "image/png"})
    body = _assert_error(r, 500, "internal_error", r.headers["x-request-id"])
    assert "secret" not in json.dumps(body) and "Traceback" not in r.text


def test_unknown_route_and_method_are_json(client):
    _assert_error(client.get("/v1/nope"), 404, "not_found")
    _assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_openapi_documents_forms_errors_and_examples(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/predict"]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json", "image/*", "application/octet-stream"}
    for status in ("200", "413", "415", "422", "503"):
        assert status in op["responses"], status
    for status in ("413", "415", "422", "503"):
        content = op["responses"][status]["content"]["application/json"]
        assert content["schema"]["$ref"].endswith("/ErrorResponse")
        assert "example" in content
    params = {p["name"]: p for p in op["parameters"]}
    assert params["top_k"]["schema"]["default"] == 3 and params["top_k"]["schema"]["minimum"] == 1
    schemas = spec["components"]["schemas"]
    assert "examples" in schemas["PredictResponse"] and "examples" in schemas["Prediction"]
    assert set(schemas["Prediction"]["properties"]) == {
        "label", "class_index", "confidence", "top_k", "ood_score", "score_name", "p_value", "threshold",
        "operating_point", "decision", "upload_form",
    }
    assert "upload_form" not in schemas["Prediction"].get("required", [])  # form-conditional bundles only


# -- the fast path (PredictEndpoint) and the FastAPI route: one contract -------------------------------------

_CASES = [  # (query, request kwargs) covering every body form and every early error
    ("", {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("?top_k=1&operating_point=tpr99", {"files": [("files", ("a.png", _png(GREEN), "image/png")),
                                                  ("files", ("b.png", _png(BLUE), "image/png"))]}),
    ("", {"json": {"images": [_b64(_png(GREY)), "data:image/png;base64," + _b64(_png(RED))]}}),
    ("?top_k=0", {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("?top_k=abc", {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("?top_k=4", {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("?top_k=1001", {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("?operating_point=tpr50", {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("?operating_point=" + "a" * 65, {"content": _png(RED), "headers": {"content-type": "image/png"}}),
    ("", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ("", {"content": b"\x89PNG\r\n\x1a\nbroken", "headers": {"content-type": "image/png"}}),
    ("", {"files": [("other", ("a.png", _png(RED), "image/png"))]}),
    ("", {"data": {"file": "not a file"}, "files": [("x", ("a.png", _png(RED), "image/png"))]}),
    ("", {"content": b"--b\r\nnot multipart", "headers": {"content-type": "multipart/form-data"}}),
    ("", {"json": {"images": ["%%%"]}}),
]


def _comparable(response) -> tuple:
    body = response.json()
    body.pop("request_id", None)
    if "error" in body:
        return response.status_code, body["error"]["code"]  # messages may word pydantic's errors differently
    return response.status_code, body


def test_fast_path_serves_predict_and_answers_like_the_fastapi_route(make_client):
    fast, routed = make_client(fast_predict=True), make_client(fast_predict=False)
    assert type(fast.app.router.routes[0].app).__name__ == "PredictEndpoint"
    assert all(type(getattr(r, "app", None)).__name__ != "PredictEndpoint" for r in routed.app.router.routes)
    for query, kwargs in _CASES:
        a, b = fast.post("/v1/predict" + query, **kwargs), routed.post("/v1/predict" + query, **kwargs)
        assert _comparable(a) == _comparable(b), (query, kwargs.keys(), a.text, b.text)
        assert a.headers["x-request-id"] and a.headers["content-type"] == "application/json"
    # Both document the same operation, and other methods still get the JSON 405.
    assert fast.get("/openapi.json").json()["paths"]["/v1/predict"] == routed.get("/openapi.json").json()["paths"]["/v1/predict"]
    _assert_error(fast.get("/v1/predict"), 405, "method_not_allowed")


def test_fast_path_metrics_use_the_route_template(client):
    client.post("/v1/predict", content=_png(RED), headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert 'oodguard_requests_total{endpoint="/v1/predict",status="200"}' in text


class _CountingPool:
    """The decode pool, counting what is handed to it."""

    def __init__(self, pool):
        self.pool, self.submitted = pool, 0

    def submit(self, fn, *args):
        self.submitted += 1
        return self.pool.submit(fn, *args)

    def __getattr__(self, name):
        return getattr(self.pool, name)


@pytest.mark.parametrize(
    "size, max_bytes, max_pixels, in_pool",
    [((8, 8), 32768, 65536, False),  # small in bytes and pixels: on the event loop
     ((300, 300), 1 << 20, 65536, True),  # 90,000 declared pixels: the pool
     ((8, 8), 0, 65536, True),  # inline decoding off
     ((8, 8), 32768, 0, True)],
)
def test_small_images_decode_inline_large_ones_in_the_pool(make_client, size, max_bytes, max_pixels, in_pool):
    client = make_client(inline_decode_max_bytes=max_bytes, inline_decode_max_pixels=max_pixels)
    layer = client.app.state.inference
    layer.decode_pool = counting = _CountingPool(layer.decode_pool)
    r = client.post("/v1/predict", content=_png(RED, size), headers={"content-type": "image/png"})
    assert r.status_code == 200 and _labels(r) == ["red"]
    assert counting.submitted == (1 if in_pool else 0)
    # Errors are the same either way: an undecodable image names its index.
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    bad = client.post("/v1/predict", files=[("files", ("a.png", _png(RED, size), "image/png")),
                                            ("files", ("b.png", truncated, "image/png"))])
    _assert_error(bad, 422, "invalid_image", "image 1")


def test_multipart_limits(make_client):
    client = make_client(max_images_per_request=2)
    png = ("a.png", _png(RED), "image/png")
    _assert_error(client.post("/v1/predict", files=[("files", png)] * 3), 422, "too_many_images", "2")
    many_fields = {f"note{i}": "x" for i in range(17)}
    _assert_error(client.post("/v1/predict", data=many_fields, files=[("file", png)]), 422, "invalid_multipart", "16 parts")
    _assert_error(client.post("/v1/predict", data={"note": "x" * (64 * 1024 + 1)}, files=[("file", png)]),
                  422, "invalid_multipart", "64 KiB")
    # Other text fields and other file parts are ignored, within the limits.
    r = client.post("/v1/predict", data={"note": "hello"}, files=[("file", png), ("thumbnail", png)])
    assert r.status_code == 200 and _labels(r) == ["red"]
