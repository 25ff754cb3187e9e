"""The shipped bundle (models/default) and what README.md and examples/README.md say about it.

- `oodguard bundle verify models/default` passes (schema, every sha256, ONNX contract, golden outputs);
- README's `curl … examples/cifar_airplane.jpg` answer is the service's answer, field by field
  (the JSON block is read from README.md itself; only `request_id` differs per request);
- the out-of-distribution examples README names are rejected with the p-values it gives, and
  `examples/cifar_cat.jpg` is the CIFAR-10 example rejected at `tpr95` (p-value 0.038);
- every other `examples/cifar_<class>.jpg` is accepted as `<class>`, and every `examples/ood_*`
  rejected, as examples/README.md says;
- bytes that are not an image get README's 415 `unsupported_image_format`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from oodguard.service.manifest import load_manifest

from .conftest import bundle_verify, serving_shipped

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "default"
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()
EXAMPLES_README = (EXAMPLES / "README.md").read_text()
CIFAR = sorted(EXAMPLES.glob("cifar_*.jpg"))
OOD = sorted(EXAMPLES.glob("ood_*"))
# The p-values README.md quotes, as it writes them (rounded): (example, p_value, decision).
README_P_VALUES = [
    ("ood_noise.png", "0.0024", "reject"),
    ("ood_tinyimagenet_1.jpg", "0.0008", "reject"),
    ("cifar_cat.jpg", "0.038", "reject"),
]
REJECTED_CIFAR = {"cifar_cat.jpg"}  # README: "about one in twenty is rejected by design, and cifar_cat.jpg is one of them"


@pytest.fixture(scope="module")
def client():
    with serving_shipped(BUNDLE) as c:
        yield c


def _predict(client, path: Path) -> dict:
    resp = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _approx(expected):
    """Floats compared to 1e-5 relative (another CPU's onnxruntime may differ in the last bits), the rest exactly."""
    if isinstance(expected, float):
        return pytest.approx(expected, rel=1e-5, abs=1e-7)
    if isinstance(expected, dict):
        return {k: _approx(v) for k, v in expected.items()}
    if isinstance(expected, list):
        return [_approx(v) for v in expected]
    return expected


@pytest.mark.slow
def test_bundle_verify_passes_on_the_shipped_bundle():
    proc = bundle_verify(BUNDLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = load_manifest(BUNDLE)
    assert f"bundle {manifest.name}:{manifest.version} OK" in proc.stdout


def test_readme_curl_answer_is_the_services(client):
    assert "curl -s -F file=@examples/cifar_airplane.jpg 127.0.0.1:8000/v1/predict" in README
    block = re.search(r"```json\n(.*?)```", README, re.S)
    assert block, "README.md lost its example answer"
    promised = json.loads(block.group(1))
    answer = _predict(client, EXAMPLES / "cifar_airplane.jpg")
    promised.pop("request_id")
    assert re.fullmatch(r"[0-9a-f]{32}", answer.pop("request_id"))
    assert answer == _approx(promised)


@pytest.mark.parametrize("name, p_value, decision", README_P_VALUES)
def test_readme_p_values_and_decisions(client, name, p_value, decision):
    assert f"`examples/{name}`" in README and p_value in README
    (pred,) = _predict(client, EXAMPLES / name)["predictions"]
    assert pred["decision"] == decision
    assert round(pred["p_value"], len(p_value) - 2) == float(p_value)


def test_noise_p_value_counts_the_calibration_images_below_it(client):
    """README: 0.0024 = 12/5001, eleven of the native group's calibration images score lower than the noise example
    (a PNG of the model's size: the `native` upload-form group, whose calibration the p-value is against)."""
    forms = load_manifest(BUNDLE).calibration.forms
    n = forms["native"].size
    assert "12/5001" in README and "eleven of the `native` group's calibration images" in README and n == 5000
    (pred,) = _predict(client, EXAMPLES / "ood_noise.png")["predictions"]
    assert pred["upload_form"] == "native"
    assert pred["p_value"] == pytest.approx(12 / (n + 1))
    calibration = np.load(BUNDLE / forms["native"].file)
    assert int((calibration <= pred["ood_score"]).sum()) == 11


@pytest.mark.parametrize("path", CIFAR, ids=lambda p: p.name)
def test_cifar_examples_are_classified_as_their_class(client, path):
    (pred,) = _predict(client, path)["predictions"]
    assert pred["label"] == path.stem.removeprefix("cifar_")
    assert pred["decision"] == ("reject" if path.name in REJECTED_CIFAR else "accept"), pred


@pytest.mark.parametrize("path", OOD, ids=lambda p: p.name)
def test_ood_examples_are_rejected(client, path):
    (pred,) = _predict(client, path)["predictions"]
    assert pred["decision"] == "reject", pred


def test_examples_readme_names_the_exception():
    assert len(CIFAR) == 10 and len(OOD) >= 2
    for name in REJECTED_CIFAR:
        assert f"`{name}`" in EXAMPLES_README, f"examples/README.md must say that {name} is rejected"


def test_not_an_image_gets_415(client):
    resp = client.post("/v1/predict", files={"file": ("x.jpg", b"definitely not an image", "image/jpeg")})
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == "unsupported_image_format"
