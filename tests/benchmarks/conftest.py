"""The model the benchmark smoke tests load: the shipped default model, whose latent-space description
the sample-gmm and traverse scenarios need (it is small enough for one-second cells)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.manifest import DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return DEFAULT_MODEL_DIR
