"""The loaded model: two onnxruntime sessions checked against the manifest, and one batcher per part.

Routes call `encode` / `decode`; nothing else in the service touches onnxruntime.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.batcher import Batcher, lower_thread_priority
from app.config import ExecutionProvider, Settings
from app.errors import NonFiniteValues
from app.metrics import Metrics
from model.latent_space import LatentSpace, LatentSpaceError, load_latent_space
from model.manifest import DEFAULT_MODEL_DIR, Manifest, load_model_dir
from model.scores import LATENT_SCORE, ScoreReference

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class StartupError(Exception):
    """The model cannot be served: bad model directory, graph disagreeing with the manifest, no CUDA."""


def select_providers(requested: ExecutionProvider, available: Sequence[str]) -> list[str]:
    """onnxruntime providers, best first: 'auto' prefers CUDA (CPU as fallback), 'cpu' forces CPU."""
    if requested == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if requested == "cuda":
        raise StartupError(
            f"execution provider 'cuda' was requested, but onnxruntime offers only {', '.join(available)}; "
            "install onnxruntime-gpu with a matching CUDA runtime, or use --execution-provider auto or cpu"
        )
    return [CPU]


def intra_op_threads(settings: Settings) -> int:
    """onnxruntime threads per run: the setting, or the usable cores shared among the inference threads of
    every worker process."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable_cores // (settings.inference_threads * settings.workers))


def _open_sessions(
    paths: Mapping[str, Path], options: ort.SessionOptions, providers: list[str]
) -> list[ort.InferenceSession]:
    """The encoder and decoder sessions, in that order; stops at the first that onnxruntime cannot load."""
    sessions = []
    for part in ("encoder", "decoder"):
        try:
            sessions.append(ort.InferenceSession(str(paths[part]), options, providers=providers))
        except Exception as error:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise StartupError(f"onnxruntime cannot load the {part} {paths[part]}: {error}") from error
    return sessions


def _check_dims(what: str, actual: Sequence[object], expected: Sequence[int]) -> None:
    """Shapes must match the manifest except the batch axis; symbolic (dynamic) dims are accepted."""
    if len(actual) != len(expected) or any(
        isinstance(dim, int) and dim != want for dim, want in zip(actual[1:], expected[1:], strict=True)
    ):
        shown = ["N", *expected[1:]]
        raise StartupError(f"{what} has shape {list(actual)}, but the manifest implies {shown}")


def _check_float32(what: str, element_type: str) -> None:
    if element_type != "tensor(float)":
        raise StartupError(f"{what} has element type {element_type}; the service sends and reads float32")


def _check_names(what: str, actual: list[str], expected: list[str]) -> None:
    if sorted(actual) != sorted(expected):
        raise StartupError(f"{what} are named {actual}, but the manifest says {expected}")


class Engine:
    """A verified, warmed-up model and the batchers that feed it."""

    def __init__(
        self,
        manifest: Manifest,
        encoder_session: ort.InferenceSession,
        decoder_session: ort.InferenceSession,
        model_dir: Path,
    ) -> None:
        self.manifest = manifest
        self.model_dir = model_dir
        self.encoder_session = encoder_session
        self.decoder_session = decoder_session
        self.providers: list[str] = encoder_session.get_providers()
        self._encoder_batcher: Batcher | None = None
        self._decoder_batcher: Batcher | None = None
        self.warmed_up = False
        self._requests_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        names = manifest.tensors
        self._encoder_outputs = [names.encoder_mean, names.encoder_log_var]
        # The images, and the logits when the graph has them (POST /score needs them for exact likelihoods;
        # fetching them with every run costs one copy of the output, and saves a second batcher).
        self._decoder_outputs = [names.decoder_output]
        if names.decoder_logits is not None:
            self._decoder_outputs.append(names.decoder_logits)
        self.latent_space: LatentSpace | None = None
        self.score_reference: ScoreReference | None = None

    @property
    def provider(self) -> str:
        """The provider that runs the model (the first one the session uses)."""
        return self.providers[0]

    @property
    def ready(self) -> bool:
        return self.warmed_up and self._encoder_batcher is not None

    @property
    def info_labels(self) -> dict[str, str]:
        """This model's labels in vae_model_info."""
        manifest = self.manifest
        return {
            "name": manifest.name,
            "version": manifest.version,
            "provider": self.provider,
            "latent_dim": str(manifest.latent_dim),
        }

    @property
    def version_label(self) -> str:
        """`name/version`, as the X-Model-Version response header shows it."""
        return f"{self.manifest.name}/{self.manifest.version}"

    @contextmanager
    def in_use(self) -> Iterator[Engine]:
        """Count a request as using this engine until it is answered, so a reload can wait for it."""
        self._requests_in_flight += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._requests_in_flight -= 1
            if self._requests_in_flight == 0:
                self._idle.set()

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Read and verify the model directory, open both sessions, check them against the manifest, warm up.

        Raises model.manifest.ManifestError or StartupError with a message saying what is wrong.
        """
        model_dir = settings.model_dir or DEFAULT_MODEL_DIR
        if not model_dir.is_dir():
            raise StartupError(f"model directory {model_dir} does not exist or is not a directory")
        manifest, paths = load_model_dir(model_dir)
        providers = select_providers(settings.execution_provider, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads(settings)
        options.inter_op_num_threads = 1
        # Idle onnxruntime threads spinning between batches would steal the CPU the event loop needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime starts its operator threads with the session, on a thread they take their niceness from.
        with ThreadPoolExecutor(
            1, initializer=lower_thread_priority, initargs=(settings.inference_niceness,)
        ) as session_opener:
            encoder, decoder = session_opener.submit(_open_sessions, paths, options, providers).result()
        engine = cls(manifest, encoder, decoder, model_dir)
        if "score_reference" in paths:
            try:
                engine.score_reference = ScoreReference.load(paths["score_reference"])
            except ValueError as error:
                raise StartupError(f"the model's score reference is unusable: {error}") from error
        if "latent_space" in paths:
            try:
                engine.latent_space = load_latent_space(paths["latent_space"], manifest.latent_dim)
            except LatentSpaceError as error:
                raise StartupError(f"the model's latent-space description is unusable: {error}") from error
        engine.check_score_reference()
        if settings.execution_provider == "cuda" and engine.provider != CUDA:
            # onnxruntime falls back to CPU silently when the CUDA libraries fail to load.
            raise StartupError(
                f"execution provider 'cuda' was requested, but onnxruntime started {engine.provider}; "
                "check the CUDA and cuDNN libraries, or use --execution-provider auto or cpu"
            )
        engine.check_graphs()
        engine.warm_up(settings.max_batch_size)
        logger.info(
            "loaded model %s version %s from %s; running on %s (requested %r, onnxruntime offers %s)",
            manifest.name,
            manifest.version,
            model_dir,
            engine.provider,
            settings.execution_provider,
            ", ".join(ort.get_available_providers()),
        )
        for warning in manifest.quality_warnings:  # exported with vae-train --allow-weak-model
            logger.warning("model %s is weak: %s", manifest.name, warning)
        return engine

    def check_score_reference(self) -> None:
        """The reference must have been calibrated with the tests the service will run: latent_nll exactly
        when the model ships its mixture prior, or every p-value would be off."""
        if self.score_reference is None:
            return
        has_prior = self.latent_space is not None and self.latent_space.prior is not None
        if (LATENT_SCORE in self.score_reference.names) != has_prior:
            calibrated, ships = ("without", "a") if has_prior else ("with", "no")
            raise StartupError(
                f"the score reference was calibrated {calibrated} the latent density test, but the model "
                f"ships {ships} mixture prior; export the model again so both come from one run"
            )

    def check_graphs(self) -> None:
        """The sessions' input/output names and shapes must be what the manifest promises."""
        names, latent_dim = self.manifest.tensors, self.manifest.latent_dim
        image_shape = (-1, *self.manifest.image.shape)
        encoder_inputs = self.encoder_session.get_inputs()
        encoder_outputs = {output.name: output for output in self.encoder_session.get_outputs()}
        decoder_inputs = self.decoder_session.get_inputs()
        decoder_outputs = {output.name: output for output in self.decoder_session.get_outputs()}
        _check_names("encoder inputs", [node.name for node in encoder_inputs], [names.encoder_input])
        _check_names("encoder outputs", list(encoder_outputs), self._encoder_outputs)
        _check_names("decoder inputs", [node.name for node in decoder_inputs], [names.decoder_input])
        _check_names("decoder outputs", list(decoder_outputs), self._decoder_outputs)
        for what, node in (
            (f"encoder input {names.encoder_input!r}", encoder_inputs[0]),
            (f"decoder input {names.decoder_input!r}", decoder_inputs[0]),
            *((f"encoder output {name!r}", encoder_outputs[name]) for name in self._encoder_outputs),
            *((f"decoder output {name!r}", decoder_outputs[name]) for name in self._decoder_outputs),
        ):
            _check_float32(what, node.type)
        _check_dims(f"encoder input {names.encoder_input!r}", encoder_inputs[0].shape, image_shape)
        for name in self._encoder_outputs:
            _check_dims(f"encoder output {name!r}", encoder_outputs[name].shape, (-1, latent_dim))
        _check_dims(f"decoder input {names.decoder_input!r}", decoder_inputs[0].shape, (-1, latent_dim))
        for name in self._decoder_outputs:
            _check_dims(f"decoder output {name!r}", decoder_outputs[name].shape, image_shape)

    def warm_up(self, batch_size: int) -> None:
        """Run one full batch through each part, so the first request does not pay for allocation."""
        channels, height, width = self.manifest.image.shape
        latent_dim = self.manifest.latent_dim
        try:
            mean, log_var = self.run_encoder(
                np.zeros((batch_size, channels, height, width), dtype=np.float32)
            )
            images = self.run_decoder(np.zeros((batch_size, latent_dim), dtype=np.float32))[0]
        except Exception as error:  # onnxruntime's errors are untyped; any failure here means unservable
            raise StartupError(f"warm-up run of {batch_size} items failed: {error}") from error
        for what, array, shape in (
            ("encoder mean", mean, (batch_size, latent_dim)),
            ("encoder log_var", log_var, (batch_size, latent_dim)),
            ("decoder images", images, (batch_size, channels, height, width)),
        ):
            if array.shape != shape:
                raise StartupError(f"warm-up: {what} came back with shape {array.shape}, expected {shape}")
        self.warmed_up = True

    def run_encoder(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, H, W) float32 in [0, 1] -> mean, log_var, each (N, L) float32. Blocking."""
        mean, log_var = self.encoder_session.run(
            self._encoder_outputs, {self.manifest.tensors.encoder_input: images}
        )
        return mean, log_var

    def run_decoder(self, latents: np.ndarray) -> tuple[np.ndarray, ...]:
        """(N, L) float32 -> images (N, C, H, W) float32 in [0, 1], and their logits when the model has
        them. Blocking."""
        return tuple(
            self.decoder_session.run(self._decoder_outputs, {self.manifest.tensors.decoder_input: latents})
        )

    def start(self, settings: Settings, metrics: Metrics, model_name: str) -> None:
        """Start one batcher per part on the running event loop, counted in metrics as `model_name`."""
        batching: dict[str, Any] = {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue_items": settings.max_queue_items,
            "threads": settings.inference_threads,
            "niceness": settings.inference_niceness,
        }
        self._encoder_batcher = Batcher(
            self.run_encoder, part="encoder", metrics=metrics.for_part(model_name, "encoder"), **batching
        )
        self._decoder_batcher = Batcher(
            self.run_decoder, part="decoder", metrics=metrics.for_part(model_name, "decoder"), **batching
        )
        self._encoder_batcher.start()
        self._decoder_batcher.start()
        metrics.add_model(model_name)

    async def stop_when_idle(self) -> None:
        """Stop once the requests that use this engine are answered (after a reload replaced it)."""
        await self._idle.wait()
        await self.stop()

    def release(self) -> None:
        """Close the onnxruntime sessions once stopped, so their memory is freed now, not when the last
        reference to this engine goes; the engine cannot run again."""
        del self.encoder_session, self.decoder_session

    async def stop(self) -> None:
        for batcher in (self._encoder_batcher, self._decoder_batcher):
            if batcher is not None:
                await batcher.stop()
        self._encoder_batcher = self._decoder_batcher = None

    def check_room(self, part: str) -> None:
        """Raise QueueFull (and count it) if the part's ("encoder" or "decoder") queue is full now."""
        batcher = self._batcher(part)
        if batcher is not None:
            batcher.check_room()

    def has_room(self, part: str) -> bool:
        """Whether the part's ("encoder" or "decoder") queue can take one more item now."""
        batcher = self._batcher(part)
        return batcher is None or batcher.has_room()

    def _batcher(self, part: str) -> Batcher | None:
        return self._encoder_batcher if part == "encoder" else self._decoder_batcher

    async def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, H, W) float32 in [0, 1] -> mean, log_var (N, L), batched with concurrent requests."""
        assert self._encoder_batcher is not None, "Engine.start() was not called"
        mean, log_var = await self._encoder_batcher.submit(images)
        return mean, log_var

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        """(N, L) float32 -> (N, C, H, W) float32 in [0, 1], batched with concurrent requests."""
        images, _ = await self.decode_with_logits(latents)
        return images

    async def decode_with_logits(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, L) float32 -> images (N, C, H, W) float32 in [0, 1] and their logits (None for models without
        them), batched with concurrent requests."""
        assert self._decoder_batcher is not None, "Engine.start() was not called"
        outputs = await self._decoder_batcher.submit(latents)
        images = outputs[0]
        if not np.isfinite(images).all():
            raise NonFiniteValues(
                "the decoder produced non-finite pixels: the latent values are too large; "
                "keep them within a few hundred"
            )
        return images, (outputs[1] if len(outputs) > 1 else None)
