"""OOD evaluation sets: built-in synthetic noise sets (fixed seed) and named / user sets via `data`.

The synthetic sets follow Outlier Exposure's (Hendrycks et al., 2019) definitions, mapped from its
[-1, 1] input space to our [0, 1] pixel space, and are quantised to uint8 like any decoded image:

- `gaussian`: i.i.d. N(0.5, 0.25^2) per pixel, clipped to [0, 1].
- `uniform`:  i.i.d. U[0, 1] per pixel.
- `blobs`:    Bernoulli(0.7) pixels, Gaussian-blurred (sigma 1.5 px, per channel), values below 0.75 set
              to 0: bright smooth blobs on black.

The same name and seed always give the same images (`numpy.random.default_rng(seed)`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

SYNTHETIC_SIZE = 32  # pixels, CIFAR-sized
DEFAULT_SYNTHETIC_COUNT = 10_000
DEFAULT_SEED = 0


def _gaussian(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return np.clip(rng.normal(0.5, 0.25, size=(n, size, size, 3)), 0.0, 1.0)


def _uniform(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=(n, size, size, 3))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """1-D convolution along `axis` with reflect padding (a separable Gaussian blur, no scipy needed)."""
    radius = kernel.size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect")
    length = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(i, i + length), axis=axis)
    return out


def _blobs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    x = rng.binomial(1, 0.7, size=(n, size, size, 3)).astype(np.float64)
    kernel = _gaussian_kernel(1.5)
    x = _blur_axis(_blur_axis(x, kernel, axis=1), kernel, axis=2)
    x[x < 0.75] = 0.0
    return x


SYNTHETIC_SETS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "gaussian": _gaussian,
    "uniform": _uniform,
    "blobs": _blobs,
}


def synthetic_images(
    name: str, n: int = DEFAULT_SYNTHETIC_COUNT, seed: int = DEFAULT_SEED, size: int = SYNTHETIC_SIZE
) -> np.ndarray:
    """uint8 NHWC images of the synthetic set `name`; deterministic in (name, n, seed, size)."""
    if name not in SYNTHETIC_SETS:
        raise ValueError(f"unknown synthetic OOD set {name!r}; built-in sets: {', '.join(SYNTHETIC_SETS)}")
    if n < 1:
        raise ValueError(f"a synthetic set needs at least one image, got n={n}")
    # a per-name stream, so adding a set never changes the images of another
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    rng = np.random.default_rng([seed, name_key])
    pixels = SYNTHETIC_SETS[name](rng, n, size)
    return np.round(pixels * 255.0).astype(np.uint8)


def load_ood_set(spec: str, max_samples: int | None = None, seed: int = DEFAULT_SEED, data_dir: str | None = None):
    """An `ImageSet` for `spec`: a synthetic name, or whatever `data.load_ood_test` accepts
    ("tinyimagenet", an .npz in the shared format, an image folder). Larger sets are subsampled to
    `max_samples` with a seeded permutation (their files may be ordered by class)."""
    from . import data

    if spec in SYNTHETIC_SETS:
        n = max_samples or DEFAULT_SYNTHETIC_COUNT
        images = synthetic_images(spec, n, seed)
        digest = hashlib.sha256(images.tobytes()).hexdigest()
        return data.ImageSet(
            images=images,
            labels=np.full(n, -1, dtype=np.int64),
            classes=[],
            source=f"synthetic:{spec}(seed={seed})",
            sha256=digest,
        )
    image_set = data.load_ood_test(spec, data_dir=data_dir)
    return subsample(image_set, max_samples, seed)


def subset_indices(n: int, max_samples: int | None, seed: int = DEFAULT_SEED) -> np.ndarray:
    """All of range(n), or a sorted seeded random subset of `max_samples` of it."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_samples])


def subsample(image_set, max_samples: int | None, seed: int = DEFAULT_SEED):
    """The same ImageSet restricted to a seeded random subset of `max_samples` images (order kept)."""
    if max_samples is None or max_samples >= len(image_set.images):
        return image_set
    return image_set.subset(subset_indices(len(image_set.images), max_samples, seed))
