"""Open Inference Protocol v2: health, metadata, infer (tensors in, every graph output out), errors."""

from __future__ import annotations

import numpy as np
import pytest

from oodguard.service.bundle import make_session
from oodguard.service.schemas import V2ErrorResponse, V2InferResponse, V2ModelMetadata


def _request(images: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}], **extra}


def assert_v2_error(r, status: int, code: str, *parts: str) -> None:
    assert r.status_code == status, r.text
    err = V2ErrorResponse.model_validate(r.json())  # the OIP shape: {"error": "<message>", "code"}
    assert set(r.json()) == {"error", "code"}, r.json()
    assert err.code == code, err
    for p in parts:
        assert p in err.error, err.error


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    assert meta["name"] == "oodguard" and "version" in meta


def test_not_ready_is_503(make_settings):
    from fastapi.testclient import TestClient

    from oodguard.service.app import create_app

    c = TestClient(create_app(make_settings()))  # lifespan not started
    assert c.get("/v2/health/live").status_code == 200
    assert_v2_error(c.get("/v2/health/ready"), 503, "not_ready")
    assert_v2_error(c.post("/v2/models/tiny/infer", json=_request(np.zeros((1, 3, 8, 8), np.float32))), 503, "not_ready")


def test_model_metadata(client):
    r = client.get("/v2/models/tiny")
    assert r.status_code == 200
    meta = V2ModelMetadata.model_validate(r.json())
    assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("image", "FP32", [-1, 3, 8, 8])]
    assert {t.name: t.shape for t in meta.outputs} == {"logits": [-1, 3], "probs": [-1, 3], "msp": [-1], "energy": [-1]}
    assert client.get("/v2/models/tiny/versions/1").json() == r.json()
    assert client.get("/v2/models/tiny/ready").json()["ready"] is True


def test_unknown_model_or_version_is_404(client):
    assert_v2_error(client.get("/v2/models/other"), 404, "model_not_found", "other")
    assert_v2_error(client.get("/v2/models/tiny/versions/7"), 404, "model_not_found", "7")
    assert_v2_error(client.post("/v2/models/other/infer", json=_request(np.zeros((1, 3, 8, 8), np.float32))), 404, "model_not_found")


def test_infer_returns_every_output_equal_to_onnxruntime(client, tiny_bundle):
    images = np.random.default_rng(0).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    r = client.post("/v2/models/tiny/infer", json=_request(images, id="req-7"))
    assert r.status_code == 200, r.text
    body = V2InferResponse.model_validate(r.json())
    assert body.model_name == "tiny" and body.model_version == "1" and body.id == "req-7"
    session = make_session(tiny_bundle / "model.onnx")
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": images})))
    assert [o.name for o in body.outputs] == list(expected)
    for out in body.outputs:
        assert out.datatype == "FP32" and out.shape == list(expected[out.name].shape)
        np.testing.assert_allclose(np.array(out.data, np.float32).reshape(out.shape), expected[out.name], rtol=1e-6, atol=1e-6)


def test_infer_selected_outputs_and_versioned_route(client):
    images = np.zeros((1, 3, 8, 8), np.float32)
    r = client.post("/v2/models/tiny/versions/1/infer", json=_request(images, outputs=[{"name": "msp"}]))
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "msp" and out["shape"] == [1] and out["data"][0] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "mutate, code, part",
    [
        (lambda b: b["inputs"][0].update(datatype="INT64"), "invalid_tensor", "FP32"),
        (lambda b: b["inputs"][0].update(shape=[1, 3, 4, 4]), "invalid_tensor", "shape"),
        (lambda b: b["inputs"][0].update(shape=[1, 3, 8]), "invalid_tensor", "shape"),
        (lambda b: b["inputs"][0].update(data=[0.5] * 10), "invalid_tensor", "192"),
        (lambda b: b["inputs"][0].update(name="input"), "invalid_tensor", "image"),
        (lambda b: b["inputs"].append(dict(b["inputs"][0])), "invalid_tensor", "exactly one"),
        (lambda b: b.update(outputs=[{"name": "features"}]), "unknown_output", "features"),
        (lambda b: b["inputs"][0].update(data=["x"] * 192), "validation_error", "data"),
        (lambda b: b.pop("inputs"), "validation_error", "inputs"),
        (lambda b: b["inputs"][0].update(data=[1e39] * 192), "invalid_tensor", "infinite"),
    ],
    ids=["dtype", "hw", "rank", "length", "name", "two-inputs", "unknown-output", "strings", "no-inputs", "overflow"],
)
def test_bad_tensors_are_422(client, mutate, code, part):
    body = _request(np.zeros((1, 3, 8, 8), np.float32))
    mutate(body)
    assert_v2_error(client.post("/v2/models/tiny/infer", json=body), 422, code, part)


def test_too_many_images_in_a_tensor(make_client):
    c = make_client(max_images_per_request=2)
    assert_v2_error(c.post("/v2/models/tiny/infer", json=_request(np.zeros((3, 3, 8, 8), np.float32))), 422, "invalid_tensor", "N <= 2")
