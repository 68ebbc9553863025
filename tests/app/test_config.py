"""Settings (env, flags, documentation), execution-provider selection and the model threads' priority."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.config import Settings
from app.engine import Engine, StartupError, select_providers
from tests.app.conftest import settings_for

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"VAE_{name.upper()}", raising=False)
    settings = Settings()
    assert settings.model_dir is None
    assert (settings.host, settings.port, settings.execution_provider) == ("127.0.0.1", 8000, "auto")
    assert (settings.max_batch_size, settings.max_wait_ms) == (64, 0.0)


def test_every_setting_is_documented_in_complete_sentences() -> None:
    for name, field in Settings.model_fields.items():
        description = field.description or ""
        assert description[:1].isupper() and description.endswith("."), name
        assert field.annotation is not None, name


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAE_PORT", "9001")
    monkeypatch.setenv("VAE_MAX_WAIT_MS", "5")
    monkeypatch.setenv("VAE_MODEL_DIR", str(tmp_path))
    from_env = Settings()
    assert (from_env.port, from_env.max_wait_ms, from_env.model_dir) == (9001, 5.0, tmp_path)
    flags = vars(build_parser().parse_args(["--port", "9002", "--execution-provider", "cpu"]))
    combined = Settings(**flags)
    assert (combined.port, combined.execution_provider, combined.max_wait_ms) == (9002, "cpu", 5.0)


def test_invalid_settings_exit_with_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "not-a-port"]) == 2
    assert main(["--max-queue-items", "4"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("vae-serve: error: invalid settings: --port / VAE_PORT")
    assert "max_queue_items (4) must be at least" in errors[1]


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(requested: str, available: list[str], expected: list[str]) -> None:
    assert select_providers(requested, available) == expected  # type: ignore[arg-type]


def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(
        StartupError, match="'cuda' was requested, but onnxruntime offers only CPUExecutionProvider"
    ):
        select_providers("cuda", [CPU])


def thread_niceness() -> dict[int, int]:
    """Each thread of this process by id: its nice value (/proc/self/task/<id>/stat field 19)."""
    niceness = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            niceness[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return niceness


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux gives each thread its own nice value")
def test_onnxruntime_operator_threads_start_at_the_inference_niceness(mnist_model_dir: Path) -> None:
    own_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if own_niceness + 4 > 19:
        pytest.skip(f"the tests already run at niceness {own_niceness}: 4 more would be clamped to 19")
    before = thread_niceness()
    settings = settings_for(mnist_model_dir, intra_op_threads=2, inference_niceness=4)
    engine = Engine.load(settings)  # its sessions hold the operator threads until `del engine`

    def started() -> dict[int, int]:
        return {thread: nice for thread, nice in thread_niceness().items() if thread not in before}

    # The thread that opened the sessions is joined, but its task can linger in /proc for a moment.
    deadline = time.monotonic() + 5
    while len(started()) > 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval
    assert len(started()) == 2  # one operator thread besides the caller's, per session
    assert set(started().values()) == {own_niceness + 4}
    assert os.getpriority(os.PRIO_PROCESS, 0) == own_niceness
    del engine
