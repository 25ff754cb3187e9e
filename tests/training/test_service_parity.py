"""The served path (service preprocessing + the bundle's ONNX in onnxruntime) equals the training path
(training's image decoding + the torch model and score functions) on the same image files, to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oodguard.service.bundle import make_session
from oodguard.service.manifest import load_manifest
from oodguard.service.preprocess import decode_images
from oodguard.training.calibrate import CalibrateConfig, calibrate_run
from oodguard.training.data import load_image_folder, to_tensor
from oodguard.training.export import ScoringModule, export_run, load_or_fit_mahalanobis, run_onnx
from oodguard.training.run_dir import RunData
from oodguard.training.scores import ScoreContext

from ._eval_helpers import make_run

torch.set_num_threads(1)


def _write_images(folder, rng):
    """CIFAR-sized and other-sized files, JPEG and PNG, RGB and greyscale: the resize and decode paths."""
    folder.mkdir(parents=True)
    specs = [((32, 32), "RGB", "png"), ((32, 32), "RGB", "jpg"), ((64, 48), "RGB", "jpg"), ((20, 28), "RGB", "png"),
             ((100, 100), "L", "jpg"), ((33, 31), "RGB", "png")]
    paths = []
    for i, ((w, h), mode, ext) in enumerate(specs * 3):
        channels = 3 if mode == "RGB" else 1
        # smooth-ish content (JPEG-friendly) plus noise
        base = rng.integers(0, 256, size=(4, 4, channels)).astype(np.float64)
        big = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
        pixels = np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        path = folder / f"img{i:02d}.{ext}"
        img.save(path, quality=90) if ext == "jpg" else img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data_dir):
    root = tmp_path_factory.mktemp("parity")
    run = make_run(root / "run", tiny_data_dir)
    export_run(run, ["msp", "energy", "mahalanobis"])
    built = calibrate_run(run, CalibrateConfig(score="energy", max_samples=32, tarball=False))
    return run, built.bundle_dir


def test_service_preprocessing_and_onnx_match_the_torch_pipeline(served, tmp_path):
    run, bundle = served
    paths = _write_images(tmp_path / "images", np.random.default_rng(0))
    manifest = load_manifest(bundle)

    # service: bytes -> decode per the manifest's InputSpec -> onnxruntime
    served_images = decode_images([p.read_bytes() for p in paths], manifest.input)
    served_out = run_onnx(make_session(bundle / "model.onnx"), served_images)

    # training: the same files through training's decoder -> torch model + score functions
    image_set = load_image_folder(tmp_path / "images", labelled=False, use_cache=False)
    torch_images = to_tensor(image_set.images)
    np.testing.assert_array_equal(served_images, torch_images.numpy())  # identical pixels

    run_data = RunData.open(run)
    model, _ = run_data.load_model()
    maha, _ = load_or_fit_mahalanobis(model, run_data)
    module = ScoringModule(model, ["msp", "energy", "mahalanobis"], ScoreContext(mahalanobis=maha)).eval()
    with torch.no_grad():
        torch_out = dict(zip(module.output_names, (t.numpy() for t in module(torch_images))))
    assert list(served_out) == manifest.outputs == module.output_names
    for name in manifest.outputs:
        np.testing.assert_allclose(served_out[name], torch_out[name], rtol=0, atol=1e-4, err_msg=name)

    # and the decision the service would take is the calibrated one
    op = manifest.operating_point()
    score = served_out[manifest.score.output]
    np.testing.assert_array_equal(score >= op.threshold, torch_out["energy"] >= op.threshold)
