"""A missing real component skips locally with its install command, fails in CI, is summed up at the end."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.components import (
    DEBIAN_PACKAGES,
    SUMMARY_TITLE,
    apt_install,
    missing_components_skipped,
    require_program,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The plugin under test; not pytest-asyncio, which warns about the configuration only the repository has.
PLUGINS = ("-p", "tests.components", "-p", "no:asyncio")
RunWithCi = Callable[[str | None], pytest.RunResult]
# Two tests on a session fixture that finds no `frobnicate`, one that finds `sh`, one on a missing package.
NEEDS_COMPONENTS = """
import pytest

from tests.components import missing_component, require_program

@pytest.fixture(scope="session")
def frobnicate():
    return require_program("frobnicate-not-installed", "sudo apt-get install -y frobnicate", "frobnicate")

def test_one(frobnicate):
    pass

def test_two(frobnicate):
    pass

def test_found():
    assert require_program("sh", "never shown").endswith("/sh")

def test_package():
    missing_component("wheel", "pip install wheel", "pip cannot reach an index")
"""


@pytest.fixture
def run_with_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> RunWithCi:
    """Runs NEEDS_COMPONENTS in a pytest of its own, with CI unset (None) or set to the given value."""
    pytester.makepyfile(test_needs=NEEDS_COMPONENTS)

    def run(ci: str | None) -> pytest.RunResult:
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        return pytester.runpytest(*PLUGINS, "-ra")

    return run


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_without_ci_a_missing_component_skips_and_is_summed_up(
    run_with_ci: RunWithCi, ci: str | None
) -> None:
    result = run_with_ci(ci)
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(
        [
            f"*= {SUMMARY_TITLE} =*",
            "frobnicate: 2 tests skipped; install it with: sudo apt-get install -y frobnicate",
            "wheel: 1 test skipped; install it with: pip install wheel",
            "*= short test summary info =*",
            "SKIPPED [[]1[]] test_needs.py:9: frobnicate is missing"
            " (frobnicate-not-installed is not on PATH); install it with: sudo apt-get install -y frobnicate",
            "SKIPPED [[]1[]] test_needs.py:12: frobnicate is missing *",
            "SKIPPED [[]1[]] test_needs.py:19: wheel is missing (pip cannot reach an index);"
            " install it with: pip install wheel",
        ]
    )
    assert "all the Debian packages at once" not in result.stdout.str()  # one Debian package only


def test_in_ci_a_missing_component_fails_with_its_install_command(run_with_ci: RunWithCi) -> None:
    result = run_with_ci("true")
    result.assert_outcomes(passed=1, errors=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*frobnicate is missing (frobnicate-not-installed is not on PATH);"
            " it is required in CI (CI is set); install it with: sudo apt-get install -y frobnicate",
            "*wheel is missing (pip cannot reach an index); it is required in CI (CI is set);"
            " install it with: pip install wheel",
        ]
    )
    assert SUMMARY_TITLE not in result.stdout.str()


def test_a_run_without_missing_components_prints_no_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="import pytest\n\ndef test_skip():\n    pytest.skip('not today')\n")
    result = pytester.runpytest(*PLUGINS)
    result.assert_outcomes(skipped=1)
    assert SUMMARY_TITLE not in result.stdout.str()


def test_the_summary_offers_one_command_for_every_missing_debian_package(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)  # a laptop's run, also when CI runs this test
    pytester.makepyfile(
        test_two_packages="""
from tests.components import apt_install, missing_component

def test_prometheus():
    missing_component("prometheus", apt_install("prometheus"))

def test_chromium():
    missing_component("chromium", apt_install("chromium"))
"""
    )
    result = pytester.runpytest(*PLUGINS)
    result.stdout.fnmatch_lines(
        [
            "chromium: 1 test skipped; install it with: sudo apt-get install -y chromium",
            "prometheus: 1 test skipped; install it with: sudo apt-get install -y prometheus",
            "all the Debian packages at once: sudo apt-get install -y chromium prometheus",
        ]
    )


def test_an_absolute_path_is_checked_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CI", raising=False)
    browser = tmp_path / "chromium"
    with pytest.raises(pytest.skip.Exception, match="does not exist or is not executable"):
        require_program(str(browser), apt_install("chromium"), component="chromium")
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    assert require_program(str(browser), apt_install("chromium")) == str(browser)


def test_other_skips_are_not_counted() -> None:
    class Report:
        def __init__(self, reason: str) -> None:
            self.longrepr = ("test_x.py", 3, f"Skipped: {reason}")

    stats = {
        "skipped": [
            Report("curl is missing (curl is not on PATH); install it with: sudo apt-get install -y curl"),
            Report("the shipped default model is not committed yet"),
        ]
    }
    assert missing_components_skipped(stats) == {("curl", "sudo apt-get install -y curl"): 1}


def test_the_debian_packages_are_the_ones_ci_installs() -> None:
    ci_script = (REPO_ROOT / ".ci" / "run").read_text()
    (installed,) = re.findall(r"^apt-get install -y --no-install-recommends (.+)$", ci_script, re.MULTILINE)
    assert sorted(set(installed.split()) - {"make"}) == sorted(DEBIAN_PACKAGES)
    assert apt_install("curl") == "sudo apt-get install -y curl"
