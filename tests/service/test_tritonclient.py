"""The reference Open Inference Protocol client, unmodified: `tritonclient[http]` (dev extra) against a
real `oodguard serve` of the shipped bundle, in JSON and binary modes; its verdict is /v1/predict's for the
same pixels uploaded losslessly (tensors sent decoded are the `native` upload-form group, as a PNG is)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from oodguard.service.manifest import load_manifest
from oodguard.service.preprocess import decode_images

from bench.serve_process import start_serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "default"
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg")) + sorted((ROOT / "examples").glob("*.png"))
VERDICT = ("ood_score", "p_value", "accept", "label_index")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "serve.log"
    with start_serve(["--bundle", str(BUNDLE), "--threads", "1", "--decode-threads", "1"], log) as s:
        yield s
        assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return decode_images([p.read_bytes() for p in EXAMPLES], load_manifest(BUNDLE).input)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def v1(server, images) -> list[dict]:
    pixels = np.rint(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)  # the decoded tensors, exactly
    files = [("files", (f"{p.stem}.png", _png(x), "application/octet-stream")) for p, x in zip(EXAMPLES, pixels)]
    r = httpx.post(f"{server.base}/v1/predict", files=files, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", concurrency=1, network_timeout=30.0)


def test_health_and_metadata(server):
    client = _client(server)
    name = load_manifest(BUNDLE).name
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(name)
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["shape"][1:] == [3, 32, 32]
    assert {"probs", "msp"} <= {o["name"] for o in meta["outputs"]}
    assert [o["name"] for o in meta["parameters"]["verdict_outputs"]] == list(VERDICT)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_verdict_equals_v1_predict(server, images, v1, binary):
    client = _client(server)
    name, version = load_manifest(BUNDLE).name, load_manifest(BUNDLE).version
    inp = triton.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probs", *VERDICT)]
    result = client.infer(name, [inp], outputs=outputs, model_version=version if binary else "")
    assert {p["upload_form"] for p in v1} == {"native"}  # the group tensors sent decoded are judged in
    decisions = [p["decision"] == "accept" for p in v1]
    assert {True, False} <= set(decisions)  # in- and out-of-distribution examples both
    assert result.as_numpy("accept").tolist() == decisions
    assert result.as_numpy("label_index").tolist() == [p["class_index"] for p in v1]
    assert result.as_numpy("p_value").tolist() == [p["p_value"] for p in v1]
    np.testing.assert_allclose(result.as_numpy("ood_score"), [p["ood_score"] for p in v1], rtol=1e-6)
    assert result.as_numpy("probs").shape == (len(EXAMPLES), 10)


def test_default_infer_binary_outputs(server, images):
    """tritonclient's default: no outputs named, so it asks for every output in binary."""
    client = _client(server)
    inp = triton.InferInput("image", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(images[:1])
    result = client.infer(load_manifest(BUNDLE).name, [inp])
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert {"logits", "probs", "msp"} <= names
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_allclose(result.as_numpy("probs").sum(axis=1), 1.0, rtol=1e-5)


def test_bad_request_is_a_client_error(server):
    client = _client(server)
    inp = triton.InferInput("image", [1, 3, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer(load_manifest(BUNDLE).name, [inp])
    # The OIP error shape {"error": "<message>", "code"}: tritonclient's message is the string, and
    # str(exception) (which concatenates it) works.
    assert info.value.status() == "422"
    assert "input shape must be" in info.value.message()
    assert str(info.value).startswith("[422] input shape must be"), str(info.value)
