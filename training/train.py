"""The training loop: seeded, resumable, with KL warm-up, free bits, an LR schedule and early stopping.

Every epoch ends with metrics.csv / metrics.json and, every CHECKPOINT_UPDATES updates and at the end, a
checkpoint (model, optimizer, scheduler, RNG state, best weights so far, history). Early
stopping and model selection use the validation negative ELBO (beta = 1, no free bits; an autoencoder's
validation reconstruction). All randomness (shuffling, augmentation, posterior samples) comes from one
torch.Generator whose state is checkpointed, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR
from tqdm import tqdm

from model.loss import elbo_terms, gaussian_kl
from model.vae import VAE, VaeConfig
from training.augment import Augmentation
from training.config import ConfigError, TrainConfig, resolve_schedule
from training.data import DataSplits
from training.evaluate import active_units, negative_elbo, posteriors

CHECKPOINT_FILENAME = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
# Keys that may differ between a checkpoint's config and the config of the run that resumes it.
RESUMABLE_CHANGES = frozenset(
    {
        "progress",
        "num_threads",
        "eval_samples",
        "iwae_samples",
        "model_name",
        "model_version",
        "latent_space",
        "judge_epochs",
        "allow_weak_model",
    }
)
_VALIDATION_SEED_OFFSET = 1_000_003
CHECKPOINT_UPDATES = 125


@dataclass
class TrainState:
    """Progress that survives a restart: epochs done, the best validation score and its weights, history."""

    epochs_done: int = 0
    best_validation_negative_elbo: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    best_model_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def vae_config_for(config: TrainConfig) -> VaeConfig:
    """The network shape a training config asks for (deterministic for --model ae)."""
    return VaeConfig(
        image_shape=config.image_shape,
        latent_dim=config.latent_dim,
        widths=config.widths,
        hidden_dim=config.hidden_dim,
        deterministic=config.model == "ae",
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> LRScheduler:
    """Per-step LR schedule: OneCycle (warm up then anneal), cosine annealing, or constant."""
    if config.lr_schedule == "onecycle":
        return OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=total_steps)
    if config.lr_schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total_steps)
    return LambdaLR(optimizer, lambda step: 1.0)


def kl_beta(step: int, warmup_epochs: int, steps_per_epoch: int) -> float:
    """KL weight at a global step: linear from 0 to 1 over warmup_epochs, then 1."""
    warmup_steps = warmup_epochs * steps_per_epoch
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so an interrupted save never corrupts the last checkpoint."""
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (plain tensors, numbers, strings and dicts)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], *, best: bool = True) -> VAE:
    """Rebuild the VAE stored in a checkpoint, with its best (default) or latest weights, in eval mode."""
    vae = VAE(VaeConfig.from_dict(checkpoint["vae_config"]))
    state = checkpoint["train_state"]["best_model_state"] if best else checkpoint["model_state"]
    vae.load_state_dict(state)
    return vae.eval()


def check_resume_config(stored: TrainConfig, requested: TrainConfig) -> None:
    """A resumed run must train the same way: only RESUMABLE_CHANGES keys may differ."""
    stored_values, requested_values = stored.to_dict(), requested.to_dict()
    changed = sorted(k for k in stored_values if stored_values[k] != requested_values[k])
    forbidden = [k for k in changed if k not in RESUMABLE_CHANGES]
    if forbidden:
        raise ConfigError(
            f"--resume continues the checkpoint's configuration; these keys differ: {forbidden}"
        )


def _write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv and metrics.json: one row per finished epoch."""
    (run_dir / METRICS_JSON).write_text(json.dumps(history, indent=2) + "\n")
    with (run_dir / METRICS_CSV).open("w", newline="") as stream:
        # Every key of every row: runs resumed from before a column existed have rows without it.
        fieldnames = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(stream, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(history)


class Trainer:
    """Owns the model, optimizer, scheduler and generator of one run; `fit` trains until done or stopped."""

    def __init__(self, config: TrainConfig, splits: DataSplits, run_dir: Path) -> None:
        if config.model == "pca":
            raise ConfigError("PCA is fitted in closed form (model/pca.py), not trained")
        config = resolve_schedule(config, len(splits.train))
        assert config.epochs is not None and config.kl_warmup_epochs is not None
        assert config.early_stopping_patience is not None
        self.config = config
        self.epochs, self.kl_warmup_epochs = config.epochs, config.kl_warmup_epochs
        self.patience = config.early_stopping_patience
        # The autoencoder has no KL term: it trains and is selected on reconstruction alone.
        self.selection_metric = (
            "validation_reconstruction" if config.model == "ae" else "validation_negative_elbo"
        )
        self.splits = splits
        self.run_dir = run_dir
        self.checkpoint_path = run_dir / CHECKPOINT_FILENAME
        torch.manual_seed(config.seed)  # the initial weights
        self.model = VAE(vae_config_for(config))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_images = torch.from_numpy(splits.train.images)
        self.steps_per_epoch = math.ceil(len(self.train_images) / config.batch_size)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = build_scheduler(self.optimizer, config, self.epochs * self.steps_per_epoch)
        self.augmentation = Augmentation(
            config.translate_pixels, config.rotate_degrees, config.scale_range, config.augment_probability
        )
        self.state = TrainState(best_model_state=copy.deepcopy(self.model.state_dict()))
        # Checkpoints every CHECKPOINT_UPDATES updates (every epoch of the recipe): a 300-image folder's
        # 1,500 epochs of 8 updates would otherwise spend more time writing checkpoints than training.
        self.checkpoint_every = max(1, math.ceil(CHECKPOINT_UPDATES / self.steps_per_epoch))
        self.saved_epochs = 0

    def resume(self) -> None:
        """Load the run directory's checkpoint; its config must match this one up to RESUMABLE_CHANGES."""
        checkpoint = load_checkpoint(self.checkpoint_path)
        check_resume_config(TrainConfig.from_dict(checkpoint["train_config"]), self.config)
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        self.generator.set_state(checkpoint["generator_state"])
        self.state = TrainState(**checkpoint["train_state"])
        self.saved_epochs = self.state.epochs_done

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to resume, re-evaluate or export this run."""
        return {
            "train_config": self.config.to_dict(),
            "vae_config": self.model.config.to_dict(),
            "dataset": self.splits.sizes(),
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "generator_state": self.generator.get_state(),
            "train_state": vars(self.state),
        }

    @property
    def finished(self) -> bool:
        return self.state.stopped_early or self.state.epochs_done >= self.epochs

    @property
    def bars(self) -> bool:
        """Redrawn progress bars on a terminal only; a log file gets one line per epoch instead."""
        return self.config.progress and sys.stderr.isatty()

    def fit(self, stop_after_epoch: int | None = None) -> TrainState:
        """Train until the last epoch, early stopping, or stop_after_epoch (to train in chunks)."""
        torch.set_num_threads(self.config.num_threads)
        epochs = tqdm(
            range(self.state.epochs_done, self.epochs),
            desc="epochs",
            initial=self.state.epochs_done,
            total=self.epochs,
            disable=not self.bars,
        )
        for epoch in epochs:
            if self.finished or (stop_after_epoch is not None and epoch >= stop_after_epoch):
                break
            started = time.perf_counter()
            row = {"epoch": epoch + 1, **self._train_epoch(epoch), **self._validate()}
            row["seconds"] = time.perf_counter() - started
            self._record(row)
            self._show(row, epochs)
        # Only ever the state at the end of an epoch, so a resumed run continues exactly.
        if self.state.epochs_done > self.saved_epochs:
            self._save()
        return self.state

    def _show(self, row: dict[str, float], bar: tqdm) -> None:
        """The epoch's summary: the bar's postfix on a terminal, a log line otherwise."""
        summary = epoch_summary(row, self.config.latent_dim, self.config.model)
        if self.bars:
            bar.set_postfix(summary, best=self.state.best_epoch)
        elif self.config.progress:
            fields = " ".join(f"{key} {value}" for key, value in summary.items())
            epoch = int(row["epoch"])
            print(f"epoch {epoch}/{self.epochs}: {fields}, best {self.state.best_epoch}", file=sys.stderr)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the shuffled, augmented training images; returns batch-weighted means."""
        self.model.train()
        order = torch.randperm(len(self.train_images), generator=self.generator)
        totals = {"loss": 0.0, "negative_elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
        learning_rate = self.optimizer.param_groups[0]["lr"]
        beta = 0.0
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch + 1}",
            leave=False,
            disable=not self.bars,
        )
        for step in bar:
            batch = self.train_images[
                order[step * self.config.batch_size : (step + 1) * self.config.batch_size]
            ]
            if self.augmentation.enabled:
                batch = self.augmentation(batch, self.generator)
            beta = (
                0.0
                if self.config.model == "ae"
                else kl_beta(epoch * self.steps_per_epoch + step, self.kl_warmup_epochs, self.steps_per_epoch)
            )
            output = self.model(batch, generator=self.generator)
            terms = elbo_terms(
                output.logits,
                batch,
                output.mean,
                output.log_var,
                beta=beta,
                free_bits=self.config.free_bits,
                likelihood=self.config.likelihood,
                gaussian_std=self.config.gaussian_std,
            )
            self.optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            for key in totals:
                totals[key] += float(getattr(terms, key).detach()) * len(batch)
            bar.set_postfix(loss=f"{float(terms.loss.detach()):.2f}", beta=f"{beta:.2f}")
        count = len(self.train_images)
        return {
            "beta": beta,
            "learning_rate": learning_rate,
            **{f"train_{key}": value / count for key, value in totals.items()},
        }

    def _validate(self) -> dict[str, float]:
        """Validation negative ELBO (one posterior sample, the same noise every epoch), active units and the
        KL of each latent dimension (posterior collapse shows as dimensions whose KL falls to 0)."""
        self.model.eval()
        images = self.splits.validation.images
        generator = torch.Generator().manual_seed(self.config.seed + _VALIDATION_SEED_OFFSET)
        metrics = negative_elbo(
            self.model,
            images,
            samples=1,
            likelihood=self.config.likelihood,
            gaussian_std=self.config.gaussian_std,
            generator=generator,
        )
        means, log_vars = posteriors(self.model, images)
        count, _ = active_units(means)
        kl_per_dim = gaussian_kl(torch.from_numpy(means), torch.from_numpy(log_vars)).mean(dim=0).tolist()
        return {
            "validation_negative_elbo": metrics["negative_elbo"],
            "validation_reconstruction": metrics["reconstruction_nll"],
            "validation_kl": metrics["kl"],
            "validation_active_units": float(count),
            **{f"validation_kl_dim_{dim}": float(kl) for dim, kl in enumerate(kl_per_dim)},
        }

    def _record(self, row: dict[str, float]) -> None:
        """Update best / early-stopping state, write metrics and the checkpoint."""
        state = self.state
        state.epochs_done = int(row["epoch"])
        state.history.append(row)
        score = row[self.selection_metric]
        if score < state.best_validation_negative_elbo:
            state.best_validation_negative_elbo = score
            state.best_epoch = state.epochs_done
            state.epochs_without_improvement = 0
            state.best_model_state = copy.deepcopy(self.model.state_dict())
        else:
            state.epochs_without_improvement += 1
        state.stopped_early = self.patience > 0 and state.epochs_without_improvement >= self.patience
        _write_metrics(self.run_dir, state.history)
        if state.epochs_done % self.checkpoint_every == 0 or self.finished:
            self._save()

    def _save(self) -> None:
        save_checkpoint(self.checkpoint_path, self.checkpoint_payload())
        self.saved_epochs = self.state.epochs_done


def epoch_summary(row: dict[str, float], latent_dim: int, model_kind: str) -> dict[str, str]:
    """What the progress bar or the epoch's log line shows: the validation score, active units and, for a
    VAE, the range of the per-dimension KL (an autoencoder's point posterior has no meaningful KL)."""
    active = f"{int(row['validation_active_units'])}/{latent_dim}"
    if model_kind == "ae":
        return {"val_reconstruction": f"{row['validation_reconstruction']:.2f}", "active": active}
    kl = [row[f"validation_kl_dim_{dim}"] for dim in range(latent_dim)]
    return {
        "val_neg_elbo": f"{row['validation_negative_elbo']:.2f}",
        "active": active,
        "kl_per_dim": f"{min(kl):.2f}..{max(kl):.2f}",
    }
