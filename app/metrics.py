"""Prometheus metrics, one registry per app so tests can create many apps.

With several worker processes (`--workers N`), prometheus_client's multiprocess mode keeps every worker's
values in files in one directory per server start, and `/metrics` on any worker reads them all: counters and
histograms add up, the gauges sum over the live workers. `vae_model_info` and `vae_model_memory_bytes` come
from the answering worker's own registry (loads, unloads and reloads switch every worker,
app/server/group.py), and the worker counts from the files the supervisor writes (app/server/rundir.py).
Every model metric carries a `model` label: the model's name in the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MODEL_PARTS = ("encoder", "decoder")
REJECTION_REASONS = ("queue_full", "timeout")
RELOAD_RESULTS = ("success", "failure")
CONTROL_ACTIONS = ("load", "unload", "reload")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Nats per image: MNIST digits score about 100; blank images far less, noise thousands.
NEGATIVE_ELBO_BUCKETS = (10, 25, 50, 75, 100, 125, 150, 200, 300, 500, 1000, 2000, 5000, 10000)


# The served models' vae_model_info labels (one dict per model serving now), and each model's memory.
ModelInfoLabels = Callable[[], list[dict[str, str]]]
ModelMemory = Callable[[], dict[str, int]]
MODEL_INFO_LABELS = ("model", "name", "version", "provider", "latent_dim")


class ModelsCollector(Collector):
    """vae_model_info and vae_model_memory_bytes for the models serving now, read at scrape time."""

    def __init__(self, served_models: ModelInfoLabels, model_memory: ModelMemory) -> None:
        self.served_models = served_models
        self.model_memory = model_memory

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        info, memory = self._families()
        for labels in self.served_models():
            info.add_metric([labels[name] for name in MODEL_INFO_LABELS], 1)
        for model, memory_bytes in sorted(self.model_memory().items()):
            memory.add_metric([model], memory_bytes)
        yield from (info, memory)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "vae_model_info", "A model serving now, one series each; always 1.", labels=MODEL_INFO_LABELS
            ),
            GaugeMetricFamily(
                "vae_model_memory_bytes",
                "Resident memory the model's load added to the process (0 while it is not loaded).",
                labels=("model",),
            ),
        )


class WorkersCollector(Collector):
    """The worker processes of a multi-worker server: how many run, and how many died and were replaced."""

    def __init__(self, workers: int, exits: Callable[[], int]) -> None:
        self.workers = workers
        self.exits = exits

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("vae_workers", "Worker processes the server runs.", value=self.workers)
        yield CounterMetricFamily(
            "vae_worker_restarts",
            "Worker processes that died (crashed, killed, or hung and killed) and were replaced.",
            value=self.exits(),
        )


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

    def __init__(self, served_models: ModelInfoLabels = list, model_memory: ModelMemory = dict) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What /metrics shows: this registry, or every worker's files in multiprocess mode.
        self.exposition: CollectorRegistry = self.registry
        self._model_info = ModelsCollector(served_models, model_memory)
        registry = self.registry
        self.requests = Counter(
            "vae_requests_total",
            "HTTP requests answered, by route template, method, status code and model (empty for routes of "
            "no model).",
            ("endpoint", "method", "status", "model"),
            registry=registry,
        )
        self.request_duration_seconds = Histogram(
            "vae_request_duration_seconds",
            "Time from receiving a request to finishing its response.",
            ("endpoint", "model"),
            registry=registry,
        )
        self.batch_size = Histogram(
            "vae_batch_size",
            "Items per onnxruntime run.",
            ("model", "part"),
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "vae_queue_wait_seconds",
            "Time a request's first items waited in the batcher queue.",
            ("model", "part"),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.inference_duration_seconds = Histogram(
            "vae_inference_duration_seconds",
            "Duration of one onnxruntime run.",
            ("model", "part"),
            buckets=INFERENCE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "vae_queue_depth",
            "Items waiting in the batcher queue.",
            ("model", "part"),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "vae_requests_in_flight",
            "HTTP requests being handled.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.items_processed = Counter(
            "vae_items_processed_total", "Items run through the model.", ("model", "part"), registry=registry
        )
        self.requests_rejected = Counter(
            "vae_requests_rejected_total",
            "Requests rejected because the queue was full or the deadline passed.",
            ("model", "reason"),
            registry=registry,
        )
        registry.register(self._model_info)
        registry.register(WorkersCollector(workers=1, exits=lambda: 0))
        self.model_reloads = Counter(
            "vae_model_reloads_total",
            "Model loads, unloads and reloads (the repository API, POST /admin/reload or SIGHUP), by "
            "model, action and result: success or failure.",
            ("model", "action", "result"),
            registry=registry,
        )
        self.score_negative_elbo = Histogram(
            "vae_score_negative_elbo",
            "Negative ELBO (nats per image) of the images POST /score scored.",
            ("model",),
            buckets=NEGATIVE_ELBO_BUCKETS,
            registry=registry,
        )
        self.anomalous_images = Counter(
            "vae_anomalous_images_total",
            "Images POST /score judged anomalous (p-value below alpha).",
            ("model",),
            registry=registry,
        )

    def add_model(self, model: str) -> None:
        """Create a model's labelled children up front, so dashboards see zeros rather than missing series."""
        for part in MODEL_PARTS:
            self.for_part(model, part)
        for reason in REJECTION_REASONS:
            self.requests_rejected.labels(model=model, reason=reason)
        for action in CONTROL_ACTIONS:
            for result in RELOAD_RESULTS:
                self.model_reloads.labels(model=model, action=action, result=result)
        self.score_negative_elbo.labels(model=model)
        self.anomalous_images.labels(model=model)

    def for_part(self, model: str, part: str) -> PartMetrics:
        """The children labelled with one model and part."""
        return PartMetrics(
            batch_size=self.batch_size.labels(model=model, part=part),
            queue_wait_seconds=self.queue_wait_seconds.labels(model=model, part=part),
            inference_duration_seconds=self.inference_duration_seconds.labels(model=model, part=part),
            queue_depth=self.queue_depth.labels(model=model, part=part),
            items_processed=self.items_processed.labels(model=model, part=part),
            rejected_queue_full=self.requests_rejected.labels(model=model, reason="queue_full"),
        )

    def read_every_worker(self, metrics_dir: Path, workers: int, exits: Callable[[], int]) -> None:
        """Expose every worker's metrics from prometheus_client's multiprocess files in `metrics_dir`
        (the process must have started with PROMETHEUS_MULTIPROC_DIR set to it)."""
        exposition = CollectorRegistry()
        MultiProcessCollector(exposition, path=str(metrics_dir))
        exposition.register(self._model_info)
        exposition.register(WorkersCollector(workers, exits))
        self.exposition = exposition
