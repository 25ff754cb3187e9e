"""Training and serving turn the same file into the same pixels, for every kind of image mode.

Both go through one RGB rule (`oodguard.service.preprocess.to_rgb`): transparency composited onto
white, 16-bit samples scaled (not clipped), palette and greyscale expanded.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from oodguard.service.manifest import InputSpec
from oodguard.service.preprocess import TRAINING_RESIZE, decode_image
from oodguard.training.data import _decode_bytes


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _cases() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 36), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]))
    palette = Image.fromarray(rgb).quantize(16)
    sixteen = Image.fromarray(rng.integers(0, 65536, (32, 32)).astype(np.uint16))
    return {
        "rgba": _png(rgba),
        "la": _png(la),
        "palette_transparent": _png(palette, transparency=3),
        "gray16": _png(sixteen),
        "rgb": _png(Image.fromarray(rgb)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_training_and_service_decode_the_same_pixels(name):
    data = _cases()[name]
    trained = _decode_bytes(data, 32)
    served = decode_image(data, InputSpec(height=32, width=32, resize=TRAINING_RESIZE))  # a new bundle's spec
    assert trained.shape == served.shape == (32, 32, 3)
    np.testing.assert_array_equal(trained, served)


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    assert (_decode_bytes(_png(img), 32) == 255).all()
