"""The explorer page, GET / and the docs through the ASGI app: served as package data, with no reference to
any other host and a name for every control, and the latent map the explorer draws."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.web.routes import STATIC_DIR


class References(HTMLParser):
    """Every src and href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def references(html: str) -> list[str]:
    parser = References()
    parser.feed(html)
    return parser.urls


class Controls(HTMLParser):
    """The id of every form control in a page, and the ids that have a name for assistive technology: a
    <label for>, a <label> around the control, or an aria-label."""

    CONTROLS = ("input", "select", "textarea")

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.named: set[str] = set()
        self.open_labels = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "label":
            self.open_labels += 1
            self.named.add(found.get("for") or "")
        elif tag in self.CONTROLS:
            self.ids.append(found.get("id") or "")
            if self.open_labels or found.get("aria-label"):
                self.named.add(found.get("id") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.open_labels -= 1


def test_the_root_redirects_to_the_explorer(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/explorer"


def test_the_explorer_and_its_assets_come_from_the_service_only(client: TestClient) -> None:
    page = client.get("/explorer")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    urls = references(page.text)
    assert urls and all(url.startswith(("/", "data:")) for url in urls), urls
    for url in urls:
        if url.startswith("/"):
            assert client.get(url).status_code == 200, url
    # The modules import each other by relative path, and call relative URLs only.
    for script in STATIC_DIR.glob("*.js"):
        text = script.read_text()
        assert not re.search(r"https?://", text), script.name
        for module in re.findall(r'from "(.+?)"', text):
            assert client.get(f"/explorer/assets/{module.removeprefix('./')}").status_code == 200


def test_every_control_on_the_explorer_has_a_name(client: TestClient) -> None:
    controls = Controls()
    controls.feed(client.get("/explorer").text)
    assert {"model", "compare-upload"} <= set(controls.ids)  # the model picker and the compare view's upload
    assert [control for control in controls.ids if control not in controls.named] == []


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_reference_no_other_host(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200
    assert not re.search(r"https?://", page.text), page.text
    for url in references(page.text):
        assert client.get(url).status_code == 200, url
    assert '"validatorUrl": null' in client.get("/docs").text  # no schema sent to validator.swagger.io


def test_the_latent_map_projects_the_test_codes(latent_client: TestClient) -> None:
    body = latent_client.get("/latent-map").json()
    points, components = np.array(body["points"]), np.array(body["components"])
    assert points.shape == (len(body["labels"]), 2) and components.shape == (2, 16)
    assert set(body["labels"]) <= set(range(len(body["label_names"])))
    np.testing.assert_allclose(components @ components.T, np.eye(2), atol=1e-5)  # orthonormal axes


def test_a_model_without_a_latent_space_says_it_has_no_map(client: TestClient) -> None:
    response = client.get("/latent-map")
    assert response.status_code == 422 and "ships no latent map" in response.json()["detail"]


def test_the_explorer_stays_open_when_operational_endpoints_need_the_key(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(mnist_model_dir, api_key="k", protect_ops_endpoints=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as keyed:
        assert keyed.get("/explorer").status_code == 200
        assert keyed.get("/explorer/assets/explorer.js").status_code == 200
        assert keyed.get("/", follow_redirects=False).status_code == 307
        assert keyed.get("/explorer/assets/index.html").status_code == 404  # scripts and styles only
        for path in ("/docs", "/docs/assets/swagger-ui.css", "/model", "/latent-map", "/metrics"):
            assert keyed.get(path).status_code == 401, path
        assert keyed.get("/model", headers={"X-API-Key": "k"}).status_code == 200
