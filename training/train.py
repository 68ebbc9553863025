"""The training loop: seeded, resumable, with KL warm-up, free bits, an LR schedule and early stopping.

Every epoch ends with metrics.csv / metrics.json and, every CHECKPOINT_UPDATES updates and at the end, a
checkpoint (model, optimizer, scheduler, RNG state, best weights so far, history). Early
stopping and model selection use the validation negative ELBO (beta = 1, no free bits; an autoencoder's
validation reconstruction). All randomness (shuffling, augmentation, posterior samples) comes from one
torch.Generator whose state is checkpointed, so a resumed run continues exactly where it stopped.

Under torchrun the same loop runs in every process on its shard of each batch (training/distributed.py):
gradients are averaged by DistributedDataParallel, metrics summed over processes, and only rank 0 validates,
logs and writes files; the generator's draws are the single process's, whatever the number of processes.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR
from tqdm import tqdm

from model.loss import ElboTerms, elbo_terms, gaussian_kl
from model.vae import VAE, VaeConfig
from training.augment import Augmentation
from training.config import ConfigError, TrainConfig, resolve_schedule
from training.data import DataSplits
from training.distributed import (
    Distributed,
    Shard,
    TrainingForward,
    check_batch_divides,
    shard_loss,
    shard_rows,
)
from training.evaluate import active_units, negative_elbo, posteriors

CHECKPOINT_FILENAME = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
STEPS_CSV = "steps.csv"  # one row per update: the global batch's loss terms, for comparing runs step by step
STEP_TERMS = ("loss", "negative_elbo", "reconstruction", "kl")
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


def _write_steps(run_dir: Path, rows: list[dict[str, float]]) -> None:
    """Append one epoch's rows to steps.csv; the first epoch (or a missing file) starts it afresh."""
    path = run_dir / STEPS_CSV
    fresh = not path.is_file() or int(rows[0]["epoch"]) == 1
    with path.open("w" if fresh else "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        if fresh:
            writer.writeheader()
        writer.writerows(rows)


def _keep_steps_until(run_dir: Path, epochs_done: int) -> None:
    """Drop steps.csv's rows of epochs after the checkpoint's, which a resumed run trains again."""
    path = run_dir / STEPS_CSV
    if not path.is_file():
        return
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        fieldnames, rows = reader.fieldnames or [], [r for r in reader if int(r["epoch"]) <= epochs_done]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


class Trainer:
    """Owns the model, optimizer, scheduler and generator of one run; `fit` trains until done or stopped.

    With a started `distributed`, this is one of its processes: the model lives on its device and trains on
    its shard of every batch; rank 0 alone validates, logs and writes the run directory.
    """

    def __init__(
        self,
        config: TrainConfig,
        splits: DataSplits,
        run_dir: Path,
        distributed: Distributed | None = None,
    ) -> None:
        if config.model == "pca":
            raise ConfigError("PCA is fitted in closed form (model/pca.py), not trained")
        self.distributed = distributed or Distributed()
        check_batch_divides(config.batch_size, self.distributed.world_size)
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
        self.device = self.distributed.device
        self.model = VAE(vae_config_for(config)).to(self.device)
        forward = TrainingForward(self.model)
        self.network: nn.Module = forward
        if self.distributed.started:
            device_ids = None if self.device.type == "cpu" else [self.device]
            self.network = DistributedDataParallel(forward, device_ids=device_ids)
            # The first conv's weight gradient (out, 1, k, k) comes back with another stride on its size-1
            # input-channel axis: the same memory layout, which DDP reports as a mismatch all the same.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
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

    def resume(self, checkpoint: dict[str, Any] | None = None) -> None:
        """Continue from `checkpoint` (default: the run directory's), whose config must match this one up to
        RESUMABLE_CHANGES. It may come from a run with another number of processes."""
        checkpoint = checkpoint if checkpoint is not None else load_checkpoint(self.checkpoint_path)
        check_resume_config(TrainConfig.from_dict(checkpoint["train_config"]), self.config)
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        self.generator.set_state(checkpoint["generator_state"])
        self.state = TrainState(**checkpoint["train_state"])
        self.saved_epochs = self.state.epochs_done
        if self.distributed.is_main:
            _keep_steps_until(self.run_dir, self.state.epochs_done)

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
        return self.config.progress and sys.stderr.isatty() and self.distributed.is_main

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
            train_metrics, steps = self._train_epoch(epoch)
            # Rank 0's validation for every process, so that all make the same early-stopping decision.
            validation = self.distributed.broadcast_from_main(
                self._validate() if self.distributed.is_main else {}
            )
            row = {"epoch": epoch + 1, **train_metrics, **validation}
            row["seconds"] = time.perf_counter() - started
            if self.distributed.is_main:
                _write_steps(self.run_dir, steps)
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
        elif self.config.progress and self.distributed.is_main:
            fields = " ".join(f"{key} {value}" for key, value in summary.items())
            epoch = int(row["epoch"])
            print(f"epoch {epoch}/{self.epochs}: {fields}, best {self.state.best_epoch}", file=sys.stderr)

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], list[dict[str, float]]]:
        """One pass over the shuffled, augmented training images: the epoch's image-weighted means and one
        row per update (for steps.csv), both over the global batches of all processes."""
        self.model.train()
        order = torch.randperm(len(self.train_images), generator=self.generator)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        beta = 0.0
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch + 1}",
            leave=False,
            disable=not self.bars,
        )
        steps: list[dict[str, float]] = []
        sums: list[list[float]] = []  # per update: this process's terms times its image count
        for step in bar:
            indices = order[step * self.config.batch_size : (step + 1) * self.config.batch_size]
            global_step = epoch * self.steps_per_epoch + step
            beta = (
                0.0
                if self.config.model == "ae"
                else kl_beta(global_step, self.kl_warmup_epochs, self.steps_per_epoch)
            )
            steps.append(
                {
                    "step": global_step + 1,
                    "epoch": epoch + 1,
                    "images": len(indices),
                    "beta": beta,
                    "learning_rate": self.optimizer.param_groups[0]["lr"],
                }
            )
            values, images = self._train_step(self.train_images[indices], beta)
            sums.append([value * images for value in values])
            bar.set_postfix(loss=f"{values[0]:.2f}", beta=f"{beta:.2f}")
        # One all-reduce per epoch; summed in step order, as one process sums them.
        global_sums = self.distributed.sum(torch.tensor(sums, dtype=torch.float64)).tolist()
        totals = dict.fromkeys(STEP_TERMS, 0.0)
        for row, step_sums in zip(steps, global_sums, strict=True):
            for key, value in zip(STEP_TERMS, step_sums, strict=True):
                totals[key] += value
                row[key] = value / row["images"]
        count = len(self.train_images)
        metrics = {
            "beta": beta,
            "learning_rate": learning_rate,
            **{f"train_{key}": value / count for key, value in totals.items()},
        }
        return metrics, steps

    def _train_step(self, batch: Tensor, beta: float) -> tuple[list[float], int]:
        """One update on this process's shard of the global batch (N, C, H, W): the shard's mean loss terms
        (STEP_TERMS) and how many images they average."""
        # Augmentation and noise are drawn for the whole batch, as one process draws them, then split.
        if self.augmentation.enabled:
            batch = self.augmentation(batch, self.generator)
        noise = None
        if self.config.model != "ae":
            noise = torch.randn((len(batch), self.config.latent_dim), generator=self.generator)
        shard = shard_rows(len(batch), self.distributed.rank, self.distributed.world_size)
        images = batch[shard.rows].to(self.device)
        output = self.network(images, None if noise is None else noise[shard.rows].to(self.device))
        terms = elbo_terms(
            output.logits,
            images,
            output.mean,
            output.log_var,
            beta=beta,
            free_bits=self.config.free_bits,
            likelihood=self.config.likelihood,
            gaussian_std=self.config.gaussian_std,
        )
        loss = self._shard_loss(terms, beta, shard, len(batch))
        self.optimizer.zero_grad(set_to_none=True)
        (loss * shard.loss_weight).backward()
        self.optimizer.step()
        self.scheduler.step()
        values = (loss, terms.negative_elbo, terms.reconstruction, terms.kl)
        return [float(value.detach()) for value in values], shard.images

    def _shard_loss(self, terms: ElboTerms, beta: float, shard: Shard, batch_images: int) -> Tensor:
        """terms.loss, except that across processes the free-bits floor follows the global batch's KL."""
        if not self.distributed.started or self.config.free_bits == 0:
            return terms.loss
        batch_kl_per_dim = self.distributed.sum(terms.kl_per_dim.detach() * shard.images) / batch_images
        return shard_loss(
            terms, beta=beta, free_bits=self.config.free_bits, batch_kl_per_dim=batch_kl_per_dim
        )

    def _validate(self) -> dict[str, float]:
        """Validation negative ELBO (one posterior sample, the same noise every epoch), active units and the
        KL of each latent dimension (posterior collapse shows as dimensions whose KL falls to 0)."""
        model = self.model.eval()
        if self.device.type != "cpu":  # the evaluation functions take numpy arrays, on the CPU
            model = VAE(self.model.config).eval()
            model.load_state_dict(self.model.state_dict())
        images = self.splits.validation.images
        generator = torch.Generator().manual_seed(self.config.seed + _VALIDATION_SEED_OFFSET)
        metrics = negative_elbo(
            model,
            images,
            samples=1,
            likelihood=self.config.likelihood,
            gaussian_std=self.config.gaussian_std,
            generator=generator,
        )
        means, log_vars = posteriors(model, images)
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
        """Update best / early-stopping state; rank 0 writes metrics and the checkpoint."""
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
        if self.distributed.is_main:
            _write_metrics(self.run_dir, state.history)
        if state.epochs_done % self.checkpoint_every == 0 or self.finished:
            self._save()

    def _save(self) -> None:
        if self.distributed.is_main:
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
