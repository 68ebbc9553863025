"""Training in several processes: torchrun's environment -> a process group, and what the loop shares over it.

`torchrun --nproc_per_node N -m training.cli ...` starts N copies of vae-train with RANK, LOCAL_RANK and
WORLD_SIZE set. Without them (plain `vae-train`) no process group starts and every helper here is a no-op.
Backend: NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is available, gloo on the CPU otherwise.

The config's batch_size stays the global batch. Every process draws the same permutation, augmentation and
reparameterization noise for the whole batch from the shared seeded generator and computes on its rows
`rank::world_size` (shard_rows): the shards' union is the single-process batch and each image gets the noise
it would get in one process, so the gradient DDP averages is the single-process one up to float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.loss import ElboTerms
from model.vae import VAE, VaeOutput
from training.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; the defaults are the single process of plain vae-train."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its node; picks its GPU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "gloo" or "nccl" once a process group is started

    @property
    def started(self) -> bool:
        """Whether a process group is running (torchrun started this process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes metrics and checkpoints, and exports."""
        return self.rank == 0

    def sum(self, values: Tensor) -> Tensor:
        """Elementwise sum of `values` over all processes (a copy, on values' device)."""
        if not self.started:
            return values
        reduced = values.detach().to(self.device, copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(values.device)

    def broadcast_from_main(self, value: T) -> T:
        """Rank 0's `value` on every process (other ranks' values are ignored); any picklable object."""
        if not self.started:
            return value
        holder: list[object] = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, device=self.device)
        return holder[0]  # type: ignore[return-value]

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.started:
            dist.barrier()


def start_from_environment() -> Distributed:
    """Join the process group that torchrun describes in the environment; without one, a single process."""
    if "WORLD_SIZE" not in os.environ:
        return Distributed()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return Distributed(rank, world_size, local_rank, torch.device("cpu"), "gloo")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"process {local_rank} on this node has no GPU: the node has {torch.cuda.device_count()}; "
            "run at most that many processes per node (--nproc_per_node)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return Distributed(rank, world_size, local_rank, device, "nccl")


def stop(distributed: Distributed) -> None:
    """Leave the process group, if one was started (safe to call twice)."""
    if distributed.started and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_divides(batch_size: int, world_size: int) -> None:
    """The global batch must split evenly: each process takes batch_size / world_size images per update."""
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch, split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )


class Shard(NamedTuple):
    """This process's part of one global batch."""

    rows: Tensor  # (n,) int64 positions in the global batch this process computes on
    images: int  # how many of those rows count: 0 for the stand-in of an empty shard
    loss_weight: float  # images * world_size / batch images: DDP's gradient mean is then the batch's


def shard_rows(batch_images: int, rank: int, world_size: int) -> Shard:
    """Rows rank, rank + world_size, ... of a global batch of `batch_images` (DistributedSampler's striding).

    A last, short batch may give some processes fewer rows, hence the loss weight. A process left with none
    computes on row 0 with weight 0, because every process must take part in each gradient all-reduce.
    """
    if rank >= batch_images:
        return Shard(torch.zeros(1, dtype=torch.int64), 0, 0.0)
    rows = torch.arange(rank, batch_images, world_size)
    return Shard(rows, len(rows), len(rows) * world_size / batch_images)


class TrainingForward(nn.Module):
    """VAE.forward with the reparameterization noise passed in, so that it can be drawn for the global batch
    and split with it (the module DDP wraps)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor, noise: Tensor | None) -> VaeOutput:
        """images (N, C, H, W), noise (N, latent_dim) ~ N(0, I), None for an autoencoder -> VaeOutput."""
        mean, log_var = self.vae.encode(images)
        z = mean if noise is None else mean + torch.exp(0.5 * log_var) * noise
        return VaeOutput(logits=self.vae.decode(z), mean=mean, log_var=log_var, z=z)


def shard_loss(terms: ElboTerms, *, beta: float, free_bits: float, batch_kl_per_dim: Tensor) -> Tensor:
    """The training loss on one process's rows, with the free-bits floor decided on the global batch.

    terms: elbo_terms of the shard; batch_kl_per_dim: (latent_dim,) the global batch's mean KL per dimension.
    The floor is not linear in the batch, so a dimension is floored where the global batch's KL is below
    free_bits; the processes' image-weighted mean of this loss is then the global batch's loss, gradient too.
    """
    floored = torch.where(batch_kl_per_dim >= free_bits, terms.kl_per_dim, free_bits)
    return terms.reconstruction + beta * floored.sum()
