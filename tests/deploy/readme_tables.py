"""The README's settings and metrics tables, generated from the code.

`python tests/deploy/readme_tables.py` prints them; with `--write` it replaces them in README.md.
tests/deploy/test_readme.py checks that the README holds exactly these rows.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase
from pydantic.fields import FieldInfo

from app.config import Settings
from app.metrics import Metrics, ModelsCollector, WorkersCollector

SETTINGS_HEADER = ("Environment variable", "Default", "Description")
METRICS_HEADER = ("Metric", "Type", "Labels", "Description")
UNSET = "(unset)"


def format_default(value: Any) -> str:
    """A default as a user would write it in the environment; "(unset)" for None."""
    if value is None:
        return UNSET
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def settings_rows() -> list[tuple[str, str, str]]:
    """One row per Settings field: (`VAE_<FIELD>`, default, description)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    rows = []
    for name, info in Settings.model_fields.items():
        assert isinstance(info, FieldInfo) and info.description, f"Settings.{name} has no description"
        rows.append((f"{prefix}{name}".upper(), format_default(info.get_default()), info.description))
    return rows


def metric_rows() -> list[tuple[str, str, str, str]]:
    """One row per metric the service registers: (exposed name, type, labels, help text)."""
    metrics = Metrics()
    wrappers = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]
    rows = []
    for wrapper in wrappers:
        (family,) = wrapper.describe()
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = ", ".join(wrapper._labelnames)  # prometheus_client keeps label names only here
        rows.append((name, family.type, labels, family.documentation))
    # Read at scrape time: the served model, and (with --workers N) the worker processes.
    collected = [*ModelsCollector(list, dict).describe(), *WorkersCollector(2, lambda: 0).collect()]
    for family in collected:
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = ", ".join(getattr(family, "_labelnames", ()))
        rows.append((name, family.type, labels, family.documentation))
    registered = {family.name for family in metrics.registry.collect()}
    read_at_scrape = {family.name for family in collected}
    assert registered == {wrapper.describe()[0].name for wrapper in wrappers} | read_at_scrape, (
        "a metric is not an attribute"
    )
    return rows


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]], code_columns: int) -> str:
    """A Markdown table; the first `code_columns` cells of each row are set in backticks."""

    def cell(index: int, text: str) -> str:
        return f"`{text}`" if index < code_columns and text not in ("", UNSET) else text

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(i, text) for i, text in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


def settings_table() -> str:
    return markdown_table(SETTINGS_HEADER, list(settings_rows()), code_columns=2)


def metrics_table() -> str:
    return markdown_table(METRICS_HEADER, list(metric_rows()), code_columns=1)


README = Path(__file__).resolve().parents[2] / "README.md"


def replace_table(text: str, heading: str, table: str) -> str:
    """text with the first Markdown table under `heading` replaced by `table`."""
    lines = text.split("\n")
    start = lines.index(heading)
    while not lines[start].startswith("|"):
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:start], table, *lines[end:]])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = replace_table(README.read_text(), "## Settings", settings_table())
        README.write_text(replace_table(text, "## Metrics", metrics_table()))
    else:
        print(settings_table(), end="\n\n")
        print(metrics_table())
