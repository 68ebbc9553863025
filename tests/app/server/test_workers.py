"""A real `vae-serve --workers 2`: one port, metrics over every worker, reloads on all or none, a dead
worker replaced, SIGTERM draining every worker."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.app.test_server import metric, start_server

pytestmark = pytest.mark.slow

KEY = "worker-test-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
DEADLINE_SECONDS = 30
WORKERS = 2


class Workers:
    """A running multi-worker server: its supervisor, URL, log and shared run directory."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path, tmp: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log
        (self.run_dir,) = tmp.glob("vae-serve-*")

    def pids(self) -> list[int]:
        """The workers that have started (opened their control socket)."""
        return sorted(int(path.name) for path in (self.run_dir / "control").iterdir())

    def wait_for(self, condition: str, check: object) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not check():  # type: ignore[operator]
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"never {condition}:\n{self.log.read_text()}"
            time.sleep(0.05)  # poll interval

    def worker_metric(self, pid: int, line_start: str) -> float:
        """One worker's own value, from its multiprocess files alone."""
        own = self.run_dir.parent / f"metrics-of-{pid}"
        shutil.rmtree(own, ignore_errors=True)
        own.mkdir()
        for path in (self.run_dir / "metrics").glob(f"*_{pid}.db"):
            shutil.copy(path, own)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(own))
        lines = generate_latest(registry).decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(line_start))

    def models_seen(self, requests: int = 12) -> set[str]:
        """The model on each of `requests` fresh connections, which the workers accept in turn."""
        return {
            httpx.get(self.base_url + "/model", headers=ADMIN, timeout=10).json()["model"]
            for _ in range(requests)
        }


@contextmanager
def workers(tmp_path: Path, *flags: str) -> Iterator[Workers]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    environment = {**os.environ, "TMPDIR": str(tmp)}
    process, base_url, log = start_server(
        tmp_path, "--workers", str(WORKERS), "--api-key", KEY, *flags, env=environment
    )
    try:
        server = Workers(process, base_url, log, tmp)
        server.wait_for("started every worker", lambda: len(server.pids()) == WORKERS)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert not list(tmp.glob("vae-serve-*")), "the run directory outlived the server"


async def _concurrent_samples(base_url: str, count: int, connections: int) -> list[int]:
    async def one_connection(seeds: range) -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, headers=ADMIN, timeout=DEADLINE_SECONDS) as client:
            return [(await client.get(f"/sample?n=1&seed={seed}")).status_code for seed in seeds]

    batches = await asyncio.gather(
        *(one_connection(range(i, count, connections)) for i in range(connections))
    )
    return [status for batch in batches for status in batch]


def test_every_worker_serves_and_any_scrape_counts_them_all(tmp_path: Path, mnist_model_dir: Path) -> None:
    with workers(tmp_path, "--model-dir", str(mnist_model_dir)) as server:
        statuses = asyncio.run(_concurrent_samples(server.base_url, count=64, connections=16))
        assert statuses == [200] * 64
        sample = 'vae_requests_total{endpoint="/sample",method="GET",model="mnist-test",status="200"}'
        per_worker = [server.worker_metric(pid, sample) for pid in server.pids()]
        assert sum(per_worker) == 64 and all(count > 0 for count in per_worker), per_worker
        decoder_batches = 'vae_batch_size_count{model="mnist-test",part="decoder"}'
        batches = sum(server.worker_metric(pid, decoder_batches) for pid in server.pids())
        for _ in range(8):  # fresh connections: several scrapes land on each worker, and all agree
            assert metric(server.base_url, sample) == 64
            assert metric(server.base_url, decoder_batches) == batches
            assert metric(server.base_url, "vae_workers ") == WORKERS
        text = httpx.get(server.base_url + "/metrics", timeout=10).text
        labels = (
            'latent_dim="16",model="mnist-test",name="mnist-test",provider="CPUExecutionProvider",version="1"'
        )
        assert re.findall(r"^vae_model_info\{.*", text, re.MULTILINE) == [f"vae_model_info{{{labels}}} 1.0"]
        assert (
            'vae_queue_depth{model="mnist-test",part="decoder"} 0.0' in text
        )  # summed over live workers, no pid label
        assert "Application startup complete" in server.log.read_text()


def test_a_reload_switches_every_worker_or_none(
    tmp_path: Path, mnist_model_dir: Path, mnist_model_v2_dir: Path
) -> None:
    with workers(tmp_path, "--model-dir", str(mnist_model_dir), "--request-timeout-seconds", "5") as server:
        reloaded = httpx.post(
            server.base_url + "/admin/reload", json={"model_dir": str(mnist_model_v2_dir)}, headers=ADMIN
        )
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json() == {
            "status": "reloaded",
            "name": "mnist-test",
            "model": "mnist-test/2",
            "model_dir": str(mnist_model_v2_dir),
            "workers": 2,
            "workers_switched": 2,
        }
        assert server.log.read_text().count("now serving mnist-test/2") == WORKERS
        assert server.models_seen() == {"mnist-test/2"}

        missing = tmp_path / "missing"
        refused = httpx.post(
            server.base_url + "/admin/reload", json={"model_dir": str(missing)}, headers=ADMIN
        )
        assert refused.status_code == 422
        for pid in server.pids():
            assert f"worker {pid}: model directory {missing} does not exist" in refused.json()["detail"]

        # One worker cannot answer in time (stopped): the reload fails, and no worker switches. The other
        # coordinates it, on its own SIGHUP: a request could be queued on the stopped worker's socket.
        stopped, running = server.pids()
        os.kill(stopped, signal.SIGSTOP)
        try:
            os.kill(running, signal.SIGHUP)
            server.wait_for(
                "failed the reload",
                lambda: f"worker {stopped}: no answer within 4 s" in server.log.read_text(),
            )
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert server.models_seen() == {"mnist-test/2"}
        assert server.log.read_text().count("now serving mnist-test/2") == WORKERS
        assert (
            metric(
                server.base_url,
                'vae_model_reloads_total{action="reload",model="mnist-test",result="failure"}',
            )
            == 2
        )
        assert (
            metric(
                server.base_url,
                'vae_model_reloads_total{action="reload",model="mnist-test",result="success"}',
            )
            == 1
        )

        # SIGHUP to the supervisor reloads the directory being served (the last one loaded), everywhere.
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(
            "reloaded on SIGHUP",
            lambda: "SIGHUP reload: mnist-test/2 on 2 of 2 workers" in server.log.read_text(),
        )
        assert (
            metric(
                server.base_url,
                'vae_model_reloads_total{action="reload",model="mnist-test",result="success"}',
            )
            == 2
        )
        assert server.pids() == sorted([stopped, running]), "no worker was replaced"


def test_a_dead_worker_is_replaced_counted_and_serves_the_current_model(
    tmp_path: Path, mnist_model_dir: Path, mnist_model_v2_dir: Path
) -> None:
    with workers(tmp_path, "--model-dir", str(mnist_model_dir)) as server:
        reloaded = httpx.post(
            server.base_url + "/admin/reload", json={"model_dir": str(mnist_model_v2_dir)}, headers=ADMIN
        )
        assert reloaded.status_code == 200
        killed, survivor = server.pids()
        os.kill(killed, signal.SIGKILL)
        server.wait_for(
            "replaced the worker", lambda: len(server.pids()) == WORKERS and killed not in server.pids()
        )
        (replacement,) = set(server.pids()) - {survivor}
        log = server.log.read_text()
        assert f"worker process {killed} died (signal 9); a new worker replaces it" in log
        assert (
            f"loaded model mnist-test version 2 from {mnist_model_v2_dir}" in log.split(f"{killed} died")[1]
        )
        assert metric(server.base_url, "vae_worker_restarts_total") == 1
        assert server.models_seen() == {"mnist-test/2"}
        assert replacement != killed


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path, mnist_model_dir: Path) -> None:
    # Lone requests wait 3 s in the batcher for company: long enough to be in flight when SIGTERM comes.
    flags = ("--model-dir", str(mnist_model_dir), "--max-wait-ms", "3000", "--shutdown-grace-seconds", "20")
    with workers(tmp_path, *flags) as server:

        async def requests_across_sigterm() -> list[httpx.Response]:
            clients = [
                httpx.AsyncClient(base_url=server.base_url, headers=ADMIN, timeout=DEADLINE_SECONDS)
                for _ in range(8)
            ]
            in_flight = [
                asyncio.ensure_future(client.get(f"/sample?n=1&seed={seed}"))
                for seed, client in enumerate(clients)
            ]
            queued = 'vae_queue_depth{model="mnist-test",part="decoder"}'
            deadline = time.monotonic() + DEADLINE_SECONDS
            while not all(server.worker_metric(pid, queued) > 0 for pid in server.pids()):
                assert time.monotonic() < deadline, "the requests never reached both workers' batchers"
                await asyncio.sleep(0.01)  # poll interval
            server.process.terminate()
            responses = list(await asyncio.gather(*in_flight))
            for client in clients:
                await client.aclose()
            return responses

        responses = asyncio.run(requests_across_sigterm())
        assert [response.status_code for response in responses] == [200] * 8
        assert server.process.wait(timeout=DEADLINE_SECONDS) == 0, server.log.read_text()
        assert server.log.read_text().count("Application shutdown complete") == WORKERS


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, mnist_model_dir: Path) -> None:
    with workers(tmp_path, "--model-dir", str(mnist_model_dir)) as server:
        pids = server.pids()
        server.process.kill()
        server.process.wait()
        deadline = time.monotonic() + DEADLINE_SECONDS
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            time.sleep(0.05)  # poll interval
        with pytest.raises(httpx.TransportError):
            httpx.get(server.base_url + "/healthz", timeout=2)
        shutil.rmtree(server.run_dir)  # a killed supervisor cannot remove it


def test_load_and_unload_switch_every_worker(tmp_path: Path, model_repository: Path) -> None:
    with workers(tmp_path, "--model-repository", str(model_repository)) as server:
        unloaded = httpx.post(server.base_url + "/v2/repository/models/beta/unload", headers=ADMIN)
        assert unloaded.status_code == 200, unloaded.text
        assert server.log.read_text().count("unload: model beta no longer serves") == WORKERS
        statuses = asyncio.run(_concurrent_statuses(server.base_url, "/models/beta/sample?n=1", 16, 8))
        assert statuses == [503] * 16, "no worker serves beta any more"
        alpha = asyncio.run(_concurrent_statuses(server.base_url, "/models/alpha/sample?n=1", 16, 8))
        assert alpha == [200] * 16
        loaded = httpx.post(server.base_url + "/v2/repository/models/beta/load", headers=ADMIN)
        assert loaded.status_code == 200, loaded.text
        statuses = asyncio.run(_concurrent_statuses(server.base_url, "/models/beta/sample?n=1", 16, 8))
        assert statuses == [200] * 16, "every worker serves beta again"
        # A worker that starts now loads what the group serves: the recorded models.
        assert (
            metric(server.base_url, 'vae_model_reloads_total{action="load",model="beta",result="success"}')
            == 1
        )


async def _concurrent_statuses(base_url: str, path: str, count: int, connections: int) -> list[int]:
    """The statuses of `count` GETs of `path` over `connections` fresh connections at once."""

    async def one_connection(share: int) -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=ADMIN) as client:
            return [(await client.get(path)).status_code for _ in range(share)]

    shares = await asyncio.gather(*(one_connection(count // connections) for _ in range(connections)))
    return [status for share in shares for status in share]
