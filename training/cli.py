"""Command lines: `vae-train` (train, evaluate, plot, export) and `vae-export CHECKPOINT OUT_DIR`.

Every TrainConfig field is a flag (`latent_dim` -> `--latent-dim`); flags override the `--config` TOML file,
which overrides the defaults. Tuples are comma-separated (`--widths 32,64`).

`torchrun --nproc_per_node N -m training.cli ...` trains in N processes (training/distributed.py); rank 0
then evaluates, plots and exports alone while the others exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.export import export_model
from model.latent_space import LatentSpace
from model.manifest import Manifest, TrainingData
from model.pca import PCA, Autoencoder
from model.scores import ScoreReference, calibrated_reference
from training.anomaly import REFERENCE_SAMPLES, LogitsFunction, anomaly_report, score_split, synthetic_sets
from training.config import FIELD_HELP, ConfigError, TrainConfig, load_config, read_toml, resolve_schedule
from training.data import DatasetError, DataSplits, load_dataset
from training.distributed import Distributed, check_batch_divides, start_from_environment, stop
from training.evaluate import evaluate, weak_model_reasons
from training.latent_space import DecodeFunction, EncodeFunction, fit_latent_space
from training.plots import save_all_plots
from training.sample_quality import sample_quality, train_judge
from training.train import (
    CHECKPOINT_FILENAME,
    Trainer,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    vae_config_for,
)

TEST_METRICS_FILENAME = "test_metrics.json"
# vae-train's exit status when the model is weak and --allow-weak-model was not given (argparse uses 2).
WEAK_MODEL_EXIT = 3
WEAK_MODEL_ADVICE = """\
Not exported: this model would serve poorly. What usually helps, in this order:
  - more updates: a larger --epochs (small datasets need many short epochs), or leave it unset
  - --free-bits 0.1 to 0.5 keeps latent dimensions from collapsing onto the prior
  - a longer --kl-warmup-epochs lets the decoder learn to use z before the KL term weighs in full
  - a smaller --latent-dim, or more images
Export it anyway with --allow-weak-model (its manifest lists these warnings); with --resume, that exports
this run without training it again."""


def _parse_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaulting to None (= not given) so the file and defaults apply."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training configuration (override the --config file)")
    for config_field in dataclasses.fields(TrainConfig):
        flag = "--" + config_field.name.replace("_", "-")
        hint = hints[config_field.name]
        arguments = typing.get_args(hint)
        default = config_field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        description = FIELD_HELP[config_field.name]
        if "default:" not in description:
            description += f" (default: {'all' if shown is None else shown})"
        help_text = description.replace("%", "%%")
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if typing.get_origin(hint) is tuple:
            parse: Any = _parse_tuple
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=arguments, default=None, help=help_text)
            continue
        elif isinstance(hint, types.UnionType):  # int | None
            parse = next(a for a in arguments if a is not type(None))
        else:
            parse = hint
        group.add_argument(flag, type=parse, default=None, metavar=config_field.name.upper(), help=help_text)


def _given_flags(arguments: argparse.Namespace) -> dict[str, Any]:
    names = {config_field.name for config_field in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(arguments).items() if name in names and value is not None}


def _resume_checkpoint(arguments: argparse.Namespace, distributed: Distributed) -> dict[str, Any] | None:
    """The checkpoint --resume continues (None: start afresh), read by rank 0 and sent to the other
    processes, whose nodes need not see the run directory."""
    checkpoint_path = arguments.run_dir / CHECKPOINT_FILENAME
    found = distributed.is_main and arguments.resume and checkpoint_path.is_file()
    return distributed.broadcast_from_main(load_checkpoint(checkpoint_path) if found else None)


def _resolve_config(arguments: argparse.Namespace, checkpoint: dict[str, Any] | None) -> TrainConfig:
    """Defaults < --config file < flags; with a checkpoint to resume, its config replaces the defaults."""
    overrides = _given_flags(arguments)
    if checkpoint is None:
        return load_config(arguments.config, overrides)
    values = dict(checkpoint["train_config"])
    if "model" not in values:  # a run from before the resolved schedule: say what it meant then
        values["early_stopping_patience"] = values.get("early_stopping_patience") or 0
        values["validation_size"] = checkpoint["dataset"]["validation_size"]
    if arguments.config is not None:
        values.update(read_toml(arguments.config))
    values.update(overrides)
    return TrainConfig.from_dict(values)


def _training_data(dataset: dict[str, Any]) -> TrainingData:
    return TrainingData(**dataset)


def _evaluate_test_split(vae: Autoencoder, config: TrainConfig, splits: DataSplits) -> dict[str, float]:
    """The manifest's test metrics: the VAE on the test split, PCA fitted on the train split as baseline."""
    return evaluate(
        vae,
        splits.test.images,
        splits.train.images,
        likelihood=config.likelihood,
        gaussian_std=config.gaussian_std,
        samples=config.eval_samples,
        iwae_samples=config.iwae_samples,
        seed=config.seed,
    )


def numpy_functions(vae: Autoencoder) -> tuple[EncodeFunction, DecodeFunction]:
    """The VAE's encoder and decoder as numpy functions, as the exported graphs compute them."""

    @torch.no_grad()
    def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, log_var = vae.encode(torch.from_numpy(images))
        return mean.numpy(), log_var.numpy()

    @torch.no_grad()
    def decode(latents: np.ndarray) -> np.ndarray:
        return torch.sigmoid(vae.decode(torch.from_numpy(latents))).numpy()

    return encode, decode


def numpy_logits(vae: Autoencoder) -> LogitsFunction:
    """The decoder's logits as a numpy function (the exported graph's second output)."""

    @torch.no_grad()
    def decode_logits(latents: np.ndarray) -> np.ndarray:
        return vae.decode(torch.from_numpy(latents)).numpy()

    return decode_logits


def calibrate_scores(
    vae: Autoencoder, config: TrainConfig, splits: DataSplits, space: LatentSpace | None
) -> tuple[ScoreReference, dict[str, Any]]:
    """The test split's score quantiles for POST /score, and the anomaly verdict's AUROC against synthetic
    out-of-distribution sets (training/anomaly.py)."""
    encode, _ = numpy_functions(vae.eval())
    decode_logits = numpy_logits(vae)
    options: dict[str, Any] = {
        "likelihood": config.likelihood,
        "observation_std": config.gaussian_std if config.likelihood == "gaussian" else None,
        "prior": space.prior if space is not None else None,
    }
    test_scores = score_split(encode, decode_logits, splits.test.images, seed=config.seed, **options)
    reference = calibrated_reference(test_scores, REFERENCE_SAMPLES)
    synthetic = {
        name: score_split(encode, decode_logits, images, seed=config.seed + 1, **options)
        for name, images in synthetic_sets(splits.test.images, config.seed).items()
    }
    validation = score_split(encode, decode_logits, splits.validation.images, seed=config.seed + 2, **options)
    report = anomaly_report(reference, test_scores, synthetic, validation)
    report["test_mean_scores"] = {name: float(values.mean()) for name, values in test_scores.items()}
    aurocs = ", ".join(f"{name} {row['auroc']:.3f}" for name, row in report["synthetic_sets"].items())
    print(f"anomaly score AUROC against synthetic sets: {aurocs}", file=sys.stderr)
    return reference, report


def describe_latent_space(
    vae: Autoencoder, config: TrainConfig, splits: DataSplits
) -> tuple[LatentSpace | None, dict[str, Any] | None]:
    """The latent-space description to export (None when switched off) and, for labelled data with
    judge_epochs > 0, its sample-quality table.
    """
    if not config.latent_space:
        return None, None
    encode, decode = numpy_functions(vae.eval())
    space = fit_latent_space(encode, decode, splits, seed=config.seed)
    prior = space.info["prior"]
    print(
        f"latent space: prior {prior['components']} {prior['covariance_type']} Gaussians, "
        f"labels {list(space.labels) or 'none'}, attributes {space.attribute_names}",
        file=sys.stderr,
    )
    if not (space.labels and config.judge_epochs):
        return space, None
    judge = train_judge(
        splits.train, splits.test, len(space.labels), epochs=config.judge_epochs, seed=config.seed
    )
    quality = sample_quality(space, encode, decode, judge, splits.test, seed=config.seed)
    priors = ", ".join(
        f"{name} {values['confident_share']:.0%} confident, FD {values['frechet_distance']:.2f}"
        for name, values in quality["priors"].items()
    )
    print(f"sample quality ({quality['judge']}): {priors}", file=sys.stderr)
    return space, quality


def train_main(argv: list[str] | None = None) -> int:
    """`vae-train`: train (or resume), evaluate the best checkpoint on the test split, save plots, export."""
    parser = argparse.ArgumentParser(prog="vae-train", description=train_main.__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (tables are flattened)")
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/latest"), help="checkpoint, metrics, plots"
    )
    parser.add_argument(
        "--export-dir", type=Path, help="model directory to export to (default RUN_DIR/model)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt if present"
    )
    _add_config_flags(parser)
    arguments = parser.parse_args(argv)
    try:
        distributed = start_from_environment()
    except ConfigError as error:
        parser.error(str(error))
    try:
        return _train_and_export(arguments, parser, distributed)
    finally:
        stop(distributed)


def _train_and_export(
    arguments: argparse.Namespace, parser: argparse.ArgumentParser, distributed: Distributed
) -> int:
    """vae-train's work in one process: all processes train; rank 0 alone writes the run and exports."""
    try:
        checkpoint = _resume_checkpoint(arguments, distributed)
        config = _resolve_config(arguments, checkpoint)
        if config.model != "pca":
            check_batch_divides(config.batch_size, distributed.world_size)
        splits = load_dataset(config)
    except (ConfigError, DatasetError) as error:
        parser.error(str(error))
    # What runs, recorded as such: the chosen schedule and the validation split's real size.
    config = dataclasses.replace(
        resolve_schedule(config, len(splits.train)), validation_size=len(splits.validation)
    )
    run_dir: Path = arguments.run_dir
    if distributed.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        print(
            f"dataset {splits.name}: train {len(splits.train)}, validation {len(splits.validation)}, "
            f"test {len(splits.test)}, skipped unreadable files {splits.skipped_files}",
            file=sys.stderr,
        )
    if config.model == "pca":
        trainer = None
    else:
        trainer = _train(parser, config, splits, run_dir, distributed, checkpoint)
    # The others wait until rank 0 has written the last checkpoint, then leave; rank 0 exports alone.
    distributed.barrier()
    stop(distributed)
    if not distributed.is_main:
        return 0
    if trainer is None:
        model: Autoencoder = PCA.fit(splits.train.images, vae_config_for(config))
        print(f"PCA: {config.latent_dim} components fitted in closed form", file=sys.stderr)
        return _evaluate_and_export(arguments, config, splits, model, None)
    return _evaluate_and_export(arguments, config, splits, trainer.model, trainer)


def _evaluate_and_export(
    arguments: argparse.Namespace,
    config: TrainConfig,
    splits: DataSplits,
    model: Autoencoder,
    trainer: Trainer | None,
) -> int:
    """Evaluate the trained model (its trainer's, or PCA's) on the test split, plot, and export it."""
    run_dir: Path = arguments.run_dir
    history = trainer.state.history if trainer is not None else []
    test_metrics = _evaluate_test_split(model, config, splits)
    (run_dir / TEST_METRICS_FILENAME).write_text(json.dumps(test_metrics, indent=2) + "\n")
    if trainer is not None:
        save_checkpoint(
            trainer.checkpoint_path, {**trainer.checkpoint_payload(), "test_metrics": test_metrics}
        )
    save_all_plots(model, history, splits.test.images, splits.test.labels, run_dir)

    warnings = weak_model_reasons(test_metrics, config.model)
    if _refuse_weak_model(warnings, allowed=config.allow_weak_model):
        return WEAK_MODEL_EXIT

    latent_space, quality = describe_latent_space(model, config, splits)
    reference, anomaly = calibrate_scores(model, config, splits, latent_space)
    export_dir = arguments.export_dir or run_dir / "model"
    manifest = export_model(
        model,
        export_dir,
        name=config.model_name,
        version=config.model_version,
        likelihood=config.likelihood,
        training_data=_training_data(splits.sizes()),
        test_metrics=test_metrics,
        latent_space=latent_space,
        sample_quality=quality,
        score_reference=reference,
        anomaly_detection=anomaly,
        observation_std=config.gaussian_std,
        model_kind=config.model,
        quality_warnings=tuple(warnings),
    )
    _report(manifest, export_dir)
    return 0


def _train(
    parser: argparse.ArgumentParser,
    config: TrainConfig,
    splits: DataSplits,
    run_dir: Path,
    distributed: Distributed,
    checkpoint: dict[str, Any] | None,
) -> Trainer:
    """Train (or resume from checkpoint) a VAE or an autoencoder; returns the trainer, its model holding the
    best weights, on the CPU, in eval mode."""
    try:
        trainer = Trainer(config, splits, run_dir, distributed)
        if checkpoint is not None:
            trainer.resume(checkpoint)
    except ConfigError as error:
        parser.error(str(error))
    log = print if distributed.is_main else _silent
    if checkpoint is not None:
        log(f"resumed from epoch {trainer.state.epochs_done}", file=sys.stderr)
    warmup = "" if config.model == "ae" else f"KL warm-up {trainer.kl_warmup_epochs} epochs, "
    stopping = (
        f"early stopping after {trainer.patience} epochs without improvement"
        if trainer.patience
        else "no early stopping"
    )
    world_size = distributed.world_size
    processes = f" in {world_size} process{'es' if world_size > 1 else ''}" if distributed.started else ""
    log(
        f"training a {config.model} for up to {trainer.epochs} epochs of {trainer.steps_per_epoch} updates "
        f"({warmup}{stopping}){processes}",
        file=sys.stderr,
    )
    state = trainer.fit()
    log(
        f"best {trainer.selection_metric} {state.best_validation_negative_elbo:.3f} "
        f"at epoch {state.best_epoch}",
        file=sys.stderr,
    )
    trainer.model.load_state_dict(state.best_model_state)
    trainer.model.cpu().eval()
    return trainer


def _silent(*values: object, **options: Any) -> None:
    """print's stand-in on processes other than rank 0."""


def _refuse_weak_model(warnings: list[str], *, allowed: bool) -> bool:
    """Print why a model is weak; True (with the advice) when it must not be exported."""
    for warning in warnings:
        print(f"WEAK MODEL: {warning}", file=sys.stderr)
    if warnings and not allowed:
        print(WEAK_MODEL_ADVICE, file=sys.stderr)
        return True
    return False


def _report(manifest: Manifest, export_dir: Path) -> None:
    metrics = ", ".join(f"{key} {value:.4g}" for key, value in manifest.test_metrics.items())
    print(f"exported {manifest.name} {manifest.version} to {export_dir}; test: {metrics}", file=sys.stderr)


def export_main(argv: list[str] | None = None) -> int:
    """`vae-export CHECKPOINT OUT_DIR`: export a checkpoint's best weights as ONNX + manifest.

    Re-evaluates on the test split and fits the latent-space description when the checkpoint's dataset can
    be loaded with the same split sizes; otherwise reuses the test metrics stored in the checkpoint by
    vae-train and exports without a latent-space description.
    """
    parser = argparse.ArgumentParser(prog="vae-export", description=export_main.__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--name", help="model name (default: the checkpoint config's model_name)")
    parser.add_argument("--version", help="model version (default: the checkpoint config's model_version)")
    parser.add_argument(
        "--allow-weak-model",
        action="store_true",
        help="export a collapsed model or one no better than PCA anyway (its manifest says so)",
    )
    arguments = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(arguments.checkpoint)
    except FileNotFoundError as error:
        parser.error(str(error))
    config = TrainConfig.from_dict(checkpoint["train_config"])
    vae = model_from_checkpoint(checkpoint)
    latent_space, quality = None, None
    reference: ScoreReference | None = None
    anomaly: dict[str, Any] | None = None
    try:
        splits = load_dataset(config)
        if splits.sizes() != checkpoint["dataset"]:
            raise DatasetError(f"dataset now splits as {splits.sizes()}, checkpoint: {checkpoint['dataset']}")
        test_metrics = _evaluate_test_split(vae, config, splits)
        print("re-evaluated on the test split", file=sys.stderr)
        latent_space, quality = describe_latent_space(vae, config, splits)
        reference, anomaly = calibrate_scores(vae, config, splits, latent_space)
    except DatasetError as error:
        if "test_metrics" not in checkpoint:
            parser.error(f"cannot re-evaluate ({error}) and the checkpoint stores no test metrics")
        test_metrics = checkpoint["test_metrics"]
        print(f"reusing the checkpoint's test metrics: {error}", file=sys.stderr)
    warnings = weak_model_reasons(test_metrics, config.model)
    if _refuse_weak_model(warnings, allowed=arguments.allow_weak_model or config.allow_weak_model):
        return WEAK_MODEL_EXIT
    manifest = export_model(
        vae,
        arguments.out_dir,
        name=arguments.name or config.model_name,
        version=arguments.version or config.model_version,
        likelihood=config.likelihood,
        training_data=_training_data(checkpoint["dataset"]),
        test_metrics=test_metrics,
        latent_space=latent_space,
        sample_quality=quality,
        score_reference=reference,
        anomaly_detection=anomaly,
        observation_std=config.gaussian_std,
        model_kind=config.model,
        quality_warnings=tuple(warnings),
    )
    _report(manifest, arguments.out_dir)
    return 0


if __name__ == "__main__":  # `python -m training.cli` and `torchrun -m training.cli` run vae-train
    sys.exit(train_main())
