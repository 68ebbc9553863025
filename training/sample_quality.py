"""Sample quality of a model's priors, judged by a small classifier of our own trained on the training split.

For labelled data (MNIST digits) a small CNN is trained on the training split; its softmax says how
confidently a sample reads as one class, the class histogram shows whether a prior covers every class,
and the Frechet distance between Gaussians fitted to its penultimate features (as FID does with Inception
features) compares samples with the real test images. The same measures judge class-conditional samples
(share classified as the requested label) and label edits (share classified as the target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.latent_space import LatentSpace, edit, sample_standard
from training.attributes import attributes_for
from training.data import Split
from training.latent_space import (
    DecodeFunction,
    EncodeFunction,
    decode_all,
    encode_split,
    measure_edit_effect,
)

CONFIDENCE_THRESHOLD = 0.9
SAMPLES_PER_PRIOR = 1000
SAMPLES_PER_LABEL = 200
FEATURE_DIM = 128
_BATCH_SIZE = 256


class DigitClassifier(nn.Module):
    """Two conv stages and a FEATURE_DIM feature layer; images (N, C, H, W) in [0, 1] -> class logits."""

    def __init__(self, image_shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@dataclass(frozen=True)
class Judge:
    """A trained classifier: class probabilities and features of images, and its test-split accuracy."""

    classifier: DigitClassifier
    test_accuracy: float

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, H, W) -> probabilities (N, classes), features (N, FEATURE_DIM), float64."""
        probabilities, features = [], []
        for start in range(0, len(images), _BATCH_SIZE):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + _BATCH_SIZE], np.float32))
            feature = self.classifier.features(batch)
            probabilities.append(F.softmax(self.classifier.head(feature), dim=1).double().numpy())
            features.append(feature.double().numpy())
        return np.concatenate(probabilities), np.concatenate(features)


def _shifted(images: Tensor, generator: torch.Generator, pixels: int = 2) -> Tensor:
    """Each image rolled by a random integer shift of at most `pixels` in x and y (zero-filled borders)."""
    padded = F.pad(images, (pixels, pixels, pixels, pixels))
    height, width = images.shape[2:]
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    return torch.stack(
        [padded[i, :, y : y + height, x : x + width] for i, (y, x) in enumerate(offsets.tolist())]
    )


def train_judge(train: Split, test: Split, classes: int, *, epochs: int = 8, seed: int = 0) -> Judge:
    """Train the classifier on the training split (random shifts), report its accuracy on the test split."""
    assert train.labels is not None and test.labels is not None
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    channels, height, width = train.images.shape[1:]
    classifier = DigitClassifier((channels, height, width), classes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    classifier.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(classifier(_shifted(images[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    judge = Judge(classifier, 0.0)
    probabilities, _ = judge(test.images)
    return Judge(classifier, float((probabilities.argmax(axis=1) == test.labels).mean()))


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two (N, F) feature sets."""
    mean_a, mean_b = features.mean(axis=0), reference.mean(axis=0)
    cov_a, cov_b = np.cov(features, rowvar=False), np.cov(reference, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)
    return float(np.square(mean_a - mean_b).sum() + np.trace(cov_a + cov_b - 2 * root))


def judge_samples(judge: Judge, images: np.ndarray, reference_features: np.ndarray) -> dict[str, Any]:
    """confident_share (max p > CONFIDENCE_THRESHOLD), class_histogram (shares), frechet_distance."""
    probabilities, features = judge(images)
    classes = probabilities.shape[1]
    histogram = np.bincount(probabilities.argmax(axis=1), minlength=classes) / len(images)
    return {
        "confident_share": float((probabilities.max(axis=1) > CONFIDENCE_THRESHOLD).mean()),
        "class_histogram": [round(float(share), 4) for share in histogram],
        "frechet_distance": frechet_distance(features, reference_features),
    }


def sample_quality(
    space: LatentSpace,
    encode: EncodeFunction,
    decode: DecodeFunction,
    judge: Judge,
    test: Split,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The model's sample-quality table: per prior, per label, label edits and attribute edits (test split).

    Priors are sampled at temperature 1 with numpy.random.default_rng(seed), exactly as GET /sample does.
    """
    assert test.labels is not None
    _, reference_features = judge(test.images)
    report: dict[str, Any] = {
        "judge": f"CNN classifier trained on the training split, test accuracy {judge.test_accuracy:.4f}",
        "samples_per_prior": SAMPLES_PER_PRIOR,
        "confidence_threshold": CONFIDENCE_THRESHOLD,
        "frechet_reference": f"the {len(test)} test images, in the classifier's {FEATURE_DIM}-d features",
    }
    priors: dict[str, np.ndarray] = {
        "standard": sample_standard(np.random.default_rng(seed), SAMPLES_PER_PRIOR, space.latent_dim, 1.0)
    }
    if space.prior is not None:
        priors["gmm"] = space.prior.sample(np.random.default_rng(seed), SAMPLES_PER_PRIOR, 1.0)
    report["priors"] = {
        name: judge_samples(judge, decode_all(decode, latents), reference_features)
        for name, latents in priors.items()
    }
    if space.class_densities:
        per_label = {}
        for index, (label, density) in enumerate(zip(space.labels, space.class_densities, strict=True)):
            latents = density.sample(np.random.default_rng(seed), SAMPLES_PER_LABEL, 1.0)
            probabilities, _ = judge(decode_all(decode, latents))
            per_label[label] = float((probabilities.argmax(axis=1) == index).mean())
        report["label_accuracy"] = {"mean": float(np.mean(list(per_label.values()))), "per_label": per_label}
        report["label_edit"] = _label_edit_accuracy(space, encode, decode, judge, test)
    report["attribute_edits"] = _attribute_edit_checks(space, encode, decode, test)
    return report


def _label_edit_accuracy(
    space: LatentSpace, encode: EncodeFunction, decode: DecodeFunction, judge: Judge, test: Split
) -> dict[str, Any]:
    """Every test image edited at amount 1 to every other label, from the label the densities find most
    probable (what POST /edit does without from_label); the share classified as the target.
    """
    means = encode_split(encode, test.images, test.labels).mean
    sources = space.classify(means).argmax(axis=1)
    frames, targets = [], []
    for latent, source in zip(means, sources, strict=True):
        for target in range(len(space.labels)):
            if target != source:
                direction = space.class_centroids[target] - space.class_centroids[source]
                frames.append(edit(latent, direction, [1.0])[0])
                targets.append(target)
    probabilities, _ = judge(decode_all(decode, np.array(frames)))
    return {
        "amount": 1.0,
        "target_accuracy": float((probabilities.argmax(axis=1) == np.array(targets)).mean()),
        "edits": len(frames),
        "source_label_accuracy": float((sources == test.labels).mean()),
    }


def _attribute_edit_checks(
    space: LatentSpace, encode: EncodeFunction, decode: DecodeFunction, test: Split
) -> dict[str, Any]:
    """Each attribute's effect on the test split: slope (std per unit) and the share monotonic over -2..2."""
    means = encode_split(encode, test.images, test.labels).mean
    measures = attributes_for(test.images.shape[1])
    checks = {}
    for attribute in space.attributes:
        measure = measures[attribute.name][0]
        slope, monotonic = measure_edit_effect(means, attribute.direction, decode, measure, attribute.std)
        checks[attribute.name] = {"effect_per_unit": slope, "monotonic_fraction": monotonic}
    return checks
