"""Shared test fixtures: tiny synthetic datasets in the shared npz-of-JPEG format and image folders.

Nothing is downloaded: every image is drawn here from a seeded RNG. Fixtures:

- `make_npz(path, images, labels, classes=None)` -> Path: write an npz exactly like ../shared/datasets.
- `make_image_folder(root, images, labels=None, classes=None, ext="png")` -> Path: class sub-folders when
  labels are given, else a nested unlabelled folder.
- `synthetic_images(n, num_classes=10, seed=0)` -> (uint8 N×32×32×3, int64 labels): learnable in a
  few steps (each class has its own colour and stripe).
- `tiny_data_dir` (session): a data directory with cifar10_{train,test}.npz, tinyimagenet_outliers.npz and
  tinyimagenet_test.npz, small enough for seconds-long training runs.

Also: every test session gets its own decode cache (OODGUARD_CACHE_DIR), never ~/.cache.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]


def synthetic_class_images(n: int, num_classes: int = 10, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    palette = np.random.default_rng(1234).integers(40, 216, size=(num_classes, 3))
    images = rng.normal(0, 18, size=(n, size, size, 3)) + palette[labels][:, None, None, :]
    for i, k in enumerate(labels):  # a class-specific horizontal stripe: shape, not just colour
        row = 2 + 3 * int(k) % (size - 4)
        images[i, row:row + 3, :, :] = 255 - palette[k]
    return np.clip(images, 0, 255).astype(np.uint8), labels


def synthetic_outlier_images(n: int, seed: int = 1, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_image_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None,
                    classes: list[str] | None = None, quality: int = 95) -> Path:
    from PIL import Image

    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    labels = np.full(len(images), -1) if labels is None else labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, jpeg=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8), offsets=offsets,
             labels=np.asarray(labels, dtype=np.int16), classes=np.asarray(classes or [], dtype=str))
    return path


def write_image_folder(root: str | Path, images: np.ndarray, labels: np.ndarray | None = None,
                       classes: list[str] | None = None, ext: str = "png") -> Path:
    from PIL import Image

    root = Path(root)
    for i, img in enumerate(images):
        if labels is not None:
            sub = root / (classes[labels[i]] if classes else f"class{labels[i]}")
        else:
            sub = root / f"part{i % 2}" / "nested"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"img{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_decode_cache(tmp_path_factory):
    old = os.environ.get("OODGUARD_CACHE_DIR")
    os.environ["OODGUARD_CACHE_DIR"] = str(tmp_path_factory.mktemp("oodguard-cache"))
    yield
    if old is None:
        os.environ.pop("OODGUARD_CACHE_DIR", None)
    else:
        os.environ["OODGUARD_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _pillow_pixel_limit_restored():
    """An app sets Pillow's process-wide bomb limit (service.preprocess.configure_pillow); a test's app with a
    small `max_pixels` must not make a later test's image decoding fail (found in random order)."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture
def make_npz():
    return write_image_npz


@pytest.fixture
def make_image_folder():
    return write_image_folder


@pytest.fixture
def synthetic_images():
    return synthetic_class_images


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """cifar10_train (400), cifar10_test (200), tinyimagenet_outliers (300), tinyimagenet_test (200)."""
    root = tmp_path_factory.mktemp("tiny-datasets")
    x, y = synthetic_class_images(400, seed=0)
    write_image_npz(root / "cifar10_train.npz", x, y, CLASSES)
    x, y = synthetic_class_images(200, seed=1)
    write_image_npz(root / "cifar10_test.npz", x, y, CLASSES)
    write_image_npz(root / "tinyimagenet_outliers.npz", synthetic_outlier_images(300, seed=2), np.zeros(300, np.int64), ["noise"])
    write_image_npz(root / "tinyimagenet_test.npz", synthetic_outlier_images(200, seed=3))
    return root
