"""The Grafana dashboard's queries checked against a real Prometheus scraping a real service.

Shared by tests/deploy/test_dashboard.py (a `vae-serve` process and Debian's `prometheus` on the host) and
tests/deploy/test_compose_stack.py (both in containers, brought up by docker-compose).
"""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "vae-service.json"
PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
# Grafana's built-in interval variables, as concrete PromQL durations for a 1 s scrape interval.
TEST_SCRAPE_INTERVAL = "1s"
BUILTIN_VALUES = {"__rate_interval": "15s", "__interval": "5s", "__range": "5m"}


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels that query Prometheus (rows excluded), including panels nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]


def concrete(expression: str, dashboard: dict[str, Any]) -> str:
    """The expression as Grafana sends it: every variable at "All", the built-in intervals filled in."""
    values = dict(BUILTIN_VALUES)
    for variable in dashboard["templating"]["list"]:
        assert variable["includeAll"], f"variable {variable['name']} needs an All value for this check"
        values[variable["name"]] = variable["allValue"]
    for name in sorted(values, key=len, reverse=True):  # $__rate_interval before $__range
        for form in (f"${{{name}}}", f"[[{name}]]", f"${name}"):
            expression = expression.replace(form, values[name])
    assert "$" not in expression, f"unknown variable left in {expression}"
    return expression


def png_bytes(width: int, height: int, blank: bool = False) -> bytes:
    """A grey (or black) PNG: any size works, the service resizes uploads to the model's image shape."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), color=0 if blank else 128).save(buffer, format="PNG")
    return buffer.getvalue()


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """Send one request; returns the HTTP status (errors included)."""
    prepared = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(prepared, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of (field, filename, PNG bytes) parts."""
    boundary = "vae-service-test-boundary"
    body = b""
    for field, filename, content in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def send_traffic(base_url: str, latent_dim: int) -> dict[str, int]:
    """One request to every endpoint plus one invalid request; returns {description: status}."""
    image = png_bytes(28, 28)
    latents = json.dumps({"latents": [[0.0] * latent_dim, [0.5] * latent_dim]}).encode()
    json_headers = {"Content-Type": "application/json"}
    statuses = {
        "encode multipart": request("POST", f"{base_url}/encode", *multipart([("files", "a.png", image)])),
        "encode raw": request("POST", f"{base_url}/encode", image, {"Content-Type": "image/png"}),
        "decode": request("POST", f"{base_url}/decode", latents, json_headers),
        "sample json": request("GET", f"{base_url}/sample?n=4"),
        "sample png": request("GET", f"{base_url}/sample?n=4", headers={"Accept": "image/png"}),
        "reconstruct": request("POST", f"{base_url}/reconstruct", image, {"Content-Type": "image/png"}),
        "interpolate": request(
            "POST",
            f"{base_url}/interpolate",
            *multipart([("start", "a.png", image), ("end", "b.png", image)]),
        ),
        "traverse": request(
            "POST",
            f"{base_url}/traverse?dims=0&steps=3",
            json.dumps({"latent": [0.0] * latent_dim}).encode(),
            json_headers,
        ),
        "edit": request("POST", f"{base_url}/edit?attribute=ink", image, {"Content-Type": "image/png"}),
        # Two scores: a plain image, and a blank one, which the shipped model flags as anomalous.
        "score": request("POST", f"{base_url}/score?k=4&seed=0", image, {"Content-Type": "image/png"}),
        "score blank": request(
            "POST",
            f"{base_url}/score?k=4&seed=0",
            png_bytes(28, 28, blank=True),
            {"Content-Type": "image/png"},
        ),
        "healthz": request("GET", f"{base_url}/healthz"),
        "readyz": request("GET", f"{base_url}/readyz"),
        "model": request("GET", f"{base_url}/model"),
        "metrics": request("GET", f"{base_url}/metrics"),
        # A latent vector of the wrong length: a 422 so the error panels have data.
        "decode invalid": request(
            "POST", f"{base_url}/decode", json.dumps({"latents": [[0.0]]}).encode(), json_headers
        ),
    }
    return statuses


def prometheus_query(prometheus_url: str, expression: str) -> list[Any]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    assert isinstance(result, list)
    return result


def prometheus_config_for_test(directory: Path, service_port: int) -> Path:
    """docker/prometheus/prometheus.yml with its target moved to the test's service and a 1 s interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=TEST_SCRAPE_INTERVAL, evaluation_interval=TEST_SCRAPE_INTERVAL)
    (job,) = config["scrape_configs"]
    job.update(scrape_interval=TEST_SCRAPE_INTERVAL, scrape_timeout=TEST_SCRAPE_INTERVAL)
    (group,) = job["static_configs"]
    assert group["targets"] == ["vae:8000"]
    group["targets"] = [f"127.0.0.1:{service_port}"]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def served_models(base_url: str) -> tuple[str, set[str]]:
    """GET /models: the default model's name, and the names of the models serving now."""
    with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
        listing = json.load(response)
    ready = {model["name"] for model in listing["models"] if model["state"] == "ready"}
    return str(listing["default_model"]), ready


def variable_query(dashboard: dict[str, Any], name: str) -> str:
    """A variable's `label_values(selector, label)` as the PromQL that lists the same values."""
    (variable,) = [variable for variable in dashboard["templating"]["list"] if variable["name"] == name]
    found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
    assert found is not None, variable["definition"]
    selector, label = found.groups()
    return f"group by ({label}) ({concrete(selector, dashboard)})"


def assert_every_query_has_data(base_url: str, prometheus_url: str, poll: Callable[..., Any]) -> None:
    """Send traffic to every endpoint (and every model), then wait until every dashboard query returns data
    from Prometheus and the Model variable lists every model the service serves."""
    dashboard = load_dashboard()
    with urllib.request.urlopen(f"{base_url}/model", timeout=5) as response:
        latent_dim = int(json.load(response)["manifest"]["latent_dim"])
    default_model, models = served_models(base_url)
    statuses = send_traffic(base_url, latent_dim)
    assert statuses.pop("decode invalid") == 422
    # One image to each other model too, so the panels' per-model series have more than one model.
    for name in sorted(models - {default_model}):
        statuses[f"encode {name}"] = request(
            "POST", f"{base_url}/models/{name}/encode", png_bytes(28, 28), {"Content-Type": "image/png"}
        )
    assert set(statuses.values()) == {200}, statuses

    pending = {expression: concrete(expression, dashboard) for expression in expressions(dashboard)}
    listed: set[str] = set()

    def all_have_data() -> bool:
        for expression, promql in list(pending.items()):
            if prometheus_query(prometheus_url, promql):
                del pending[expression]
        listed.clear()
        listed.update(
            series["metric"]["model"]
            for series in prometheus_query(prometheus_url, variable_query(dashboard, "model"))
        )
        return not pending and listed == models

    try:
        poll(all_have_data, 45, "every dashboard query to return data", interval_seconds=1)
    except pytest.fail.Exception:
        pytest.fail(
            f"the Model variable lists {sorted(listed)}, the service serves {sorted(models)}; "
            "dashboard queries without data:\n" + "\n".join(pending.values())
        )
    # The scrape target is the real service and it is up.
    (target,) = prometheus_query(prometheus_url, 'up{job="vae-service"}')
    assert target["value"][1] == "1"
