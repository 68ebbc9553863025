"""Service settings: one `Settings` object read from `VAE_`-prefixed environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ExecutionProvider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything `vae-serve` can be told; flags override environment variables, which override defaults."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="forbid", frozen=True)

    model_dir: Path | None = Field(
        default=None,
        description=(
            "Directory holding encoder.onnx, decoder.onnx and manifest.json. "
            "When unset, the shipped default model (model/default) is served."
        ),
    )
    host: str = Field(default="127.0.0.1", description="Interface address the HTTP server binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port the HTTP server listens on.")
    execution_provider: ExecutionProvider = Field(
        default="auto",
        description=(
            "Which onnxruntime execution provider runs the model. "
            "'auto' uses CUDA when onnxruntime offers it and CPU otherwise, "
            "'cuda' requires CUDA and refuses to start without it, and 'cpu' always uses the CPU."
        ),
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description=(
            "Number of threads onnxruntime may use inside one operator. "
            "Zero lets onnxruntime choose (one per physical core)."
        ),
    )
    max_batch_size: int = Field(
        default=64,
        ge=1,
        description="Largest number of items the batcher puts into one onnxruntime run.",
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description=(
            "Longest time in milliseconds the first queued item waits for more items "
            "before a partly filled batch runs."
        ),
    )
    max_queue_items: int = Field(
        default=1024,
        ge=1,
        description=(
            "Most items that may wait for the encoder (and, separately, for the decoder). "
            "Requests that would exceed it are rejected at once with 503 and a Retry-After header."
        ),
    )
    request_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Deadline for answering one request, in seconds. "
            "A request still unanswered then gets 504 and its queued work is dropped."
        ),
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="Largest accepted request body in bytes; larger bodies get 413.",
    )
    max_image_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description=(
            "Largest accepted uploaded image in pixels (width times height), "
            "checked from the image header before decoding; larger images get 413."
        ),
    )
    max_items_per_request: int = Field(
        default=64,
        ge=1,
        description="Most images or latent vectors one request may carry; more get 422.",
    )
    max_sample_n: int = Field(
        default=64,
        ge=1,
        description="Largest n accepted by GET /sample; larger values get 422.",
    )
    max_interpolation_steps: int = Field(
        default=64,
        ge=2,
        description="Largest number of frames (endpoints included) accepted by POST /interpolate.",
    )
    max_temperature: float = Field(
        default=5.0,
        gt=0,
        description="Largest sampling temperature accepted by GET /sample; larger values get 422.",
    )
    log_level: LogLevel = Field(default="info", description="Lowest level of log messages that are written.")

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        largest_request = max(self.max_items_per_request, self.max_sample_n, self.max_interpolation_steps)
        if self.max_queue_items < largest_request:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least the largest request "
                f"({largest_request} items), or such requests could never be queued"
            )
        return self
