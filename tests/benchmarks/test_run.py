"""The benchmark suite end to end with tiny settings, its load generators, and its target arithmetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import run
from benchmarks.loadgen import HttpxLoadGenerator, LoadGenerator, LoadResult, WrkLoadGenerator
from benchmarks.report import (
    BATCHING_OFF,
    HTTP_CEILING,
    INFERENCE_CEILING,
    NAIVE,
    SERVICE,
    Cell,
    evaluate_targets,
)
from benchmarks.scenarios import build_scenarios
from benchmarks.servers import ServerProcess, free_port, python_command


def _load(
    requests_per_second: float, p50_ms: float = 1.0, p99_ms: float = 2.0, images: int = 1
) -> LoadResult:
    throughput = requests_per_second
    return LoadResult(
        "test", 64, 1.0, int(throughput), throughput, throughput * images, p50_ms, p50_ms, p99_ms, {}
    )


def test_targets_compare_the_service_with_each_baseline() -> None:
    cells = {
        ("encode", SERVICE, 64): Cell(
            "encode", SERVICE, 64, [_load(800, p99_ms=40)], peak_rss_bytes=200 * 2**20
        ),
        ("encode", HTTP_CEILING, 64): Cell("encode", HTTP_CEILING, 64, [_load(1000)]),
        ("encode", NAIVE, 64): Cell("encode", NAIVE, 64, [_load(500)]),
        ("encode", BATCHING_OFF, 64): Cell("encode", BATCHING_OFF, 64, [_load(900)]),
        ("sample-png", SERVICE, 64): Cell("sample-png", SERVICE, 64, [_load(50, images=16)]),
        ("sample-png", INFERENCE_CEILING, 64): Cell(
            "sample-png", INFERENCE_CEILING, 64, images_per_second_runs=[1000, 2000, 1600]
        ),
        ("encode", SERVICE, 1): Cell("encode", SERVICE, 1, [_load(300, p50_ms=3.5)]),
        ("encode", BATCHING_OFF, 1): Cell("encode", BATCHING_OFF, 1, [_load(400, p50_ms=2.5)]),
    }
    targets = {t.name: t for t in evaluate_targets(cells, 64, max_wait_ms=2.0, service_ready_seconds=1.5)}

    assert targets["encode: service / HTTP ceiling (req/s)"].value == pytest.approx(0.8)
    assert targets["encode: service / HTTP ceiling (req/s)"].passed is True
    assert targets["encode: service / naive service (req/s)"].value == pytest.approx(1.6)
    assert targets["encode: service / naive service (req/s)"].passed is False
    assert targets["encode: batching on / off (images/s)"].passed is False
    # 800 images/s against the median ceiling of 1600.
    assert targets["sample-png: service / inference ceiling (images/s)"].value == pytest.approx(0.5)
    assert targets["sample-json: service / inference ceiling (images/s)"].passed is None
    assert targets["encode, 1 client: p50 added by batching"].value == pytest.approx(1.0)
    assert targets["encode, 1 client: p50 added by batching"].passed is True
    assert targets["service: spawn to /readyz 200"].passed is True
    assert targets["service: peak RSS under load"].value == pytest.approx(200)


_TOOLS: list[LoadGenerator] = [HttpxLoadGenerator()]
if shutil.which("wrk"):
    _TOOLS.append(WrkLoadGenerator())


@pytest.mark.parametrize("load", _TOOLS, ids=lambda tool: tool.name)
def test_load_generators_send_a_multipart_upload_fastapi_accepts(load: LoadGenerator, tmp_path: Path) -> None:
    response_path = tmp_path / "response.json"
    response_path.write_bytes(b'{"mean": [0.0], "log_var": [0.0]}')
    port = free_port()
    command = python_command(
        *("-m", "benchmarks.baselines", "http-ceiling"),
        *("--port", str(port), "--encode-response", str(response_path)),
    )
    with ServerProcess("http-ceiling", command, port) as server:
        server.start()
        result = load.run(server.base_url, build_scenarios()["encode"], concurrency=2, duration_seconds=1.0)

    assert result.errors == {}
    assert result.ok_requests > 10
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms


@pytest.mark.slow
def test_suite_runs_every_scenario_and_writes_json(model_dir: Path, tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    tiny = ["--duration", "1", "--repetitions", "1", "--concurrency", "4", "--warmup", "0"]
    paths = ["--model-dir", str(model_dir), "--json", str(json_path), "--log-dir", str(tmp_path / "logs")]
    run.main([*tiny, "--inference-seconds", "0.2", *paths])

    report = json.loads(json_path.read_text())
    measured = {(cell["scenario"], cell["server"], cell["concurrency"]) for cell in report["results"]}
    for name, scenario in build_scenarios().items():
        for server in (SERVICE, BATCHING_OFF, INFERENCE_CEILING):
            assert (name, server, 4) in measured
        # The naive baseline has no latent-space features; it runs only what it implements.
        assert ((name, NAIVE, 4) in measured) == scenario.naive
    assert {("encode", HTTP_CEILING, 4), ("encode", SERVICE, 1), ("encode", BATCHING_OFF, 1)} <= measured
    for cell in report["results"]:
        assert cell["errors"] == {}, cell
        assert cell["median"]["images_per_second"] > 0, cell
    assert report["servers"][SERVICE]["ready_seconds"] > 0
    assert {target["name"] for target in report["targets"]} >= {"service: peak RSS under load"}
    assert report["machine"]["cores_usable"] >= 1
