"""The PCA and autoencoder models that `make compare` ships in model/comparison/ serve like the default."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

COMPARISON = Path(__file__).resolve().parents[2] / "model" / "comparison"


@pytest.mark.parametrize("kind", ["pca", "ae"])
def test_shipped_comparison_model_serves(kind: str) -> None:
    settings = Settings(model_dir=COMPARISON / f"mnist-{kind}", _env_file=None)
    with TestClient(create_app(settings)) as client:
        manifest = client.get("/model").json()["manifest"]
        assert (manifest["name"], manifest["model_kind"], manifest["quality_warnings"]) == (
            f"mnist-{kind}",
            kind,
            [],
        )
        sampled = client.get("/sample?n=4&seed=0", headers={"Accept": "image/png"})
        assert sampled.status_code == 200 and sampled.headers["content-type"] == "image/png"
        assert client.get("/sample?n=1&prior=standard").json()["prior"] == "standard"
        scored = client.post("/score?k=4", files={"file": ("x.png", sampled.content, "image/png")})
        assert scored.status_code == 200, scored.text
