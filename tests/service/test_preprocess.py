"""Image decoding: formats, modes, EXIF, resizing, exact [0,1] scaling, and every refusal."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from oodguard.service.errors import OodguardError
from oodguard.service.manifest import InputSpec
from oodguard.service.preprocess import (
    ImageLimits,
    decode_image,
    decode_images,
    preprocess_image,
    to_tensor,
)

from .bundle_factory import encode_image

SPEC = InputSpec(height=8, width=8, resize="bilinear")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _random_rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "WEBP"])
def test_lossless_formats_decode_exactly(fmt):
    data = encode_image((255, 0, 0), size=(8, 8), fmt=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    x = preprocess_image(data, SPEC)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], 1.0)
    np.testing.assert_array_equal(x[1:], 0.0)


def test_matches_the_reference_pipeline_exactly():
    """Same size: asarray(float32)/255 bit for bit; other size: Pillow bilinear resize of the whole image."""
    img = _random_rgb(8, 8)
    x = preprocess_image(_encode(img, "PNG"), SPEC)
    expected = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(x, expected)

    big = _random_rgb(20, 13, seed=1)
    x = preprocess_image(_encode(big, "PNG"), SPEC)
    expected = np.asarray(big.resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(x, expected)


def test_resize_filter_follows_the_spec():
    big = _random_rgb(24, 24, seed=2)
    data = _encode(big, "PNG")
    nearest = preprocess_image(data, InputSpec(height=8, width=8, resize="nearest"))
    bilinear = preprocess_image(data, InputSpec(height=8, width=8, resize="bilinear"))
    expected = np.asarray(big.resize((8, 8), Image.Resampling.NEAREST), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(nearest, expected)
    assert not np.array_equal(nearest, bilinear)


def test_area_resize_averages_where_it_shrinks_and_interpolates_where_it_grows():
    area = InputSpec(height=8, width=8, resize="area")
    big = _random_rgb(24, 20, seed=3)  # both sides shrink: Pillow's box filter, the pixel-area average
    expected = np.asarray(big.resize((8, 8), Image.Resampling.BOX), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(preprocess_image(_encode(big, "PNG"), area), expected)
    small = _random_rgb(5, 4, seed=4)  # both grow: bilinear, not the blocky copy a box filter makes
    expected = np.asarray(small.resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(preprocess_image(_encode(small, "PNG"), area), expected)
    # 2x2 blocks of one colour shrink back to that colour exactly (bilinear at 2x blends neighbours)
    blocks = _random_rgb(4, 4, seed=5).resize((8, 8), Image.Resampling.NEAREST)
    x = preprocess_image(_encode(blocks, "PNG"), InputSpec(height=4, width=4, resize="area"))
    assert np.array_equal(x, np.asarray(_random_rgb(4, 4, seed=5), dtype=np.float32).transpose(2, 0, 1) / 255)
    # one axis shrinks, the other grows: each along its own rule
    wide = _random_rgb(4, 16, seed=6)  # 4 high, 16 wide -> 8 x 8
    by_axis = wide.resize((8, 4), Image.Resampling.BOX).resize((8, 8), Image.Resampling.BILINEAR)
    expected = np.asarray(by_axis, dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(preprocess_image(_encode(wide, "PNG"), area), expected)


def test_jpeg_is_close_to_the_source():
    x = preprocess_image(encode_image((200, 40, 90), fmt="JPEG", quality=95), SPEC)
    np.testing.assert_allclose(x[:, 4, 4], np.array([200, 40, 90]) / 255, atol=4 / 255)


def test_exif_orientation_is_applied():
    # A 4 (wide) x 2 (high) image, left half red, right half blue, tagged "rotate 90 CW to view" (6).
    arr = np.zeros((2, 4, 3), np.uint8)
    arr[:, :2] = (255, 0, 0)
    arr[:, 2:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(img, "PNG", exif=exif.tobytes())
    out = decode_image(data, InputSpec(height=4, width=2, resize="nearest"))  # upright: 2 wide x 4 high
    assert out.shape == (4, 2, 3)
    # Rotated 90 degrees clockwise: the left (red) half ends up on top.
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[-1, 0]) == (0, 0, 255)


def test_palette_with_transparency_composites_onto_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 4, 8))  # left half red, right half index 0 = transparent black
    data = _encode(img, "PNG", transparency=0)
    out = decode_image(data, SPEC)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 7]) == (255, 255, 255)


def test_rgba_and_la_alpha_composited():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))  # fully transparent blue -> white
    assert tuple(decode_image(_encode(rgba, "PNG"), SPEC)[0, 0]) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 255))  # opaque black
    assert tuple(decode_image(_encode(la, "PNG"), SPEC)[0, 0]) == (0, 0, 0)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257: mid-grey in 16 bits
    data = _encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, SPEC)
    assert np.all(out == 128)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_pixels_convert_block_by_block_exactly_as_whole(monkeypatch, mode):
    # issue 18 #13: the whole-image float64 arithmetic cost +450 MB for a 4096^2 16-bit PNG; the
    # block-wise conversion must give the very same bytes.
    from oodguard.service import preprocess

    rng = np.random.default_rng(0)
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    arr = (rng.uniform(-10, 70000, size=(37, 23)) if mode != "I;16" else rng.integers(0, 65536, size=(37, 23))).astype(dtype)
    if mode == "F":
        arr[3, 4], arr[5, 6] = np.nan, np.inf

    def whole(a, m):  # the previous implementation, verbatim
        a = a.astype(np.float64)
        if m == "F":
            peak = 1.0 if a.size == 0 or np.nanmax(a) <= 1.0 else 65535.0 if np.nanmax(a) > 255.0 else 255.0
        else:
            peak = 255.0 if a.size == 0 or a.max() <= 255 else 65535.0
        return np.clip(np.rint(np.nan_to_num(a) * (255.0 / peak)), 0, 255).astype(np.uint8)

    monkeypatch.setattr(preprocess, "CHUNK_PIXELS", 50)  # blocks of 2 rows: many blocks, a short last one
    np.testing.assert_array_equal(preprocess.to_uint8(arr, mode), whole(arr, mode))
    np.testing.assert_array_equal(preprocess.to_uint8(arr[:, :0], mode), whole(arr[:, :0], mode))


def test_cmyk_jpeg_and_grayscale_become_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(_encode(cmyk, "JPEG", quality=95), SPEC)
    assert out.shape == (8, 8, 3)
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 60 and out[4, 4, 2] < 60
    grey = decode_image(_encode(Image.new("L", (8, 8), 77), "PNG"), SPEC)
    assert np.all(grey == 77)


def test_each_decoded_image_is_released_before_the_next_is_decoded(monkeypatch):
    # Pillow's `with img:` closes only the file: the decoded pixels of every image of a request stayed
    # allocated until the request ended (64 x 4096^2 16-bit PNGs: +2.1 GB). Each must be closed - its
    # pixels released - before the next one is decoded.
    from oodguard.service import preprocess

    opened = preprocess.open_images([_encode(Image.new("RGB", (64, 64), c), "PNG") for c in ("red", "green", "blue")])
    alive_at_each_load = []
    real_load = preprocess.load_image

    def counting(img, spec):
        alive_at_each_load.append(sum(_decoded(other) for other in opened if other is not img))
        return real_load(img, spec)

    monkeypatch.setattr(preprocess, "load_image", counting)
    out = preprocess.load_images(opened, SPEC)
    assert out.shape == (3, 3, 8, 8) and alive_at_each_load == [0, 0, 0]
    assert not any(_decoded(img) for img in opened)


def _decoded(img: Image.Image) -> bool:
    """Whether an image still holds decoded pixels (after close(), any pixel access raises)."""
    try:
        return img.im is not None
    except (ValueError, AssertionError):  # closed (DeferredError), or not decoded yet (no core)
        return False


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 255, 0), (255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = decode_image(buf.getvalue(), SPEC)
    assert tuple(out[0, 0]) == (0, 255, 0)


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to declare another size (a decompression bomb's header)."""
    data = bytearray(encode_image((0, 0, 0), size=(1, 1), fmt="PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bomb_is_refused_from_the_header_before_decoding():
    data = _png_declaring(60000, 60000)  # 3.6e9 pixels declared in a ~70-byte file
    t0 = time.perf_counter()
    with pytest.raises(OodguardError) as err:
        decode_image(data, SPEC, ImageLimits(max_pixels=16_777_216, max_image_side=100_000))
    assert time.perf_counter() - t0 < 10.0  # decoding 3.6e9 pixels would take minutes (and ~11 GB)
    assert err.value.code == "too_many_pixels" and err.value.http_status == 413
    assert "pixels" in err.value.message


def test_side_and_pixel_limits():
    data = encode_image((1, 2, 3), size=(64, 2), fmt="PNG")
    with pytest.raises(OodguardError) as err:
        decode_image(data, SPEC, ImageLimits(max_pixels=10_000, max_image_side=32))
    assert err.value.code == "image_too_large" and err.value.http_status == 413
    with pytest.raises(OodguardError) as err:
        decode_image(data, SPEC, ImageLimits(max_pixels=100, max_image_side=1000))
    assert err.value.code == "too_many_pixels"
    assert decode_image(data, SPEC, ImageLimits(max_pixels=128, max_image_side=64)).shape == (8, 8, 3)


@pytest.mark.parametrize(
    "data, code, status",
    [
        (b"", "invalid_image", 422),
        (b"this is not an image at all", "unsupported_image_format", 415),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "unsupported_image_format", 415),
        (b"<html><body>hi</body></html>", "unsupported_image_format", 415),
        (encode_image((0, 0, 0), fmt="ICO"), "unsupported_image_format", 415),
        (encode_image((9, 9, 9), size=(32, 32), fmt="PNG")[:60], "invalid_image", 422),
        (encode_image((9, 9, 9), size=(32, 32), fmt="JPEG")[:200], "invalid_image", 422),
    ],
    ids=["empty", "text", "svg", "html", "ico", "truncated-png", "truncated-jpeg"],
)
def test_bad_inputs_raise_typed_errors(data, code, status):
    with pytest.raises(OodguardError) as err:
        decode_image(data, SPEC)
    assert (err.value.code, err.value.http_status) == (code, status)
    assert err.value.message


def test_decode_images_names_the_bad_index_and_stacks_nchw():
    good = encode_image((0, 255, 0), fmt="PNG")
    x = decode_images([good, encode_image((0, 0, 255), fmt="PNG")], SPEC)
    assert x.shape == (2, 3, 8, 8) and x.flags.c_contiguous
    assert x[0, 1].min() == 1.0 and x[1, 2].min() == 1.0
    with pytest.raises(OodguardError) as err:
        decode_images([good, good, b"garbage"], SPEC)
    assert err.value.details["index"] == 2 and err.value.message.startswith("image 2:")


def test_to_tensor_is_exact_division_by_255():
    arrays = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(3)]
    x = to_tensor(arrays)
    expected = np.stack([np.asarray(a, dtype=np.float32) / 255 for a in arrays]).transpose(0, 3, 1, 2)
    assert np.array_equal(x, expected)
    assert x.min() >= 0.0 and x.max() <= 1.0
