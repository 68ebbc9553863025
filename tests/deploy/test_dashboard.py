"""The Grafana dashboard and the Prometheus config: valid, consistent, and every query has data.

The slow test runs Debian's real `prometheus` with a config made from docker/prometheus/prometheus.yml,
scraping a real `vae-serve`, and evaluates every PromQL expression of the dashboard after real traffic
(tests/deploy/dashboard.py; test_compose_stack.py runs the same check against the compose stack).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.components import apt_install, require_program

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = REPO_ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO_ROOT / "docker" / "grafana" / "provisioning" / "dashboards" / "vae-service.yml"
COMPOSE = REPO_ROOT / "docker-compose.yml"
METRIC_NAME = re.compile(r"\bvae_[a-z_]+\b")
# A metric in a PromQL expression and its label matchers ("" when it has none).
SELECTOR = re.compile(r"\b(vae_[a-z_]+)(\{[^}]*\})?")


def exposed_names(
    readme_tables: ModuleType, labelled: Callable[[list[str]], bool] = lambda labels: True
) -> set[str]:
    """Every series name the service's metrics produce (histograms as _bucket, _sum and _count), or only
    those of the metrics whose label names `labelled` accepts."""
    names: set[str] = set()
    for name, kind, labels, _ in readme_tables.metric_rows():
        if labelled(labels.split(", ")):
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


# --- Static checks -----------------------------------------------------------------------------------------


def test_dashboard_is_valid_grafana_json(dashboard_checks: ModuleType) -> None:
    dashboard = dashboard_checks.load_dashboard()
    assert dashboard["uid"] == "vae-service" and dashboard["title"]
    panels = dashboard_checks.query_panels(dashboard)
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


def test_dashboard_uses_only_and_all_service_metrics(
    readme_tables: ModuleType, dashboard_checks: ModuleType
) -> None:
    dashboard = dashboard_checks.load_dashboard()
    used = {
        name
        for expression in dashboard_checks.expressions(dashboard)
        for name in METRIC_NAME.findall(expression)
    }
    for variable in dashboard["templating"]["list"]:
        used |= set(METRIC_NAME.findall(variable["definition"]))
    assert used <= exposed_names(readme_tables), sorted(used - exposed_names(readme_tables))
    base_names_used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    service_names = {row[0] for row in readme_tables.metric_rows()}
    assert service_names <= base_names_used, (
        f"not on the dashboard: {sorted(service_names - base_names_used)}"
    )


def test_dashboard_shows_what_operators_need(dashboard_checks: ModuleType) -> None:
    titles = [panel["title"] for panel in dashboard_checks.query_panels(dashboard_checks.load_dashboard())]
    for wanted in (
        "Request rate by model",
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
        "Model memory",
        "Model loads, unloads and reloads",
        "Scored images: negative ELBO",
        "Anomalous images",
        "Worker processes",
    ):
        assert wanted in titles


def test_every_model_metric_follows_the_model_variable(
    readme_tables: ModuleType, dashboard_checks: ModuleType
) -> None:
    """The Model variable lists the loaded models, and every query of a metric with a `model` label keeps
    only the chosen ones; at All (`.*`) that includes the model="" series of routes that use no model."""
    dashboard = dashboard_checks.load_dashboard()
    (variable,) = [variable for variable in dashboard["templating"]["list"] if variable["name"] == "model"]
    assert re.fullmatch(r"label_values\(vae_model_info(\{[^}]*\})?, model\)", variable["definition"])
    assert variable["query"]["query"] == variable["definition"]
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    model_metrics = exposed_names(readme_tables, lambda labels: "model" in labels)
    assert {"vae_requests_total", "vae_queue_depth", "vae_model_memory_bytes"} <= model_metrics
    for panel in dashboard_checks.query_panels(dashboard):
        for target in panel["targets"]:
            for name, matchers in SELECTOR.findall(target["expr"]):
                if name in model_metrics:
                    assert 'model=~"$model"' in matchers, f"{panel['title']!r}: {name}{matchers}"


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


@pytest.mark.slow
def test_every_dashboard_query_has_data(
    deploy: Any, dashboard_checks: ModuleType, processes: Any, tmp_path: Path
) -> None:
    prometheus_binary = require_program("prometheus", apt_install("prometheus"))
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
            f"--config.file={dashboard_checks.prometheus_config_for_test(tmp_path, service_port)}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        dict(os.environ),
        tmp_path,
        "prometheus",
    )
    processes.wait_until_answering(prometheus, f"{prometheus_url}/-/ready", timeout_seconds=30)
    dashboard_checks.assert_every_query_has_data(base_url, prometheus_url, deploy.poll)
