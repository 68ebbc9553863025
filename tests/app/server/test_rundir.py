"""The run directory a multi-worker server shares: the served model, worker exits, the reload lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import Settings
from app.engine import intra_op_threads
from app.server.rundir import RunDirectory, run_directory


def test_a_new_run_directory_is_empty_and_removed_after(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "metrics").mkdir(parents=True)
    (root / "metrics" / "counter_1.db").write_bytes(b"old")  # a previous start's counts
    with run_directory(root) as run:
        assert sorted(path.name for path in root.iterdir()) == ["control", "metrics"]
        assert list(run.metrics_dir.iterdir()) == []
    assert not root.exists()


def test_the_served_models_and_exits_are_recorded(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run")
    assert run.served_models() is None
    run.set_served_models({"mnist-vae": "/models/v2", "mnist-ae": "/models/ae"})
    assert run.served_models() == {"mnist-vae": "/models/v2", "mnist-ae": "/models/ae"}
    run.set_served_models({})
    assert run.served_models() == {}, "no models is a record too, unlike none"
    socket_path = run.control_socket(4242)
    socket_path.touch()
    assert run.workers() == {4242: socket_path}
    run.record_exit(4242, -9)
    run.record_exit(4343, 1)
    assert run.exit_count() == 2
    assert run.workers() == {}, "a dead worker's socket is removed"


def test_one_reload_at_a_time_and_none_while_a_worker_starts(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run")
    reload = run.try_lock_for_reload()
    assert reload is not None
    assert run.try_lock_for_reload() is None
    reload.close()
    starting = run.lock_for_start()
    assert run.try_lock_for_reload() is None
    also_starting = run.lock_for_start()  # workers start together
    starting.close()
    also_starting.close()
    again = run.try_lock_for_reload()
    assert again is not None
    again.close()


@pytest.mark.parametrize(("workers", "threads", "expected"), [(1, 2, 4), (2, 2, 2), (4, 2, 1), (16, 2, 1)])
def test_workers_share_the_cores(
    monkeypatch: pytest.MonkeyPatch, workers: int, threads: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert intra_op_threads(Settings(workers=workers, inference_threads=threads)) == expected
