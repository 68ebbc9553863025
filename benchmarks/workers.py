"""Throughput of `vae-serve --workers N` against one worker, with the CPU every process spends.

    python -m benchmarks.workers [--workers 1 2] [--duration S] [--repetitions R] [--concurrency C]
                                 [--scenario encode] [--json PATH]

Each server runs on its own port; repetitions interleave (every server once, then again) and medians are
shown. Per run it reads, from /proc, the CPU seconds of each worker's event-loop thread (the main thread,
which parses every request and writes every response) and of the whole server, and from getrusage the
load generator's own CPU. On a small machine the load generator and the workers share the cores, so the
gain from more workers is bounded there; the projection in benchmarks/README.md turns the per-request CPU
into capacity on a larger host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadgen import make_load_generator
from benchmarks.run import RESULTS_DIR, model_directory, model_scenarios, service_command, service_env
from benchmarks.servers import ServerProcess, free_port

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User plus system CPU of one thread (fields 14 and 15 of /proc/<pid>/task/<tid>/stat)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def worker_pids(server_pid: int, workers: int) -> list[int]:
    """The processes that serve: the server itself with one worker, else its spawned children (not
    multiprocessing's resource tracker)."""
    if workers == 1:
        return [server_pid]
    children = [
        int(pid) for pid in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    ]
    spawned = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(spawned) == workers, f"expected {workers} workers, found {spawned}"
    return spawned


def cpu_snapshot(pids: list[int]) -> dict[int, tuple[float, float]]:
    """(event-loop thread, whole process) CPU seconds per worker."""
    return {pid: (thread_cpu_seconds(pid, pid), process_cpu_seconds(pid)) for pid in pids}


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Run:
    workers: int
    requests_per_second: float
    p99_ms: float
    errors: int
    load_generator_cores: float
    server_cores: float
    loop_cpu_ms_per_request: float  # summed over workers' loop threads, per request
    server_cpu_ms_per_request: float
    busiest_loop_cores: float  # the event-loop thread closest to saturation


def measure_once(server: ServerProcess, workers: int, args: argparse.Namespace) -> Run:
    scenario = model_scenarios(args.model_dir_resolved)[args.scenario]
    load = make_load_generator(args.load_tool)
    pids = worker_pids(server.pid, workers)
    before, client_before = cpu_snapshot(pids), children_cpu_seconds()
    result = load.run(server.base_url, scenario, args.concurrency, args.duration)
    after, client_after = cpu_snapshot(pids), children_cpu_seconds()
    requests = max(1, result.ok_requests)
    loop = {pid: after[pid][0] - before[pid][0] for pid in pids}
    total = sum(after[pid][1] - before[pid][1] for pid in pids)
    return Run(
        workers=workers,
        requests_per_second=result.requests_per_second,
        p99_ms=result.p99_ms,
        errors=result.error_count,
        load_generator_cores=(client_after - client_before) / result.duration_seconds,
        server_cores=total / result.duration_seconds,
        loop_cpu_ms_per_request=1000 * sum(loop.values()) / requests,
        server_cpu_ms_per_request=1000 * total / requests,
        busiest_loop_cores=max(loop.values()) / result.duration_seconds,
    )


def median_run(runs: list[Run]) -> dict[str, float]:
    fields = [name for name in asdict(runs[0]) if name != "workers"]
    return {name: statistics.median(getattr(run, name) for run in runs) for name in fields}


def projection(one_worker: dict[str, float], cores: int) -> dict[str, float]:
    """Capacity on a host with `cores` cores and the load generator elsewhere, if CPU per request stays
    what one worker spent here: the cores bound it, and each worker's loop thread, which can use one core."""
    per_request = one_worker["server_cpu_ms_per_request"] / 1000
    loop_per_request = one_worker["loop_cpu_ms_per_request"] / 1000
    requests_per_second = cores / per_request
    return {
        "cores": cores,
        "requests_per_second": requests_per_second,
        "workers_needed": max(1.0, requests_per_second * loop_per_request / 0.8),  # loops at most 80% busy
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--scenario", default="encode")
    parser.add_argument("--load-tool", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "workers.json")
    args = parser.parse_args(argv)
    with model_directory(args.model_dir) as model_dir, contextlib.ExitStack() as stack:
        args.model_dir_resolved = model_dir
        servers: dict[int, ServerProcess] = {}
        for workers in args.workers:
            port = free_port()
            env = service_env(model_dir, port, VAE_WORKERS=str(workers))
            server = stack.enter_context(ServerProcess(f"service-{workers}w", service_command(), port, env))
            server.start()
            servers[workers] = server
        runs: dict[int, list[Run]] = {workers: [] for workers in args.workers}
        for repetition in range(args.repetitions):
            for workers, server in servers.items():
                if repetition == 0:  # warm-up
                    load = make_load_generator(args.load_tool)
                    load.run(server.base_url, model_scenarios(model_dir)[args.scenario], args.concurrency, 1)
                run = measure_once(server, workers, args)
                runs[workers].append(run)
                print(f"[{repetition + 1}/{args.repetitions}] {run}", file=sys.stderr)
    medians = {workers: median_run(worker_runs) for workers, worker_runs in runs.items()}
    baseline = medians[args.workers[0]]
    runs_text = f"medians of {args.repetitions} x {args.duration:g} s"
    print(f"\n{args.scenario}, {args.concurrency} connections, {runs_text}")
    print(
        "| workers | req/s | vs 1 | p99 ms | load generator cores | server cores | loop CPU ms/req | "
        "server CPU ms/req | busiest loop cores |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for workers, row in medians.items():
        print(
            f"| {workers} | {row['requests_per_second']:,.0f} | "
            f"{row['requests_per_second'] / baseline['requests_per_second']:.2f} | {row['p99_ms']:.1f} | "
            f"{row['load_generator_cores']:.2f} | {row['server_cores']:.2f} | "
            f"{row['loop_cpu_ms_per_request']:.3f} | {row['server_cpu_ms_per_request']:.3f} | "
            f"{row['busiest_loop_cores']:.2f} |"
        )
    projections = [projection(baseline, cores) for cores in (8, 32)]
    for item in projections:
        print(
            f"projection: {item['cores']:.0f} cores -> {item['requests_per_second']:,.0f} req/s "
            f"with {item['workers_needed']:.1f} workers or more"
        )
    report = {
        "scenario": args.scenario,
        "concurrency": args.concurrency,
        "duration_seconds": args.duration,
        "repetitions": args.repetitions,
        "cpu_count": os.cpu_count(),
        "runs": {str(workers): [asdict(run) for run in worker_runs] for workers, worker_runs in runs.items()},
        "medians": {str(workers): row for workers, row in medians.items()},
        "projections": projections,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
