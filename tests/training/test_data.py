"""Data loading: the shared npz format, image folders, caching, corrupt files, splits, batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from oodguard.training import data
from oodguard.training.data import (
    BatchStream,
    DataError,
    calibration_split,
    default_data_dir,
    load_image_folder,
    load_in_distribution,
    load_npz,
    load_ood_test,
    load_outliers,
    random_crop_flip,
    to_tensor,
)


def _decoded_reference(path):
    d = np.load(path)
    jpeg, off = d["jpeg"], d["offsets"]
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                     for i in range(len(off) - 1)])


def test_load_npz_reads_the_shared_format(tmp_path, make_npz, synthetic_images):
    x, y = synthetic_images(12)
    path = make_npz(tmp_path / "set.npz", x, y, [f"k{i}" for i in range(10)])
    s = load_npz(path, cache_dir=tmp_path / "cache")
    assert s.images.shape == (12, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int64 and s.labels.tolist() == y.tolist()
    assert s.classes == [f"k{i}" for i in range(10)] and s.source == str(path)
    assert s.sha256 == data.sha256_file(path)
    np.testing.assert_array_equal(s.images, _decoded_reference(path))
    assert np.abs(s.images.astype(int) - x.astype(int)).mean() < 20  # lossy JPEG of noisy images, but close


def test_second_load_comes_from_the_cache_without_decoding(tmp_path, make_npz, synthetic_images, monkeypatch):
    x, y = synthetic_images(8)
    path = make_npz(tmp_path / "set.npz", x, y)
    first = load_npz(path, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.images.npy"))

    def _no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode_bytes", _no_decoding)
    second = load_npz(path, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)


def _npz_with_corrupt_image(tmp_path, make_npz, synthetic_images):
    x, y = synthetic_images(6)
    path = make_npz(tmp_path / "bad.npz", x, y)
    d = dict(np.load(path))
    jpeg, off = d["jpeg"].copy(), d["offsets"]
    jpeg[off[3]:off[4]] = 7  # image 3 is garbage now
    np.savez(path, **{**d, "jpeg": jpeg})
    return path, y


def test_corrupt_image_fails_naming_its_index(tmp_path, make_npz, synthetic_images):
    path, _ = _npz_with_corrupt_image(tmp_path, make_npz, synthetic_images)
    with pytest.raises(DataError, match=r"bad\.npz: image 3 is corrupt"):
        load_npz(path, use_cache=False)


def test_corrupt_image_can_be_skipped_with_a_count(tmp_path, make_npz, synthetic_images, caplog):
    path, y = _npz_with_corrupt_image(tmp_path, make_npz, synthetic_images)
    for _ in range(2):  # decoded, then from the cache: same result
        s = load_npz(path, on_corrupt="skip", cache_dir=tmp_path / "cache")
        assert len(s) == 5 and s.labels.tolist() == [int(v) for i, v in enumerate(y) if i != 3]
    assert "skipped 1 corrupt image" in caplog.text


@pytest.mark.parametrize("content,match", [(None, "not found"), (b"not a zip", "unreadable"), ("empty", "empty"),
                                           ("keys", "missing arrays")])
def test_bad_npz_files_name_the_path(tmp_path, content, match):
    path = tmp_path / "x.npz"
    if content == "empty":
        np.savez(path, jpeg=np.zeros(0, np.uint8), offsets=np.zeros(1, np.int64), labels=np.zeros(0, np.int16))
    elif content == "keys":
        np.savez(path, images=np.zeros(3))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        load_npz(path, use_cache=False)
    assert str(path) in str(err.value)


def test_labelled_image_folder(tmp_path, make_image_folder, synthetic_images):
    x, y = synthetic_images(9, num_classes=3)
    root = make_image_folder(tmp_path / "imgs", x, y, ["cat", "dog", "eel"])
    s = load_image_folder(root, labelled=True)
    assert s.classes == ["cat", "dog", "eel"] and len(s) == 9
    assert sorted(s.labels.tolist()) == sorted(y.tolist())
    # PNG is lossless: each decoded image is exactly one of the originals with the matching label
    for img, label in zip(s.images, s.labels):
        matches = [i for i in range(9) if np.array_equal(x[i], img)]
        assert len(matches) == 1 and y[matches[0]] == label
    assert s.sha256 and load_image_folder(root, labelled=True).sha256 == s.sha256


def test_unlabelled_nested_folder_and_resize_rule(tmp_path):
    root = tmp_path / "out"
    (root / "a" / "b").mkdir(parents=True)
    big = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "a" / "b" / "x.png")
    Image.fromarray(big[:32, :32]).convert("L").save(root / "a" / "gray.png")
    s = load_image_folder(root, labelled=False, use_cache=False)
    assert len(s) == 2 and s.labels.tolist() == [-1, -1] and s.images.shape == (2, 32, 32, 3)
    # "area": 64 -> 32 rows and 48 -> 32 columns both shrink, so a box (pixel-area) average
    want = np.asarray(Image.fromarray(big).resize((32, 32), Image.BOX))
    np.testing.assert_array_equal(s.images[0], want)  # sorted order: a/b/x.png before a/gray.png


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (255, 0, 0)
    img[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    (tmp_path / "o").mkdir()
    Image.fromarray(img).save(tmp_path / "o" / "r.jpg", exif=exif, quality=95)
    s = load_image_folder(tmp_path / "o", labelled=False, use_cache=False)
    assert s.images[0, 16, 4, 2] > 200 and s.images[0, 16, 28, 0] > 200  # blue now on the left


def test_empty_or_corrupt_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path / "empty", labelled=False)
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_image_folder(tmp_path / "empty", labelled=True)
    (tmp_path / "bad" / "c").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image_folder(tmp_path / "bad", labelled=True, use_cache=False)


def test_dataset_specs(tiny_data_dir, tmp_path, make_image_folder, synthetic_images):
    by_name = load_in_distribution("cifar10", "train", data_dir=tiny_data_dir)
    by_dir = load_in_distribution(tiny_data_dir, "train")
    by_file = load_in_distribution(tiny_data_dir / "cifar10_train.npz", "train")
    assert len(by_name) == len(by_dir) == len(by_file) == 400 and by_name.sha256 == by_file.sha256
    assert len(load_in_distribution("cifar10", "test", data_dir=tiny_data_dir)) == 200
    assert len(load_outliers("tinyimagenet", data_dir=tiny_data_dir)) == 300
    assert len(load_outliers(tiny_data_dir)) == 300
    assert len(load_ood_test(tiny_data_dir)) == 200
    x, y = synthetic_images(6, num_classes=2)
    make_image_folder(tmp_path / "mine" / "train", x, y, ["a", "b"])
    assert load_in_distribution(tmp_path / "mine", "train").classes == ["a", "b"]


def test_missing_data_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("OODGUARD_DATA_DIR", str(tmp_path / "nowhere"))
    assert default_data_dir() == tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        load_in_distribution("cifar10", "train")
    with pytest.raises(DataError, match="no such dataset"):
        load_outliers(tmp_path / "missing-folder")


def test_calibration_split():
    train, cal = calibration_split(1000, size=100, seed=0)
    assert len(cal) == 100 and len(train) == 900
    assert not set(train) & set(cal) and sorted(set(train) | set(cal)) == list(range(1000))
    assert np.all(np.diff(cal) > 0) and np.all(np.diff(train) > 0)
    again, cal_again = calibration_split(1000, size=100, seed=0)
    np.testing.assert_array_equal(cal, cal_again)
    assert not np.array_equal(cal, calibration_split(1000, size=100, seed=1)[1])
    with pytest.raises(ValueError, match="smaller than the training set"):
        calibration_split(100, size=100)


def test_to_tensor():
    imgs = np.zeros((2, 4, 5, 3), np.uint8)
    imgs[1, 2, 3] = (255, 51, 0)
    t = to_tensor(imgs)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32
    assert t[1, :, 2, 3].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert t.sum().item() == pytest.approx(1.2)


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(batch, g, pad=2)
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        candidates = {(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                      if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))}
        assert candidates, f"image {i} is not a crop of its padded input"
        flips += min(f for _, _, f in candidates)
    assert 0 < flips < 16  # both flipped and unflipped images occur


def test_batch_stream_resumes_exactly_and_shards():
    imgs = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(50)
    a = BatchStream(imgs, labels, 8, seed=3)
    assert a.batches_per_epoch == 6
    for _ in range(4):
        a.next()
    state = a.state_dict()
    want = [a.next() for _ in range(5)]  # crosses the epoch boundary
    b = BatchStream(imgs, labels, 8, seed=3)
    b.load_state_dict(state)
    got = [b.next() for _ in range(5)]
    for (xw, yw), (xg, yg) in zip(want, got):
        assert torch.equal(xw, xg) and torch.equal(yw, yg)
    # two ranks: disjoint halves of the same epoch permutation
    r0 = BatchStream(imgs, labels, 5, seed=3, rank=0, world_size=2, augment=False)
    r1 = BatchStream(imgs, labels, 5, seed=3, rank=1, world_size=2, augment=False)
    seen0 = torch.cat([r0.next()[1] for _ in range(r0.batches_per_epoch)])
    seen1 = torch.cat([r1.next()[1] for _ in range(r1.batches_per_epoch)])
    assert len(seen0) == len(seen1) == 25 and not set(seen0.tolist()) & set(seen1.tolist())
    x, _ = r0.next()  # unaugmented batches are exactly the images / 255
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
