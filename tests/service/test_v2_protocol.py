"""Open Inference Protocol v2 as real clients speak it: no Content-Type, the binary tensor extension,
requested outputs with parameters, the verdict tensors, and a 4xx JSON error for every malformed body."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from oodguard.service.preprocess import decode_images
from oodguard.service.v2_codec import InputSpec, encode_infer_response, parse_infer_request, split_body

from .bundle_factory import encode_image
from .test_v2 import assert_v2_error  # one check of the OIP error shape for both v2 test files

URL = "/v2/models/tiny/infer"


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 3, 8, 8)).astype(np.float32)


def _binary_body(images: np.ndarray, **extra) -> tuple[bytes, dict[str, str]]:
    """What tritonclient sends in binary mode: JSON header, then the raw FP32 bytes; no Content-Type."""
    raw = images.astype("<f4").tobytes()
    head = {
        "inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}],
        **extra,
    }
    js = json.dumps(head).encode()
    return js + raw, {"Inference-Header-Content-Length": str(len(js))}


def _json_body(images: np.ndarray, **extra) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}], **extra}
    ).encode()


def _decode_response(r) -> dict[str, np.ndarray]:
    """Parse a (possibly binary) v2 response into {name: array}, as tritonclient's InferResult does."""
    length = r.headers.get("inference-header-content-length")
    js, binary = split_body(r.content, None if length is None else int(length))
    head = json.loads(js)
    out, offset = {}, 0
    dtypes = {"FP32": "<f4", "FP64": "<f8", "BOOL": "?", "INT64": "<i8"}
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(binary[offset : offset + size], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
            offset += size
    assert offset == len(binary)
    return out


def test_json_without_content_type(client):
    images = _images()
    r = client.post(URL, content=_json_body(images), headers={"content-type": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert set(_decode_response(r)) == {"logits", "probs", "msp", "energy"}


def test_binary_input_and_outputs_equal_json_ones(client):
    images = _images(3)
    json_out = _decode_response(client.post(URL, content=_json_body(images)))
    body, headers = _binary_body(images, parameters={"binary_data_output": True})
    r = client.post(URL, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers["inference-header-content-length"]) < len(r.content)
    bin_out = _decode_response(r)
    assert list(bin_out) == list(json_out)
    for name in json_out:
        np.testing.assert_allclose(bin_out[name], json_out[name], rtol=1e-6, atol=1e-7)


def test_per_output_binary_flag_overrides_the_request_default(client):
    body, headers = _binary_body(
        _images(1),
        parameters={"binary_data_output": True},
        outputs=[{"name": "msp", "parameters": {"binary_data": False}}, {"name": "accept"}],
    )
    r = client.post("/v2/models/tiny/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    head = json.loads(r.content[: int(r.headers["inference-header-content-length"])])
    msp, accept = head["outputs"]
    assert "data" in msp and "parameters" not in msp
    assert accept["datatype"] == "BOOL" and accept["parameters"] == {"binary_data_size": 1} and "data" not in accept


def test_verdict_outputs_equal_v1_predict(client, tiny_bundle):
    """The same images through /v1/predict and through v2 (the decoded tensor): the same verdict, every field."""
    from oodguard.service.manifest import load_manifest

    blobs = [encode_image((255, 0, 0)), encode_image((128, 128, 128)), encode_image((0, 0, 230), fmt="JPEG")]
    v1 = client.post("/v1/predict", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    assert v1.status_code == 200, v1.text
    preds = v1.json()["predictions"]
    assert {p["decision"] for p in preds} == {"accept", "reject"}  # both verdicts are exercised
    images = decode_images(blobs, load_manifest(tiny_bundle).input)
    for op in (None, "tpr90"):
        params = {} if op is None else {"parameters": {"operating_point": op}}
        names = ["ood_score", "p_value", "accept", "label_index", "probs"]
        r = client.post(URL, content=_json_body(images, outputs=[{"name": n} for n in names], **params))
        assert r.status_code == 200, r.text
        out = _decode_response(r)
        if op is not None:
            preds = client.post(f"/v1/predict?operating_point={op}", files=[("files", ("x", b, "image/png")) for b in blobs]).json()[
                "predictions"
            ]
        assert out["accept"].tolist() == [p["decision"] == "accept" for p in preds]
        assert out["label_index"].tolist() == [p["class_index"] for p in preds]
        assert out["p_value"].tolist() == [p["p_value"] for p in preds]
        np.testing.assert_allclose(out["ood_score"], [p["ood_score"] for p in preds], rtol=1e-6)
        assert out["accept"].dtype == np.bool_ and out["label_index"].dtype == np.int64


def test_metadata_lists_verdict_outputs_and_binary_extension(client):
    meta = client.get("/v2/models/tiny").json()
    assert [t["name"] for t in meta["parameters"]["verdict_outputs"]] == ["ood_score", "p_value", "accept", "label_index"]
    assert meta["parameters"]["default_operating_point"] == "tpr95"
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]


def test_v2_requests_feed_the_p_value_metrics(client):
    before = client.get("/metrics").text
    assert client.post(URL, content=_json_body(_images(2), outputs=[{"name": "msp"}])).status_code == 200
    after = client.get("/metrics").text

    def count(text: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("oodguard_p_value_count")))

    assert count(after) == count(before) + 2


@pytest.mark.parametrize(
    "make, status, code, part",
    [
        (lambda: (b"{not json", {}), 400, "invalid_json", "JSON"),
        (lambda: (b"[1, 2]", {}), 422, "validation_error", "body"),
        (lambda: (b"{}", {"Inference-Header-Content-Length": "999"}), 400, "invalid_inference_header", "999"),
        (lambda: (b"{}", {"Inference-Header-Content-Length": "-1"}), 422, "validation_error", "Inference-Header"),
        (lambda: (b"{}", {"Inference-Header-Content-Length": "abc"}), 422, "validation_error", "Inference-Header"),
    ],
    ids=["not-json", "not-an-object", "header-too-long", "header-negative", "header-not-int"],
)
def test_malformed_bodies_are_4xx(client, make, status, code, part):
    body, headers = make()
    assert_v2_error(client.post(URL, content=body, headers=headers), status, code, part)


def _mutated_binary(mutate) -> tuple[bytes, dict]:
    images = _images(1)
    raw = images.astype("<f4").tobytes()
    head = {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}]}
    raw = mutate(head, raw)
    js = json.dumps(head).encode()
    return js + raw, {"Inference-Header-Content-Length": str(len(js))}


@pytest.mark.parametrize(
    "mutate, code, part",
    [
        (lambda h, raw: raw[:-4], "invalid_tensor", "follow"),
        (lambda h, raw: raw + b"\0" * 4, "invalid_tensor", "follow"),
        (lambda h, raw: (h["inputs"][0]["parameters"].update(binary_data_size=12), raw)[1], "invalid_tensor", "768 bytes"),
        (lambda h, raw: (h["inputs"][0]["parameters"].update(binary_data_size="768"), raw)[1], "invalid_tensor", "non-negative"),
        (lambda h, raw: (h["inputs"][0]["parameters"].update(binary_data_size=True), raw)[1], "invalid_tensor", "non-negative"),
        (lambda h, raw: (h["inputs"][0].update(shape=[10**9, 3, 8, 8]), raw)[1], "invalid_tensor", "N <= 64"),
        (lambda h, raw: (h["inputs"][0].update(data=[0.0] * 192), raw)[1], "invalid_tensor", "both"),
        (lambda h, raw: (h["inputs"][0].pop("parameters"), raw)[1], "invalid_tensor", "binary_data_size"),
        (lambda h, raw: (h["inputs"][0].update(datatype="FP64"), raw)[1], "invalid_tensor", "FP32"),
        (lambda h, raw: np.full((1, 3, 8, 8), np.nan, "<f4").tobytes(), "invalid_tensor", "NaN"),
        (lambda h, raw: (h.update(outputs=[{"name": "msp"}, {"name": "msp"}]), raw)[1], "duplicate_output", "msp"),
        (lambda h, raw: (h.update(outputs=[{"name": "features"}]), raw)[1], "unknown_output", "features"),
        (lambda h, raw: (h.update(outputs=[{"name": "msp", "parameters": {"binary_data": "yes"}}]), raw)[1], "invalid_parameter", "binary_data"),
        (lambda h, raw: (h.update(outputs=[{"name": "probs", "parameters": {"classification": 2}}]), raw)[1], "unsupported_parameter", "classification"),
        (lambda h, raw: (h.update(parameters={"binary_data_output": 1}), raw)[1], "invalid_parameter", "binary_data_output"),
        (lambda h, raw: (h.update(parameters={"operating_point": "tpr50"}), raw)[1], "unknown_operating_point", "tpr50"),
        (lambda h, raw: (h.update(parameters={"operating_point": 95}), raw)[1], "invalid_parameter", "operating_point"),
    ],
    ids=[
        "short", "long", "size-vs-shape", "size-str", "size-bool", "huge-shape", "data-and-binary", "binary-unclaimed",
        "fp64", "nan", "duplicate-output", "unknown-output", "binary-flag-str", "classification", "binary-output-int",
        "unknown-op", "op-int",
    ],
)
def test_malformed_binary_requests_are_422(client, mutate, code, part):
    body, headers = _mutated_binary(mutate)
    assert_v2_error(client.post(URL, content=body, headers=headers), 422, code, part)


def test_many_requested_outputs_are_refused_before_validation(client):
    # issue 18 #1: each repeat rebuilt the output (K = 20,000 -> +935 MB, a 255 MB response). More
    # entries than the model offers are refused from the parsed JSON; a body of them too large for
    # the value budget is refused before parsing.
    n_outputs = len(client.get("/v2/models/tiny").json()["outputs"]) + 4  # + the verdict outputs
    body, headers = _mutated_binary(lambda h, raw: (h.update(outputs=[{"name": "msp"}] * (n_outputs + 1)), raw)[1])
    assert_v2_error(client.post(URL, content=body, headers=headers), 422, "too_many_outputs", str(n_outputs))
    body, headers = _mutated_binary(lambda h, raw: (h.update(outputs=[{"name": "msp"}] * 20_000), raw)[1])
    assert_v2_error(client.post(URL, content=body, headers=headers), 422, "too_many_values", "separators")


def test_a_few_repeated_outputs_are_duplicates(client):
    body, headers = _mutated_binary(lambda h, raw: (h.update(outputs=[{"name": "msp"}] * 3), raw)[1])
    assert_v2_error(client.post(URL, content=body, headers=headers), 422, "duplicate_output", "msp")


def test_json_data_with_more_values_than_any_valid_tensor_is_refused_unparsed(client):
    # issue 18 #4: a 16 MiB JSON body cost ~30x its size once parsed. 64 images of 3x8x8 = 12,288
    # values at most; one more than the budget is refused from its separators.
    values = 64 * 3 * 8 * 8 + 1024 + 1
    body = b'{"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [' + b"0," * values + b"0]}]}"
    assert_v2_error(client.post(URL, content=body), 422, "too_many_values", "separators")


def test_compressed_body_is_415(client):
    body = gzip.compress(_json_body(_images(1)))
    assert_v2_error(client.post(URL, content=body, headers={"content-encoding": "gzip"}), 415, "unsupported_media_type", "gzip")


def test_codec_round_trip_is_pure():
    spec = InputSpec("image", (3, 2, 2), 4, ("probs", "accept"), ("probs",))
    images = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 24
    raw = images.tobytes()
    js = json.dumps(
        {"id": "7", "inputs": [{"name": "image", "shape": [2, 3, 2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 96}}],
         "outputs": [{"name": "accept", "parameters": {"binary_data": True}}, {"name": "probs"}]}
    ).encode()
    req = parse_infer_request(js + raw, len(js), spec)
    np.testing.assert_array_equal(req.images, images)
    assert req.id == "7" and req.outputs == (("accept", True), ("probs", False))
    body, length = encode_infer_response({"model_name": "m", "model_version": "1"}, [
        ("accept", np.array([True, False]), True), ("probs", np.array([[0.25, 0.75]], np.float32), False)])
    head = json.loads(body[:length])
    assert body[length:] == b"\x01\x00"
    assert head["outputs"][0] == {"name": "accept", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}}
    assert head["outputs"][1]["data"] == [0.25, 0.75]
    assert encode_infer_response({"model_name": "m"}, [("p", np.array([1.0]), False)])[1] is None
