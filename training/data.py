"""Datasets by name, loaded whole into memory, and the seeded train / validation / test split.

- `digits` (default): scikit-learn's embedded 8x8 handwritten digits, pixels / 16, 1x8x8.
- `idx`: a directory in the MNIST / Fashion-MNIST layout, parsed directly from the IDX format.
- `folder`: a directory of image files (sub-directories become labels), converted and resized.

Every image tensor is float32 (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from service.imaging import ImageError, read_pixels, to_model
from service.model_card import InputSpec

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "Split",
    "idx_test_file",
    "load_dataset",
    "read_idx",
    "split_dataset",
]

log = logging.getLogger(__name__)

DatasetName = Literal["digits", "idx", "folder"]
DATASETS: tuple[DatasetName, ...] = ("digits", "idx", "folder")
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)

# IDX: two zero bytes, a type code, the number of dimensions (http://yann.lecun.com/exdb/mnist/).
_IDX_UBYTE = 0x08
_IDX_TRAIN_IMAGES = "train-images-idx3-ubyte"
_IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
_IDX_TRAIN_LABELS = "train-labels-idx1-ubyte"
_IDX_TEST_LABELS = "t10k-labels-idx1-ubyte"

Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Split:
    """One part of a dataset."""

    images: Images  # (N, C, H, W) float32 in [0, 1]
    labels: Labels | None  # (N,) or None when the dataset has no labels


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset, with its own test part when the source defines one (IDX t10k files)."""

    name: DatasetName
    source: str
    images: Images
    labels: Labels | None
    # SHA-256 of what the images were read from: checkpoints keep it, evaluate and export check it.
    sha256: str
    test: Split | None = None
    # Light strokes on a dark background (digits, MNIST) or the reverse.
    foreground: Literal["light", "dark"] = "light"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, c, h, w = self.images.shape
        return (c, h, w)


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Parse an IDX file of unsigned bytes (plain or .gz) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip's for corrupt or truncated archives
        raise DataError(f"{path}: cannot read ({error})") from error
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic")
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(
            f"{path}: bad IDX magic {data[:4].hex()}; expected 0000 08 0N (unsigned bytes, N dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, the header alone needs {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    body = len(data) - header
    if body != expected:
        what = "truncated" if body < expected else "trailing data"
        raise DataError(f"{path}: {what}: shape {dims} needs {expected} bytes of data, found {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `root`; the plain file where both are, with a warning (they may differ)."""
    found = [root / name for name in (stem, stem + ".gz") if (root / name).is_file()]
    if len(found) == 2:
        log.warning("%s and %s both exist: reading %s", found[0].name, found[1].name, found[0].name)
    return found[0] if found else None


def idx_test_file(root: Path) -> Path | None:
    """The test images of the IDX dataset in `root`, when it has its own."""
    return _find_idx(root, _IDX_TEST_IMAGES)


def _load_idx(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: IDX dataset directory not found")
    train_path = _find_idx(root, _IDX_TRAIN_IMAGES)
    if train_path is None:
        raise DataError(
            f"{root}: no training images; expected {_IDX_TRAIN_IMAGES} or {_IDX_TRAIN_IMAGES}.gz "
            f"(and optionally {_IDX_TEST_IMAGES}[.gz], {_IDX_TRAIN_LABELS}[.gz], {_IDX_TEST_LABELS}[.gz])"
        )

    def part(images_path: Path, labels_stem: str) -> Split:
        raw = read_idx(images_path)
        if raw.ndim != 3:
            raise DataError(f"{images_path}: expected 3 dimensions (N, H, W), found shape {raw.shape}")
        if 0 in raw.shape:
            raise DataError(f"{images_path}: holds no pixels (shape {raw.shape})")
        labels_path = _find_idx(root, labels_stem)
        labels = None
        if labels_path is not None:
            labels = read_idx(labels_path).astype(np.int64)
            if labels.ndim != 1:
                raise DataError(f"{labels_path}: expected 1 dimension (N labels), found shape {labels.shape}")
            if labels.shape != (raw.shape[0],):
                raise DataError(f"{labels_path}: {labels.shape[0]} labels for {raw.shape[0]} images")
        return Split((raw[:, None].astype(np.float32) / 255.0), labels)

    train = part(train_path, _IDX_TRAIN_LABELS)
    test_path = idx_test_file(root)
    test = part(test_path, _IDX_TEST_LABELS) if test_path is not None else None
    orphan = _find_idx(root, _IDX_TEST_LABELS) if test_path is None else None
    if orphan is not None:  # the test images missing, or misnamed: the labels would go unread
        raise DataError(
            f"{orphan}: test labels without test images; expected {_IDX_TEST_IMAGES}[.gz] beside them"
        )
    if test is not None and test.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"{test_path}: image shape {test.images.shape[1:]} differs from the training images")
    names = (_IDX_TRAIN_IMAGES, _IDX_TEST_IMAGES, _IDX_TRAIN_LABELS, _IDX_TEST_LABELS)
    # A directory of such a name is not read either (an unpacked archive: `t10k-images-idx3-ubyte/`).
    unread = sorted(p for p in root.iterdir() if not (p.is_file() and p.name.removesuffix(".gz") in names))
    what = f"entries that are not files of the IDX names ({', '.join(names)}, each may end in .gz)"
    _warn_skipped(root, what, unread)
    parts = [train.images] if test is None else [train.images, test.images]
    return Dataset("idx", str(root), train.images, train.labels, _digest(parts), test=test)


def _load_folder(root: Path, image_size: int, channels: int, foreground: Literal["light", "dark"]) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    entries = sorted(root.rglob("*"))
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    _warn_skipped(root, "files that are not images by extension", others)
    # rglob does not descend into linked directories; a broken link is no file.
    odd = [p for p in entries if not p.is_file() and (p.is_symlink() or not p.is_dir())]
    _warn_skipped(root, "entries that are neither files nor directories (broken or directory links)", odd)
    if not images:
        raise DataError(
            f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); {len(others)} other files"
        )
    # Read and resized exactly as the service reads an upload, so that training and serving see the same
    # pixels: 16-bit levels scaled, transparency over the background, EXIF orientation, area-average shrink.
    # Each image is resized as it is read: only the model's size of it is kept.
    spec = InputSpec(
        channels=1 if channels == 1 else 3, height=image_size, width=image_size, foreground=foreground
    )
    arrays = np.empty((len(images), spec.channels, image_size, image_size), dtype=np.float32)
    # The files, not the pixels: resizing is a matrix product whose last bits vary with the CPU's BLAS.
    digest = hashlib.sha256()
    for i, path in enumerate(images):
        try:
            data = path.read_bytes()
            arrays[i] = to_model([read_pixels(data, spec)], spec)[0]
        except (ImageError, OSError) as error:
            raise DataError(f"{path}: unreadable image: {error}") from error
        digest.update(os.fsencode(path.relative_to(root)) + b"\0" + len(data).to_bytes(8, "big"))
        digest.update(data)
    # Images in sub-directories are labelled by directory, in sorted order.
    class_names = sorted({p.parent.relative_to(root).as_posix() for p in images})
    labels = None
    if len(class_names) > 1:
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[p.parent.relative_to(root).as_posix()] for p in images], dtype=np.int64)
    return Dataset("folder", str(root), arrays, labels, digest.hexdigest(), foreground=foreground)


def _warn_skipped(root: Path, what: str, skipped: list[Path]) -> None:
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:10])
        log.warning(
            "%s: skipped %d %s: %s", root, len(skipped), what, names + (" ..." if len(skipped) > 10 else "")
        )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None]
    labels = np.asarray(digits.target, np.int64)
    return Dataset("digits", "sklearn.datasets.load_digits", images, labels, _digest([images]))


def _digest(arrays: list[Images]) -> str:
    """SHA-256 of arrays read without resampling (their values are the same on every machine), shapes too."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(repr(contiguous.shape).encode())
        digest.update(contiguous.data)
    return digest.hexdigest()


def load_dataset(
    name: DatasetName,
    path: Path | None = None,
    *,
    image_size: int = 28,
    channels: int = 1,
    foreground: Literal["light", "dark"] = "light",
) -> Dataset:
    """Load a dataset by name; `path` is required for `idx` and `folder`, the rest is for `folder`."""
    if name == "digits":
        return _load_digits()
    if path is None:
        raise DataError(f"dataset {name!r} needs a path (--data-dir)")
    if name == "idx":
        return _load_idx(path)
    if name == "folder":
        return _load_folder(path, image_size, channels, foreground)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def split_dataset(
    dataset: Dataset, *, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> tuple[Split, Split, Split]:
    """Seeded, deterministic (train, val, test). A dataset's own test part is used as the test set."""
    n = len(dataset.images)
    order = np.random.default_rng(seed).permutation(n)
    n_test = 0 if dataset.test is not None else round(n * test_fraction)
    n_val = round(n * val_fraction)
    if n - n_test - n_val < 1 or n_val < 1 or (dataset.test is None and n_test < 1):
        raise DataError(f"{dataset.source}: {n} images are too few to split (val {n_val}, test {n_test})")
    tested = len(dataset.test.images) if dataset.test is not None else n_test
    if tested < 2:  # evaluate's active units are a variance over the test images
        raise DataError(f"{dataset.source}: the test split would hold 1 image; it needs at least 2")

    def take(idx: npt.NDArray[np.int64]) -> Split:
        idx = np.sort(idx)
        labels = dataset.labels[idx] if dataset.labels is not None else None
        return Split(dataset.images[idx], labels)

    test = dataset.test if dataset.test is not None else take(order[:n_test])
    val = take(order[n_test : n_test + n_val])
    train = take(order[n_test + n_val :])
    return train, val, test
