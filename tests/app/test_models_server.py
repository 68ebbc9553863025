"""Several models in a real `vae-serve`: load and unload cycles never fail another model's requests, and an
unload gives the memory back to the operating system."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import MNIST_LIKE, _export
from tests.app.test_server import serving

pytestmark = pytest.mark.slow

KEY = "models-server-key"
ADMIN = {"X-API-Key": KEY}
# A VAE with a wide fully-connected layer: about 100 MB of weights, big enough to see in the process's RSS.
WIDE = {**MNIST_LIKE, "widths": (32, 64), "hidden_dim": 4096}


@pytest.fixture(scope="module")
def wide_repository(tmp_path_factory: pytest.TempPathFactory, mnist_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("wide-repository")
    shutil.copytree(mnist_model_dir, root / "small")
    _export(root / "wide", WIDE, "wide-test")
    return root


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def server_pid(log: Path) -> int:
    """The serving process's pid, as uvicorn logs it."""
    for line in log.read_text().splitlines():
        if "Started server process [" in line:
            return int(line.split("[")[1].split("]")[0])
    raise AssertionError(f"no server pid in the log:\n{log.read_text()}")


@pytest.fixture
def server(tmp_path: Path, wide_repository: Path) -> Iterator[tuple[str, Path]]:
    flags = ("--model-repository", str(wide_repository), "--default-model", "small", "--api-key", KEY)
    with serving(tmp_path, *flags, "--model-control-mode", "explicit") as started:
        yield started


def test_unload_and_load_cycles_never_fail_another_models_requests(server: tuple[str, Path]) -> None:
    base_url, _ = server
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def steady_load() -> None:
        with httpx.Client(base_url=base_url, headers=ADMIN, timeout=30) as client:
            while not stop.is_set():
                statuses[client.get("/models/small/sample?n=4").status_code] += 1

    loaders = [threading.Thread(target=steady_load) for _ in range(4)]
    for loader in loaders:
        loader.start()
    try:
        with httpx.Client(base_url=base_url, headers=ADMIN, timeout=60) as control:
            for _ in range(3):
                assert control.post("/v2/repository/models/wide/load").status_code == 200
                assert control.get("/models/wide/sample?n=2").status_code == 200
                assert control.post("/v2/repository/models/wide/unload").status_code == 200
                assert control.get("/models/wide/sample?n=2").status_code == 503
    finally:
        stop.set()
        for loader in loaders:
            loader.join()
    assert set(statuses) == {200} and statuses[200] > 20, statuses


def test_an_unload_gives_the_memory_back(server: tuple[str, Path]) -> None:
    base_url, log = server
    pid = server_pid(log)
    with httpx.Client(base_url=base_url, headers=ADMIN, timeout=60) as client:
        for _ in range(3):  # the default model's arenas at their working size first
            assert client.get("/sample?n=64").status_code == 200
        before = resident_bytes(pid)
        assert client.post("/v2/repository/models/wide/load").status_code == 200
        for _ in range(3):
            assert client.get("/models/wide/sample?n=64").status_code == 200
        loaded = resident_bytes(pid)
        assert client.post("/v2/repository/models/wide/unload").status_code == 200
        deadline = time.monotonic() + 10
        while resident_bytes(pid) - before > (loaded - before) / 10 and time.monotonic() < deadline:
            time.sleep(0.05)  # the engine stops once its requests are answered: within milliseconds
        after = resident_bytes(pid)
    added, kept = loaded - before, after - before
    mebibytes = [f"{value / 2**20:.1f}" for value in (before, loaded, after)]
    print("RSS before the load, loaded, unloaded (MiB):", ", ".join(mebibytes))
    assert added > 80 * 2**20, "the wide model should add more than 80 MiB"
    assert kept <= added / 10, f"kept {kept / 2**20:.1f} MiB of the {added / 2**20:.1f} MiB the load added"
