"""Upload forms: the same images as a user might send them, through the service's own decode path.

A shift is not an attack: the picture is the same, its form differs (PNG instead of the stored JPEG,
another JPEG quality, an upscaled or non-square copy). Each form is rendered to the bytes a client would
upload, then decoded and resized exactly as `oodguard serve` does (`service.preprocess.decode_image` with
the bundle's input spec: Pillow, RGB, bilinear resize of the whole image), so a realised TPR or FPR
measured on a form here is the rate the service gives for that form.

    images_q50 = render_form(images, "jpeg_q50")     # uint8 (N, 32, 32, 3), as the service would see them
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from oodguard.service.manifest import InputSpec
from oodguard.service.preprocess import decode_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(quality: int) -> Callable[[Image.Image], bytes]:
    def encode(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)  # Pillow's default chroma subsampling, 4:2:0
        return buf.getvalue()
    return encode


def _resized(scale_w: float, scale_h: float) -> Callable[[Image.Image], bytes]:
    """Upscaled with bicubic (what image editors use), stored losslessly so only the size differs."""
    def encode(img: Image.Image) -> bytes:
        w, h = img.size
        return _png(img.resize((round(w * scale_w), round(h * scale_h)), Image.Resampling.BICUBIC))
    return encode


def _stored(img: Image.Image) -> bytes:  # the dataset's own form: rendering keeps the decoded pixels
    return _png(img)


# name -> encoder of a PIL image into the bytes a client uploads. "stored" = the dataset's own JPEG, as decoded.
FORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "stored": _stored,
    "png": _png,
    "jpeg_q30": _jpeg(30),
    "jpeg_q50": _jpeg(50),
    "jpeg_q95": _jpeg(95),
    "upscale_x2": _resized(2, 2),
    "upscale_x3": _resized(3, 3),
    "upscale_x4": _resized(4, 4),
    "non_square": _resized(3, 2),  # 96 x 64 for a 32 x 32 image: aspect ratio 3:2
}


def check_forms(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in FORMS]
    if unknown:
        raise ValueError(f"unknown upload form(s) {unknown}; valid: {', '.join(FORMS)}")
    return list(dict.fromkeys(names))


def encode_form(pixels: np.ndarray, form: str) -> bytes:
    """One uint8 (H, W, 3) image -> the bytes of its upload in `form` (not for "stored")."""
    return FORMS[form](Image.fromarray(pixels))


def render_form(images: np.ndarray, form: str, spec: InputSpec | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, h, w, 3): each image uploaded in `form`, decoded as the service does."""
    check_forms([form])
    spec = spec or InputSpec(height=images.shape[1], width=images.shape[2])
    if form == "stored":
        return images.copy()
    out = np.empty((len(images), spec.height, spec.width, 3), dtype=np.uint8)
    for i, pixels in enumerate(images):
        out[i] = decode_image(encode_form(pixels, form), spec)
    return out


def render_mixed(images: np.ndarray, forms: list[str], seed: int = 0, spec: InputSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each image in one of `forms`, assigned in equal shares by a seeded permutation; returns (images, form index)."""
    check_forms(forms)
    order = np.random.default_rng(seed).permutation(len(images))
    assignment = np.empty(len(images), dtype=np.int64)
    assignment[order] = np.arange(len(images)) % len(forms)
    out = images.copy()
    for k, form in enumerate(forms):
        idx = np.flatnonzero(assignment == k)
        if idx.size and form != "stored":
            out[idx] = render_form(images[idx], form, spec)
    return out, assignment
