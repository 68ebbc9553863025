"""`vae-compare`: the seed's story measured. PCA -> autoencoder -> VAE on the same split and latent size.

Trains the three kinds with `vae-train --model pca|ae|vae`, then measures what each exported
model directory serves (through onnxruntime, as the service runs it) with one digit classifier
(training/sample_quality.py):

- reconstruction MSE per pixel on the test split;
- samples from N(0, I) and from the fitted mixture prior: share the classifier is confident about, the
  spread of the class histogram, and the Frechet distance to the test digits in the classifier's features;
- interpolation: the share of confident midpoints between test digits of different labels;
- latent regularity: how far decoded N(0, I) draws fall from the nearest real test digit (RMSE per pixel).

Writes comparison.json, comparison.md (the table) and one picture per model (reconstructions, N(0, I)
samples, mixture samples, an interpolation), and can copy the PCA and autoencoder models for shipping.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from PIL import Image

from model.latent_space import LatentSpace, load_latent_space, sample_standard
from model.manifest import Manifest, load_model_dir
from training.cli import train_main
from training.config import TrainConfig
from training.data import DataSplits, load_dataset
from training.latent_space import decode_all
from training.sample_quality import CONFIDENCE_THRESHOLD, Judge, judge_samples, train_judge

KINDS = ("pca", "ae", "vae")
DEFAULT_CONFIG = Path("training/configs/mnist.toml")
INTERPOLATION_PAIRS = 500
REGULARITY_SAMPLES = 500
PICTURE_COLUMNS = 8
PICTURE_SCALE = 2


@dataclass
class ServedModel:
    """An exported model directory as onnxruntime runs it, with its latent-space description."""

    manifest: Manifest
    space: LatentSpace
    encoder: onnxruntime.InferenceSession
    decoder: onnxruntime.InferenceSession

    @classmethod
    def open(cls, model_dir: Path) -> ServedModel:
        manifest, paths = load_model_dir(model_dir)
        space = load_latent_space(paths["latent_space"], manifest.latent_dim)
        providers = ["CPUExecutionProvider"]
        encoder = onnxruntime.InferenceSession(str(paths["encoder"]), providers=providers)
        decoder = onnxruntime.InferenceSession(str(paths["decoder"]), providers=providers)
        return cls(manifest, space, encoder, decoder)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Posterior means (N, latent_dim) of images (N, C, H, W)."""
        tensors = self.manifest.tensors
        (mean,) = self.encoder.run([tensors.encoder_mean], {tensors.encoder_input: images})
        return np.asarray(mean)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W) in [0, 1] of latents (N, latent_dim)."""
        tensors = self.manifest.tensors
        latents = latents.astype(np.float32)
        (images,) = self.decoder.run([tensors.decoder_output], {tensors.decoder_input: latents})
        return np.asarray(images)


def interpolation_confidence(model: ServedModel, judge: Judge, splits: DataSplits, seed: int) -> float:
    """Share of confident midpoints of straight lines between test digits with different labels."""
    assert splits.test.labels is not None
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(splits.test), INTERPOLATION_PAIRS * 2)
    second = rng.integers(0, len(splits.test), INTERPOLATION_PAIRS * 2)
    keep = splits.test.labels[first] != splits.test.labels[second]
    first, second = first[keep][:INTERPOLATION_PAIRS], second[keep][:INTERPOLATION_PAIRS]
    codes = model.encode(splits.test.images)
    midpoints = decode_all(model.decode, 0.5 * (codes[first] + codes[second]))
    probabilities, _ = judge(midpoints)
    return float((probabilities.max(axis=1) > CONFIDENCE_THRESHOLD).mean())


def nearest_digit_rmse(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the RMSE per pixel to the closest reference image: (N, ...) against (M, ...)."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    targets = reference.reshape(len(reference), -1).astype(np.float64)
    squared = (flat**2).sum(1)[:, None] - 2 * flat @ targets.T + (targets**2).sum(1)[None, :]
    return float(np.sqrt(np.maximum(squared.min(axis=1), 0) / flat.shape[1]).mean())


def measure(
    model: ServedModel, judge: Judge, reference_features: np.ndarray, splits: DataSplits, seed: int
) -> dict[str, Any]:
    """The comparison row of one model (see the module docstring); reference_features: the judge's
    features of the test split."""
    rng = np.random.default_rng(seed)
    latent_dim = model.manifest.latent_dim
    assert model.space.prior is not None
    draws = {
        "standard": sample_standard(rng, 1000, latent_dim, 1.0),
        "gmm": model.space.prior.sample(np.random.default_rng(seed), 1000, 1.0),
    }
    samples = {name: decode_all(model.decode, latents) for name, latents in draws.items()}
    priors = {name: judge_samples(judge, images, reference_features) for name, images in samples.items()}
    for values in priors.values():
        histogram = values.pop("class_histogram")
        values["class_share_range"] = [min(histogram), max(histogram)]
    return {
        "model_kind": model.manifest.model_kind,
        "reconstruction_mse": model.manifest.test_metrics["reconstruction_mse"],
        "pca_mse": model.manifest.test_metrics["pca_mse"],
        "priors": priors,
        "interpolation_confident_share": interpolation_confidence(model, judge, splits, seed),
        "standard_nearest_digit_rmse": nearest_digit_rmse(
            samples["standard"][:REGULARITY_SAMPLES], splits.test.images
        ),
        "test_reconstruction_nearest_digit_rmse": nearest_digit_rmse(
            decode_all(model.decode, model.encode(splits.test.images[:REGULARITY_SAMPLES])),
            splits.test.images,
        ),
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    """comparison.md: one row per model kind."""
    lines = [
        "| model | reconstruction MSE | N(0, I): confident, FD | mixture prior: confident, FD "
        "| confident midpoints | N(0, I) draw to nearest digit (RMSE) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"pca": "PCA", "ae": "autoencoder", "vae": "VAE"}
    for kind, row in rows.items():
        standard, mixture = row["priors"]["standard"], row["priors"]["gmm"]
        lines.append(
            f"| {names[kind]} | {row['reconstruction_mse']:.4f} "
            f"| {standard['confident_share']:.1%}, {standard['frechet_distance']:.1f} "
            f"| {mixture['confident_share']:.1%}, {mixture['frechet_distance']:.1f} "
            f"| {row['interpolation_confident_share']:.1%} | {row['standard_nearest_digit_rmse']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def picture(model: ServedModel, splits: DataSplits, seed: int) -> Image.Image:
    """Four rows: reconstructions of the first test digit of each label 0..7, N(0, I) samples, mixture
    samples, and the straight line from the first test 2 to the first test 7."""
    columns = PICTURE_COLUMNS
    latent_dim = model.manifest.latent_dim
    assert model.space.prior is not None and splits.test.labels is not None
    firsts = [int(np.flatnonzero(splits.test.labels == label)[0]) for label in range(columns)]
    codes = model.encode(splits.test.images[firsts])
    weights = np.linspace(0, 1, columns)[:, None]
    end = model.encode(splits.test.images[[int(np.flatnonzero(splits.test.labels == 7)[0])]])[0]
    rows = [
        model.decode(codes),
        model.decode(sample_standard(np.random.default_rng(seed), columns, latent_dim, 1.0)),
        model.decode(model.space.prior.sample(np.random.default_rng(seed), columns, 1.0)),
        model.decode((1 - weights) * codes[2] + weights * end),
    ]
    _, channels, height, width = rows[0].shape
    grid = np.ones((channels, len(rows) * (height + 2), columns * (width + 2)), dtype=np.float32)
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            top, left = row_index * (height + 2) + 1, column * (width + 2) + 1
            grid[:, top : top + height, left : left + width] = image
    pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    mode = "L" if channels == 1 else "RGB"
    grid_image = Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0), mode)
    size = (grid_image.width * PICTURE_SCALE, grid_image.height * PICTURE_SCALE)
    return grid_image.resize(size, Image.Resampling.NEAREST)


def train_all(config: Path, out_dir: Path, train_flags: list[str], reuse_vae: Path | None) -> bool:
    """Run `vae-train --model K` for each kind, one after the other (each uses both cores); with reuse_vae,
    copy that exported VAE instead of training the third. False when a run failed."""
    for kind in KINDS:
        run_dir = out_dir / kind
        if kind == "vae" and reuse_vae is not None:
            if reuse_vae.resolve() == (run_dir / "model").resolve():
                continue  # already in place
            shutil.rmtree(run_dir / "model", ignore_errors=True)
            shutil.copytree(reuse_vae, run_dir / "model")
            print(f"--- the VAE: {reuse_vae}, not trained again", file=sys.stderr)
            continue
        flags = ["--config", str(config), "--model", kind, "--model-name", f"mnist-{kind}"]
        flags += ["--run-dir", str(run_dir), "--export-dir", str(run_dir / "model"), *train_flags]
        print(f"--- vae-train --model {kind}", file=sys.stderr)
        status = train_main(flags)
        if status != 0:
            print(f"vae-train --model {kind} exited {status}; no comparison", file=sys.stderr)
            return False
    return True


def compare_main(argv: list[str] | None = None) -> int:
    """`vae-compare`: train PCA, an autoencoder and a VAE on one split; measure and picture what they serve.

    Arguments it does not know go to every `vae-train` run (e.g. --max-train-images 200 --epochs 2).
    """
    parser = argparse.ArgumentParser(prog="vae-compare", description=compare_main.__doc__)
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="the vae-train recipe of all three"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare"), help="runs, table, pictures")
    parser.add_argument("--ship-dir", type=Path, help="copy the PCA and autoencoder models here")
    parser.add_argument(
        "--docs-dir", type=Path, help="also write comparison.md and images/compare-*.png here"
    )
    parser.add_argument(
        "--reuse-vae",
        type=Path,
        help="an exported VAE of this very recipe (e.g. model/default) to measure instead of training one",
    )
    arguments, train_flags = parser.parse_known_args(argv)
    out_dir: Path = arguments.out_dir
    if not train_all(arguments.config, out_dir, train_flags, arguments.reuse_vae):
        return 1

    # The split every run trained on, from the recipe and the flags (as the autoencoder's run recorded them).
    config = TrainConfig.from_dict(json.loads((out_dir / "ae" / "config.json").read_text()))
    splits = load_dataset(config)
    if splits.test.labels is None:
        parser.error("the comparison's digit classifier needs a labelled dataset (MNIST)")
    reused, _ = load_model_dir(out_dir / "vae" / "model")
    if (
        reused.training_data.model_dump(exclude={"name"})
        != {key: value for key, value in splits.sizes().items() if key != "name"}
        or reused.latent_dim != config.latent_dim
    ):
        parser.error(f"the VAE in {out_dir / 'vae' / 'model'} was not trained on this split and latent size")
    judge = train_judge(splits.train, splits.test, 10, epochs=max(1, config.judge_epochs), seed=config.seed)
    models = {kind: ServedModel.open(out_dir / kind / "model") for kind in KINDS}
    _, reference_features = judge(splits.test.images)
    rows = {
        kind: measure(model, judge, reference_features, splits, config.seed) for kind, model in models.items()
    }
    report = {"judge": f"CNN digit classifier, test accuracy {judge.test_accuracy:.4f}", "models": rows}
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = table(rows)
    (out_dir / "comparison.md").write_text(markdown)
    print(markdown, file=sys.stderr)
    for target in [out_dir, *([arguments.docs_dir] if arguments.docs_dir else [])]:
        (target / "images").mkdir(parents=True, exist_ok=True)
        for kind, model in models.items():
            picture(model, splits, config.seed).save(target / "images" / f"compare-{kind}.png")
    if arguments.docs_dir:
        (arguments.docs_dir / "comparison.md").write_text(markdown)
    if arguments.ship_dir:
        for kind in ("pca", "ae"):
            destination = arguments.ship_dir / f"mnist-{kind}"
            shutil.rmtree(destination, ignore_errors=True)
            shutil.copytree(out_dir / kind / "model", destination)
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
