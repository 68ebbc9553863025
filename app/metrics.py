"""Prometheus metrics, one registry per app so tests can create many apps.

Metrics are per process: `vae-serve` runs one uvicorn worker, so run one process per container and let
Prometheus aggregate across containers.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MODEL_PARTS = ("encoder", "decoder")
REJECTION_REASONS = ("queue_full", "timeout")
RELOAD_RESULTS = ("success", "failure")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Nats per image: MNIST digits score about 100; blank images far less, noise thousands.
NEGATIVE_ELBO_BUCKETS = (10, 25, 50, 75, 100, 125, 150, 200, 300, 500, 1000, 2000, 5000, 10000)


@dataclass(frozen=True)
class PartMetrics:
    """The metric children of one model part ("encoder" or "decoder"), as the batcher uses them."""

    batch_size: Histogram
    queue_wait_seconds: Histogram
    inference_duration_seconds: Histogram
    queue_depth: Gauge
    items_processed: Counter
    rejected_queue_full: Counter


class Metrics:
    """Every metric the service exports, registered in its own `CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "vae_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ("endpoint", "method", "status"),
            registry=registry,
        )
        self.request_duration_seconds = Histogram(
            "vae_request_duration_seconds",
            "Time from receiving a request to finishing its response.",
            ("endpoint",),
            registry=registry,
        )
        self.batch_size = Histogram(
            "vae_batch_size",
            "Items per onnxruntime run.",
            ("part",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "vae_queue_wait_seconds",
            "Time a request's first items waited in the batcher queue.",
            ("part",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.inference_duration_seconds = Histogram(
            "vae_inference_duration_seconds",
            "Duration of one onnxruntime run.",
            ("part",),
            buckets=INFERENCE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "vae_queue_depth", "Items waiting in the batcher queue.", ("part",), registry=registry
        )
        self.requests_in_flight = Gauge(
            "vae_requests_in_flight", "HTTP requests being handled.", registry=registry
        )
        self.items_processed = Counter(
            "vae_items_processed_total", "Items run through the model.", ("part",), registry=registry
        )
        self.requests_rejected = Counter(
            "vae_requests_rejected_total",
            "Requests rejected because the queue was full or the deadline passed.",
            ("reason",),
            registry=registry,
        )
        self.model_info = Gauge(
            "vae_model_info",
            "The served model; always 1.",
            ("name", "version", "provider", "latent_dim"),
            registry=registry,
        )
        self.model_reloads = Counter(
            "vae_model_reloads_total",
            "Model reloads (POST /admin/reload or SIGHUP), by result: success or failure.",
            ("result",),
            registry=registry,
        )
        self.score_negative_elbo = Histogram(
            "vae_score_negative_elbo",
            "Negative ELBO (nats per image) of the images POST /score scored.",
            buckets=NEGATIVE_ELBO_BUCKETS,
            registry=registry,
        )
        self.anomalous_images = Counter(
            "vae_anomalous_images_total",
            "Images POST /score judged anomalous (p-value below alpha).",
            registry=registry,
        )
        self._model_info_labels: dict[str, str] | None = None
        # Create every labelled child up front so dashboards see zeros rather than missing series.
        for part in MODEL_PARTS:
            self.for_part(part)
        for reason in REJECTION_REASONS:
            self.requests_rejected.labels(reason=reason)
        for result in RELOAD_RESULTS:
            self.model_reloads.labels(result=result)

    def for_part(self, part: str) -> PartMetrics:
        """The children labelled with one model part."""
        return PartMetrics(
            batch_size=self.batch_size.labels(part=part),
            queue_wait_seconds=self.queue_wait_seconds.labels(part=part),
            inference_duration_seconds=self.inference_duration_seconds.labels(part=part),
            queue_depth=self.queue_depth.labels(part=part),
            items_processed=self.items_processed.labels(part=part),
            rejected_queue_full=self.requests_rejected.labels(reason="queue_full"),
        )

    def set_model_info(self, name: str, version: str, provider: str, latent_dim: int) -> None:
        """Show this model in vae_model_info, replacing the previously served one's series."""
        labels = {"name": name, "version": version, "provider": provider, "latent_dim": str(latent_dim)}
        if self._model_info_labels is not None and self._model_info_labels != labels:
            self.model_info.remove(*self._model_info_labels.values())
        self.model_info.labels(**labels).set(1)
        self._model_info_labels = labels
