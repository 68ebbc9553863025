"""The Grafana dashboard and the Prometheus config: valid, consistent, and every query has data.

The slow test runs Debian's real `prometheus` with a config made from docker/prometheus/prometheus.yml,
scraping a real `vae-serve`, and evaluates every PromQL expression of the dashboard after real traffic.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "vae-service.json"
PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = REPO_ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO_ROOT / "docker" / "grafana" / "provisioning" / "dashboards" / "vae-service.yml"
COMPOSE = REPO_ROOT / "docker-compose.yml"
METRIC_NAME = re.compile(r"\bvae_[a-z_]+\b")
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


def exposed_names(readme_tables: ModuleType) -> set[str]:
    """Every series name the service's metrics produce (histograms as _bucket, _sum and _count)."""
    names: set[str] = set()
    for name, kind, _, _ in readme_tables.metric_rows():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


# --- Static checks -----------------------------------------------------------------------------------------


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "vae-service" and dashboard["title"]
    panels = query_panels(dashboard)
    nested = [child for panel in dashboard["panels"] for child in panel.get("panels", [])]
    ids = [panel["id"] for panel in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {datasource["uid"] for datasource in provisioned}
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] in uids, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in uids


def test_dashboard_uses_only_and_all_service_metrics(readme_tables: ModuleType) -> None:
    dashboard = load_dashboard()
    used = {name for expression in expressions(dashboard) for name in METRIC_NAME.findall(expression)}
    for variable in dashboard["templating"]["list"]:
        used |= set(METRIC_NAME.findall(variable["definition"]))
    assert used <= exposed_names(readme_tables), sorted(used - exposed_names(readme_tables))
    base_names_used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    service_names = {row[0] for row in readme_tables.metric_rows()}
    assert service_names <= base_names_used, (
        f"not on the dashboard: {sorted(service_names - base_names_used)}"
    )


def test_dashboard_shows_what_operators_need() -> None:
    titles = [panel["title"] for panel in query_panels(load_dashboard())]
    for wanted in (
        "Request rate by endpoint",
        "Error rate by endpoint and status",
        "Latency p50 by endpoint",
        "Latency p95 by endpoint",
        "Latency p99 by endpoint",
        "Batch size distribution (encoder)",
        "Batch size distribution (decoder)",
        "Queue depth",
        "Queue wait beside inference time",
        "Items per second",
        "Overload rejections",
        "Model info",
        "Scored images: negative ELBO",
        "Anomalous images",
    ):
        assert wanted in titles


def test_stack_files_agree_with_each_other() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["scrape_interval"] == "5s" and job["metrics_path"] == "/metrics"
    (target,) = [target for group in job["static_configs"] for target in group["targets"]]
    service, port = target.split(":")
    assert service in compose["services"] and port == "8000"
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert urllib.parse.urlsplit(datasource["url"]).hostname == "prometheus" in compose["services"]
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{provider['options']['path']}:ro" in grafana_mounts


# --- Real Prometheus ---------------------------------------------------------------------------------------


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


def prometheus_config_for_test(tmp_path: Path, service_port: int) -> Path:
    """docker/prometheus/prometheus.yml with its target moved to the test's service and a 1 s interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=TEST_SCRAPE_INTERVAL, evaluation_interval=TEST_SCRAPE_INTERVAL)
    (job,) = config["scrape_configs"]
    job.update(scrape_interval=TEST_SCRAPE_INTERVAL, scrape_timeout=TEST_SCRAPE_INTERVAL)
    (group,) = job["static_configs"]
    assert group["targets"] == ["vae:8000"]
    group["targets"] = [f"127.0.0.1:{service_port}"]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_every_dashboard_query_has_data(deploy: Any, processes: Any, tmp_path: Path) -> None:
    prometheus_binary = shutil.which("prometheus")
    if prometheus_binary is None:
        pytest.fail("prometheus is not installed (Debian: apt-get install prometheus; .ci/run does)")
    dashboard = load_dashboard()

    service_port = deploy.free_port()
    service = processes.start(
        [deploy.installed_script("vae-serve")],
        deploy.service_environment(service_port),
        tmp_path,
        "vae-serve",
    )
    base_url = f"http://127.0.0.1:{service_port}"
    processes.wait_until_answering(service, f"{base_url}/readyz", timeout_seconds=60)

    prometheus_port = deploy.free_port()
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    prometheus = processes.start(
        [
            prometheus_binary,
            f"--config.file={prometheus_config_for_test(tmp_path, service_port)}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        dict(os.environ),
        tmp_path,
        "prometheus",
    )
    processes.wait_until_answering(prometheus, f"{prometheus_url}/-/ready", timeout_seconds=30)

    with urllib.request.urlopen(f"{base_url}/model", timeout=5) as response:
        latent_dim = int(json.load(response)["manifest"]["latent_dim"])
    statuses = send_traffic(base_url, latent_dim)
    assert statuses.pop("decode invalid") == 422
    assert set(statuses.values()) == {200}, statuses

    queries = {expression: concrete(expression, dashboard) for expression in expressions(dashboard)}
    pending = dict(queries)

    def all_have_data() -> bool:
        for expression, promql in list(pending.items()):
            if prometheus_query(prometheus_url, promql):
                del pending[expression]
        return not pending

    try:
        deploy.poll(all_have_data, 45, "every dashboard query to return data", interval_seconds=1)
    except pytest.fail.Exception:
        pytest.fail("dashboard queries without data:\n" + "\n".join(pending.values()))
    # The scrape target is the real service and it is up.
    (target,) = prometheus_query(prometheus_url, 'up{job="vae-service"}')
    assert target["value"][1] == "1"
