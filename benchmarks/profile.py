"""Profile the service under one scenario's load with py-spy and print its hotspots.

    python -m benchmarks.profile [--scenario encode] [--seconds 15] [--concurrency 64] [--gil] [--native]

Starts the service like the suite does, loads it (wrk when installed), records with py-spy (raw collapsed
stacks, per thread) and prints the Python functions with the largest share of busy samples: "self" is time
with that function as the innermost Python frame (including the C code it calls), "total" counts it anywhere
on the stack. Threads waiting for work (idle pool threads, epoll) are counted apart as idle. With --gil only
the thread holding the GIL is sampled: the serial part of the service. Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from benchmarks.loadgen import make_load_generator
from benchmarks.run import SCENARIO_NAMES, model_directory, model_scenarios, service_command, service_env
from benchmarks.servers import ServerProcess, free_port

_PYTHON_FRAME = re.compile(r"^(?P<function>.+) \((?P<file>[^()]+\.py):\d+\)$")
_THREAD_FRAME = re.compile(r"^thread \(\d+\): (?P<name>.+)$")
# Innermost frames of a thread that is waiting for work rather than doing it.
_IDLE_PYTHON_FRAMES = {
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Queue.get (queue.py)",
    "_worker (futures/thread.py)",  # a ThreadPoolExecutor thread blocked in its work queue's get()
}
_IDLE_NATIVE_FRAMES = (
    "epoll_",  # epoll_wait, epoll_pwait
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "futex",
    "sem_wait",
    "poll",
)


def parse_collapsed(path: Path) -> list[tuple[str, list[str], int]]:
    """py-spy raw output as (thread name, Python frames outermost first as "function (file)", samples).

    Idle stacks (see _IDLE_PYTHON_FRAMES, _IDLE_NATIVE_FRAMES) get the single frame "<idle>".
    """
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = _THREAD_FRAME.match(frames[0])
        python_frames = []
        for frame in frames[1:] if thread else frames:
            match = _PYTHON_FRAME.match(frame)
            if match:
                short_file = "/".join(Path(match["file"]).parts[-2:])
                python_frames.append(f"{match['function']} ({short_file})")
        # A thread blocked inside Session.run waits for onnxruntime's own threads: inference, not idleness.
        in_inference = any(frame.startswith("Session.run ") for frame in python_frames)
        waiting = any(frame.startswith(_IDLE_NATIVE_FRAMES) for frame in frames[-3:]) and not in_inference
        idle = waiting or python_frames[-1:] in ([frame] for frame in _IDLE_PYTHON_FRAMES)
        stacks.append((thread["name"] if thread else "?", ["<idle>"] if idle else python_frames, int(count)))
    return stacks


def hotspots(stacks: list[tuple[str, list[str], int]], top: int) -> str:
    """Idle share, busy share per thread, then the top functions by self and total share of busy samples."""
    total = sum(count for _, _, count in stacks) or 1
    busy_stacks = [(thread, frames, count) for thread, frames, count in stacks if frames != ["<idle>"]]
    busy = sum(count for _, _, count in busy_stacks) or 1
    by_thread: Counter[str] = Counter()
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    for thread, frames, count in busy_stacks:
        by_thread[re.sub(r"[-_ ]?\d+(_\d+)?$", "", thread)] += count
        if frames:
            self_samples[frames[-1]] += count
        for frame in set(frames):
            total_samples[frame] += count
    shares = ", ".join(f"{name} {count / busy:.0%}" for name, count in by_thread.most_common())
    lines = [f"{total} samples, {1 - busy / total:.0%} idle; busy samples by thread: {shares}"]
    for title, counter in (("self", self_samples), ("total", total_samples)):
        lines.append(f"top {top} by {title} share of busy samples:")
        lines += [f"  {count / busy:6.1%}  {frame}" for frame, count in counter.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=SCENARIO_NAMES, default="encode")
    parser.add_argument("--seconds", type=int, default=15, help="seconds of recording (load runs 3 s longer)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL")
    parser.add_argument("--native", action="store_true", help="include native frames (onnxruntime, uvloop)")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument(
        "--output", type=Path, default=Path("/tmp/vae-profile.txt"), help="raw collapsed stacks"
    )
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        sys.exit("py-spy is not on PATH: pip install py-spy")

    load = make_load_generator()
    with model_directory(args.model_dir) as model_dir:
        port = free_port()
        with ServerProcess("service", service_command(), port, service_env(model_dir, port)) as server:
            server.start()
            scenario = model_scenarios(model_dir)[args.scenario]
            load_thread = threading.Thread(
                target=load.run, args=(server.base_url, scenario, args.concurrency, args.seconds + 3)
            )
            load_thread.start()
            flags = ["--gil"] * args.gil + ["--native"] * args.native
            command = [py_spy, "record", "--pid", str(server.pid), "--duration", str(args.seconds)]
            command += [
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--threads",
                *flags,
                "-o",
                str(args.output),
            ]
            threading.Event().wait(1.5)  # let the load reach steady state before sampling
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            load_thread.join()
    print(f"{args.scenario} at concurrency {args.concurrency}, {load.name}; raw stacks in {args.output}")
    print(hotspots(parse_collapsed(args.output), args.top))


if __name__ == "__main__":
    main()
