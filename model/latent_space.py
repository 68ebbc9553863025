"""The latent-space description of a model (`latent_space.npz`) and the numpy operations on it.

Torch-free on purpose: the exporter writes the file, the service reads it and samples, classifies, traverses
and edits with the functions here. The file holds, for a model trained on a dataset:
- the aggregate posterior's per-dimension mean and std (of the posterior means over the training split),
  and the test split's KL per dimension and variance of the posterior means (posterior-collapse diagnostics);
- a Gaussian mixture fitted to the training split's posterior means (the ex-post density prior);
- with labels: one Gaussian mixture per label and the labels' centroids;
- attribute directions: latent vectors along which one unit moves a measured image attribute by one
  standard deviation, with their effect measured on the validation split;
- a 2-D projection (PCA) of the test split's posterior means, with labels.
Arrays are float64 unless said otherwise; `D` is the latent dimension.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LATENT_SPACE_FILENAME = "latent_space.npz"
# Burda et al.: a dimension is active when the variance of its posterior means over the data exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01
_LOG_2PI = math.log(2 * math.pi)


class LatentSpaceError(Exception):
    """A latent_space.npz file is unreadable or its arrays do not fit together."""


@dataclass(frozen=True)
class GaussianMixture:
    """weights (K,) summing to 1, means (K, D), full covariances (K, D, D): a density over latent codes."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    _cholesky: np.ndarray = field(init=False, repr=False, compare=False)
    _precision_cholesky: np.ndarray = field(init=False, repr=False, compare=False)
    _log_normalizers: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or len(self.means) < 1:
            raise LatentSpaceError(f"mixture means must be (K >= 1, D), got shape {self.means.shape}")
        components, dim = self.means.shape
        if self.weights.shape != (components,) or self.covariances.shape != (components, dim, dim):
            raise LatentSpaceError(
                f"mixture arrays do not fit: weights {self.weights.shape}, means {self.means.shape}, "
                f"covariances {self.covariances.shape}"
            )
        if not all(np.isfinite(array).all() for array in (self.weights, self.means, self.covariances)):
            raise LatentSpaceError("a mixture holds NaN or infinite values")
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1.0) > 1e-6:
            raise LatentSpaceError(f"mixture weights must be >= 0 and sum to 1, got sum {self.weights.sum()}")
        try:
            cholesky = np.linalg.cholesky(self.covariances)
        except np.linalg.LinAlgError as error:
            raise LatentSpaceError(f"a mixture covariance is not positive definite: {error}") from None
        precision_cholesky = np.linalg.inv(cholesky)
        log_det = 2 * np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(axis=1)
        object.__setattr__(self, "_cholesky", cholesky)
        object.__setattr__(self, "_precision_cholesky", precision_cholesky)
        object.__setattr__(self, "_log_normalizers", np.log(self.weights) - 0.5 * (dim * _LOG_2PI + log_det))

    @property
    def components(self) -> int:
        return len(self.weights)

    def sample(self, rng: np.random.Generator, count: int, temperature: float) -> np.ndarray:
        """(count, D): component c = rng.choice(K, p=weights), then z = mean_c + T * chol(cov_c) @ eps."""
        chosen = rng.choice(self.components, size=count, p=self.weights)
        eps = rng.standard_normal((count, self.means.shape[1]))
        latents = self.means[chosen]
        for component in np.unique(chosen):  # one matrix product per component: no (count, D, D) copy
            rows = chosen == component
            latents[rows] += temperature * eps[rows] @ self._cholesky[component].T
        return latents

    def component_log_densities(self, latents: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, K): log(weight_k) + log N(z; mean_k, cov_k)."""
        centred = latents[:, None, :] - self.means[None]  # (N, K, D)
        whitened = np.einsum("kij,nkj->nki", self._precision_cholesky, centred)
        return self._log_normalizers[None] - 0.5 * np.square(whitened).sum(axis=2)

    def log_density(self, latents: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) log p(z), computed stably (log-sum-exp over components)."""
        return logsumexp(self.component_log_densities(latents), axis=1)


def logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(values))) along axis without overflow, for any magnitude of values."""
    peak = np.max(values, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(values - peak), axis=axis))


@dataclass(frozen=True)
class Attribute:
    """A latent direction (D,) along which one unit moves `name` by one standard deviation (`std`).

    `effect_per_unit`: the attribute's mean change, in standard deviations, per unit of the direction when
    validation images are edited and decoded (1 would be exact); `monotonic_fraction`: the share of them
    whose attribute rises monotonically over amounts -2, -1, 0, 1, 2.
    """

    name: str
    description: str
    direction: np.ndarray
    mean: float
    std: float
    effect_per_unit: float
    monotonic_fraction: float


@dataclass(frozen=True)
class LatentSpace:
    """Everything in latent_space.npz; see the module docstring. Labels are strings (MNIST: "0".."9")."""

    aggregate_mean: np.ndarray  # (D,)
    aggregate_std: np.ndarray  # (D,)
    test_kl_per_dim: np.ndarray  # (D,) nats
    test_mean_variance: np.ndarray  # (D,) variance of the test split's posterior means
    prior: GaussianMixture | None
    labels: tuple[str, ...] = ()
    label_frequencies: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (L,) in the training split
    class_densities: tuple[GaussianMixture, ...] = ()
    class_centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (L, D)
    attributes: tuple[Attribute, ...] = ()
    projection_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (D,)
    projection_components: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))  # (2, D)
    projection_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (T, 2) float32
    projection_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (T,) -1: none
    info: dict[str, Any] = field(default_factory=dict)  # how things were fitted and chosen (JSON)

    @property
    def latent_dim(self) -> int:
        return len(self.aggregate_mean)

    @property
    def active_dims(self) -> list[int]:
        """Active dimensions (test variance of the means > ACTIVE_UNIT_THRESHOLD), highest KL first."""
        active = np.flatnonzero(self.test_mean_variance > ACTIVE_UNIT_THRESHOLD)
        return [int(d) for d in active[np.argsort(-self.test_kl_per_dim[active], kind="stable")]]

    @property
    def attribute_names(self) -> list[str]:
        return [attribute.name for attribute in self.attributes]

    def attribute(self, name: str) -> Attribute | None:
        return next((attribute for attribute in self.attributes if attribute.name == name), None)

    def label_index(self, label: str) -> int | None:
        return self.labels.index(label) if label in self.labels else None

    def classify(self, latents: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, L) posterior probabilities of each label under the class-conditional densities."""
        log_joint = np.stack(
            [
                np.log(frequency) + density.log_density(latents)
                for frequency, density in zip(self.label_frequencies, self.class_densities, strict=True)
            ],
            axis=1,
        )
        return np.exp(log_joint - logsumexp(log_joint, axis=1)[:, None])


def sample_standard(rng: np.random.Generator, count: int, latent_dim: int, temperature: float) -> np.ndarray:
    """(count, D) from N(0, T^2 I): rng.standard_normal((count, D)) * T."""
    return rng.standard_normal((count, latent_dim)) * temperature


def traversal(
    latent: np.ndarray, dims: Sequence[int], span: float, steps: int, std: np.ndarray
) -> np.ndarray:
    """(len(dims) * steps, D): row r moves dimension dims[r] of `latent` (D,) over linspace(-span, span,
    steps) * std[dims[r]] around its value, all other dimensions fixed; rows one after another.
    """
    offsets = np.linspace(-span, span, steps)
    frames = np.repeat(latent[None].astype(np.float64), len(dims) * steps, axis=0)
    for row, dim in enumerate(dims):
        frames[row * steps : (row + 1) * steps, dim] += offsets * std[dim]
    return frames


def edit(latent: np.ndarray, direction: np.ndarray, amounts: Sequence[float]) -> np.ndarray:
    """(len(amounts), D): latent + amount * direction for each amount; amount 0 gives latent unchanged."""
    return latent[None].astype(np.float64) + np.asarray(amounts, dtype=np.float64)[:, None] * direction[None]


# --- the file ---------------------------------------------------------------------------------------------

_ATTRIBUTE_FIELDS = ("mean", "std", "effect_per_unit", "monotonic_fraction")


def _mixture_arrays(prefix: str, mixture: GaussianMixture) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_weights": mixture.weights,
        f"{prefix}_means": mixture.means,
        f"{prefix}_covariances": mixture.covariances,
    }


def save_latent_space(path: Path, space: LatentSpace) -> None:
    """Write the description as an uncompressed .npz of plain arrays (strings as unicode, no pickles)."""
    arrays: dict[str, np.ndarray] = {
        "aggregate_mean": space.aggregate_mean,
        "aggregate_std": space.aggregate_std,
        "test_kl_per_dim": space.test_kl_per_dim,
        "test_mean_variance": space.test_mean_variance,
        "labels": np.array(space.labels, dtype=np.str_),
        "label_frequencies": space.label_frequencies,
        "class_centroids": space.class_centroids,
        "attribute_names": np.array(space.attribute_names, dtype=np.str_),
        "attribute_descriptions": np.array([a.description for a in space.attributes], dtype=np.str_),
        "attribute_directions": np.array([a.direction for a in space.attributes]).reshape(
            len(space.attributes), space.latent_dim
        ),
        "projection_mean": space.projection_mean,
        "projection_components": space.projection_components,
        "projection_points": space.projection_points,
        "projection_labels": space.projection_labels,
        "info": np.array(json.dumps(space.info, sort_keys=True)),
    }
    for name in _ATTRIBUTE_FIELDS:
        arrays[f"attribute_{name}"] = np.array([getattr(a, name) for a in space.attributes], dtype=np.float64)
    if space.prior is not None:
        arrays.update(_mixture_arrays("prior", space.prior))
    for index, density in enumerate(space.class_densities):
        arrays.update(_mixture_arrays(f"class{index}", density))
    with path.open("wb") as stream:
        np.savez(stream, allow_pickle=False, **arrays)


def _mixture(arrays: dict[str, np.ndarray], prefix: str) -> GaussianMixture:
    return GaussianMixture(
        weights=arrays[f"{prefix}_weights"],
        means=arrays[f"{prefix}_means"],
        covariances=arrays[f"{prefix}_covariances"],
    )


def load_latent_space(path: Path, latent_dim: int) -> LatentSpace:
    """Read latent_space.npz for a model with `latent_dim` latents; LatentSpaceError says what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise LatentSpaceError(f"cannot read {path.name} as .npz: {error}") from None
    try:
        labels = tuple(str(label) for label in arrays["labels"])
        names = [str(name) for name in arrays["attribute_names"]]
        attributes = tuple(
            Attribute(
                name=name,
                description=str(arrays["attribute_descriptions"][index]),
                direction=arrays["attribute_directions"][index],
                **{key: float(arrays[f"attribute_{key}"][index]) for key in _ATTRIBUTE_FIELDS},
            )
            for index, name in enumerate(names)
        )
        space = LatentSpace(
            aggregate_mean=arrays["aggregate_mean"],
            aggregate_std=arrays["aggregate_std"],
            test_kl_per_dim=arrays["test_kl_per_dim"],
            test_mean_variance=arrays["test_mean_variance"],
            prior=_mixture(arrays, "prior") if "prior_weights" in arrays else None,
            labels=labels,
            label_frequencies=arrays["label_frequencies"],
            class_densities=tuple(_mixture(arrays, f"class{index}") for index in range(len(labels))),
            class_centroids=arrays["class_centroids"],
            attributes=attributes,
            projection_mean=arrays["projection_mean"],
            projection_components=arrays["projection_components"],
            projection_points=arrays["projection_points"],
            projection_labels=arrays["projection_labels"],
            info=json.loads(str(arrays["info"])),
        )
    except KeyError as error:
        raise LatentSpaceError(f"{path.name} lacks the array {error}") from None
    except (ValueError, IndexError, TypeError, zipfile.BadZipFile, EOFError) as error:
        raise LatentSpaceError(f"{path.name} holds arrays that do not fit together: {error}") from None
    _check_dims(space, latent_dim, path.name)
    return space


def _check_dims(space: LatentSpace, latent_dim: int, name: str) -> None:
    """Every array's latent axis must be latent_dim long, and per-label arrays one row per label."""
    vectors = {
        "aggregate_mean": space.aggregate_mean,
        "aggregate_std": space.aggregate_std,
        "test_kl_per_dim": space.test_kl_per_dim,
        "test_mean_variance": space.test_mean_variance,
        **{f"attribute {a.name!r}": a.direction for a in space.attributes},
    }
    mixtures = [m for m in (space.prior, *space.class_densities) if m is not None]
    wrong = [key for key, vector in vectors.items() if vector.shape != (latent_dim,)]
    wrong += [f"{key} (not finite)" for key, vector in vectors.items() if not np.isfinite(vector).all()]
    wrong += ["a mixture" for mixture in mixtures if mixture.means.shape[1] != latent_dim]
    if space.labels and space.class_centroids.shape != (len(space.labels), latent_dim):
        wrong.append("class_centroids")
    if space.label_frequencies.shape != (len(space.labels),):
        wrong.append("label_frequencies")
    if len(space.projection_points) and space.projection_components.shape != (2, latent_dim):
        wrong.append("projection_components")
    if len(space.projection_points) != len(space.projection_labels):
        wrong.append("projection_labels")
    if wrong:
        raise LatentSpaceError(f"{name} does not fit a model with {latent_dim} latents: {', '.join(wrong)}")
