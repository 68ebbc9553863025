"""Closed-loop load generators: fixed connections, each sending its next request when the last one returns.

Two tools behind one interface (`LoadGenerator.run`): wrk (C, light; preferred because the client competes
with the server for the same CPU cores) and an httpx async client (pure Python, used when wrk is missing; on
a 2-core machine it takes noticeably more CPU from the server, so absolute numbers drop and ratios flatten).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.scenarios import Scenario

# A request slower than this counts as an error ("timeout") instead of a latency sample.
REQUEST_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class LoadResult:
    """One measurement: throughput of successful (2xx) responses, latency of all responses, errors by kind."""

    tool: str
    concurrency: int
    duration_seconds: float
    ok_requests: int
    requests_per_second: float
    images_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # HTTP status ("503") or transport failure ("timeout", "connect", "read", "write") -> count.
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(
    tool: str,
    scenario: Scenario,
    concurrency: int,
    duration_seconds: float,
    ok_requests: int,
    percentiles_ms: tuple[float, float, float],
    errors: dict[str, int],
) -> LoadResult:
    duration_seconds = max(duration_seconds, 1e-9)
    return LoadResult(
        tool=tool,
        concurrency=concurrency,
        duration_seconds=duration_seconds,
        ok_requests=ok_requests,
        requests_per_second=ok_requests / duration_seconds,
        images_per_second=ok_requests * scenario.images_per_request / duration_seconds,
        p50_ms=percentiles_ms[0],
        p95_ms=percentiles_ms[1],
        p99_ms=percentiles_ms[2],
        errors=dict(sorted(errors.items())),
    )


class LoadGenerator(ABC):
    """Sends one scenario's request to base_url over `concurrency` connections for `duration_seconds`."""

    name: str

    @abstractmethod
    def run(self, base_url: str, scenario: Scenario, concurrency: int, duration_seconds: float) -> LoadResult:
        """Run the load and summarise it; blocks for about duration_seconds."""


# wrk runs this script in every thread; `response` counts statuses per thread, `done` merges them and
# prints one JSON line. The body is read from a file so binary multipart bodies survive unescaped.
_WRK_SCRIPT = """
wrk.method = {method}
wrk.path = {path}
{headers}
local body_file = io.open({body_path}, "rb")
wrk.body = body_file:read("*a")
body_file:close()
if wrk.body == "" then wrk.body = nil end

local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end

function done(summary, latency, requests)
  local merged = {{}}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do merged[status] = (merged[status] or 0) + count end
  end
  local parts = {{}}
  for status, count in pairs(merged) do table.insert(parts, string.format('"%d": %d', status, count)) end
  local errors = summary.errors
  io.write(string.format(
    'BENCHMARK_JSON {{"duration_us": %d, "statuses": {{%s}}, "connect": %d, "read": %d, "write": %d, '
      .. '"timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d}}\\n',
    summary.duration, table.concat(parts, ", "), errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def _lua_string(text: str) -> str:
    """A Lua string literal for arbitrary text (decimal escapes, so no quoting rules to get wrong)."""
    return '"' + "".join(f"\\{byte}" for byte in text.encode()) + '"'


class WrkLoadGenerator(LoadGenerator):
    """wrk with one thread (leaving the other core to the server) and a Lua script for the request."""

    name = "wrk"

    def __init__(self, executable: str = "wrk", threads: int = 1) -> None:
        self.executable = executable
        self.threads = threads

    def run(self, base_url: str, scenario: Scenario, concurrency: int, duration_seconds: float) -> LoadResult:
        request = scenario.request
        with tempfile.TemporaryDirectory(prefix="vae-bench-wrk-") as workdir:
            body_path = Path(workdir) / "body"
            body_path.write_bytes(request.body)
            headers = "\n".join(
                f"wrk.headers[{_lua_string(key)}] = {_lua_string(value)}"
                for key, value in request.headers.items()
            )
            script_path = Path(workdir) / "request.lua"
            script_path.write_text(
                _WRK_SCRIPT.format(
                    method=_lua_string(request.method),
                    path=_lua_string(request.path),
                    headers=headers,
                    body_path=_lua_string(str(body_path)),
                )
            )
            # wrk takes whole seconds; sub-second runs are only for smoke tests.
            command = [
                self.executable,
                f"--threads={min(self.threads, concurrency)}",
                f"--connections={concurrency}",
                f"--duration={max(1, math.ceil(duration_seconds))}s",
                f"--timeout={int(REQUEST_TIMEOUT_SECONDS)}s",
                f"--script={script_path}",
                base_url + request.path,
            ]
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("BENCHMARK_JSON ")), None)
        if completed.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr or completed.stdout}")
        report = json.loads(line.removeprefix("BENCHMARK_JSON "))
        statuses = {int(status): count for status, count in report["statuses"].items()}
        errors = {str(status): count for status, count in statuses.items() if not 200 <= status < 300}
        for kind in ("connect", "read", "write", "timeout"):
            if report[kind]:
                errors[kind] = report[kind]
        return _result(
            self.name,
            scenario,
            concurrency,
            report["duration_us"] / 1e6,
            sum(count for status, count in statuses.items() if 200 <= status < 300),
            (report["p50_us"] / 1e3, report["p95_us"] / 1e3, report["p99_us"] / 1e3),
            errors,
        )


class HttpxLoadGenerator(LoadGenerator):
    """An asyncio + httpx client with one task per connection; the fallback when wrk is missing."""

    name = "httpx"

    def run(self, base_url: str, scenario: Scenario, concurrency: int, duration_seconds: float) -> LoadResult:
        return asyncio.run(self._run(base_url, scenario, concurrency, duration_seconds))

    async def _run(
        self, base_url: str, scenario: Scenario, concurrency: int, duration_seconds: float
    ) -> LoadResult:
        request = scenario.request
        latencies_seconds: list[float] = []
        statuses: Counter[str] = Counter()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

            async def connection_loop(deadline: float) -> None:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        response = await client.request(
                            request.method, request.path, headers=request.headers, content=request.body
                        )
                    except httpx.TimeoutException:
                        statuses["timeout"] += 1
                        continue
                    except httpx.ConnectError:
                        statuses["connect"] += 1
                        continue
                    except httpx.TransportError:
                        statuses["read"] += 1
                        continue
                    latencies_seconds.append(time.perf_counter() - started)
                    statuses[str(response.status_code)] += 1

            started = time.perf_counter()
            deadline = started + duration_seconds
            await asyncio.gather(*(connection_loop(deadline) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        ok_requests = sum(count for status, count in statuses.items() if status.startswith("2"))
        errors = {status: count for status, count in statuses.items() if not status.startswith("2")}
        if latencies_seconds:
            p50, p95, p99 = (float(v) * 1e3 for v in np.percentile(latencies_seconds, [50, 95, 99]))
        else:
            p50 = p95 = p99 = float("nan")
        return _result(self.name, scenario, concurrency, elapsed, ok_requests, (p50, p95, p99), errors)


def make_load_generator(tool: str = "auto") -> LoadGenerator:
    """The tool named "wrk" or "httpx", or for "auto" wrk when it is on PATH, else httpx."""
    if tool not in ("auto", "wrk", "httpx"):
        raise ValueError(f"load tool must be auto, wrk or httpx, got {tool!r}")
    wrk_path = shutil.which("wrk")
    if tool == "wrk" and wrk_path is None:
        raise RuntimeError("--load-tool wrk was asked for but wrk is not on PATH (apt-get install wrk)")
    if tool != "httpx" and wrk_path is not None:
        return WrkLoadGenerator(wrk_path)
    return HttpxLoadGenerator()
