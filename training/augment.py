"""Upload-form augmentation: the forms an image can reach the service in, simulated on training images.

Why: every image in the shared files is a 32x32 JPEG of quality 75 (4:2:0). A model trained only on that
form can learn the form itself — the old outlier files were quality 90, and the shipped model learnt to
call quality-75 artefacts "in-distribution". Users upload PNGs, phone JPEGs of every quality, and images
of any size that the service resizes to 32x32. So each training image (inliers and outliers alike, with
the same distribution, before the attack) is, with probability `p_apply`, re-rendered as a random upload
(the rest pass as stored: the native form is also an upload, and the commonest):

0. with probability `p_blur`, softened by a Gaussian blur of radius drawn from `blur_radius` (off by default) —
   a soft photo, or a tool's smoothing; on both sides alike it keeps sharpness from telling the sets apart;
1. with probability `p_rescale`, resized to a random upload size (each side 24..128 px, independently,
   so non-square too) with a random Pillow filter — what a user's tool did to it;
2. stored as that upload: lossless (PNG-like: pixels unchanged) with probability `p_lossless`, else JPEG
   with a quality drawn uniformly from `quality` and 4:2:0 or 4:4:4 chroma subsampling;
3. decoded and resized back to 32x32 exactly as the service does (`pil_to_array`: the "area" filter of new bundles).

The draws come from the caller's torch.Generator, so a resumed run re-draws the same forms. Cost: about
0.1 ms per image on one core (`bench/train.py` measures it in images/s), a few percent of a plain step on
the CPU. On a GPU it bounds the step, so `apply(..., pool=...)` renders slices of the batch in worker
processes (threads do not help: for 32x32 images the time is Python's, under the GIL). Every random
number is drawn before the split, so the output is the same with or without a pool.
"""

from __future__ import annotations

import io
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from .data import pil_to_array

_UPSCALE_FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                    Image.Resampling.LANCZOS, Image.Resampling.BOX)


@dataclass(frozen=True)
class UploadAugment:
    p_apply: float = 1.0  # probability an image is re-rendered at all; the others pass unchanged
    p_rescale: float = 0.5  # probability of a resize round trip through a random upload size
    min_side: int = 24  # upload side lengths drawn from [min_side, max_side] pixels, each side on its own
    max_side: int = 128
    p_lossless: float = 0.3  # probability the upload is lossless (PNG); else JPEG
    quality: tuple[int, int] = (20, 95)  # JPEG quality range (inclusive)
    p_blur: float = 0.0  # probability of a Gaussian blur first (radius uniform in blur_radius, pixels)
    blur_radius: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        if not all(0 <= p <= 1 for p in (self.p_apply, self.p_rescale, self.p_lossless, self.p_blur)):
            raise ValueError("p_apply, p_rescale, p_lossless and p_blur must be probabilities")
        if not 0 < self.blur_radius[0] <= self.blur_radius[1]:
            raise ValueError("blur radius range must be positive, low <= high")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("need 1 <= min_side <= max_side")
        if not 1 <= self.quality[0] <= self.quality[1] <= 100:
            raise ValueError("JPEG quality range must lie in 1..100, low <= high")

    def apply(self, images: np.ndarray, generator: torch.Generator, pool: Executor | None = None,
              workers: int = 1) -> np.ndarray:
        """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3): each image re-rendered as a random upload; with a process
        `pool` of `workers`, in that many slices at once."""
        # every random number up front, from the torch generator (resumable), one row per image; the blur's two
        # columns only when it is on, so runs without it draw exactly what they drew before it existed
        u = torch.rand(len(images), 9 if self.p_blur > 0 else 7, generator=generator).numpy()
        if pool is None or workers <= 1 or len(images) < 2 * workers:
            return self.render(images, u)
        slices = np.array_split(np.arange(len(images)), workers)
        return np.concatenate(list(pool.map(self.render, [images[s] for s in slices], [u[s] for s in slices])))

    def render(self, images: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The uploads for the random rows `u` (N, 7, or 9 with blur) in [0, 1), one per image: deterministic given u."""
        n, h, w, _ = images.shape
        out = np.empty_like(images)
        for i in range(n):
            out[i] = self._one(images[i], u[i], (w, h))
        return out

    def _one(self, pixels: np.ndarray, u: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if u[6] >= self.p_apply:
            return pixels
        img = Image.fromarray(pixels)
        if self.p_blur > 0 and u[7] < self.p_blur:
            lo, hi = self.blur_radius
            img = img.filter(ImageFilter.GaussianBlur(radius=float(lo + u[8] * (hi - lo))))
        if u[0] < self.p_rescale:
            span = self.max_side - self.min_side + 1
            upload = (self.min_side + int(u[1] * span), self.min_side + int(u[2] * span))
            img = img.resize(upload, resample=_UPSCALE_FILTERS[int(u[3] * len(_UPSCALE_FILTERS))])
        if u[4] >= self.p_lossless:
            lo, hi = self.quality
            quality = lo + int(u[5] * (hi - lo + 1))
            subsampling = 2 if (u[4] - self.p_lossless) / max(1e-9, 1 - self.p_lossless) < 0.7 else 0  # 4:2:0 | 4:4:4
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
            img = Image.open(io.BytesIO(buf.getvalue()))
        if img.size == size:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        return pil_to_array(img, size[0])  # the service's resize ("area"), only square sizes here
