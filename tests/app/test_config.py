"""Settings (env, flags, documentation) and execution-provider selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.config import Settings
from app.engine import StartupError, select_providers

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
