"""Heavy decodes in worker processes (service/heavy_decode.py): the same tensor and the same refusals
as decoding in the server, a dead worker fails only its request, and the server routes by declared pixels."""

from __future__ import annotations

import asyncio
import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

from oodguard.service.errors import OodguardError
from oodguard.service.heavy_decode import WORKER_NICENESS, HeavyDecoder
from oodguard.service.manifest import InputSpec
from oodguard.service.preprocess import ImageLimits, decode_images

SPEC = InputSpec(height=8, width=8)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 65536, (64, 96), dtype=np.uint16))  # 16-bit: scaled, not clipped
    return [_encoded(rgb, "PNG"), _encoded(rgb, "JPEG"), _encoded(wide, "PNG")]


@pytest.fixture
def decoder():
    d = HeavyDecoder(1, ImageLimits())
    yield d
    d.close()


def test_a_worker_decodes_exactly_what_the_server_would(decoder):
    blobs = _images()
    got = asyncio.run(decoder.decode(blobs, SPEC))
    assert got.dtype == np.float32 and got.shape == (3, 3, 8, 8)
    assert np.array_equal(got, decode_images(blobs, SPEC))
    (pid,) = decoder.worker_pids()
    assert pid != os.getpid()
    niceness = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])
    assert niceness == min(19, os.nice(0) + WORKER_NICENESS)  # below the server: small requests first


@pytest.mark.parametrize("bad", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_a_workers_refusal_is_the_in_process_refusal(decoder, bad):
    blobs = [_images()[0], bad]
    with pytest.raises(OodguardError) as in_worker:
        asyncio.run(decoder.decode(blobs, SPEC))
    with pytest.raises(OodguardError) as in_process:
        decode_images(blobs, SPEC)
    got, want = in_worker.value, in_process.value
    assert (got.kind, got.code, got.message, got.details) == (want.kind, want.code, want.message, want.details)
    assert got.details == {"index": 1}


def test_the_workers_apply_the_servers_pixel_limits():
    decoder = HeavyDecoder(1, ImageLimits(max_pixels=1000, max_image_side=8192, max_request_pixels=4000))
    try:
        with pytest.raises(OodguardError) as exc:
            asyncio.run(decoder.decode(_images()[:1], SPEC))  # 60,000 pixels
        assert exc.value.code == "too_many_pixels"
    finally:
        decoder.close()


def test_a_killed_worker_fails_its_request_and_the_next_one_gets_a_fresh_worker(decoder):
    blobs = _images()[:1]
    want = decode_images(blobs, SPEC)
    assert np.array_equal(asyncio.run(decoder.decode(blobs, SPEC)), want)
    (pid,) = decoder.worker_pids()
    os.kill(pid, signal.SIGKILL)  # what a segfaulting decoder or the OOM killer does
    with pytest.raises(OodguardError) as exc:
        asyncio.run(decoder.decode(blobs, SPEC))
    assert exc.value.kind == "invalid_input" and exc.value.code == "decoder_crashed"
    assert np.array_equal(asyncio.run(decoder.decode(blobs, SPEC)), want)
    assert decoder.restarts == 1 and decoder.worker_pids() and pid not in decoder.worker_pids()


def test_close_ends_the_workers(decoder):
    asyncio.run(decoder.decode(_images()[:1], SPEC))
    (pid,) = decoder.worker_pids()
    decoder.close()
    for _ in range(100):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        asyncio.run(asyncio.sleep(0.05))
    else:
        pytest.fail(f"worker {pid} still running after close()")


def test_the_server_sends_requests_by_declared_pixels_and_answers_the_same(make_client):
    rng = np.random.default_rng(1)
    large = _encoded(Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)), "PNG")  # 160,000 px
    small = _encoded(Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)), "PNG")  # 90,000 px
    in_threads = make_client(heavy_decode_processes=0)
    in_workers = make_client(heavy_decode_min_pixels=100_000)
    heavy = in_workers.app.state.inference.heavy_decoder
    assert in_threads.app.state.inference.heavy_decoder is None
    headers = {"content-type": "image/png"}
    r = in_workers.post("/v1/predict", content=small, headers=headers)
    assert r.status_code == 200 and heavy.worker_pids() == []  # below the threshold: a decode thread
    for blob in (large, small):
        a = in_threads.post("/v1/predict", content=blob, headers=headers)
        b = in_workers.post("/v1/predict", content=blob, headers=headers)
        assert a.status_code == b.status_code == 200 and a.json()["predictions"] == b.json()["predictions"]
    assert len(heavy.worker_pids()) == 1  # the large one went to a worker
