"""Write README's latent-space pictures (docs/images/) from the shipped model, through the real API.

    .venv/bin/python docs/latent_space_pictures.py

Every picture is a PNG grid the service returns for a seeded request, so anyone can reproduce it with curl.
`python tests/deploy/readme_examples.py --write` writes the same pictures from a real `vae-serve`, and
tests/deploy/test_readme_examples.py checks that the committed ones are what that server draws.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

IMAGES = Path(__file__).resolve().parent / "images"
PNG = {"Accept": "image/png"}
# The digit README edits and traverses: a typical "3" (its density sampled at temperature 0.5).
SUBJECT = "/sample?n=1&label=3&seed=0&temperature=0.5"


def pictures(client: httpx.Client) -> dict[str, bytes]:
    """README's pictures by name, as the service behind `client` (a TestClient, or httpx) draws them."""
    responses = {
        "samples-standard.png": client.get("/sample?n=64&seed=0&prior=standard&columns=8", headers=PNG),
        "samples-gmm.png": client.get("/sample?n=64&seed=0&prior=gmm&columns=8", headers=PNG),
        "samples-by-label.png": client.get("/sample?n=10&seed=1&label=7&columns=10", headers=PNG),
    }
    latent = client.post("/encode", files={"file": ("d.png", client.get(SUBJECT, headers=PNG).content)})
    mean = latent.json()["items"][0]["mean"]
    top_dims = ",".join(map(str, client.get("/model").json()["latent_space"]["active_dims"][:6]))
    responses["traverse.png"] = client.post(
        f"/traverse?dims={top_dims}&steps=9", json={"latent": mean}, headers=PNG
    )
    for attribute in ("thickness", "slant"):
        responses[f"edit-{attribute}.png"] = client.post(
            f"/edit?attribute={attribute}&amounts=-2,-1,0,1,2", json={"latent": mean}, headers=PNG
        )
    responses["edit-to-label.png"] = client.post(
        "/edit?to_label=8&amounts=0,0.25,0.5,0.75,1", json={"latent": mean}, headers=PNG
    )
    for response in responses.values():
        response.raise_for_status()
    return {name: response.content for name, response in responses.items()}


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    with TestClient(create_app(Settings(execution_provider="cpu"))) as client:  # in process, no server
        for name, content in pictures(client).items():
            (IMAGES / name).write_bytes(content)
            print(f"wrote docs/images/{name}")


if __name__ == "__main__":
    main()
