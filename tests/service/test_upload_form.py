"""Form-conditional bundles: the upload's form group read from its header, and each group's own threshold
and p-values, from the manifest's rules to an HTTP answer."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from oodguard.service.bundle import BundleError, conformal_p_values, verify_bundle, write_manifest
from oodguard.service.manifest import FormCalibration, InputSpec, OperatingPoint, load_manifest
from oodguard.service.upload_form import (
    DEFAULT_GROUPS,
    FORM_RULE,
    FORM_RULE_V1,
    V1_GROUPS,
    FormGroups,
    UploadForm,
    jpeg_quality,
    read_upload_form,
)

FORM_GROUPS = DEFAULT_GROUPS.names

from .bundle_factory import encode_image, make_tiny_bundle

SPEC = InputSpec(height=8, width=8)


def _open(blob: bytes) -> Image.Image:
    return Image.open(io.BytesIO(blob))


@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_quality_is_read_exactly_for_every_ijg_quality(subsampling):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for quality in range(1, 101):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
        assert jpeg_quality(_open(buf.getvalue())) == quality


def test_a_non_standard_table_maps_to_the_nearest_quality_and_lossless_has_none():
    buf = io.BytesIO()
    # a flat table of 8s sits between the IJG tables of quality ~85 and ~90
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG", qtables=[[8] * 64, [8] * 64])
    assert 80 <= jpeg_quality(_open(buf.getvalue())) <= 95
    assert jpeg_quality(_open(encode_image(fmt="PNG"))) is None


@pytest.mark.parametrize("blob, group, v1_group", [
    (encode_image(fmt="PNG"), "native", "native"),
    (encode_image(fmt="BMP"), "native", "native"),
    (encode_image(fmt="GIF"), "native", "native"),
    (encode_image(fmt="WEBP", quality=20), "native", "native"),  # WebP's quality is not in its header
    (encode_image(fmt="JPEG", quality=95), "jpeg_q92_100", "native"),
    (encode_image(fmt="JPEG", quality=75), "jpeg_q75_83", "native"),  # the shared sets' own files
    (encode_image(fmt="JPEG", quality=66), "jpeg_q61_67", "native"),
    (encode_image(fmt="JPEG", quality=65), "jpeg_q61_67", "jpeg_q46_65"),
    (encode_image(fmt="JPEG", quality=50), "jpeg_q50_60", "jpeg_q46_65"),
    (encode_image(fmt="JPEG", quality=48), "jpeg_q34_48", "jpeg_q46_65"),
    (encode_image(fmt="JPEG", quality=30), "jpeg_q24_33", "jpeg_q16_45"),
    (encode_image(fmt="JPEG", quality=10), "jpeg_q10_12", "jpeg_q1_15"),
    (encode_image(fmt="PNG", size=(16, 16)), "larger", "larger"),
    (encode_image(fmt="JPEG", size=(8, 12), quality=30), "larger", "larger"),  # size first: the resize dominates
    (encode_image(fmt="PNG", size=(4, 4)), "smaller", "smaller"),
    (encode_image(fmt="PNG", size=(16, 7)), "smaller", "smaller"),  # one side short: information lost on that axis
])
def test_form_group_from_the_header_under_each_rule(blob, group, v1_group):
    form = read_upload_form(_open(blob), SPEC)
    assert DEFAULT_GROUPS.group_of(form) == group and V1_GROUPS.group_of(form) == v1_group


def test_the_default_bands_cover_every_quality_and_v1s_leave_the_top_native():
    assert DEFAULT_GROUPS.covers_every_quality() and not V1_GROUPS.covers_every_quality()
    assert V1_GROUPS.names == ("native", "jpeg_q1_15", "jpeg_q16_45", "jpeg_q46_65", "smaller", "larger")
    assert [DEFAULT_GROUPS.group_of(UploadForm("native", q)) for q in range(1, 101)].count("native") == 0
    assert [V1_GROUPS.group_of(UploadForm("native", q)) for q in (1, 15, 16, 45, 46, 65, 66, 100, None)] == [
        "jpeg_q1_15", "jpeg_q1_15", "jpeg_q16_45", "jpeg_q16_45", "jpeg_q46_65", "jpeg_q46_65", "native", "native", "native"]
    assert FormGroups.from_names(DEFAULT_GROUPS.names) == DEFAULT_GROUPS  # the names say the bands


@pytest.mark.parametrize("names, message", [
    (("native", "smaller", "larger", "jpeg_q1_50", "jpeg_q40_100"), "overlap at quality 40"),
    (("native", "smaller", "larger", "jpeg_q0_50"), "must lie in 1-100"),
    (("native", "smaller", "larger", "jpeg_q60_50"), "must lie in 1-100"),
    (("native", "smaller", "larger", "jpeg_q1_101"), "must lie in 1-100"),
    (("native", "smaller", "larger", "png"), "is none of"),
    (("native", "smaller", "larger", "jpeg_q01_100"), "is none of"),  # served as jpeg_q1_100: refused
    (("native", "larger", "jpeg_q1_100"), r"must include \['smaller'\]"),
])
def test_malformed_groups_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        FormGroups.from_names(names)


# -- the manifest: all groups or none, under this rule ---------------------------------------------------

def _form_scores(shift: dict[str, float] | None = None, n: int = 100) -> dict[str, np.ndarray]:
    base = np.linspace(0.40, 0.99, n)
    return {g: np.clip(base + (shift or {}).get(g, 0.0), 0.0, 1.0) for g in FORM_GROUPS}


@pytest.fixture(scope="module")
def form_bundle(tmp_path_factory):
    # enlarged uploads are held to a much higher bar (their calibration scores sit at the top), JPEG q16-45 lower
    scores = _form_scores({"larger": 0.6, "jpeg_q24_33": -0.35})
    return make_tiny_bundle(tmp_path_factory.mktemp("forms") / "b", form_calibration=scores, calibration_size=100)


def _raw(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _validate(raw: dict):
    from oodguard.service.manifest import BundleManifest

    return BundleManifest.model_validate(raw)


def test_a_form_conditional_manifest_round_trips_and_verifies(form_bundle):
    report = verify_bundle(form_bundle)
    m = report.manifest
    assert m.calibration.form_rule == FORM_RULE and set(m.calibration.forms) == set(FORM_GROUPS)
    assert set(report.form_calibration) == set(FORM_GROUPS)
    op = m.operating_point("tpr95")
    assert op.form_thresholds["larger"] > op.form_thresholds["native"] > op.form_thresholds["jpeg_q24_33"]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["calibration"].update(form_rule="size-only-v0"), "is not a rule this oodguard reads"),
    (lambda r: r["calibration"]["forms"].pop("larger"), r"must include \['larger'\]"),
    (lambda r: r["calibration"]["forms"].pop("jpeg_q49_49"), "must cover every quality"),
    (lambda r: r["calibration"].update(form_rule=FORM_RULE_V1), "must have exactly the groups"),
    (lambda r: r["calibration"]["forms"].update(jpeg_q49_50=r["calibration"]["forms"].pop("jpeg_q49_49")), "overlap"),
    (lambda r: r["operating_points"][0]["form_thresholds"].pop("native"), "form_thresholds must have exactly"),
    (lambda r: r["operating_points"][0].pop("form_thresholds"), "form_thresholds must have exactly"),
    (lambda r: r["operating_points"][0].update(class_thresholds=[0.5, 0.5, 0.5]), "are exclusive"),
    (lambda r: r["calibration"].pop("forms"), "form_rule is set but"),
    (lambda r: r["calibration"]["forms"]["native"].update(file="../calibration.npy"), "calibration_<group>.npy"),
    (lambda r: r["calibration"]["forms"]["native"].update(file="calibration.npy"), "calibration_<group>.npy"),
    (lambda r: r["calibration"]["forms"]["native"].update(file=r["calibration"]["forms"]["larger"]["file"]),
     "its own file"),
])
def test_manifest_refuses_partial_or_foreign_form_calibration(form_bundle, edit, message):
    raw = _raw(form_bundle)
    edit(raw)
    with pytest.raises(ValueError, match=message):
        _validate(raw)


def test_form_thresholds_without_form_calibration_are_refused(tiny_bundle):
    raw = _raw(tiny_bundle)
    raw["operating_points"][0]["form_thresholds"] = {g: 0.5 for g in FORM_GROUPS}
    with pytest.raises(ValueError, match="the calibration has no forms"):
        _validate(raw)


def test_a_bundle_without_forms_keeps_its_manifest_hash(tiny_bundle):
    m = load_manifest(tiny_bundle)
    assert "forms" not in _raw(tiny_bundle)["calibration"]
    assert m.compute_content_sha256() == m.content_sha256


def test_verify_refuses_a_missing_or_unsorted_group_file(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "a", form_calibration=_form_scores(), calibration_size=100)
    (bundle / "calibration_larger.npy").unlink()
    m = load_manifest(bundle)
    write_manifest(bundle, m)  # the manifest no longer lists it: refused as a required file
    with pytest.raises(BundleError, match="required file calibration_larger.npy"):
        verify_bundle(bundle)
    bundle = make_tiny_bundle(tmp_path / "b", form_calibration=_form_scores(), calibration_size=100)
    np.save(bundle / "calibration_native.npy", np.linspace(1.0, 0.0, 100).astype(np.float32))
    write_manifest(bundle, load_manifest(bundle))
    with pytest.raises(BundleError, match="calibration_native.npy is not sorted"):
        verify_bundle(bundle)


# -- the service: each upload against its own group ------------------------------------------------------

def _predict(client, blob: bytes, **params):
    r = client.post("/v1/predict", files={"file": ("x", blob, "application/octet-stream")}, params=params)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_each_upload_gets_its_groups_threshold_and_p_value(make_client, form_bundle):
    client = make_client(bundle=form_bundle)
    m = load_manifest(form_bundle)
    op = m.operating_point("tpr95")
    scores = {g: np.sort(np.load(form_bundle / f.file)) for g, f in m.calibration.forms.items()}
    red = (255, 0, 0)
    for blob, group in [(encode_image(red, fmt="PNG"), "native"), (encode_image(red, size=(16, 16)), "larger"),
                        (encode_image(red, fmt="JPEG", quality=30), "jpeg_q24_33")]:
        p = _predict(client, blob)
        assert p["upload_form"] == group
        assert p["threshold"] == pytest.approx(op.form_thresholds[group])
        assert p["p_value"] == pytest.approx(float(conformal_p_values(scores[group], np.array([p["ood_score"]]))[0]))
        assert p["decision"] == ("accept" if p["ood_score"] >= op.form_thresholds[group] else "reject")
    # the same red picture: accepted as a PNG, rejected when uploaded upscaled (its group's bar is higher)
    assert _predict(client, encode_image(red, fmt="PNG"))["decision"] == "accept"
    assert _predict(client, encode_image(red, size=(16, 16)))["decision"] == "reject"


def test_a_bundle_calibrated_under_v1_is_served_under_v1(make_client, tmp_path):
    """Bundles calibrated before the v2 rule keep their meaning: a JPEG above quality 65 is `native` there."""
    scores = {g: np.linspace(0.40, 0.99, 100) for g in V1_GROUPS.names}
    bundle = make_tiny_bundle(tmp_path / "v1", form_calibration=scores, calibration_size=100)
    assert load_manifest(bundle).calibration.form_rule == FORM_RULE_V1
    client = make_client(bundle=bundle)
    red = (255, 0, 0)
    assert _predict(client, encode_image(red, fmt="JPEG", quality=66))["upload_form"] == "native"
    assert _predict(client, encode_image(red, fmt="JPEG", quality=30))["upload_form"] == "jpeg_q16_45"


def test_a_bundle_without_forms_answers_as_before(client):
    p = _predict(client, encode_image((255, 0, 0), size=(16, 16)))
    assert "upload_form" not in p


def test_tensors_sent_decoded_are_the_native_group(make_client, form_bundle):
    client = make_client(bundle=form_bundle)
    m = load_manifest(form_bundle)
    image = np.zeros((1, 3, 8, 8), dtype=np.float32)
    image[0, 0] = 1.0
    body = {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": image.ravel().tolist()}],
            "outputs": [{"name": n} for n in ("ood_score", "p_value", "accept")],
            "parameters": {"operating_point": "tpr95"}}
    r = client.post(f"/v2/models/{m.name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    score = out["ood_score"]["data"][0]
    native = np.sort(np.load(form_bundle / m.calibration.forms["native"].file))
    assert out["p_value"]["data"][0] == pytest.approx(float(conformal_p_values(native, np.array([score]))[0]))
    assert out["accept"]["data"][0] == (score >= m.operating_point("tpr95").form_thresholds["native"])


def test_operating_point_model_accepts_form_thresholds():
    op = OperatingPoint(name="t", target_tpr=0.95, threshold=0.5, form_thresholds={g: 0.1 for g in FORM_GROUPS})
    assert op.form_thresholds["larger"] == 0.1
    assert FormCalibration(file="calibration_native.npy", size=3).rendering == ""


def test_image_thresholds_by_group_and_native_when_unknown():
    from oodguard.service.postprocess import image_thresholds

    groups = {g: float(i) for i, g in enumerate(FORM_GROUPS)}
    op = OperatingPoint(name="t", target_tpr=0.95, threshold=9.0, form_thresholds=groups)
    np.testing.assert_array_equal(image_thresholds(op, np.array([0, 1, 2]), ["larger", "native", "jpeg_q1_3"]),
                                  [groups["larger"], groups["native"], groups["jpeg_q1_3"]])
    np.testing.assert_array_equal(image_thresholds(op, np.array([0, 1])), [groups["native"]] * 2)
    plain = OperatingPoint(name="t", target_tpr=0.95, threshold=9.0)
    np.testing.assert_array_equal(image_thresholds(plain, np.array([0]), ["larger"]), [9.0])


def test_bundle_info_shows_each_groups_threshold(form_bundle):
    from typer.testing import CliRunner

    from oodguard.cli import app

    result = CliRunner().invoke(app, ["bundle", "info", str(form_bundle)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    op = load_manifest(form_bundle).operating_point("tpr95")
    assert "upload-form groups" in result.output and FORM_RULE in result.output
    assert f"larger {op.form_thresholds['larger']:.6g}" in result.output


def test_metrics_count_uploads_by_form_group_and_verdict(make_client, form_bundle):
    client = make_client(bundle=form_bundle)
    red = (255, 0, 0)
    for blob in (encode_image(red, fmt="PNG"), encode_image(red, fmt="PNG"), encode_image(red, size=(16, 16))):
        _predict(client, blob)
    text = client.get("/metrics").text
    assert 'oodguard_upload_forms_total{decision="accept",group="native"} 2.0' in text
    assert 'oodguard_upload_forms_total{decision="reject",group="larger"} 1.0' in text
