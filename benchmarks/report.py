"""Summaries of a run: medians over repetitions, ratios to baselines, target checks, table, machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadResult

SERVICE = "service"
BATCHING_OFF = "batching-off"
NAIVE = "naive"
HTTP_CEILING = "http-ceiling"
INFERENCE_CEILING = "inference-ceiling"


@dataclass
class Cell:
    """One (scenario, server, concurrency) measured per repetition; in-process cells only have images/s."""

    scenario: str
    server: str
    concurrency: int
    load_results: list[LoadResult] = field(default_factory=list)
    images_per_second_runs: list[float] = field(default_factory=list)
    inference_layouts: list[dict[str, float]] = field(default_factory=list)  # per repetition, by layout
    peak_rss_bytes: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scenario, self.server, self.concurrency)

    def median(self, metric: str) -> float | None:
        if metric == "images_per_second" and self.images_per_second_runs:
            return statistics.median(self.images_per_second_runs)
        values = [getattr(result, metric) for result in self.load_results]
        return statistics.median(values) if values else None

    def errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for result in self.load_results:
            for kind, count in result.errors.items():
                total[kind] = total.get(kind, 0) + count
        return total

    def to_dict(self) -> dict[str, Any]:
        metrics = ("requests_per_second", "images_per_second", "p50_ms", "p95_ms", "p99_ms")
        return {
            "scenario": self.scenario,
            "server": self.server,
            "concurrency": self.concurrency,
            "median": {metric: self.median(metric) for metric in metrics},
            "errors": self.errors(),
            "peak_rss_mb": self.peak_rss_bytes / 2**20 if self.peak_rss_bytes else None,
            "repetitions": [result.to_dict() for result in self.load_results]
            or [{"images_per_second_by_layout": layouts} for layouts in self.inference_layouts],
        }


def service_ratio(cells: dict[tuple[str, str, int], Cell], cell: Cell) -> float | None:
    """The service's images/s divided by this cell's, in the same scenario and concurrency."""
    concurrency = cell.concurrency if cell.server != INFERENCE_CEILING else _load_concurrency(cells, cell)
    service = cells.get((cell.scenario, SERVICE, concurrency))
    if service is None or cell.server == SERVICE:
        return None
    mine, theirs = service.median("images_per_second"), cell.median("images_per_second")
    return mine / theirs if mine is not None and theirs else None


def _load_concurrency(cells: dict[tuple[str, str, int], Cell], cell: Cell) -> int:
    return max(c.concurrency for c in cells.values() if c.scenario == cell.scenario and c.server == SERVICE)


@dataclass(frozen=True)
class Target:
    """One check from issue 5 with the measured value and the limit it is held to."""

    name: str
    value: float | None
    limit: str
    passed: bool | None  # None: not measured in this run

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "passed": self.passed}


def _check(name: str, value: float | None, limit: float, at_least: bool, unit: str = "") -> Target:
    passed = None if value is None else (value >= limit if at_least else value <= limit)
    return Target(name, value, f"{'>=' if at_least else '<='} {limit:g}{unit}", passed)


def evaluate_targets(
    cells: dict[tuple[str, str, int], Cell],
    concurrency: int,
    max_wait_ms: float,
    service_ready_seconds: float | None,
) -> list[Target]:
    """Every target of issue 5 that this run measured."""

    def cell(scenario: str, server: str, at: int = concurrency) -> Cell | None:
        return cells.get((scenario, server, at))

    def ratio(scenario: str, server: str, at: int = concurrency) -> float | None:
        found = cell(scenario, server, at)
        return service_ratio(cells, found) if found else None

    targets = [
        _check("encode: service / HTTP ceiling (req/s)", ratio("encode", HTTP_CEILING), 0.7, True, "x"),
        _check("encode: service / naive service (req/s)", ratio("encode", NAIVE), 2.0, True, "x"),
    ]
    encode = cell("encode", SERVICE)
    targets.append(
        _check("encode: service p99", encode.median("p99_ms") if encode else None, 50, False, " ms")
    )
    # issue 5's 0.6 for the sample and latent-space rows; issue 13's 0.7 for /score; issue 16's 0.8 for the
    # Open Inference Protocol's binary encoder batches.
    for scenario, limit in (
        ("sample-json", 0.6),
        ("sample-png", 0.6),
        ("sample-gmm", 0.6),
        ("traverse", 0.6),
        ("score", 0.7),
        ("oip-binary", 0.8),  # issue 16
    ):
        targets.append(
            _check(
                f"{scenario}: service / inference ceiling (images/s)",
                ratio(scenario, INFERENCE_CEILING),
                limit,
                True,
                "x",
            )
        )
    for scenario in dict.fromkeys(key[0] for key in cells):
        if cell(scenario, BATCHING_OFF):
            targets.append(
                _check(
                    f"{scenario}: batching on / off (images/s)", ratio(scenario, BATCHING_OFF), 1.0, True, "x"
                )
            )
    on, off = cell("encode", SERVICE, 1), cell("encode", BATCHING_OFF, 1)
    if on and off:
        on_p50, off_p50 = on.median("p50_ms"), off.median("p50_ms")
        added = on_p50 - off_p50 if on_p50 is not None and off_p50 is not None else None
        targets.append(
            _check("encode, 1 client: p50 added by batching", added, max_wait_ms + 1, False, " ms")
        )
    targets.append(_check("service: spawn to /readyz 200", service_ready_seconds, 2.0, False, " s"))
    service_rss = [c.peak_rss_bytes for c in cells.values() if c.server == SERVICE and c.peak_rss_bytes]
    peak_mb = max(service_rss) / 2**20 if service_rss else None
    targets.append(_check("service: peak RSS under load", peak_mb, 300, False, " MB"))
    return targets


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(cells: dict[tuple[str, str, int], Cell]) -> str:
    """The one results table: medians per cell and the service's throughput relative to each baseline."""
    header = (
        *("scenario", "server", "conc", "req/s", "images/s", "p50 ms", "p95 ms", "p99 ms"),
        *("errors", "RSS MB", "service/this"),
    )
    rows = [header]
    for cell in cells.values():
        ratio = service_ratio(cells, cell)
        errors = cell.errors()
        rows.append(
            (
                cell.scenario,
                cell.server,
                "-" if cell.server == INFERENCE_CEILING else str(cell.concurrency),
                _number(cell.median("requests_per_second")),
                _number(cell.median("images_per_second")),
                _number(cell.median("p50_ms"), 2),
                _number(cell.median("p95_ms"), 2),
                _number(cell.median("p99_ms"), 2),
                ",".join(f"{kind}:{count}" for kind, count in errors.items()) or "0",
                _number(cell.peak_rss_bytes / 2**20, 0) if cell.peak_rss_bytes else "-",
                "ref" if cell.server == SERVICE else (f"{ratio:.2f}x" if ratio else "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # Names left-aligned, numbers right-aligned.
    lines = [
        "  ".join(
            value.ljust(width) if column < 2 else value.rjust(width)
            for column, (value, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_targets(targets: list[Target]) -> str:
    marks = {True: "PASS", False: "FAIL", None: "n/a "}
    return "\n".join(
        f"  {marks[t.passed]}  {t.name}: {_number(t.value, 2)} (target {t.limit})" for t in targets
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(load_tool: str) -> dict[str, Any]:
    """CPU, cores and the versions that decide the numbers."""
    wrk = "-"
    if load_tool == "wrk":
        completed = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        wrk = (completed.stdout or completed.stderr).split("\n", 1)[0].strip()
    return {
        "cpu_model": _cpu_model(),
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "numpy": _version("numpy"),
        "load_tool": load_tool,
        "wrk": wrk,
    }


def format_machine(machine: dict[str, Any]) -> str:
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_at_start"])
    return (
        f"machine: {machine['cpu_model']}, {machine['cores_usable']} usable cores "
        f"({machine['cores_online']} online), load average at start {load}; kernel {machine['kernel']}\n"
        f"python {machine['python']}, onnxruntime {machine['onnxruntime']}, fastapi {machine['fastapi']}, "
        f"uvicorn {machine['uvicorn']}, numpy {machine['numpy']}; load tool {machine['load_tool']}"
        + (f" ({machine['wrk']})" if machine["wrk"] != "-" else "")
    )
