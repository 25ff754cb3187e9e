"""Which upload form an image arrived in, read from its header: the groups of the form-conditional calibration.

The same picture scores differently by the form it is uploaded in (measured on the calibration split of
the shipped model at one threshold: 93% of stored JPEGs accepted, 89% of JPEG quality 50, 97% of every
upscaled copy), so one threshold cannot keep the promised acceptance rate for every form. A bundle can
therefore carry one calibration per *form group* (Mondrian, i.e. group-conditional, split conformal:
`CalibrationInfo.forms`), and the service thresholds each image against its own group's scores. The
group is read from what the upload itself declares, before any pixel is decoded:

- `smaller`: a side shorter than the model's input (a thumbnail: the service upscales it; any format);
- `larger`: no side shorter, the size differs (what most uploads are: the service downscales it);
- `jpeg_qA_B`: a JPEG at the model's size whose estimated quality (its luminance quantisation table
  matched against the IJG tables for qualities 1-100, the ones libjpeg, Pillow and most encoders
  write) lies in one of `JPEG_QUALITY_BANDS`;
- `native`: everything else at the model's size: lossless formats (PNG, BMP, TIFF, GIF), JPEG above
  the bands, WebP (its quality is not in the header), and tensors sent already decoded (the Open
  Inference Protocol).

The bands and the size split were chosen on the calibration split (validation data): the served score's
acceptance at one threshold falls from 93% at quality 75 to 89% at 50, rises to 95% between 20 and 40, and
falls to 86% at 10; with one threshold for every resized upload, thumbnails (16x16) were accepted 3-4
points less often than enlarged copies (their own group brings them to 94%). Uploads resized along one
axis only stay below (~91%, docs/results.md). The rule is versioned (`FORM_RULE`): a bundle calibrated
with another rule is refused, because its groups would not mean what this code reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # manifest.py imports this module's constants: no Pillow (or manifest) at import time
    from PIL import Image

    from .manifest import InputSpec

FORM_RULE = "size-and-jpeg-quality-v1"
NATIVE = "native"
SMALLER = "smaller"
LARGER = "larger"
# (lowest, highest) estimated JPEG quality of each band; qualities above the last band count as native
JPEG_QUALITY_BANDS: tuple[tuple[int, int], ...] = ((1, 15), (16, 45), (46, 65))
JPEG_BAND_GROUPS: dict[str, tuple[int, int]] = {f"jpeg_q{lo}_{hi}": (lo, hi) for lo, hi in JPEG_QUALITY_BANDS}
FORM_GROUPS: tuple[str, ...] = (NATIVE, *JPEG_BAND_GROUPS, SMALLER, LARGER)

# The IJG standard luminance table (ITU-T T.81, Annex K), row-major: what Pillow reports in `quantization`.
_IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)


def _ijg_tables() -> np.ndarray:
    """(100, 64): libjpeg's luminance table for qualities 1..100 (jpeg_quality_scaling, baseline clamp 1..255)."""
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    return np.clip((_IJG_LUMINANCE[None, :] * scale[:, None] + 50) // 100, 1, 255)


_LOG_TABLES = np.log(_ijg_tables())


def jpeg_quality(img: Image.Image) -> int | None:
    """The IJG quality (1-100) whose luminance table is closest to the JPEG's own; None if it has none."""
    tables = getattr(img, "quantization", None)
    if not tables:
        return None
    first = tuple(int(v) for v in tables[min(tables)])
    return _closest_quality(first) if len(first) == 64 else None


@lru_cache(maxsize=256)
def _closest_quality(table: tuple[int, ...]) -> int:
    # closest in log ratio: a table off by a factor matters the same at every quality. Cached: uploads share a
    # handful of tables (one per encoder and quality), and the comparison costs ~20 us, a third of a decode.
    distance = np.abs(_LOG_TABLES - np.log(np.maximum(np.asarray(table, dtype=np.float64), 1.0))[None, :]).sum(axis=1)
    return int(np.argmin(distance)) + 1


def form_group(img: Image.Image, spec: InputSpec) -> str:
    """The form group of an opened (header-only) image for a model with input `spec`."""
    width, height = img.size
    if width < spec.width or height < spec.height:
        return SMALLER
    if (width, height) != (spec.width, spec.height):
        return LARGER
    if img.format == "JPEG":
        return jpeg_quality_group(jpeg_quality(img))
    return NATIVE


def jpeg_quality_group(quality: int | None) -> str:
    """The group of a JPEG of `quality` at the model's size (None: quality unknown, counted as native)."""
    if quality is not None:
        for group, (lo, hi) in JPEG_BAND_GROUPS.items():
            if lo <= quality <= hi:
                return group
    return NATIVE


def form_groups(images: Sequence[Image.Image], spec: InputSpec) -> list[str]:
    return [form_group(img, spec) for img in images]
