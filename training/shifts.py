"""Upload forms: the same images as a user might send them, through the service's own decode path.

A shift is not an attack: the picture is the same, its form differs (PNG instead of the stored JPEG,
another JPEG quality, an upscaled or non-square copy). Each form is rendered to the bytes a client would
upload, then decoded and resized exactly as `oodguard serve` does (`service.preprocess.decode_image` with
the bundle's input spec: Pillow, RGB, the spec's resize of the whole image; new bundles: "area"), so a realised TPR or FPR
measured on a form here is the rate the service gives for that form.

    images_q50 = render_form(images, "jpeg_q50")     # uint8 (N, 32, 32, 3), as the service would see them

Form groups (service/upload_form.py) are what a form-conditional bundle calibrates: `render_group` uploads
each image in a random form of the group, `group_of_form` says which group the service puts a form in.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from oodguard.service.manifest import InputSpec
from oodguard.service.preprocess import TRAINING_RESIZE, decode_image
from oodguard.service.upload_form import (
    DEFAULT_GROUPS,
    LARGER,
    NATIVE,
    SMALLER,
    FormGroups,
    UploadForm,
    band_name,
    read_upload_form,
)


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
    spec = spec or InputSpec(height=images.shape[1], width=images.shape[2], resize=TRAINING_RESIZE)
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


# -- form groups: the calibration of form-conditional bundles (service/upload_form.py) ----------------------

# How the calibration split is uploaded for each group's calibration: random forms spanning the group, one
# per image (seeded), so a group's thresholds hold for every form the service puts in it.
_LARGER_RANGE = (1.0, 4.0)  # resize factor per side of a `larger` upload (not both 1)
_SMALLER_RANGE = (0.4, 1.0)  # ... of the side(s) a `smaller` upload shrinks
_CODEC = "then PNG or JPEG of quality uniform in 50-95 (half each), decoded and resized back as the service does"
# The shared sets' own files are 32x32 JPEGs of quality 75 (../shared/datasets/README.md): uploaded as they
# are, the service puts them in the group of that quality.
STORED_QUALITY = 75


def group_rendering(group: str, groups: FormGroups = DEFAULT_GROUPS) -> str:
    """How `render_group` uploads the calibration split for `group` (the manifest's `rendering`)."""
    if group == SMALLER:
        return (f"shrunk (bicubic) by a factor uniform in {_SMALLER_RANGE[0]}-{_SMALLER_RANGE[1]}: half both sides "
                "by one factor, half one side only (the other kept, or enlarged by a factor in 1-2), " + _CODEC)
    if group == LARGER:
        return (f"enlarged (bicubic) by a factor uniform in 1.25-{_LARGER_RANGE[1]}: half both sides by one factor, "
                f"half each side by its own factor in {_LARGER_RANGE[0]}-{_LARGER_RANGE[1]}, " + _CODEC)
    uncovered = _uncovered_qualities(groups)
    if group == NATIVE:  # lossless uploads carry the stored pixels
        if not uncovered:
            return "the stored pixels, as a lossless upload (PNG) carries them"
        return (f"half the stored pixels, half re-encoded as JPEG of a quality drawn uniformly from the {len(uncovered)} "
                f"qualities in no band ({uncovered[0]}-{uncovered[-1]})")
    lo, hi = _band(group, groups)
    if lo <= STORED_QUALITY <= hi:
        return f"half as stored (32x32 JPEG quality {STORED_QUALITY}), half re-encoded as JPEG of quality uniform in {lo}-{hi}"
    return f"JPEG of quality {lo}" if lo == hi else f"JPEG of quality uniform in {lo}-{hi}"


def render_group(images: np.ndarray, group: str, seed: int = 0, spec: InputSpec | None = None,
                 groups: FormGroups = DEFAULT_GROUPS) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same images each uploaded in a random form of `group` of `groups`
    (`group_rendering`) and decoded as the service does. Seeded: the same call gives the same images."""
    if group not in groups.names:
        raise ValueError(f"unknown form group {group!r}; valid: {', '.join(groups.names)}")
    spec = spec or InputSpec(height=images.shape[1], width=images.shape[2], resize=TRAINING_RESIZE)
    rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
    uncovered = _uncovered_qualities(groups)
    band = None if group in (NATIVE, SMALLER, LARGER) else _band(group, groups)
    out = images.copy()
    for i, pixels in enumerate(images):
        img = Image.fromarray(pixels)
        if group in (SMALLER, LARGER):
            size = _resized_size(img.size, group, rng)
            resized = img.resize(size, Image.Resampling.BICUBIC)
            blob = _png(resized) if rng.random() < 0.5 else _jpeg(int(rng.integers(50, 96)))(resized)
        elif group == NATIVE:
            if not uncovered or rng.random() < 0.5:
                continue  # the stored pixels, as a lossless upload carries them
            blob = _jpeg(int(rng.choice(uncovered)))(img)
        else:
            if band[0] <= STORED_QUALITY <= band[1] and rng.random() < 0.5:
                continue  # as stored: the stored JPEG itself
            blob = _jpeg(int(rng.integers(band[0], band[1] + 1)))(img)
        out[i] = decode_image(blob, spec)
    return out


def _band(group: str, groups: FormGroups) -> tuple[int, int]:
    return {band_name(*band): band for band in groups.bands}[group]


def _uncovered_qualities(groups: FormGroups) -> list[int]:
    return [q for q in range(1, 101) if groups.band_of(q) is None]


def _resized_size(size: tuple[int, int], group: str, rng: np.random.Generator) -> tuple[int, int]:
    """A random upload size of `group` (`group_rendering`) for an image of `size`; its group is always `group`."""
    w, h = size
    if group == SMALLER:
        if rng.random() < 0.5:
            f = rng.uniform(*_SMALLER_RANGE)
            fw, fh = f, f
        else:
            fw, fh = rng.uniform(*_SMALLER_RANGE), (1.0 if rng.random() < 0.5 else rng.uniform(1.0, 2.0))
            if rng.random() < 0.5:
                fw, fh = fh, fw
        out = (max(1, round(w * fw)), max(1, round(h * fh)))
        return out if out[0] < w or out[1] < h else (w - 1, out[1])
    if rng.random() < 0.5:
        f = rng.uniform(1.25, _LARGER_RANGE[1])
        fw, fh = f, f
    else:
        fw, fh = rng.uniform(*_LARGER_RANGE), rng.uniform(*_LARGER_RANGE)
    out = (max(w, round(w * fw)), max(h, round(h * fh)))
    return out if out != (w, h) else (w + 1, h)


def group_of_form(form: str, spec: InputSpec | None = None, groups: FormGroups = DEFAULT_GROUPS) -> str:
    """The form group of `groups` the service puts an upload in `form` (shifts.FORMS) in, from the bytes it would send."""
    check_forms([form])
    if form == "stored":
        return groups.group_of(UploadForm(NATIVE, STORED_QUALITY))
    spec = spec or InputSpec()
    sample = np.zeros((spec.height, spec.width, 3), dtype=np.uint8)
    return groups.group_of(read_upload_form(Image.open(io.BytesIO(encode_form(sample, form))), spec))
