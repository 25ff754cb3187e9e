"""Hypothesis-driven image fuzzing: random bytes, mutated valid images, random sizes and modes.

Properties (bounded examples, derandomized so CI sees the same cases every run):
- `decode_image` on any bytes either returns the model's (H, W, 3) uint8 array or raises
  `OodguardError` with a 4xx status - never another exception;
- `POST /v1/predict` with random or mutated bytes answers 200 or a 4xx JSON error, never a 5xx;
- every valid image Pillow can write (any size, mode and format the service accepts) is classified
  (200, one prediction);
- in a multi-image request, one broken image fails the request with a 4xx naming its index.
Each property checks, once hypothesis is done with it, that it ran at least half of its
`max_examples` (`counted`): a strategy that `assume`s nearly everything away fails instead of
passing on a handful of cases. Every test stands alone (no test reads what another one did).
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from oodguard.service.app import create_app
from oodguard.service.manifest import InputSpec
from oodguard.service.errors import OodguardError
from oodguard.service.preprocess import ImageLimits, configure_pillow, decode_image
from oodguard.service.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

SPEC = InputSpec(height=8, width=8)
LIMITS = ImageLimits()  # the service defaults
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
FUZZ_COUNTS: Counter[str] = Counter()  # cases run per property in this process


def counted(name: str, max_examples: int):
    """Outside `@given`: after the property ran, at least half of `max_examples` cases reached its body."""

    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            before = FUZZ_COUNTS[name]
            test(*args, **kwargs)
            ran = FUZZ_COUNTS[name] - before
            assert ran >= max_examples // 2, f"{name}: only {ran} of {max_examples} cases ran"

        return run

    return wrap

_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    frames = [noise, noise.rotate(90)]
    return [
        _encode(noise, "PNG"),
        _encode(noise, "JPEG", quality=80),
        _encode(noise, "JPEG", progressive=True),
        _encode(noise.convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames]),
        _encode(noise, "WEBP"),
        _encode(noise, "TIFF", compression="tiff_lzw"),
        _encode(noise, "BMP"),
        _encode(noise.convert("RGBA"), "PNG"),
    ]


SEEDS = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid encoded image with a few random byte-level mutations (flip, overwrite, cut, insert, splice)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:  # a cut or delete emptied it: an empty upload is a case of its own
            break
        op = draw(st.sampled_from(("flip", "overwrite", "truncate", "insert", "delete", "splice")))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif op == "truncate":
            del data[max(1, pos) :]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:  # a piece of another image: plausible structure in the wrong place
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other) - 1))
            data[pos:pos] = other[start : start + draw(st.integers(1, 200))]
    return bytes(data)


@st.composite
def valid_images(draw) -> tuple[bytes, str]:
    """Any size, mode and format combination Pillow can write and the service accepts."""
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    mode = draw(st.sampled_from(_MODES))
    fmt = draw(st.sampled_from(_FORMATS))
    seed = draw(st.integers(0, 2**32 - 1))
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    try:
        img = rgb.convert(mode)
        data = _encode(img, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # this mode cannot be written in this format
    return data, f"{fmt}/{mode}/{w}x{h}"


@pytest.fixture(scope="module")
def fuzz_client(tiny_bundle):
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("OODGUARD_")]}
    settings_ = Settings(bundle=tiny_bundle, max_wait_ms=0.0, decode_threads=1, request_timeout_s=10.0)
    try:
        with TestClient(create_app(settings_), raise_server_exceptions=False) as client:
            yield client
    finally:
        os.environ.update(saved)


def _post(client, data: bytes, content_type: str = "application/octet-stream"):
    return client.post("/v1/predict", content=data, headers={"content-type": content_type})


def _assert_2xx_or_4xx_json(resp) -> None:
    assert resp.status_code < 500, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    if resp.status_code == 200:
        assert len(body["predictions"]) == 1
    else:
        assert 400 <= resp.status_code < 500 and body["error"]["code"] and body["error"]["message"]


# -- decode_image directly (fast: many cases) ---------------------------------------------------------


def _decode_property(data: bytes) -> None:
    try:
        out = decode_image(data, SPEC, LIMITS)
    except OodguardError as exc:
        assert 400 <= exc.http_status < 500 and exc.code and exc.message
        return
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


@counted("decode: random bytes", 1000)
@settings(FUZZ, max_examples=1000)
@given(st.binary(max_size=4096))
def test_decode_random_bytes_raises_only_image_errors(data):
    FUZZ_COUNTS["decode: random bytes"] += 1
    configure_pillow(LIMITS)
    _decode_property(data)


@counted("decode: mutated images", 1500)
@settings(FUZZ, max_examples=1500)
@given(mutated_images())
def test_decode_mutated_images_raises_only_image_errors(data):
    FUZZ_COUNTS["decode: mutated images"] += 1
    configure_pillow(LIMITS)
    _decode_property(data)


# -- over HTTP ------------------------------------------------------------------------------------


@counted("http: random bytes", 200)
@settings(FUZZ, max_examples=200)
@given(data=st.binary(max_size=2048), content_type=st.sampled_from(["image/png", "image/jpeg", "application/octet-stream"]))
def test_http_random_bytes_get_2xx_or_4xx_json(fuzz_client, data, content_type):
    FUZZ_COUNTS["http: random bytes"] += 1
    _assert_2xx_or_4xx_json(_post(fuzz_client, data, content_type))


@counted("http: mutated images", 400)
@settings(FUZZ, max_examples=400)
@given(mutated_images())
def test_http_mutated_images_get_2xx_or_4xx_json(fuzz_client, data):
    FUZZ_COUNTS["http: mutated images"] += 1
    _assert_2xx_or_4xx_json(_post(fuzz_client, data))


@counted("http: valid sizes/modes/formats", 300)
@settings(FUZZ, max_examples=300)
@given(valid_images())
def test_http_every_valid_size_mode_and_format_is_classified(fuzz_client, image):
    data, what = image
    FUZZ_COUNTS["http: valid sizes/modes/formats"] += 1
    resp = _post(fuzz_client, data)
    assert resp.status_code == 200, f"{what}: {resp.text[:300]}"
    (pred,) = resp.json()["predictions"]
    assert pred["label"] in ("red", "green", "blue") and 0 < pred["p_value"] <= 1


@counted("http: multi-image with one broken", 100)
@settings(FUZZ, max_examples=100)
@given(
    good=st.lists(st.sampled_from(SEEDS), min_size=1, max_size=5),
    bad=mutated_images(),
    where=st.integers(0, 5),
)
def test_http_one_broken_image_fails_its_request_naming_its_index(fuzz_client, good, bad, where):
    configure_pillow(LIMITS)
    try:
        decode_image(bad, SPEC, LIMITS)
        assume(False)  # the mutation happened to stay decodable: not a broken image
    except OodguardError:
        pass
    FUZZ_COUNTS["http: multi-image with one broken"] += 1
    index = min(where, len(good))
    images = good[:index] + [bad] + good[index:]
    files = [("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
    resp = fuzz_client.post("/v1/predict", files=files)
    assert 400 <= resp.status_code < 500, resp.text[:300]
    assert resp.json()["error"]["message"].startswith(f"image {index}:")


def test_the_server_still_serves_after_broken_uploads(fuzz_client):
    """A burst of broken uploads (every seed format cut short, bit-flipped, or replaced by noise), then a valid one."""
    rng = np.random.default_rng(0)
    broken = [seed[:cut] for seed in SEEDS for cut in (1, 16, len(seed) // 2)]
    for seed in SEEDS:
        flipped = bytearray(seed)
        flipped[len(seed) // 3] ^= 0xFF
        broken.append(bytes(flipped))
    broken += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 64, 4096)]
    for data in broken:
        _assert_2xx_or_4xx_json(_post(fuzz_client, data))
    resp = _post(fuzz_client, SEEDS[0], "image/png")
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json()["predictions"][0]["label"] in ("red", "green", "blue")
