"""Model directories of both manifest schemas: version 1 (no extras) keeps serving; version 2's latent-space
file is verified like the ONNX files."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.engine import Engine, StartupError
from app.main import create_app
from model.latent_space import LATENT_SPACE_FILENAME
from model.manifest import ManifestError, read_manifest, sha256_of
from tests.app.conftest import rewrite_latent_space, settings_for


def as_version_1(source: Path, target: Path) -> Path:
    """What the exporter wrote before schema 2: a decoder with the images output only, and a manifest
    without the logits name, the latent-space file or sample quality."""
    shutil.copytree(source, target)
    (target / LATENT_SPACE_FILENAME).unlink(missing_ok=True)
    decoder = onnx.load(str(target / "decoder.onnx"))
    logits = [output for output in decoder.graph.output if output.name == "logits"]
    for output in logits:
        decoder.graph.output.remove(output)
    onnx.save(decoder, str(target / "decoder.onnx"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["schema_version"] = 1
    del manifest["tensors"]["decoder_logits"], manifest["sample_quality"]
    del manifest["anomaly_detection"], manifest["observation_std"]
    del manifest["files"]["latent_space"], manifest["files"]["score_reference"]
    manifest["files"]["decoder"]["sha256"] = sha256_of(target / "decoder.onnx")
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def version_1_dir(latent_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return as_version_1(latent_model_dir, tmp_path_factory.mktemp("v1") / "model")


def test_version_1_directories_keep_serving(version_1_dir: Path) -> None:
    assert read_manifest(version_1_dir).schema_version == 1
    with TestClient(create_app(settings_for(version_1_dir)), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        sample = client.get("/sample?n=3&seed=1").json()
        assert sample["prior"] == "standard" and len(sample["images"]) == 3
        assert client.post("/traverse?dims=0&steps=3", json={"latent": [0.0] * 16}).status_code == 200
        summary = client.get("/model").json()
        assert summary["manifest"]["schema_version"] == 1 and summary["latent_space"]["priors"] == [
            "standard"
        ]
        assert client.get("/sample?prior=gmm").status_code == 422
        # Scores from the clipped probabilities, and a note saying so.
        scored = client.post(
            "/score?k=2&seed=0", json=None, content=b"", headers={"Content-Type": "image/png"}
        )
        assert scored.status_code == 422  # an empty body is still refused clearly
        digit = np.zeros((28, 28), np.uint8)
        digit[8:20, 12:16] = 255
        buffer = io.BytesIO()
        Image.fromarray(digit).save(buffer, format="PNG")
        body = client.post(
            "/score?k=2&seed=0", files={"file": ("d.png", buffer.getvalue(), "image/png")}
        ).json()
        assert "no logits output" in body["note"] and body["items"][0]["negative_elbo"] > 0


def test_version_2_decoder_must_have_the_logits_it_names(version_1_dir: Path, tmp_path: Path) -> None:
    """A v2 manifest naming logits over a decoder without them is refused at start-up."""
    broken = tmp_path / "broken"
    shutil.copytree(version_1_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["schema_version"] = 2
    manifest["tensors"]["decoder_logits"] = "logits"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StartupError, match=r"decoder outputs are named \['images'\]"):
        Engine.load(settings_for(broken))


def test_the_latent_space_file_is_checksummed(latent_model_dir: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(latent_model_dir, tampered)
    rewrite_latent_space(
        tampered, lambda arrays: arrays.update(aggregate_std=arrays["aggregate_std"] * 2), checksum=False
    )
    with pytest.raises(ManifestError, match=r"latent_space file latent_space\.npz has sha256"):
        Engine.load(settings_for(tampered))
    (tampered / LATENT_SPACE_FILENAME).unlink()
    with pytest.raises(
        ManifestError, match=r"latent_space file latent_space\.npz named in the manifest is missing"
    ):
        Engine.load(settings_for(tampered))


def test_a_latent_space_for_another_model_is_refused(latent_model_dir: Path, tmp_path: Path) -> None:
    """A file whose checksum matches but whose arrays do not fit the model: a clear start-up error."""
    mismatched = tmp_path / "mismatched"
    shutil.copytree(latent_model_dir, mismatched)
    rewrite_latent_space(mismatched, lambda arrays: arrays.update(aggregate_std=arrays["aggregate_std"][:4]))
    with pytest.raises(StartupError, match="does not fit a model with 16 latents: aggregate_std"):
        Engine.load(settings_for(mismatched))
