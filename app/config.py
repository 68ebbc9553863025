"""Service settings: one `Settings` object read from `VAE_`-prefixed environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ExecutionProvider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
ModelControlMode = Literal["none", "explicit"]


class Settings(BaseSettings):
    """Everything `vae-serve` can be told; flags override environment variables, which override defaults."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="forbid", frozen=True)

    model_dir: Path | None = Field(
        default=None,
        description=(
            "The service serves the model in this directory (encoder.onnx, decoder.onnx, manifest.json and, "
            "when the manifest names them, latent_space.npz and score_reference.npz), as a repository of one "
            "model named by its manifest; when neither this nor model_repository is set, the shipped models "
            "are served."
        ),
    )
    model_repository: Path | None = Field(
        default=None,
        description=(
            "The service serves every immediate sub-folder of this directory that holds a manifest.json, "
            "each as a model named by its folder name (GET /models, /models/<name>/...); when neither this "
            "nor model_dir is set, the shipped models are served: mnist-vae (the default), mnist-ae and "
            "mnist-pca."
        ),
    )
    default_model: str | None = Field(
        default=None,
        description=(
            "The unprefixed routes (/encode, /sample, GET /model, ...) serve the model of this name; unset, "
            "the only model, the shipped VAE, or else the first name in alphabetical order."
        ),
    )
    model_control_mode: ModelControlMode = Field(
        default="none",
        description=(
            "In mode 'none' every model of the repository loads at start; in 'explicit' only the default "
            "model and those in load_models do, and the rest when POST /v2/repository/models/<name>/load "
            "asks."
        ),
    )
    load_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "With model_control_mode 'explicit', these models (comma-separated names) load at start, "
            "besides the default model."
        ),
    )
    host: str = Field(default="127.0.0.1", description="The HTTP server binds to this interface address.")
    port: int = Field(default=8000, ge=0, le=65535, description="The HTTP server listens on this TCP port.")
    workers: int = Field(
        default=1,
        ge=1,
        description=(
            "The server runs this many worker processes on one port, each with its own copy of the models "
            "and batchers (uvicorn's process supervisor); the CPU cores are shared among them, and /metrics "
            "on any worker reports all of them."
        ),
    )
    execution_provider: ExecutionProvider = Field(
        default="auto",
        description=(
            "This selects the onnxruntime execution provider that runs the model: 'auto' uses CUDA when "
            "onnxruntime offers it and the CPU otherwise, 'cuda' requires CUDA and refuses to start without "
            "it, and 'cpu' always uses the CPU."
        ),
    )
    inference_threads: int = Field(
        # Two runs of one thread each beat one run of two threads on 2 cores: small convolutions scale
        # poorly across threads, and the runs also overlap their Python work (benchmarks/, issue 5).
        default=2,
        ge=1,
        description=(
            "Each model part (encoder, decoder) runs up to this many batches at once, each on its own thread."
        ),
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description=(
            "Each onnxruntime operator may use this many threads; zero gives each inference thread of each "
            "worker process an equal share of the usable CPU cores (at least one)."
        ),
    )
    inference_niceness: int = Field(
        # At niceness 0 and four times capacity, the event loop ran 0.69 of a core and waited 0.26 for a core
        # behind the model's threads, and fell behind the load. At 10 it keeps up: 503s take 4 ms at the
        # median, not 51 ms, and the soak test's client never finds 2,048 requests open (issue 6).
        default=10,
        ge=0,
        le=19,
        description=(
            "The model's threads (the batchers' and onnxruntime's own) run this much nicer than the event "
            "loop on Linux, so the loop, which reads every request and answers the 503s, gets most of a "
            "contested core under overload; 0 runs them at the process's priority."
        ),
    )
    max_batch_size: int = Field(
        default=64,
        ge=1,
        description="The batcher puts at most this many items into one onnxruntime run.",
    )
    max_wait_ms: float = Field(
        # Batches still form at 0: whatever queues while the model runs goes into the next run. Waiting only
        # added latency (2.3 ms at one client) without more throughput at 64 (benchmarks/, issue 5).
        default=0.0,
        ge=0,
        description=(
            "The first queued item waits at most this many milliseconds for more items before a partly filled"
            " batch runs; at 0 a batch runs as soon as the model is free, with every item queued by then."
        ),
    )
    max_queue_items: int = Field(
        # 64 clients each decoding 64 latents must queue, not be shed: 4096 small items cost little memory.
        default=4096,
        ge=1,
        description=(
            "At most this many items may wait for the encoder (and, separately, for the decoder); a request "
            "that would exceed it is rejected at once with 503 and a Retry-After header."
        ),
    )
    request_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "A request still unanswered after this many seconds gets 504, and its queued work is dropped "
            "(deadlines are checked every 25 ms)."
        ),
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="Request bodies larger than this many bytes are rejected with 413.",
    )
    max_image_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description=(
            "Uploaded images with more pixels (width times height) than this are rejected with 413; the size "
            "is read from the image header before anything is decoded."
        ),
    )
    max_items_per_request: int = Field(
        default=64,
        ge=1,
        description=(
            "One request may carry at most this many images or latent vectors; more are rejected with 422."
        ),
    )
    max_sample_n: int = Field(
        default=64,
        ge=1,
        description="GET /sample accepts n up to this value; larger values are rejected with 422.",
    )
    max_interpolation_steps: int = Field(
        default=64,
        ge=2,
        description=(
            "POST /interpolate accepts up to this many frames (both endpoints included); more are rejected "
            "with 422."
        ),
    )
    max_temperature: float = Field(
        default=5.0,
        gt=0,
        description=(
            "GET /sample accepts temperatures up to this value; larger values are rejected with 422."
        ),
    )
    max_score_samples: int = Field(
        default=256,
        ge=1,
        description="POST /score accepts k (posterior samples per image) up to this value; more get 422.",
    )
    max_score_decodes: int = Field(
        # A quarter of the default queue: one scoring request must not fill the decoder queue for everyone.
        default=1024,
        ge=2,
        description=(
            "POST /score decodes (k + 1) x N latents for N images (k draws and the mean each); requests "
            "needing more (or more than VAE_MAX_QUEUE_ITEMS) are rejected with 422."
        ),
    )
    anomaly_alpha: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description=(
            "POST /score calls an image anomalous when its p-value (the combined likelihood, reconstruction "
            "and latent-density tests against the test split) is below this, unless the request gives its "
            "own alpha."
        ),
    )
    max_frames_per_request: int = Field(
        default=256,
        ge=1,
        description=(
            "POST /traverse (dimensions times steps) and POST /edit (amounts) return at most this many "
            "frames (and never more than VAE_MAX_QUEUE_ITEMS); more are rejected with 422."
        ),
    )
    max_traverse_span: float = Field(
        default=10.0,
        gt=0,
        description=(
            "POST /traverse accepts spans up to this many aggregate-posterior standard deviations; larger "
            "ones are rejected with 422."
        ),
    )
    max_edit_amount: float = Field(
        default=10.0,
        gt=0,
        description="POST /edit accepts amounts up to this magnitude; larger ones are rejected with 422.",
    )
    log_level: LogLevel = Field(default="info", description="Log messages below this level are not written.")
    access_log: bool = Field(
        # One log line per request costs about a tenth of /encode's throughput; vae_requests_total and
        # vae_request_duration_seconds already count and time every request.
        default=False,
        description="When true, uvicorn writes one access-log line per request.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "When set, the model endpoints require this key as 'Authorization: Bearer <key>' or "
            "'X-API-Key: <key>' (401 otherwise); the /admin endpoints and the repository's load and unload "
            "always require it and are refused with 403 while it is unset."
        ),
    )
    protect_ops_endpoints: bool = Field(
        default=False,
        description=(
            "When true (and an API key is set), /healthz, /readyz, /metrics, /docs, /redoc, /openapi.json, "
            "/v2 and /v2/health require the API key too; by default they stay open for probes and scrapers. "
            "The explorer page stays open either way (its calls need the key)."
        ),
    )
    cors_allow_origins: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description=(
            "Browsers on these origins (comma-separated, e.g. 'https://a.example,https://b.example', or '*') "
            "may call the API; when unset, no CORS headers are sent."
        ),
    )
    shutdown_grace_seconds: int = Field(
        default=30,
        ge=1,
        description=(
            "On SIGTERM the server stops accepting connections and gives requests in flight this many "
            "seconds to finish before it closes them."
        ),
    )

    @field_validator("cors_allow_origins", "load_models", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @property
    def frame_limit(self) -> int:
        """/traverse and /edit frames per request: the setting, or the queue's size if that is smaller
        (a larger request could never be queued, and would get 503 forever)."""
        return min(self.max_frames_per_request, self.max_queue_items)

    @property
    def score_decode_limit(self) -> int:
        """/score decoder items per request, bounded by the queue's size the same way."""
        return min(self.max_score_decodes, self.max_queue_items)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        largest_request = max(
            self.max_items_per_request,
            self.max_sample_n,
            self.max_interpolation_steps,
        )
        if self.max_queue_items < largest_request:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least the largest request "
                f"({largest_request} items), or such requests could never be queued"
            )
        return self
