"""Run the benchmark suite: start the service and its baselines, load each, print one table, write JSON.

    python -m benchmarks.run [--duration S] [--repetitions R] [--concurrency C] [--scenarios ...]
                             [--json PATH] [--model-dir DIR] [--load-tool auto|wrk|httpx]

See benchmarks/README.md for what is measured and how to read the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from benchmarks.baselines import inference_images_per_second
from benchmarks.loadgen import LoadGenerator, make_load_generator
from benchmarks.report import (
    BATCHING_OFF,
    HTTP_CEILING,
    INFERENCE_CEILING,
    NAIVE,
    SERVICE,
    Cell,
    evaluate_targets,
    format_machine,
    format_table,
    format_targets,
    machine_info,
)
from benchmarks.scenarios import Scenario, build_scenarios
from benchmarks.servers import RssSampler, ServerProcess, free_port, python_command
from model.manifest import DEFAULT_MODEL_DIR, MANIFEST_FILENAME, read_manifest

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_JSON_PATH = RESULTS_DIR / "latest.json"
# Each server's output (and uvicorn's access log with VAE_ACCESS_LOG=true), overwritten by the next run.
LOG_DIR = RESULTS_DIR / "logs"
SCENARIO_NAMES = list(build_scenarios())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of load per repetition (default 5)"
    )
    parser.add_argument(
        "--repetitions", type=int, default=3, help="repetitions per measurement; medians shown"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of warm-up load per server and scenario"
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIO_NAMES, default=SCENARIO_NAMES)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON_PATH, help=f"default {DEFAULT_JSON_PATH}")
    parser.add_argument(
        "--model-dir", type=Path, help="model to serve (default: model/default, else an untrained stand-in)"
    )
    parser.add_argument("--load-tool", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--log-dir", type=Path, default=LOG_DIR, help=f"server logs (default {LOG_DIR})")
    parser.add_argument(
        "--inference-seconds",
        type=float,
        default=2.0,
        help="seconds per repetition of the in-process ceiling",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def model_directory(requested: Path | None) -> Iterator[Path]:
    """The requested model dir, else the shipped default, else an untrained stand-in (needs torch)."""
    if requested is not None:
        yield requested
    elif (DEFAULT_MODEL_DIR / MANIFEST_FILENAME).is_file():
        yield DEFAULT_MODEL_DIR
    else:
        from model.export import export_untrained  # torch: only for the stand-in
        from model.vae import VaeConfig

        with tempfile.TemporaryDirectory(prefix="vae-bench-model-") as stand_in:
            print(f"model/default is missing: exporting an untrained stand-in to {stand_in}", file=sys.stderr)
            export_untrained(Path(stand_in), VaeConfig())
            yield Path(stand_in)


def service_command() -> list[str]:
    """The `vae-serve` console script, run with this interpreter (so no install is needed)."""
    entry_points = importlib.metadata.entry_points(group="console_scripts", name="vae-serve")
    module, _, function = (
        next(iter(entry_points)).value.partition(":") if entry_points else ("app.cli", "", "main")
    )
    return python_command("-c", f"import sys; from {module} import {function}; sys.exit({function}())")


def service_env(model_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    return {"VAE_MODEL_DIR": str(model_dir), "VAE_HOST": "127.0.0.1", "VAE_PORT": str(port), **overrides}


def baseline_server_flags(settings: Settings) -> list[str]:
    """The baselines' flags that give them the service's logging, so they pay for it alike."""
    return ["--log-level", settings.log_level, *(["--access-log"] if settings.access_log else [])]


def preflight(server: ServerProcess, scenarios: list[Scenario]) -> dict[str, bytes]:
    """Send each scenario once; warn on a non-2xx answer. Returns the response bodies by scenario."""
    bodies = {}
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        for scenario in scenarios:
            request = scenario.request
            response = client.request(
                request.method, request.path, headers=request.headers, content=request.body
            )
            if not response.is_success:
                print(
                    f"warning: {server.name} answered {scenario.name} with {response.status_code}: "
                    f"{response.text[:300]}",
                    file=sys.stderr,
                )
            bodies[scenario.name] = response.content
    return bodies


def measure(
    args: argparse.Namespace,
    load: LoadGenerator,
    servers: dict[str, ServerProcess],
    model_dir: Path,
    max_batch_size: int,
) -> dict[tuple[str, str, int], Cell]:
    """Measure every cell; repetitions interleave (all cells once, then again) so drift spreads evenly."""
    scenarios = model_scenarios(model_dir)
    cells: dict[tuple[str, str, int], Cell] = {}
    for name in args.scenarios:
        for server in (*servers, INFERENCE_CEILING):
            if (server != HTTP_CEILING or name == "encode") and (server != NAIVE or scenarios[name].naive):
                cells[(name, server, args.concurrency)] = Cell(name, server, args.concurrency)
    if "encode" in args.scenarios and args.concurrency != 1:
        for server in (SERVICE, BATCHING_OFF):
            cells[("encode", server, 1)] = Cell("encode", server, 1)

    for repetition in range(args.repetitions):
        for cell in cells.values():
            started = time.perf_counter()
            if cell.server == INFERENCE_CEILING:
                layouts = inference_images_per_second(
                    model_dir, cell.scenario, max_batch_size, args.inference_seconds
                )
                cell.images_per_second_runs.append(max(layouts.values()))
                cell.inference_layouts.append(layouts)
                summary = ", ".join(f"{layout} {value:,.0f} images/s" for layout, value in layouts.items())
            else:
                process, scenario = servers[cell.server], scenarios[cell.scenario]
                if repetition == 0 and args.warmup > 0:
                    load.run(process.base_url, scenario, cell.concurrency, args.warmup)
                with RssSampler(process.pid) as rss:
                    result = load.run(process.base_url, scenario, cell.concurrency, args.duration)
                cell.load_results.append(result)
                cell.peak_rss_bytes = max(cell.peak_rss_bytes, rss.peak_bytes)
                summary = f"{result.requests_per_second:,.0f} req/s, p99 {result.p99_ms:.1f} ms"
                if result.errors:
                    summary += f", errors {result.errors}"
            print(
                f"[{repetition + 1}/{args.repetitions}] {cell.scenario:<12} {cell.server:<17} "
                f"c={cell.concurrency:<3} {summary} ({time.perf_counter() - started:.1f} s)",
                file=sys.stderr,
            )
    return cells


def model_scenarios(model_dir: Path) -> dict[str, Scenario]:
    """Every scenario, built for the model's manifest: its latent size, image size and name."""
    manifest = read_manifest(model_dir)
    return build_scenarios(
        latent_dim=manifest.latent_dim,
        image_height=manifest.image.height,
        image_width=manifest.image.width,
        model_name=manifest.name,
        image_channels=manifest.image.channels,
    )


def start_servers(
    args: argparse.Namespace,
    model_dir: Path,
    server_flags: list[str],
    stack: contextlib.ExitStack,
    workdir: Path,
) -> dict[str, ServerProcess]:
    """The service, the service with batching off, the naive service and (for /encode) the HTTP ceiling."""
    scenarios = [model_scenarios(model_dir)[name] for name in args.scenarios]
    servers: dict[str, ServerProcess] = {}

    def start(server: ServerProcess) -> ServerProcess:
        stack.enter_context(server)
        seconds = server.start()
        print(
            f"started {server.name} (pid {server.pid}) in {seconds:.2f} s; log {server.log_path}",
            file=sys.stderr,
        )
        servers[server.name] = server
        return server

    port = free_port()
    service = start(
        ServerProcess(SERVICE, service_command(), port, service_env(model_dir, port), log_dir=args.log_dir)
    )
    bodies = preflight(service, scenarios)
    port = free_port()
    batching_off_env = service_env(model_dir, port, VAE_MAX_BATCH_SIZE="1")
    preflight(
        start(ServerProcess(BATCHING_OFF, service_command(), port, batching_off_env, log_dir=args.log_dir)),
        scenarios,
    )
    port = free_port()
    naive_command = python_command(
        *("-m", "benchmarks.baselines", "naive", *server_flags),
        *("--port", str(port), "--model-dir", str(model_dir)),
    )
    preflight(
        start(ServerProcess(NAIVE, naive_command, port, log_dir=args.log_dir)),
        [scenario for scenario in scenarios if scenario.naive],
    )
    if "encode" in args.scenarios:
        encode_response = workdir / "encode-response.json"
        encode_response.write_bytes(bodies["encode"])
        port = free_port()
        ceiling_command = python_command(
            *("-m", "benchmarks.baselines", "http-ceiling", *server_flags),
            *("--port", str(port), "--encode-response", str(encode_response)),
        )
        preflight(
            start(ServerProcess(HTTP_CEILING, ceiling_command, port, log_dir=args.log_dir)),
            [s for s in scenarios if s.name == "encode"],
        )
    return servers


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load = make_load_generator(args.load_tool)
    machine = machine_info(load.name)
    settings = Settings()  # the service's settings, as it will read them (honours VAE_*)
    max_batch_size, max_wait_ms = settings.max_batch_size, settings.max_wait_ms
    started_at = datetime.now(UTC)
    with (
        model_directory(args.model_dir) as model_dir,
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="vae-bench-") as workdir,
    ):
        manifest = read_manifest(model_dir)
        servers = start_servers(args, model_dir, baseline_server_flags(settings), stack, Path(workdir))
        cells = measure(args, load, servers, model_dir, max_batch_size)
    ready = {name: server.ready_seconds for name, server in servers.items()}
    targets = evaluate_targets(cells, args.concurrency, max_wait_ms, ready[SERVICE])

    print()
    print(format_table(cells))
    print()
    ready_text = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in ready.items() if seconds)
    print(
        f"model {manifest.name} {manifest.version} ({model_dir}); service max_batch_size {max_batch_size}, "
        f"max_wait_ms {max_wait_ms:g}; medians of {args.repetitions} x {args.duration:g} s per cell; "
        f"ready (spawn -> /readyz 200): {ready_text}"
    )
    print(format_machine(machine))
    print("targets (issue 5):")
    print(format_targets(targets))

    report = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": machine,
        "model": {"name": manifest.name, "version": manifest.version, "dir": str(model_dir)},
        "settings": {
            "duration_seconds": args.duration,
            "repetitions": args.repetitions,
            "concurrency": args.concurrency,
            "warmup_seconds": args.warmup,
            "inference_seconds": args.inference_seconds,
            "scenarios": args.scenarios,
            "service_max_batch_size": max_batch_size,
            "service_max_wait_ms": max_wait_ms,
            "service_log_level": settings.log_level,
            "service_access_log": settings.access_log,
        },
        "servers": {
            name: {"command": s.command, "ready_seconds": s.ready_seconds} for name, s in servers.items()
        },
        "results": [cell.to_dict() for cell in cells.values()],
        "targets": [target.to_dict() for target in targets],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
