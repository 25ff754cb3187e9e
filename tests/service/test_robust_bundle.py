"""The second shipped bundle (models/robust: the default classifier + the detector adversarially trained at 8/255)
and what README.md says about it.

- `oodguard bundle verify models/robust` passes (schema, every sha256, ONNX contract, golden outputs);
- it serves the score `--score auto` chose on validation data under the strong attack, as
  docs/results-robust.json records, and its graph carries both the detector and the classifier's energy;
- README's numbers for it are those of docs/results-robust.json (the test-set evaluation);
- served, it classifies with the default model's classifier and answers bad input like any bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oodguard.service.manifest import load_manifest

from .conftest import bundle_verify, serving_shipped

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "robust"
RESULTS = json.loads((ROOT / "docs" / "results-robust.json").read_text())
README = (ROOT / "README.md").read_text()


def _tinyimagenet(attack: str) -> dict:
    return RESULTS["eval"]["results"]["detector"]["tinyimagenet"][attack]


@pytest.fixture(scope="module")
def client():
    with serving_shipped(BUNDLE) as c:
        yield c


@pytest.mark.slow
def test_bundle_verify_passes_on_the_robust_bundle():
    proc = bundle_verify(BUNDLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bundle robust:" in proc.stdout and " OK" in proc.stdout


def test_it_serves_the_score_chosen_on_validation_data_under_the_strong_attack():
    manifest = load_manifest(BUNDLE)
    selection = RESULTS["bundle_metrics"]["score_selection"]
    assert selection["attack"] == "strong" and manifest.score.name == selection["chosen"] == "detector"
    assert {"detector", "energy"} <= set(manifest.outputs)
    assert manifest.name == "robust" and manifest.version == RESULTS["recipe"]["version"]


def test_readme_quotes_the_evaluations_numbers():
    section = README[README.index("**At ε = 8/255**"):README.index("## Limits and security")]
    strong, clean = _tinyimagenet("strong"), _tinyimagenet("none")
    for value in (strong["auroc"], clean["auroc"], _tinyimagenet("strong_ood_only")["auroc"]):
        assert f"{100 * value:.1f}" in section, f"README's models/robust paragraph lost {100 * value:.1f}"
    assert f"{strong['n_in']} + {strong['n_out']}" in section and "models/robust" in section


def test_served_it_classifies_with_the_default_classifier(client):
    image = ROOT / "examples" / "cifar_airplane.jpg"
    resp = client.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "application/octet-stream")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    (pred,) = body["predictions"]
    assert body["model"]["name"] == "robust" and pred["label"] == "airplane" and pred["score_name"] == "detector"
    assert pred["decision"] in ("accept", "reject") and 0 < pred["p_value"] <= 1


def test_not_an_image_gets_415(client):
    resp = client.post("/v1/predict", files={"file": ("x.jpg", b"definitely not an image", "image/jpeg")})
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_image_format"
