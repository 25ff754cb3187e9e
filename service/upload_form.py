"""Which upload form an image arrived in, read from its header: the groups of the form-conditional calibration.

The same picture scores differently by the form it is uploaded in (measured on the calibration split of
the shipped model at one threshold: 93% of stored JPEGs accepted, 89% of JPEG quality 50, 97% of every
upscaled copy), so one threshold cannot keep the promised acceptance rate for every form. A bundle can
therefore carry one calibration per *form group* (Mondrian, i.e. group-conditional, split conformal:
`CalibrationInfo.forms`), and the service thresholds each image against its own group's scores. What an
upload declares is read from its header before any pixel is decoded (`read_upload_form`), then mapped to
the groups of the bundle that answers (`FormGroups.group_of`):

- `smaller`: a side shorter than the model's input (a thumbnail: the service upscales it; any format);
- `larger`: no side shorter, the size differs (what most uploads are: the service downscales it);
- `jpeg_qA_B`: a JPEG at the model's size whose estimated quality (its luminance quantisation table
  matched against the IJG tables for qualities 1-100, the ones libjpeg, Pillow and most encoders
  write) lies in the band A-B;
- `native`: everything else at the model's size: lossless formats (PNG, BMP, TIFF, GIF), JPEG of a
  quality in no band, WebP (its quality is not in the header), and tensors sent already decoded (the
  Open Inference Protocol).

The rules are versioned (`calibration.form_rule`):
- `size-and-jpeg-quality-v1`: the bands 1-15, 16-45 and 46-65; a JPEG above 65 is `native`. Bundles
  calibrated under it are still served exactly as before.
- `size-and-jpeg-quality-v2` (what `oodguard calibrate` writes): the bands are the bundle's own, named by
  its groups, and cover every quality 1-100, so `native` is lossless and unknown only. v1's bands mixed
  qualities the score treats differently: on validation data the 46-65 band's threshold accepted 98.6-98.9%
  of in-distribution images at quality 46-48 and 92.8% at 50 (re-encoding the quality-75 files at quality 49
  or lower removes their smallest DCT coefficients; at 50 or above it keeps them), and let 34-40% of held-out
  outliers through at 46-48 (docs/bench/jpeg_bands.json). `DEFAULT_JPEG_BANDS` were chosen on validation data so that every quality keeps its
  group's acceptance within 1.5 points of the target (scripts/choose_jpeg_bands.py, docs/results.md).

The size split was chosen on the calibration split too: with one threshold for every resized upload,
thumbnails (16x16) were accepted 3-4 points less often than enlarged copies (their own group brings them
to 94%). Uploads resized along one axis only stay below (~91%, docs/results.md). A bundle under a rule
this code does not know is refused, because its groups would not mean what this code reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # manifest.py imports this module's constants: no Pillow (or manifest) at import time
    from PIL import Image

    from .manifest import InputSpec

FORM_RULE_V1 = "size-and-jpeg-quality-v1"
FORM_RULE = "size-and-jpeg-quality-v2"  # what calibrate writes
FORM_RULES = (FORM_RULE_V1, FORM_RULE)
NATIVE = "native"
SMALLER = "smaller"
LARGER = "larger"
# (lowest, highest) estimated JPEG quality of each band
V1_JPEG_BANDS: tuple[tuple[int, int], ...] = ((1, 15), (16, 45), (46, 65))
# v2's default: chosen on the shipped model's validation data (scripts/choose_jpeg_bands.py; docs/results.md)
DEFAULT_JPEG_BANDS: tuple[tuple[int, int], ...] = (
    (1, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 9), (10, 12), (13, 23), (24, 33), (34, 48), (49, 49), (50, 60),
    (61, 67), (68, 74), (75, 83), (84, 91), (92, 100))
_BAND_NAME = re.compile(r"jpeg_q([0-9]{1,3})_([0-9]{1,3})")


class UploadForm(NamedTuple):
    """What an upload declares in its header, whatever the bundle: its size against the model's input and,
    for a JPEG at the model's size, its estimated quality."""

    size: str  # NATIVE (the model's own size), SMALLER or LARGER
    jpeg_quality: int | None = None


@dataclass(frozen=True)
class FormGroups:
    """A bundle's upload-form groups: `native`, `smaller`, `larger` and one group per JPEG quality band."""

    bands: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        previous = 0
        for lo, hi in sorted(self.bands):
            if not 1 <= lo <= hi <= 100:
                raise ValueError(f"JPEG quality band {lo}-{hi} must lie in 1-100, lowest first")
            if lo <= previous:
                raise ValueError(f"JPEG quality bands overlap at quality {lo}")
            previous = hi
        object.__setattr__(self, "bands", tuple(sorted(self.bands)))

    @classmethod
    def from_names(cls, names) -> FormGroups:
        """The groups a manifest names: exactly native, smaller, larger and `jpeg_qA_B` bands (ValueError else)."""
        names = set(names)
        missing = {NATIVE, SMALLER, LARGER} - names
        if missing:
            raise ValueError(f"form groups must include {sorted(missing)}")
        bands = []
        for name in sorted(names - {NATIVE, SMALLER, LARGER}):
            match = _BAND_NAME.fullmatch(name)
            if match is None or name != band_name(int(match[1]), int(match[2])):  # one spelling: the one served
                raise ValueError(f"form group {name!r} is none of native, smaller, larger, jpeg_q<lowest>_<highest>")
            bands.append((int(match[1]), int(match[2])))
        return cls(tuple(bands))

    @property
    def names(self) -> tuple[str, ...]:
        return (NATIVE, *(band_name(lo, hi) for lo, hi in self.bands), SMALLER, LARGER)

    def covers_every_quality(self) -> bool:
        return sum(hi - lo + 1 for lo, hi in self.bands) == 100

    def band_of(self, quality: int) -> tuple[int, int] | None:
        return next(((lo, hi) for lo, hi in self.bands if lo <= quality <= hi), None)

    def group_of(self, form: UploadForm) -> str:
        if form.size != NATIVE:
            return form.size
        band = None if form.jpeg_quality is None else self.band_of(form.jpeg_quality)
        return NATIVE if band is None else band_name(*band)

    def groups_of(self, forms: Sequence[UploadForm]) -> list[str]:
        return [self.group_of(form) for form in forms]


def band_name(lo: int, hi: int) -> str:
    return f"jpeg_q{lo}_{hi}"


V1_GROUPS = FormGroups(V1_JPEG_BANDS)
DEFAULT_GROUPS = FormGroups(DEFAULT_JPEG_BANDS)


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


def read_upload_form(img: Image.Image, spec: InputSpec) -> UploadForm:
    """The form of an opened (header-only) image for a model with input `spec`."""
    width, height = img.size
    if width < spec.width or height < spec.height:
        return UploadForm(SMALLER)
    if (width, height) != (spec.width, spec.height):
        return UploadForm(LARGER)
    return UploadForm(NATIVE, jpeg_quality(img) if img.format == "JPEG" else None)


def read_upload_forms(images: Sequence[Image.Image], spec: InputSpec) -> list[UploadForm]:
    return [read_upload_form(img, spec) for img in images]
