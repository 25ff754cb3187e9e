"""Upload-form augmentation (training) and upload forms (evaluation / calibration).

The augmentation must give inliers and outliers the same forms (no form may tell them apart), be
reproducible from the generator (so --resume is exact), and really change the pixels; the forms must go
through the service's own decode path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from oodguard.service.manifest import InputSpec
from oodguard.service.preprocess import decode_image
from oodguard.training.augment import UploadAugment
from oodguard.training.data import BatchStream
from oodguard.training.shifts import FORMS, encode_form, render_form, render_mixed


def _images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)  # smooth-ish content: upsampled noise
    return np.stack([np.asarray(Image.fromarray(b).resize((32, 32), Image.BICUBIC)) for b in base])


def test_upload_augment_is_reproducible_and_changes_pixels():
    x = _images(100)
    a = UploadAugment()
    y1 = a.apply(x, torch.Generator().manual_seed(4))
    y2 = a.apply(x, torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(y1, y2)
    assert y1.shape == x.shape and y1.dtype == np.uint8
    changed = np.abs(y1.astype(int) - x).reshape(len(x), -1).mean(1) > 0.5
    assert changed.mean() > 0.5  # most images are re-rendered; lossless + no resize leaves a few untouched


def test_upload_augment_in_worker_processes_renders_exactly_what_one_process_does():
    """The GPU trainer renders uploads in a process pool: slices of the batch, same random draws, same pixels."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    x = _images(40)
    serial = UploadAugment().apply(x, torch.Generator().manual_seed(9))
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = UploadAugment().apply(x, torch.Generator().manual_seed(9), pool, workers=3)
        stream = BatchStream(x, None, 16, seed=3, upload_augment=UploadAugment(), augment_pool=pool, augment_workers=3)
        pooled_batch = stream.next()[0]
    np.testing.assert_array_equal(pooled, serial)
    assert torch.equal(pooled_batch, BatchStream(x, None, 16, seed=3, upload_augment=UploadAugment()).next()[0])


def test_upload_augment_identity_when_lossless_and_unscaled():
    x = _images()
    y = UploadAugment(p_rescale=0.0, p_lossless=1.0).apply(x, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(x, y)


def test_upload_augment_p_apply_leaves_the_rest_as_stored():
    x = np.random.default_rng(4).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    y = UploadAugment(p_apply=0.5, p_lossless=0.0).apply(x, torch.Generator().manual_seed(2))  # every render is JPEG
    unchanged = np.array([np.array_equal(a, b) for a, b in zip(x, y)])
    assert 0.4 < unchanged.mean() < 0.6  # the other half re-encoded: noise never survives JPEG exactly
    assert np.array_equal(UploadAugment(p_apply=0.0).apply(x, torch.Generator().manual_seed(2)), x)


def test_upload_augment_draws_every_form():
    """Over many images: lossless uploads at the set rate, and JPEGs of many different settings."""
    x = np.repeat(_images(1), 400, axis=0)
    y = UploadAugment(p_rescale=0.0).apply(x, torch.Generator().manual_seed(1))
    diffs = np.abs(y.astype(int) - x).reshape(len(x), -1).mean(1)
    assert (diffs == 0).mean() == pytest.approx(0.3, abs=0.08)  # p_lossless
    assert len(np.unique(np.round(diffs[diffs > 0], 4))) > 30  # many JPEG qualities / subsamplings, not one


def test_upload_blur_softens_at_its_rate_and_leaves_runs_without_it_unchanged():
    """Blur lowers the high-frequency energy of the images it touches, at rate p_blur; with p_blur 0 the
    draws (so the pixels of a resumed old run) are exactly those of the augmentation before blur existed."""
    x = np.random.default_rng(5).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)  # noise: all high frequency
    lossless = dict(p_rescale=0.0, p_lossless=1.0)
    y = UploadAugment(p_blur=0.5, **lossless).apply(x, torch.Generator().manual_seed(3))
    blurred = np.array([not np.array_equal(a, b) for a, b in zip(x, y)])
    assert 0.4 < blurred.mean() < 0.6

    def roughness(im):
        return np.abs(np.diff(im.astype(int), axis=1)).mean()

    assert all(roughness(b) < 0.85 * roughness(a) for a, b, hit in zip(x, y, blurred) if hit)  # radius 0.3: ~0.8
    g1 = torch.Generator().manual_seed(8)
    np.testing.assert_array_equal(UploadAugment(p_blur=0.0).apply(x[:50], g1),
                                  UploadAugment().apply(x[:50], torch.Generator().manual_seed(8)))
    g2 = torch.Generator().manual_seed(8)
    torch.rand(50, 7, generator=g2)  # what the augmentation drew before blur existed: 7 numbers per image
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_upload_quality_floor_is_respected():
    """quality=(q, q): every JPEG upload is exactly that quality (compare with a direct encode)."""
    x = _images(20)
    y = UploadAugment(p_rescale=0.0, p_lossless=0.0, quality=(10, 10)).apply(x, torch.Generator().manual_seed(0))
    for a, b in zip(x, y):
        candidates = []
        for sub in (2, 0):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=10, subsampling=sub)
            candidates.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        assert any(np.array_equal(b, c) for c in candidates)


@pytest.mark.parametrize("bad", [dict(p_rescale=1.5), dict(p_apply=-0.1), dict(min_side=0), dict(quality=(90, 20)),
                                 dict(p_blur=2.0), dict(blur_radius=(0.0, 1.0)), dict(blur_radius=(1.0, 0.5))])
def test_upload_augment_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        UploadAugment(**bad)


def test_batch_stream_applies_the_same_augmentation_to_any_stream_and_resumes_exactly():
    x = _images(64)
    aug = UploadAugment()
    a = BatchStream(x, None, 16, seed=3, upload_augment=aug)
    b = BatchStream(x, None, 16, seed=3, upload_augment=aug)
    first = a.next()[0]
    state = a.state_dict()
    second = a.next()[0]
    b.next()
    b.load_state_dict(state)
    assert torch.equal(b.next()[0], second) and not torch.equal(first, second)
    plain = BatchStream(x, None, 16, seed=3, upload_augment=None)
    assert not torch.equal(plain.next()[0], first)  # the upload augmentation really is applied


def test_forms_go_through_the_service_decoder():
    x = _images(6)
    spec = InputSpec()
    np.testing.assert_array_equal(render_form(x, "stored"), x)
    np.testing.assert_array_equal(render_form(x, "png"), x)  # lossless
    for form in FORMS:
        out = render_form(x, form, spec)
        assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8
        if form not in ("stored", "png"):
            assert not np.array_equal(out, x), form
            expected = decode_image(encode_form(x[0], form), spec)
            np.testing.assert_array_equal(out[0], expected)
    assert Image.open(io.BytesIO(encode_form(x[0], "non_square"))).size == (96, 64)
    assert Image.open(io.BytesIO(encode_form(x[0], "upscale_x4"))).size == (128, 128)
    assert Image.open(io.BytesIO(encode_form(x[0], "jpeg_q30"))).format == "JPEG"
    with pytest.raises(ValueError, match="unknown upload form"):
        render_form(x, "gif")


def test_mixed_forms_share_the_images_equally_and_are_seeded():
    x = _images(30)
    forms = ["stored", "jpeg_q50", "upscale_x3"]
    mixed, assignment = render_mixed(x, forms, seed=1)
    assert np.bincount(assignment).tolist() == [10, 10, 10]
    np.testing.assert_array_equal(mixed[assignment == 0], x[assignment == 0])
    again, assignment2 = render_mixed(x, forms, seed=1)
    np.testing.assert_array_equal(again, mixed) and np.testing.assert_array_equal(assignment, assignment2)


def test_group_renderings_land_in_their_group():
    """Every calibration image of a group is uploaded in a form the service puts in that group."""
    from oodguard.service.upload_form import DEFAULT_GROUPS, V1_GROUPS, read_upload_form
    from oodguard.training.shifts import STORED_QUALITY, _resized_size, render_group

    def group_of(blob: bytes, groups=DEFAULT_GROUPS) -> str:
        return groups.group_of(read_upload_form(Image.open(io.BytesIO(blob)), InputSpec()))

    rng = np.random.default_rng(0)
    for group in ("smaller", "larger"):
        for _ in range(200):
            size = _resized_size((32, 32), group, rng)
            buf = io.BytesIO()
            Image.new("RGB", size).save(buf, format="PNG")
            assert group_of(buf.getvalue()) == group, size
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    renders = {g: render_group(images, g, seed=3) for g in DEFAULT_GROUPS.names}
    assert all(r.shape == images.shape and r.dtype == np.uint8 for r in renders.values())
    assert len({r.tobytes() for r in renders.values()}) == len(DEFAULT_GROUPS.names)  # each group its own forms
    np.testing.assert_array_equal(renders["larger"], render_group(images, "larger", seed=3))  # seeded
    # bands cover every quality: native is the stored pixels as a lossless upload carries them
    np.testing.assert_array_equal(renders["native"], images)
    # the band of the stored quality: half the images as stored, the rest re-encoded in the band
    stored_band = DEFAULT_GROUPS.group_of(read_upload_form(Image.open(io.BytesIO(_jpeg_bytes(images[0], STORED_QUALITY))),
                                                          InputSpec()))
    kept = [np.array_equal(a, b) for a, b in zip(renders[stored_band], images)]
    assert 0 < sum(kept) < len(kept)
    # under v1's bands (JPEG above 65 is native) native is half stored, half re-encoded at 66-100
    v1_native = render_group(images, "native", seed=3, groups=V1_GROUPS)
    assert 0 < sum(np.array_equal(a, b) for a, b in zip(v1_native, images)) < len(images)
    with pytest.raises(ValueError, match="unknown form group 'jpeg_q16_45'"):
        render_group(images, "jpeg_q16_45")  # a v1 group, not one of the default groups


def _jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_the_configured_quality_range_reaches_the_training_uploads(tiny_config, monkeypatch):
    """--upload-quality-min/max are the range every training upload's JPEG quality is drawn from."""
    from oodguard.training import trainer

    made = []
    real = trainer.UploadAugment

    def recording(**kw):
        made.append(real(**kw))
        return made[-1]

    monkeypatch.setattr(trainer, "UploadAugment", recording)
    trainer.train(tiny_config(method="oe", max_steps=1, eval_test=False, upload_quality_min=25, upload_quality_max=40))
    assert [u.quality for u in made] == [(25, 40)]  # one augmentation, for inliers and outliers alike
