"""Datasets: digits, the IDX parser, image folders, and the split."""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from training.data import DataError, Dataset, Split, load_dataset, read_idx, split_dataset


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 6, 7), dtype=np.uint8)


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzip"])
def test_read_idx_round_trip(tmp_path: Path, images: np.ndarray, suffix: str) -> None:
    path = _write(tmp_path / f"train-images-idx3-ubyte{suffix}", _idx_bytes(images))
    np.testing.assert_array_equal(read_idx(path), images)


def test_read_idx_rejects_bad_magic(tmp_path: Path, images: np.ndarray) -> None:
    data = bytearray(_idx_bytes(images))
    data[2] = 0x0D  # float32 type code
    path = _write(tmp_path / "bad", bytes(data))
    with pytest.raises(DataError, match=r"bad: bad IDX magic 00000d03; expected 0000 08 0N"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzip"])
def test_read_idx_rejects_truncation(tmp_path: Path, images: np.ndarray, suffix: str) -> None:
    path = _write(tmp_path / f"short{suffix}", _idx_bytes(images)[:-10])
    with pytest.raises(DataError, match=r"truncated: shape \(5, 6, 7\) needs 210 bytes of data, found 200"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzip"])
def test_read_idx_rejects_data_after_the_declared_images(
    tmp_path: Path, images: np.ndarray, suffix: str
) -> None:
    """Bytes past the shape the header declares mean the header or the file is wrong: the file is named, not
    read as fewer images than it holds."""
    path = _write(tmp_path / f"long{suffix}", _idx_bytes(images) + bytes(3))
    with pytest.raises(
        DataError, match=rf"long{suffix}: trailing data: shape \(5, 6, 7\) needs 210 bytes of data, found 213"
    ):
        read_idx(path)


def test_idx_pixels_are_read_as_the_service_reads_the_same_levels_in_a_png(
    tmp_path: Path, images: np.ndarray
) -> None:
    """The service divides an upload's 8-bit levels by 255: IDX levels are scaled the same way, so that a
    model sees the same values in training and in serving (255 is 1.0 in both)."""
    from service.imaging import read_pixels
    from service.model_card import InputSpec

    images[0, 0, :2] = [0, 255]
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images))
    dataset = load_dataset("idx", tmp_path)
    spec = InputSpec(channels=1, height=6, width=7, foreground="light")
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(read_pixels(buffer.getvalue(), spec))
    np.testing.assert_array_equal(dataset.images, np.stack(pngs).transpose(0, 3, 1, 2))
    assert dataset.images[0, 0, 0, :2].tolist() == [0.0, 1.0]


def test_read_idx_rejects_truncated_header_and_gzip(tmp_path: Path, images: np.ndarray) -> None:
    with pytest.raises(DataError, match="the header alone needs 16"):
        read_idx(_write(tmp_path / "h", _idx_bytes(images)[:9]))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(_idx_bytes(images))[:-12])
    with pytest.raises(DataError, match="broken.gz: cannot read"):
        read_idx(broken)
    # A deflate block of the reserved type (bits 1-2 of the byte after gzip's 10-byte header): zlib's own
    # error, which is not an OSError.
    corrupt = bytearray(gzip.compress(_idx_bytes(images)))
    corrupt[10] |= 0b110
    (tmp_path / "corrupt.gz").write_bytes(corrupt)
    with pytest.raises(
        DataError, match=r"corrupt.gz: cannot read \(Error -3 while decompressing data: invalid block type\)"
    ):
        read_idx(tmp_path / "corrupt.gz")


def test_idx_directory_uses_its_test_file(tmp_path: Path, images: np.ndarray) -> None:
    _write(tmp_path / "train-images-idx3-ubyte.gz", _idx_bytes(np.tile(images, (4, 1, 1))))
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.arange(20) % 10))
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(images[:3]))
    dataset = load_dataset("idx", tmp_path)
    assert dataset.images.shape == (20, 1, 6, 7) and dataset.images.dtype == np.float32
    assert dataset.images.max() <= 1.0 and dataset.labels is not None
    train, val, test = split_dataset(dataset, seed=0)
    assert len(test.images) == 3 and test.labels is None
    assert len(train.images) + len(val.images) == 20


def test_idx_directory_with_a_file_plain_and_gzipped_reads_the_plain_one_and_says_so(
    tmp_path: Path, images: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.tile(images, (4, 1, 1))))
    _write(tmp_path / "train-images-idx3-ubyte.gz", _idx_bytes(images))
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset("idx", tmp_path)
    assert len(dataset.images) == 20
    assert (
        "train-images-idx3-ubyte and train-images-idx3-ubyte.gz both exist: reading train-images-idx3-ubyte"
        in (caplog.text)
    )


def test_idx_directory_reports_the_files_it_does_not_read(
    tmp_path: Path, images: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """A test file under another name (Kaggle's MNIST spells it `t10k-images.idx3-ubyte`) is not read, and the
    test split is then a fifth of the training images: said, with the names read, not left to be noticed."""
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.tile(images, (4, 1, 1))))
    _write(tmp_path / "t10k-images.idx3-ubyte", _idx_bytes(images[:3]))
    (tmp_path / "README").write_text("MNIST")
    (tmp_path / "t10k-labels-idx1-ubyte").mkdir()  # Kaggle's archive also unpacks into directories
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset("idx", tmp_path)
    assert dataset.test is None
    assert (
        f"{tmp_path}: skipped 3 entries that are not files of the IDX names (train-images-idx3-ubyte, "
        "t10k-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-labels-idx1-ubyte, each may end in .gz): "
        "README, t10k-images.idx3-ubyte, t10k-labels-idx1-ubyte"
    ) in caplog.text


def test_idx_directory_lists_expected_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected train-images-idx3-ubyte or train-images-idx3-ubyte\.gz"):
        load_dataset("idx", tmp_path)


def test_idx_labels_must_match_images(tmp_path: Path, images: np.ndarray) -> None:
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images))
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.arange(4)))
    with pytest.raises(DataError, match="4 labels for 5 images"):
        load_dataset("idx", tmp_path)


def test_idx_test_labels_without_test_images_are_refused(tmp_path: Path, images: np.ndarray) -> None:
    """The test images missing or misnamed: the labels would otherwise go unread without a word."""
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images))
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.arange(3)))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte\.gz: test labels without test images; expected"
    ):
        load_dataset("idx", tmp_path)


def test_digits_is_the_embedded_default() -> None:
    dataset = load_dataset("digits")
    assert dataset.images.shape == (1797, 1, 8, 8)
    assert float(dataset.images.min()) == 0.0 and float(dataset.images.max()) == 1.0
    assert dataset.labels is not None and set(dataset.labels.tolist()) == set(range(10))


def test_split_is_seeded_disjoint_and_complete() -> None:
    dataset = load_dataset("digits")
    a = split_dataset(dataset, seed=0)
    b = split_dataset(dataset, seed=0)
    c = split_dataset(dataset, seed=1)
    for part_a, part_b in zip(a, b, strict=True):
        np.testing.assert_array_equal(part_a.images, part_b.images)
    assert not np.array_equal(a[2].images, c[2].images)
    rows = {row.tobytes() for part in a for row in part.images}
    everything = {row.tobytes() for row in dataset.images}
    assert rows == everything  # nothing lost (digits has a few duplicate images, hence sets)
    assert [len(p.images) for p in a] == [1258, 180, 359]


@pytest.mark.parametrize("own_test", [False, True], ids=["split", "idx-test-file"])
def test_a_test_split_of_one_image_is_refused(own_test: bool) -> None:
    """Its active units (a variance over the test images) would be undefined, and its metrics one image's."""
    images = np.zeros((12, 1, 4, 4), dtype=np.float32)
    test = Split(images[:1], None) if own_test else None
    dataset = Dataset("idx", "data", images[:11] if own_test else images[:5], None, "0", test=test)
    with pytest.raises(DataError, match=r"data: the test split would hold 1 image; it needs at least 2"):
        split_dataset(dataset, seed=0, val_fraction=0.2, test_fraction=0.2)


def test_folder_reads_modes_resizes_and_labels_by_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for label, mode in [("cats", "RGB"), ("dogs", "LA")]:
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new(mode, (20, 13), color=(200, 10, 10) if mode == "RGB" else (200, 255)).save(
                tmp_path / label / f"{i}.png"
            )
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset("folder", tmp_path, image_size=10, channels=3)
    assert dataset.images.shape == (6, 3, 10, 10)
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "skipped 1 files that are not images by extension: notes.txt" in caplog.text


def test_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no image files"):
        load_dataset("folder", tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        load_dataset("folder", tmp_path)
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset("folder", tmp_path / "missing")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("idx")


def test_folder_reads_pixels_as_the_service_reads_uploads(tmp_path: Path) -> None:
    """Training and serving see the same pixels: the service's decoder and resizer read the folder."""
    from service.imaging import read_pixels, to_model
    from service.model_card import InputSpec

    levels = np.linspace(0, 65535, 12 * 12).reshape(12, 12).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "a-16bit.png")
    # White strokes, transparent elsewhere (the hidden colour is white too): the background shows.
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[4:8, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "b-alpha.png")
    dataset = load_dataset("folder", tmp_path, image_size=6, channels=1)
    spec = InputSpec(channels=1, height=6, width=6, foreground="light")
    served = to_model(
        [read_pixels((tmp_path / name).read_bytes(), spec) for name in ("a-16bit.png", "b-alpha.png")], spec
    )
    np.testing.assert_array_equal(dataset.images, served)
    # 16-bit levels are scaled, not clipped to white; the transparent rows are the dark background.
    assert dataset.images[0].min() < 0.1 and 0.45 < dataset.images[0].mean() < 0.55
    assert dataset.images[1, 0, 0].max() == 0.0 and dataset.images[1, 0, 3].min() == 1.0
    dark = load_dataset("folder", tmp_path, image_size=6, channels=1, foreground="dark")
    assert dark.images[1, 0, 0].min() == 1.0  # dark strokes on light paper: transparency is the paper


def test_folder_reports_links_it_does_not_follow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "digits").mkdir(parents=True)
    Image.new("L", (8, 8), 128).save(data / "digits" / "0.png")
    (tmp_path / "elsewhere").mkdir()
    Image.new("L", (8, 8), 7).save(tmp_path / "elsewhere" / "1.png")
    (data / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "dead.png").symlink_to(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset("folder", data, image_size=8)
    assert len(dataset.images) == 1
    assert "skipped 2 entries that are neither files nor directories" in caplog.text
    assert "dead.png, linked" in caplog.text


def test_idx_errors_name_the_shape(tmp_path: Path, images: np.ndarray) -> None:
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images))
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros((5, 1))))
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte: expected 1 dimension \(N labels\), found shape \(5, 1\)"
    ):
        load_dataset("idx", tmp_path)
    # Dimensions whose product overflows 64 bits are read exactly, and the file is short of them.
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 65536, 65536, 65536)
    _write(tmp_path / "train-images-idx3-ubyte", header + bytes(10))
    with pytest.raises(DataError, match=f"needs {65536**3} bytes of data, found 10"):
        load_dataset("idx", tmp_path)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((4, 0, 0))))
    with pytest.raises(DataError, match=r"holds no pixels \(shape \(4, 0, 0\)\)"):
        load_dataset("idx", tmp_path)


def test_a_folder_is_fingerprinted_by_its_files_not_by_resampled_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resizing is a matrix product whose last bits vary with the CPU's BLAS: a checkpoint trained on one
    machine must still find its data on another."""
    import training.data

    for i in range(3):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    here = load_dataset("folder", tmp_path, image_size=5)
    resize = training.data.to_model

    def another_blas(*args: Any, **kwargs: Any) -> np.ndarray:
        return np.nextafter(resize(*args, **kwargs), np.float32(2.0))

    monkeypatch.setattr(training.data, "to_model", another_blas)
    elsewhere = load_dataset("folder", tmp_path, image_size=5)
    assert not np.array_equal(here.images, elsewhere.images) and here.sha256 == elsewhere.sha256
    Image.fromarray(np.full((12, 12), 7, np.uint8)).save(tmp_path / "1.png")
    assert load_dataset("folder", tmp_path, image_size=5).sha256 != here.sha256


def test_a_folder_fingerprint_changes_when_a_file_is_renamed_or_moved(tmp_path: Path) -> None:
    """The same bytes in the same order under other names are other data: a file moved to another
    sub-directory has another label, so evaluate and export must refuse the checkpoint as for changed
    pixels."""
    for label, name, level in [("a", "0.png", 0), ("a", "1.png", 100), ("b", "2.png", 200)]:
        (tmp_path / label).mkdir(exist_ok=True)
        Image.new("L", (8, 8), level).save(tmp_path / label / name)
    before = load_dataset("folder", tmp_path, image_size=8)
    (tmp_path / "a" / "1.png").rename(tmp_path / "b" / "1.png")
    moved = load_dataset("folder", tmp_path, image_size=8)
    np.testing.assert_array_equal(moved.images, before.images)
    assert before.labels is not None and moved.labels is not None
    assert (before.labels.tolist(), moved.labels.tolist()) == ([0, 0, 1], [0, 1, 1])
    assert moved.sha256 != before.sha256
    (tmp_path / "b" / "2.png").rename(tmp_path / "b" / "3.png")
    assert load_dataset("folder", tmp_path, image_size=8).sha256 not in (before.sha256, moved.sha256)


def test_a_folder_with_a_file_name_that_is_not_utf8_loads(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 9).save(tmp_path / os.fsdecode(b"caf\xe9.png"))
    assert len(load_dataset("folder", tmp_path, image_size=8).images) == 1
