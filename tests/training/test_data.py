"""Dataset loaders: image folders, .npz files and the fixed MNIST split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import TrainConfig
from training.data import (
    DatasetError,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_npz,
    mnist_split_indices,
)


def _write_images(root: Path) -> None:
    """Five readable images in two class folders (one nested deeper), one corrupt file, one text file."""
    (root / "cats" / "nested").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("L", (28, 28), color=255).save(root / "cats" / "white.png")
    Image.new("RGB", (40, 30), color=(255, 0, 0)).save(root / "cats" / "nested" / "red.jpg")
    Image.new("RGBA", (8, 8), color=(0, 0, 0, 255)).save(root / "dogs" / "black.PNG")
    Image.new("L", (100, 60), color=51).save(root / "dogs" / "gray.webp", lossless=True)
    Image.new("P", (12, 12), color=0).save(root / "dogs" / "palette.png")
    (root / "dogs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "dogs" / "notes.txt").write_text("not an image")


def test_image_folder_grayscale_resizes_skips_and_labels(tmp_path: Path) -> None:
    _write_images(tmp_path)
    loaded = load_image_folder(tmp_path, (1, 28, 28))
    assert loaded.images.shape == (5, 1, 28, 28)
    assert loaded.images.dtype == np.float32
    assert loaded.skipped_files == 1
    # Sorted paths: cats/nested/red.jpg, cats/white.png, dogs/black.PNG, dogs/gray.webp, dogs/palette.png
    assert loaded.labels is not None
    assert loaded.labels.tolist() == [0, 0, 1, 1, 1] and loaded.label_names == ("cats", "dogs")
    means = loaded.images.mean(axis=(1, 2, 3))
    assert means[1] == 1.0
    assert means[2] == 0.0
    assert means[3] == pytest.approx(51 / 255, abs=1e-6)
    assert means[0] == pytest.approx(76 / 255, abs=2 / 255)  # PIL luma of pure red (JPEG, so approximately)


def test_image_folder_rgb(tmp_path: Path) -> None:
    _write_images(tmp_path)
    loaded = load_image_folder(tmp_path, (3, 8, 12))
    assert loaded.images.shape == (5, 3, 8, 12)
    np.testing.assert_allclose(loaded.images[1], 1.0)
    np.testing.assert_allclose(loaded.images[3], 51 / 255, atol=1e-6)


def test_image_folder_without_subfolders_is_unlabelled(tmp_path: Path) -> None:
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    loaded = load_image_folder(tmp_path, (1, 4, 4))
    assert loaded.labels is None
    assert loaded.skipped_files == 0


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path, (1, 28, 28))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="skipped 1"):
        load_image_folder(tmp_path, (1, 28, 28))


def test_folder_dataset_is_split_three_ways(tmp_path: Path) -> None:
    for index in range(20):
        Image.new("L", (28, 28), color=index).save(tmp_path / f"{index:02d}.png")
    config = TrainConfig(dataset=str(tmp_path), validation_fraction=0.1, test_fraction=0.2)
    splits = load_dataset(config)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (14, 2, 4)
    everything = np.concatenate([splits.train.images, splits.validation.images, splits.test.images])
    assert sorted(np.rint(everything.mean(axis=(1, 2, 3)) * 255).astype(int).tolist()) == list(range(20))
    assert splits.name == tmp_path.name


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((3, 4, 8), (3, 1, 4, 8)),
        ((3, 1, 4, 8), (3, 1, 4, 8)),
        ((3, 4, 8, 1), (3, 1, 4, 8)),
        ((3, 3, 4, 8), (3, 3, 4, 8)),
    ],
)
def test_npz_layouts_uint8(tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    images = np.full(shape, 255, dtype=np.uint8)
    images[0] = 0
    np.savez(tmp_path / "data.npz", images=images, labels=np.array([7, 8, 9]))
    loaded = load_npz(tmp_path / "data.npz", expected[1:])  # type: ignore[arg-type]
    assert loaded.images.shape == expected
    assert loaded.images.dtype == np.float32
    assert loaded.images[0].max() == 0.0
    assert loaded.images[1].min() == 1.0
    assert loaded.labels is not None
    # Labels are renumbered 0..L-1 in sorted order; their values become the label names.
    assert loaded.labels.tolist() == [0, 1, 2] and loaded.label_names == ("7", "8", "9")


def test_npz_float_images_are_resized_and_unlabelled(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", images=np.full((2, 8, 8), 0.5, dtype=np.float64))
    loaded = load_npz(tmp_path / "data.npz", (1, 4, 4))
    assert loaded.images.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(loaded.images, 128 / 255)  # resizing goes through 8-bit PIL images
    assert loaded.labels is None


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "no_images.npz", pixels=np.zeros((2, 4, 4)))
    with pytest.raises(DatasetError, match="no 'images' array"):
        load_npz(tmp_path / "no_images.npz", (1, 4, 4))
    np.savez(tmp_path / "range.npz", images=np.full((2, 4, 4), 255.0))
    with pytest.raises(DatasetError, match=r"must lie in \[0, 1\]"):
        load_npz(tmp_path / "range.npz", (1, 4, 4))
    np.savez(tmp_path / "layout.npz", images=np.zeros((2, 5, 4, 4)))
    with pytest.raises(DatasetError, match="must be"):
        load_npz(tmp_path / "layout.npz", (1, 4, 4))


def test_mnist_split_rule() -> None:
    mnist = load_mnist()
    assert mnist.images.shape == (5000, 1, 28, 28)
    assert mnist.images.dtype == np.float32
    assert mnist.images.min() == 0.0
    assert mnist.images.max() == 1.0
    assert mnist.labels is not None
    indices = mnist_split_indices(mnist.labels, validation_size=500, split_seed=0)
    assert (len(indices["train"]), len(indices["validation"]), len(indices["test"])) == (4000, 500, 500)
    # The file is sorted by class, 500 per class: the test split is the last 50 of each block of 500.
    expected_test = [c * 500 + i for c in range(10) for i in range(450, 500)]
    assert indices["test"].tolist() == expected_test
    assert np.bincount(mnist.labels[indices["test"]]).tolist() == [50] * 10
    together = np.concatenate(list(indices.values()))
    assert len(np.unique(together)) == 5000
    # Fixed and seeded: the same seed gives the same validation split, another seed a different one.
    again = mnist_split_indices(mnist.labels, validation_size=500, split_seed=0)
    assert again["validation"].tolist() == indices["validation"].tolist()
    other = mnist_split_indices(mnist.labels, validation_size=500, split_seed=1)
    assert other["validation"].tolist() != indices["validation"].tolist()
    assert other["test"].tolist() == expected_test


def test_mnist_dataset_sizes_and_subset() -> None:
    splits = load_dataset(TrainConfig(validation_size=300, max_train_images=100))
    assert (splits.name, len(splits.train), len(splits.validation), len(splits.test)) == (
        "mnist",
        100,
        300,
        500,
    )
    assert splits.test.labels is not None
    assert splits.test.labels.tolist() == [c for c in range(10) for _ in range(50)]
    assert splits.label_names == tuple("0123456789")
    with pytest.raises(DatasetError, match="mnist images are"):
        load_dataset(TrainConfig(image_shape=(1, 32, 32)))
