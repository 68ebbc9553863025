"""Training in several processes: the sharding and loss arithmetic without processes, then real torchrun runs.

The slow tests start `torchrun --standalone --nproc_per_node 2 -m training.cli` (gloo on the CPU) and compare
its per-update losses with one process trained on the same global batches and seed.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from model.loss import elbo_terms
from model.manifest import load_model_dir
from model.vae import VAE, VaeConfig
from tests.training.conftest import as_flags
from training.config import ConfigError, TrainConfig
from training.data import load_dataset, load_mnist
from training.distributed import (
    Distributed,
    TrainingForward,
    check_batch_divides,
    shard_loss,
    shard_rows,
    start_from_environment,
)
from training.train import (
    CHECKPOINT_FILENAME,
    STEP_TERMS,
    STEPS_CSV,
    Trainer,
    load_checkpoint,
    model_from_checkpoint,
)

# The runs differ by float summation order only (the batch mean of two shard means, gradients summed by an
# all-reduce): measured at most 1.2e-7 relative on the loss and 4.7e-7 on the KL term over these 14 updates.
# Drawing an image's noise or augmentation per process fails this by 1e-2, a missing loss weight on the
# uneven batch by 5e-5 at once and 3e-3 later. A per-shard free-bits floor moves these losses by under 2e-6;
# test_averaged_shard_gradients_are_the_batch_gradient catches it in the gradients instead.
LOSS_RELATIVE_TOLERANCE = 1e-5
# 200 real digits in a .npz (MNIST's CSV would take each process 4 s to parse): 20 test, 20 validation,
# and 99 of the other 160 train in batches of 16: six full batches and one of 3, split 2 + 1 over 2 processes.
DIGITS = 200
DISTRIBUTED_RUN: dict[str, Any] = {
    "max_train_images": 99,
    "validation_fraction": 0.1,
    "test_fraction": 0.1,
    "latent_dim": 4,
    "widths": (4, 8),
    "hidden_dim": 16,
    "batch_size": 16,
    "epochs": 2,
    "lr_schedule": "constant",
    "learning_rate": 1e-2,
    "translate_pixels": 1,
    "rotate_degrees": 10.0,
    "augment_probability": 0.5,
    "kl_warmup_epochs": 1,
    "free_bits": 0.1,
    "num_threads": 1,
    "progress": False,
    "eval_samples": 2,
    "iwae_samples": 0,
    "latent_space": False,
    "judge_epochs": 0,
    "allow_weak_model": True,
}
TORCHRUN_TIMEOUT_SECONDS = 240


@pytest.mark.parametrize(("train_images", "world_size"), [(48, 2), (50, 4), (99, 2), (35, 4), (16, 1)])
def test_the_shards_of_each_step_make_up_the_single_process_batch(train_images: int, world_size: int) -> None:
    batch_size = 16
    order = torch.randperm(train_images, generator=torch.Generator().manual_seed(0))
    for start in range(0, train_images, batch_size):
        batch = order[start : start + batch_size]
        shards = [shard_rows(len(batch), rank, world_size) for rank in range(world_size)]
        taken = torch.cat([batch[shard.rows] for shard in shards if shard.images])
        assert sorted(taken.tolist()) == sorted(batch.tolist())  # every image once, none twice
        assert sum(shard.images for shard in shards) == len(batch)
        # DDP averages over processes: the weights make that average the batch's image-weighted mean.
        assert sum(shard.loss_weight for shard in shards) == pytest.approx(world_size)
        assert all(shard.loss_weight == 1.0 for shard in shards) or len(batch) % world_size


def test_full_shards_are_those_of_torchs_distributed_sampler() -> None:
    """Striding one permutation rank::N, as DistributedSampler does; its per-process batches of
    batch_size / N then make up the single-process batches."""
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
    batch_size, world_size = 16, 2
    for rank in range(world_size):
        sampler = DistributedSampler(order, num_replicas=world_size, rank=rank, shuffle=False)
        sampled = [order[i] for i in sampler]
        ours = [
            order[start + row]
            for start in range(0, len(order), batch_size)
            for row in shard_rows(batch_size, rank, world_size).rows.tolist()
        ]
        assert ours == sampled


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_averaged_shard_gradients_are_the_batch_gradient(world_size: int) -> None:
    """What DDP relies on: the mean over processes of each shard's weighted loss gradient is the global
    batch's gradient, with the batch's noise split along and the free-bits floor decided on the batch.
    A batch of 7 splits unevenly over 2 and 3 processes and leaves 8 processes with one empty shard."""
    torch.manual_seed(0)
    vae = VAE(VaeConfig(latent_dim=6, widths=(4, 8), hidden_dim=16))
    forward = TrainingForward(vae)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((7, 1, 28, 28), generator=generator)
    noise = torch.randn((7, 6), generator=generator)
    beta = 0.7

    def terms_of(rows: torch.Tensor, free_bits: float) -> Any:
        output = forward(images[rows], noise[rows])
        return elbo_terms(
            output.logits, images[rows], output.mean, output.log_var, beta=beta, free_bits=free_bits
        )

    whole = terms_of(torch.arange(7), 0.0)
    # A floor between the dimensions' KLs, so that some dimensions are floored and others are not.
    free_bits = float(whole.kl_per_dim.detach().median())
    whole = terms_of(torch.arange(7), free_bits)
    expected = torch.autograd.grad(whole.loss, list(vae.parameters()))

    shards = [shard_rows(7, rank, world_size) for rank in range(world_size)]
    shard_terms = [terms_of(shard.rows, free_bits) for shard in shards]
    batch_kl_per_dim = (
        sum(t.kl_per_dim.detach() * s.images for t, s in zip(shard_terms, shards, strict=True)) / 7
    )
    assert torch.allclose(batch_kl_per_dim, whole.kl_per_dim.detach(), rtol=1e-5)
    losses = [
        shard_loss(terms, beta=beta, free_bits=free_bits, batch_kl_per_dim=batch_kl_per_dim)
        for terms in shard_terms
    ]
    assert float(sum(loss.detach() * s.images for loss, s in zip(losses, shards, strict=True)) / 7) == (
        pytest.approx(float(whole.loss.detach()), rel=1e-6)
    )
    gradients = [
        torch.autograd.grad(loss * shard.loss_weight, list(vae.parameters()))
        for loss, shard in zip(losses, shards, strict=True)
    ]
    for index, gradient in enumerate(expected):
        averaged = sum(shard_gradients[index] for shard_gradients in gradients) / world_size
        assert torch.allclose(averaged, gradient, rtol=1e-4, atol=1e-6)


def test_the_global_batch_must_split_evenly(tiny_config: TrainConfig) -> None:
    with pytest.raises(ConfigError, match="batch_size 16 is the global batch, split evenly over 3 processes"):
        check_batch_divides(16, 3)
    check_batch_divides(16, 4)
    splits = load_dataset(tiny_config)
    with pytest.raises(ConfigError, match="use a multiple of 3"):
        Trainer(tiny_config, splits, Path("unused"), Distributed(rank=0, world_size=3))


def test_without_torchruns_environment_no_process_group_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed = start_from_environment()
    assert distributed == Distributed() and not distributed.started
    assert not torch.distributed.is_initialized()
    values = torch.tensor([1.0, 2.0])
    assert distributed.sum(values) is values and distributed.broadcast_from_main("x") == "x"


# --- real processes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .npz of DIGITS seeded-random MNIST digits with their labels."""
    mnist = load_mnist()
    chosen = np.random.default_rng(0).permutation(len(mnist.images))[:DIGITS]
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    assert mnist.labels is not None
    np.savez(path, images=mnist.images[chosen], labels=mnist.labels[chosen])
    return path


def _torchrun(run_dir: Path, log_dir: Path, dataset: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """vae-train in two processes; each process's stdout and stderr go to its own file under log_dir."""
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        "-m",
        "training.cli",
        "--run-dir",
        str(run_dir),
        *as_flags({**DISTRIBUTED_RUN, "dataset": str(dataset)}),
        *extra,
    ]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    environment.pop("WORLD_SIZE", None)
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT_SECONDS,
        env=environment,
        check=False,
    )


def _process_stderr(log_dir: Path, local_rank: int) -> str:
    (path,) = log_dir.glob(f"*/attempt_0/{local_rank}/stderr.log")
    return path.read_text()


def _steps(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / STEPS_CSV).open(newline="") as stream:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(stream)]


def _single_process_steps(
    run_dir: Path, dataset: Path, stop_after_epoch: int | None = None
) -> list[dict[str, float]]:
    """The same run in this process, through the Trainer, with the config vae-train would record."""
    run_dir.mkdir()
    config = TrainConfig.from_dict({**DISTRIBUTED_RUN, "dataset": str(dataset)})
    splits = load_dataset(config)
    config = dataclasses.replace(config, validation_size=len(splits.validation))
    Trainer(config, splits, run_dir).fit(stop_after_epoch=stop_after_epoch)
    return _steps(run_dir)


def _assert_steps_match(distributed: list[dict[str, float]], single: list[dict[str, float]]) -> None:
    assert [row["step"] for row in distributed] == [row["step"] for row in single]
    for two, one in zip(distributed, single, strict=True):
        assert (two["images"], two["beta"], two["learning_rate"]) == (
            one["images"],
            one["beta"],
            one["learning_rate"],
        )
        for key in STEP_TERMS:
            assert two[key] == pytest.approx(one[key], rel=LOSS_RELATIVE_TOLERANCE), (int(one["step"]), key)


@pytest.mark.slow
def test_two_processes_train_as_one_and_write_the_run_once(tmp_path: Path, digits: Path) -> None:
    single = _single_process_steps(tmp_path / "single", digits)
    run_dir, log_dir = tmp_path / "two", tmp_path / "logs"
    completed = _torchrun(run_dir, log_dir, digits)
    assert completed.returncode == 0, completed.stderr[-3000:]

    steps = _steps(run_dir)
    assert len(steps) == 14 and steps[-1]["images"] == 3
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]  # the model learns, so the comparison has teeth
    _assert_steps_match(steps, single)

    # One checkpoint, one export, one log: rank 1 trains and says nothing.
    main, other = _process_stderr(log_dir, 0), _process_stderr(log_dir, 1)
    assert main.count("exported mnist-vae") == 1 and "in 2 processes" in main
    assert not any(line in other for line in ("dataset", "training a", "epoch", "exported")), other[-2000:]
    assert not list(run_dir.glob("*.tmp"))
    assert sorted(p.name for p in (run_dir / "model").iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
        "score_reference.npz",
    ]
    load_model_dir(run_dir / "model")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILENAME)
    assert "test_metrics" in checkpoint
    model_from_checkpoint(checkpoint)  # the VAE's own keys, not DDP's module.*


@pytest.mark.slow
def test_two_processes_resume_a_single_process_checkpoint(tmp_path: Path, digits: Path) -> None:
    single = _single_process_steps(tmp_path / "single", digits)
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    first_epoch = _single_process_steps(run_dir, digits, stop_after_epoch=1)
    assert first_epoch == single[: len(first_epoch)]
    completed = _torchrun(run_dir, log_dir, digits, "--resume")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resumed from epoch 1" in _process_stderr(log_dir, 0)
    steps = _steps(run_dir)
    assert steps[: len(first_epoch)] == first_epoch
    _assert_steps_match(steps, single)
