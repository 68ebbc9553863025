"""The README's settings and metrics tables say exactly what the code does."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "the README table is out of date: python tests/deploy/readme_tables.py --write"


def readme_table(heading: str) -> list[tuple[str, ...]]:
    """The header and rows of the first Markdown table under `heading`, cells without backticks."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert heading in lines, f"README.md has no {heading!r} section"
    start = lines.index(heading) + 1
    while not lines[start].startswith("|"):
        assert not lines[start].startswith("#"), f"no table under {heading!r}"
        start += 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = tuple(cell.strip().strip("`") for cell in line.strip().strip("|").split("|"))
        if not all(set(cell) <= {"-", ":"} for cell in cells):  # skip the |---| line
            rows.append(cells)
    return rows


def test_settings_table_lists_every_setting(readme_tables: ModuleType) -> None:
    header, *rows = readme_table("## Settings")
    assert header == readme_tables.SETTINGS_HEADER
    assert rows == readme_tables.settings_rows(), REGENERATE


def test_metrics_table_lists_every_metric(readme_tables: ModuleType) -> None:
    header, *rows = readme_table("## Metrics")
    assert header == readme_tables.METRICS_HEADER
    assert rows == readme_tables.metric_rows(), REGENERATE


def test_comparison_table_is_the_one_make_compare_wrote() -> None:
    # docs/comparison.md is written by `make compare`, with the shipped models of model/comparison/.
    written = (REPO_ROOT / "docs" / "comparison.md").read_text()
    assert written in (REPO_ROOT / "README.md").read_text(), "paste docs/comparison.md into README's section"
    for kind in ("pca", "ae"):
        manifest = json.loads(
            (REPO_ROOT / "model" / "comparison" / f"mnist-{kind}" / "manifest.json").read_text()
        )
        assert manifest["model_kind"] == kind
    for kind in ("pca", "ae", "vae"):
        assert (REPO_ROOT / "docs" / "images" / f"compare-{kind}.png").is_file()
