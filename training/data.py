"""Datasets in memory: the shared npz-of-JPEG files and user image folders, decoded once and cached.

Everything here is uint8 HWC images (`ImageSet`) until a batch is made; `to_tensor` gives float32
NCHW in [0, 1], the models' input (normalisation is inside the model). Training batches come from
`BatchStream`: an in-memory, seeded, resumable iterator with vectorised crop+flip augmentation in
torch (no DataLoader workers: on 2 cores they would only fight the training threads).

Where data lives: `default_data_dir()` = $OODGUARD_DATA_DIR, else `<repo>/../shared/datasets`.
Decoded arrays are cached as .npy under `default_cache_dir()` = $OODGUARD_CACHE_DIR, else
~/.cache/oodguard, keyed by the sha256 of the source, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from oodguard.service.atomic import atomic_write
from oodguard.service.bundle import sha256_file
from oodguard.service.preprocess import TRAINING_RESIZE, resize_image, to_rgb

log = logging.getLogger(__name__)

OnCorrupt = Literal["fail", "skip"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_CACHE_FORMAT = 3  # bump when the decoding rule changes (3: the area resize): old cache entries are ignored

# Named datasets -> file name pattern in the data directory.
_IN_DISTRIBUTION = {"cifar10": "cifar10_{split}.npz"}
_OUTLIERS = {"tinyimagenet": "tinyimagenet_outliers.npz"}
_OOD_TEST = {"tinyimagenet": "tinyimagenet_test.npz"}


class DataError(ValueError):
    """A dataset is missing, empty or unreadable. The message names the path."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,), -1 where unlabelled
    classes: list[str] = field(default_factory=list)
    source: str = ""  # path (or name) it was loaded from
    sha256: str | None = None  # of the source file (npz) or of the folder's contents

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"{self.source}: images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], list(self.classes), self.source, self.sha256)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def describe(self) -> dict:
        """What a run records about its data (lineage)."""
        return {"source": self.source, "sha256": self.sha256, "n": len(self), "classes": list(self.classes)}


# -- locations ----------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    env = os.environ.get("OODGUARD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    repo_relative = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if repo_relative.is_dir():
        return repo_relative
    return Path("..") / "shared" / "datasets"


def default_cache_dir() -> Path:
    env = os.environ.get("OODGUARD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodguard"


# -- decoding -----------------------------------------------------------------------------------------


def pil_to_array(img: Image.Image, size: int = 32) -> np.ndarray:
    """The one preprocessing rule (the service's too): EXIF transpose, RGB, "area" resize of the whole image."""
    img = ImageOps.exif_transpose(img)
    img = to_rgb(img)  # the service's rule: transparency composited onto white, 16-bit scaled, not clipped
    return np.asarray(resize_image(img, (size, size), TRAINING_RESIZE), dtype=np.uint8)


def _decode_bytes(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return pil_to_array(img, size)


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.images.npy", cache_dir / f"{key}.meta.json"


def _read_cache(cache_dir: Path | None, key: str) -> tuple[np.ndarray, dict] | None:
    if cache_dir is None:
        return None
    images_path, meta_path = _cache_paths(cache_dir, key)
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(images_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != meta.get("n"):
        log.warning("ignoring inconsistent cache entry %s", images_path)
        return None
    return images, meta


def _write_cache(cache_dir: Path | None, key: str, images: np.ndarray, meta: dict) -> None:
    """Atomic (temp + rename) so a crash or a concurrent run never leaves a half-written entry."""
    if cache_dir is None:
        return
    images_path, meta_path = _cache_paths(cache_dir, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, write in ((images_path, lambda f: np.save(f, images)), (meta_path, lambda f: f.write(json.dumps(meta).encode()))):
            with atomic_write(path) as f:
                write(f)
    except OSError as exc:  # a read-only cache only costs time
        log.warning("could not write decode cache in %s: %s", cache_dir, exc)


def _decode_all(items, size: int, on_corrupt: OnCorrupt, describe) -> tuple[np.ndarray, list[int]]:
    """Decode an iterable of (index, bytes). Returns (images, kept indices)."""
    arrays, kept, bad = [], [], []
    for i, data in items:
        try:
            arrays.append(_decode_bytes(data, size))
            kept.append(i)
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            if on_corrupt == "fail":
                raise DataError(f"{describe(i)} is corrupt or not an image ({type(exc).__name__}: {exc}); "
                                "use on_corrupt='skip' (--on-corrupt skip) to skip such images") from None
            bad.append(i)
    if bad:
        log.warning("skipped %d corrupt image(s); first: %s", len(bad), ", ".join(describe(i) for i in bad[:5]))
    if not arrays:
        raise DataError(f"{describe(None)}: no readable images")
    return np.stack(arrays), kept


def load_npz(
    path: str | Path, cache_dir: str | Path | None = None, on_corrupt: OnCorrupt = "fail", size: int = 32,
    use_cache: bool = True,
) -> ImageSet:
    """Load an npz of JPEG bytes (`jpeg`, `offsets`, `labels`, optional `classes`; see the datasets README)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    digest = sha256_file(path)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if use_cache else None
    key = f"npz-{digest[:32]}-{size}-{on_corrupt}-v{_CACHE_FORMAT}"
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = {"jpeg", "offsets", "labels"} - set(d.files)
            if missing:
                raise DataError(f"{path}: not an oodguard image npz (missing arrays: {', '.join(sorted(missing))})")
            labels = d["labels"].astype(np.int64)
            classes = [str(c) for c in d["classes"]] if "classes" in d.files else []
            cached = _read_cache(cache, key)
            if cached is not None:
                images, meta = cached
                kept = np.asarray(meta["kept"], dtype=np.int64) if meta.get("kept") is not None else None
                log.info("loaded %s from cache (%d images)", path.name, len(images))
            else:
                jpeg, offsets = d["jpeg"], d["offsets"]
                n = len(offsets) - 1
                if n <= 0:
                    raise DataError(f"{path}: dataset is empty")
                if len(labels) != n or offsets[0] < 0 or offsets[-1] > len(jpeg) or np.any(np.diff(offsets) < 0):
                    raise DataError(f"{path}: inconsistent offsets/labels ({n} offsets, {len(labels)} labels)")
                log.info("decoding %d images from %s (once; cached afterwards)", n, path)
                items = ((i, jpeg[offsets[i]:offsets[i + 1]].tobytes()) for i in range(n))
                images, kept_list = _decode_all(items, size, on_corrupt, lambda i: f"{path}" if i is None else f"{path}: image {i}")
                kept = None if len(kept_list) == n else np.asarray(kept_list, dtype=np.int64)
                _write_cache(cache, key, images, {"n": len(images), "source": str(path), "sha256": digest,
                                                 "kept": None if kept is None else kept.tolist()})
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable dataset file ({type(exc).__name__}: {exc})") from None
    if kept is not None:
        labels = labels[kept]
    return ImageSet(images, labels, classes, str(path), digest)


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(
    path: str | Path, labelled: bool, size: int = 32, on_corrupt: OnCorrupt = "fail",
    cache_dir: str | Path | None = None, use_cache: bool = True,
) -> ImageSet:
    """A folder of images: class sub-folders (sorted names = class indices) when `labelled`, else any
    flat or nested layout (labels -1). Images are resized to `size` x `size` by `pil_to_array`."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    if labelled:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{root}: a labelled image folder needs one sub-folder per class, found none")
        for k, name in enumerate(classes):
            found = _list_images(root / name)
            files += found
            labels += [k] * len(found)
    else:
        files = _list_images(root)
        labels = [-1] * len(files)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    # Content digest: relative paths + bytes (+ labelling); names the data in lineage and keys the cache.
    h = hashlib.sha256(f"folder labelled={labelled}\n".encode())
    contents = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise DataError(f"{p}: unreadable ({exc})") from None
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
        contents.append(data)
    digest = h.hexdigest()
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if use_cache else None
    key = f"dir-{digest[:32]}-{size}-{on_corrupt}-v{_CACHE_FORMAT}"
    cached = _read_cache(cache, key)
    if cached is not None:
        images, meta = cached
        kept = meta["kept"]
    else:
        images, kept = _decode_all(enumerate(contents), size, on_corrupt,
                                   lambda i: f"{root}" if i is None else f"{files[i]} (image {i})")
        _write_cache(cache, key, images, {"n": len(images), "source": str(root), "sha256": digest, "kept": kept})
    label_arr = np.asarray(labels, dtype=np.int64)[np.asarray(kept, dtype=np.int64)]
    return ImageSet(images, label_arr, classes, str(root), digest)


# -- dataset specs --------------------------------------------------------------------------------------


def _resolve(spec: str | Path, names: dict[str, str], file_name: str, labelled: bool, data_dir, **kw) -> ImageSet:
    """spec = a known name (file in data_dir), a directory holding `file_name`, an .npz, or an image folder."""
    spec_str = str(spec)
    if spec_str in names:
        base = Path(data_dir) if data_dir is not None else default_data_dir()
        path = base / file_name
        if not path.is_file():
            raise DataError(f"{path}: dataset file for {spec_str!r} not found in data directory {base} "
                            "(set --data-dir or OODGUARD_DATA_DIR)")
        return load_npz(path, **kw)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if (path / file_name).is_file():
            return load_npz(path / file_name, **kw)
        return load_image_folder(path, labelled=labelled, **kw)
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: expected an .npz dataset file or a directory")
        return load_npz(path, **kw)
    raise DataError(f"{path}: no such dataset file or directory (known names: {', '.join(sorted(names))})")


def load_in_distribution(spec: str | Path, split: str = "train", data_dir: str | Path | None = None, **kw) -> ImageSet:
    """'cifar10' -> <data_dir>/cifar10_{split}.npz; a directory holding cifar10_{split}.npz; an .npz; or a
    labelled image folder (its `<split>/` sub-folder when present)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(str(spec)).expanduser()
    if str(spec) not in _IN_DISTRIBUTION and path.is_dir() and (path / split).is_dir() \
            and not (path / f"cifar10_{split}.npz").is_file():
        spec = path / split
    names = {k: v.format(split=split) for k, v in _IN_DISTRIBUTION.items()}
    return _resolve(spec, names, f"cifar10_{split}.npz", True, data_dir, **kw)


def load_outliers(spec: str | Path, data_dir: str | Path | None = None, **kw) -> ImageSet:
    """'tinyimagenet' -> <data_dir>/tinyimagenet_outliers.npz; a directory holding it; an .npz; or an image folder."""
    return _resolve(spec, _OUTLIERS, "tinyimagenet_outliers.npz", False, data_dir, **kw)


def load_ood_test(spec: str | Path, data_dir: str | Path | None = None, **kw) -> ImageSet:
    """'tinyimagenet' -> <data_dir>/tinyimagenet_test.npz; a directory holding it; an .npz; or an image folder."""
    return _resolve(spec, _OOD_TEST, "tinyimagenet_test.npz", False, data_dir, **kw)


def calibration_split(n: int, size: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train_idx, cal_idx), both sorted int64; the calibration part is held out of training."""
    if not 0 <= size < n:
        raise ValueError(f"calibration size {size} must be >= 0 and smaller than the training set ({n} images)")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[size:]).astype(np.int64), np.sort(perm[:size]).astype(np.int64)


def outlier_holdout(outliers: ImageSet, fraction: float, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Split an outlier set into (training indices, record of the held-out validation part).

    Labelled sets hold out whole classes (`fraction` of them, seeded), so validation measures outliers of
    kinds never trained on; unlabelled sets hold out that fraction of images. The record goes to split.json
    and `held_out_outliers` rebuilds the validation set from it."""
    n = len(outliers)
    if fraction <= 0:
        return np.arange(n), {"fraction": 0.0, "classes": [], "indices": []}
    rng = np.random.default_rng(seed + 2)
    labels = np.asarray(outliers.labels)
    if (labels >= 0).all() and len(np.unique(labels)) >= 2:
        classes = np.unique(labels)
        k = max(1, int(round(fraction * len(classes))))
        held = np.sort(rng.choice(classes, size=k, replace=False))
        mask = np.isin(labels, held)
        return np.flatnonzero(~mask), {"fraction": fraction, "classes": held.tolist(), "indices": [],
                                       "n_train": int((~mask).sum()), "n_val": int(mask.sum())}
    held_idx = np.sort(rng.choice(n, size=max(1, int(round(fraction * n))), replace=False))
    keep = np.setdiff1d(np.arange(n), held_idx)
    return keep, {"fraction": fraction, "classes": [], "indices": held_idx.tolist(),
                  "n_train": int(len(keep)), "n_val": int(len(held_idx))}


def held_out_outliers(outliers: ImageSet, record: dict) -> ImageSet:
    """The validation outliers `outlier_holdout` set aside (record as stored in split.json)."""
    if record.get("classes"):
        return outliers.subset(np.flatnonzero(np.isin(np.asarray(outliers.labels), record["classes"])))
    return outliers.subset(np.asarray(record.get("indices", []), dtype=np.int64))


# -- tensors and batches ----------------------------------------------------------------------------------


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def iterate_batches(images: np.ndarray, batch_size: int = 256):
    """Sequential, unaugmented float batches for evaluation: yields (start, x)."""
    for start in range(0, len(images), batch_size):
        yield start, to_tensor(images[start:start + batch_size])


def random_crop_flip(batch: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Vectorised augmentation of a uint8 NCHW batch: random crop after zero-padding by `pad`, then a
    horizontal flip with probability 1/2. One gather for the whole batch; no Python loop over images."""
    n, c, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # (n, h)
    cols = dx[:, None] + torch.arange(w)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading the columns backwards
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class BatchStream:
    """An endless stream of shuffled, augmented batches from uint8 images held in memory.

    Epoch e's order is `randperm` from a generator seeded with (seed, e), identical on every rank; rank r
    takes every world_size-th index (like DistributedSampler), dropping the remainder so ranks stay in step.
    Augmentation draws from `self.generator` (seeded per rank). `state_dict()` holds the position and the
    generator state, so a resumed run produces exactly the batches the uninterrupted run would have.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, batch_size: int, *, seed: int,
                 augment: bool = True, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 crop_pad: int = 4, upload_augment=None, augment_pool=None, augment_workers: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        self.labels = torch.from_numpy(np.asarray(labels if labels is not None else np.full(len(images), -1), dtype=np.int64))
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.crop_pad = crop_pad
        self.upload_augment = upload_augment  # an augment.UploadAugment (or None): applied before crop + flip
        self.augment_pool, self.augment_workers = augment_pool, augment_workers  # processes rendering the uploads
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.per_rank = len(self.images) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(self.images)} images are fewer than one batch of {batch_size} per rank "
                             f"(world size {world_size})")
        self.generator = torch.Generator().manual_seed(seed * 1000 + 17 + rank)
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.images), generator=g)
        return perm[self.rank::self.world_size][: self.per_rank]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x float32 NCHW in [0, 1], y int64) batch; rolls over to the next epoch when one ends."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        x = self.images[idx]
        if self.augment and self.upload_augment is not None:
            x = torch.from_numpy(self.upload_augment.apply(
                x.permute(0, 2, 3, 1).numpy(), self.generator, self.augment_pool, self.augment_workers)).permute(0, 3, 1, 2)
        if self.augment:
            x = random_crop_flip(x, self.generator, pad=self.crop_pad)
        x = x.float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])
        self._order = None
