"""Several models in one server (issue 25): what serving by name costs, and two models under load at once.

    python -m benchmarks.models                             # this checkout only
    python -m benchmarks.models --before /path/to/checkout  # and an older checkout, A/B in one run

Rows, each the median of interleaved repetitions (every cell once, then every cell again):
- `/encode` on the default model: the older checkout serving model/default (`before`, when given), this
  checkout serving the same one directory (`one model`), and the shipped three models (`shipped`);
- `/models/mnist-vae/encode` on the shipped server: the same model by name;
- two models at once on the shipped server: half the connections on `/models/mnist-vae/encode`, half on
  `/models/mnist-ae/encode` (a load generator process each), each model's req/s and the sum, against
  `/encode` alone (the single-model ceiling of the same server: both models are the same size);
- the control for that row: the same two load generators, both on `/models/mnist-vae/encode`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadGenerator, LoadResult, make_load_generator
from benchmarks.run import RESULTS_DIR, model_scenarios, service_command, service_env
from benchmarks.scenarios import Scenario
from benchmarks.servers import ServerProcess, free_port
from model.manifest import DEFAULT_MODEL_DIR


def at_path(scenario: Scenario, path: str) -> Scenario:
    return dataclasses.replace(scenario, request=dataclasses.replace(scenario.request, path=path))


def run_two(
    load: Callable[[], LoadGenerator],
    base_url: str,
    scenarios: tuple[Scenario, Scenario],
    concurrency: int,
    duration: float,
) -> tuple[LoadResult, LoadResult]:
    """Both scenarios at once, each on half the connections, each with its own load generator process."""
    results: list[LoadResult | None] = [None, None]

    def one(index: int) -> None:
        results[index] = load().run(base_url, scenarios[index], concurrency // 2, duration)

    threads = [threading.Thread(target=one, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = results
    assert first is not None and second is not None
    return first, second


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="an older checkout to compare with (its app/ and model/)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--load-tool", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "models.json")
    args = parser.parse_args(argv)
    encode = model_scenarios(DEFAULT_MODEL_DIR)["encode"]
    servers: dict[str, ServerProcess] = {}
    layouts = {"one model": True, "shipped": False}
    if args.before is not None:
        layouts = {"before": True, **layouts}
    try:
        for name, one_model in layouts.items():
            port = free_port()
            env = service_env(DEFAULT_MODEL_DIR, port)
            if not one_model:
                del env["VAE_MODEL_DIR"]  # unset: the shipped models
            if name == "before":
                env["PYTHONPATH"] = str(args.before.resolve())
            server = ServerProcess(name.replace(" ", "-"), service_command(), port, env)
            server.start()
            servers[name] = server
        cells: dict[str, Callable[[], dict[str, float]]] = {}
        load = lambda: make_load_generator(args.load_tool)  # noqa: E731

        def single(server: ServerProcess, scenario: Scenario) -> Callable[[], dict[str, float]]:
            def measure() -> dict[str, float]:
                result = load().run(server.base_url, scenario, args.concurrency, args.duration)
                return {
                    "req/s": result.requests_per_second,
                    "p99 ms": result.p99_ms,
                    "errors": result.error_count,
                }

            return measure

        def pair(server: ServerProcess, second: str) -> dict[str, float]:
            vae, other = run_two(
                load,
                server.base_url,
                (at_path(encode, "/models/mnist-vae/encode"), at_path(encode, f"/models/{second}/encode")),
                args.concurrency,
                args.duration,
            )
            return {
                "first req/s": vae.requests_per_second,
                "second req/s": other.requests_per_second,
                "req/s": vae.requests_per_second + other.requests_per_second,
                "errors": vae.error_count + other.error_count,
            }

        for name, server in servers.items():
            cells[f"/encode, {name}"] = single(server, encode)
        shipped = servers["shipped"]
        by_name = at_path(encode, "/models/mnist-vae/encode")
        cells["/models/mnist-vae/encode, shipped"] = single(shipped, by_name)
        cells["two models at once, shipped"] = lambda: pair(shipped, "mnist-ae")
        # The control: the same two load generators on one model, so the row above shows what the second
        # model costs, not what a second load generator process costs.
        cells["one model, two load generators, shipped"] = lambda: pair(shipped, "mnist-vae")
        for server in servers.values():  # warm-up
            load().run(server.base_url, encode, args.concurrency, 1)
        runs: dict[str, list[dict[str, float]]] = {cell: [] for cell in cells}
        for repetition in range(args.repetitions):
            for cell, measure in cells.items():
                runs[cell].append(measure())
                print(f"[{repetition + 1}/{args.repetitions}] {cell}: {runs[cell][-1]}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    medians = {
        cell: {key: statistics.median(run[key] for run in cell_runs) for key in cell_runs[0]}
        for cell, cell_runs in runs.items()
    }
    reference = medians["/encode, one model"]["req/s"]
    runs_text = f"medians of {args.repetitions} x {args.duration:g} s"
    print(f"\n/encode-sized requests, {args.concurrency} connections, {runs_text}")
    print("| cell | req/s | vs /encode, one model | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for cell, row in medians.items():
        p99 = f"{row['p99 ms']:.1f}" if "p99 ms" in row else "-"
        detail = f" ({row['first req/s']:,.0f} + {row['second req/s']:,.0f})" if "first req/s" in row else ""
        print(
            f"| {cell} | {row['req/s']:,.0f}{detail} | {row['req/s'] / reference:.3f} | {p99} | "
            f"{row['errors']:.0f} |"
        )
    # Each pair's ratio per repetition (run back to back), then the median: drift between repetitions cancels.
    pairs = [
        ("/encode, one model", "/encode, before"),
        ("/encode, shipped", "/encode, one model"),
        ("/models/mnist-vae/encode, shipped", "/encode, shipped"),
        ("two models at once, shipped", "one model, two load generators, shipped"),
    ]
    ratios = {
        f"{cell} / {reference}": statistics.median(
            run["req/s"] / base["req/s"] for run, base in zip(runs[cell], runs[reference], strict=True)
        )
        for cell, reference in pairs
        if cell in runs and reference in runs
    }
    print("\n| paired ratio (median of the repetitions' ratios) | req/s ratio |\n|---|---|")
    for pair_name, ratio in ratios.items():
        print(f"| {pair_name} | {ratio:.3f} |")
    report = {
        "ratios": ratios,
        "concurrency": args.concurrency,
        "duration_seconds": args.duration,
        "repetitions": args.repetitions,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "medians": medians,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
