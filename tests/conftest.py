"""Plugins for every test package: pytester (tests/test_components.py runs pytest inside pytest) and
tests/components.py (missing real components: skipped locally with their install command, required in CI,
summed up at the end of the run). pytest reads `pytest_plugins` only from this top-level conftest."""

pytest_plugins = ["pytester", "tests.components"]
