"""`vae-client`: the common jobs from a shell, on top of VaeClient.

    vae-client sample -n 16 -o grid.png
    vae-client encode DIR -o latents.npy         # rows in sorted file-name order; --names names.txt
    vae-client score DIR --csv scores.csv
    vae-client models                            # the served models, their kinds and states
    vae-client --model mnist-ae encode DIR -o ae-latents.npy

The service's address comes from --url or VAE_URL, the key from --api-key or VAE_API_KEY, the model to call
from --model or VAE_MODEL (unset: the server's default model). Folders are sent in batches that fit the
model's limits (read from GET /model), with a progress bar.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from tqdm import tqdm

from app.client.api import DEFAULT_URL, ModelSummary, VaeClient
from app.client.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    UnsupportedMediaType,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
T = TypeVar("T")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vae-client", description="Call a running vae-service.")
    parser.add_argument("--url", default=os.environ.get("VAE_URL", DEFAULT_URL), help="service address")
    parser.add_argument("--api-key", default=os.environ.get("VAE_API_KEY"), help="API key (env VAE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--model",
        default=os.environ.get("VAE_MODEL"),
        help="model to call (env VAE_MODEL; default: the server's)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("models", help="list the served models: kind, state, shapes, memory")

    sample = commands.add_parser("sample", help="decode samples into one PNG grid")
    sample.add_argument("-n", type=int, default=16, help="number of images")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--prior", help="standard or gmm (default: the model's best)")
    sample.add_argument("--label", help="sample this label's density")
    sample.add_argument("--columns", type=int, help="grid width in images")
    sample.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")

    encode = commands.add_parser("encode", help="posterior means of every image in a folder, as .npy")
    encode.add_argument("folder", type=Path)
    encode.add_argument("-o", "--output", type=Path, required=True, help=".npy file, (N, latent_dim)")
    encode.add_argument("--log-var", type=Path, help="also write the log-variances to this .npy file")
    encode.add_argument("--names", type=Path, help="also write the file names, one per row, to this file")

    score = commands.add_parser("score", help="likelihood and anomaly scores of every image in a folder")
    score.add_argument("folder", type=Path)
    score.add_argument("--csv", type=Path, required=True, help="CSV file to write, one row per image")
    score.add_argument("-k", type=int, default=16, help="posterior samples per image")
    score.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def image_files(folder: Path) -> list[Path]:
    """The images in `folder` (not recursive), sorted by name."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder")
    files = sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    )
    if not files:
        raise SystemExit(f"error: {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


# Room in each upload for the multipart framing of one file (boundaries and part headers).
MULTIPART_OVERHEAD_BYTES = 512
RETRIES_WHEN_BUSY = 5


def batched(files: list[Path], max_items: int, max_body_bytes: int) -> list[list[Path]]:
    """Consecutive batches of at most `max_items` files whose upload fits in `max_body_bytes`."""
    batches: list[list[Path]] = []
    batch: list[Path] = []
    size = MULTIPART_OVERHEAD_BYTES
    for path in files:
        file_bytes = path.stat().st_size + MULTIPART_OVERHEAD_BYTES
        if file_bytes + MULTIPART_OVERHEAD_BYTES > max_body_bytes:
            raise SystemExit(
                f"error: {path} is {path.stat().st_size} bytes; the service takes bodies up to "
                f"{max_body_bytes} bytes"
            )
        if batch and (len(batch) == max_items or size + file_bytes > max_body_bytes):
            batches.append(batch)
            batch, size = [], MULTIPART_OVERHEAD_BYTES
        batch.append(path)
        size += file_bytes
    if batch:
        batches.append(batch)
    return batches


def run_batch(run: Callable[[list[Path]], T], batch: list[Path]) -> T:
    """`run` on one batch: retried while the service is busy (503, after its Retry-After); a refused
    image is named (the batch is tried one file at a time to find it)."""
    for attempt in range(RETRIES_WHEN_BUSY + 1):
        try:
            return run(batch)
        except ServiceUnavailable as error:
            if attempt == RETRIES_WHEN_BUSY:
                raise
            time.sleep(error.retry_after or 1.0)
        except (InvalidInput, UnsupportedMediaType, PayloadTooLarge) as error:
            if len(batch) == 1:
                raise SystemExit(f"error: {batch[0]}: {error}") from None
            for path in batch:
                run_batch(run, [path])
            raise
    raise AssertionError("unreachable")


def in_batches(
    files: list[Path], limits: dict[str, Any], max_items: int, what: str, run: Callable[[list[Path]], T]
) -> list[T]:
    """`run` on consecutive batches that fit the service's limits, with a progress bar on a terminal."""
    results = []
    with tqdm(total=len(files), unit="image", desc=what, disable=None) as progress:
        for batch in batched(files, max_items, limits["max_body_bytes"]):
            results.append(run_batch(run, batch))
            progress.update(len(batch))
    return results


def sample_command(client: VaeClient, args: argparse.Namespace) -> str:
    grid = client.sample_grid(
        args.n, seed=args.seed, temperature=args.temperature, prior=args.prior, label=args.label,
        columns=args.columns,
    )  # fmt: skip
    grid.save(args.output)
    return f"wrote {args.n} samples as a {grid.width}x{grid.height} grid to {args.output}"


def encode_command(client: VaeClient, args: argparse.Namespace) -> str:
    files = image_files(args.folder)
    limits = client.model()["limits"]
    encodings = in_batches(
        files, limits, limits["max_items_per_request"], "encode", lambda batch: client.encode(list(batch))
    )
    mean = np.concatenate([encoding.mean for encoding in encodings])
    np.save(args.output, mean)
    if args.log_var is not None:
        np.save(args.log_var, np.concatenate([encoding.log_var for encoding in encodings]))
    if args.names is not None:
        args.names.write_text("".join(f"{path.name}\n" for path in files))
    return f"wrote {mean.shape[0]} latents of {mean.shape[1]} dims to {args.output} (rows in file-name order)"


def score_command(client: VaeClient, args: argparse.Namespace) -> str:
    files = image_files(args.folder)
    model = client.model()
    limits = model["limits"]
    decodes = min(limits["max_score_decodes"], model["batching"]["max_queue_items"])
    size = max(1, min(limits["max_items_per_request"], decodes // (args.k + 1)))
    results = in_batches(
        files, limits, size, "score", lambda batch: client.score(list(batch), k=args.k, seed=args.seed)
    )
    rows: list[dict[str, Any]] = [
        {"file": path.name, **item}
        for path, item in zip(files, (item for result in results for item in result.items), strict=True)
    ]
    with args.csv.open("w", newline="") as output:
        writer = csv.DictWriter(output, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    flagged = sum(1 for row in rows if row.get("anomalous"))
    return f"wrote scores of {len(rows)} images to {args.csv}; {flagged} anomalous"


def models_table(models: list[ModelSummary]) -> str:
    """One aligned row per model; the default model's name is marked with `*`."""

    def shape(dims: tuple[int, ...]) -> str:
        return "x".join(str(size) for size in dims) or "-"

    def cells(model: ModelSummary) -> tuple[str, ...]:
        memory = "-" if model.memory_bytes is None else f"{model.memory_bytes / 2**20:.1f} MiB"
        name = model.name + (" *" if model.default else "")
        return (name, model.version, model.kind, model.state, shape(model.latent_shape),
                shape(model.image_shape), memory, model.reason)  # fmt: skip

    header = ("NAME", "VERSION", "KIND", "STATE", "LATENT", "IMAGE", "MEMORY", "REASON")
    rows = [header, *(cells(model) for model in models)]
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*(line.rstrip() for line in lines), "* the default model (the unprefixed routes)"])


def models_command(client: VaeClient, args: argparse.Namespace) -> str:
    return models_table(client.models())


COMMANDS: dict[str, Callable[[VaeClient, argparse.Namespace], str]] = {
    "models": models_command,
    "sample": sample_command,
    "encode": encode_command,
    "score": score_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with VaeClient(args.url, api_key=args.api_key, timeout=args.timeout, model=args.model) as client:
            print(COMMANDS[args.command](client, args))
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except httpx.TimeoutException as error:
        print(f"error: no answer from {args.url} within {args.timeout:g} s: {error!r}", file=sys.stderr)
        return 1
    except httpx.TransportError as error:
        print(f"error: cannot reach the service at {args.url}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file cannot be read or written
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
