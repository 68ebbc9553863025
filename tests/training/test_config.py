"""Config: TOML tables are flattened; CLI flags override the file; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, TrainConfig, load_config

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "mnist.toml"


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nlatent_dim = 8\nwidths = [16, 32]\n[optimization]\nepochs = 5\nlr_schedule = "cosine"\n'
    )
    config = load_config(path, {"epochs": 7})
    assert (config.latent_dim, config.widths, config.epochs, config.lr_schedule) == (8, (16, 32), 7, "cosine")
    assert config.batch_size == TrainConfig().batch_size


def test_unknown_and_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("latent_dimension = 8\n")
    with pytest.raises(ConfigError, match="latent_dimension"):
        load_config(path, {})
    path.write_text("[a]\nepochs = 1\n[b]\nepochs = 2\n")
    with pytest.raises(ConfigError, match="more than once"):
        load_config(path, {})
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig.from_dict({"lr_schedule": "linear"})


def test_round_trip_and_shipped_config_loads() -> None:
    config = load_config(SHIPPED_CONFIG, {})
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert (config.dataset, config.latent_dim, config.model_name) == ("mnist", 16, "mnist-vae")
