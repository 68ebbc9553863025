"""Real components the tests need (Prometheus, curl, Chromium, Docker, kubectl, ...): required in CI,
optional on a laptop.

Where one is missing, a test calls `missing_component` (or `require_program`, for a program on PATH). With
`CI` set (.ci/run sets CI=true and installs every Debian package first) that is a failure; elsewhere the test
skips, and the reason names the command that installs the component. At the end of a run with such skips, a
"missing components" section lists each component, its install command and how many tests it skipped.
tests/conftest.py registers this module as a plugin, for the summary; tests/test_components.py tests it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from typing import Any, NoReturn

import pytest

# The Debian packages .ci/run installs for the real-component tests (tests/test_components.py checks that
# the two lists agree); `make` comes with them there, but a laptop that runs `make test` has it.
DEBIAN_PACKAGES = ("prometheus", "docker-compose", "curl", "docker.io", "debootstrap", "chromium")
SUMMARY_TITLE = "missing components (skipped locally, required in CI)"
APT_INSTALL = "sudo apt-get install -y "
# The skip reason missing_component writes, read back by the summary from the skip reports.
SKIP_REASON = re.compile(
    r"(?P<component>.+?) is missing(?: \(.*\))?; install it with: (?P<install>.+)", re.DOTALL
)


def apt_install(package: str) -> str:
    """The command that installs one of the Debian packages .ci/run installs."""
    assert package in DEBIAN_PACKAGES, f"{package} is not among the packages .ci/run installs"
    return APT_INSTALL + package


def in_ci() -> bool:
    """Whether this run is CI's: the `CI` variable is set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_component(component: str, install: str, why: str = "") -> NoReturn:
    """Stop the test: a failure in CI, where every component is required; elsewhere a skip naming `install`,
    the command that installs the component (or what else provides it)."""
    __tracebackhide__ = True  # the skip's location is the caller's
    because = f" ({why})" if why else ""
    if in_ci():
        pytest.fail(
            f"{component} is missing{because}; it is required in CI (CI is set); install it with: {install}"
        )
    pytest.skip(f"{component} is missing{because}; install it with: {install}")


def require_program(program: str, install: str, component: str | None = None) -> str:
    """The path of `program` (a name looked up on PATH, or an absolute path), or missing_component."""
    __tracebackhide__ = True
    found = shutil.which(program)
    if found is None:
        where = "does not exist or is not executable" if os.path.isabs(program) else "is not on PATH"
        missing_component(component or program, install, f"{program} {where}")
    return found


def missing_components_skipped(stats: dict[str, list[Any]]) -> Counter[tuple[str, str]]:
    """How many tests each (component, install command) skipped, from the terminal reporter's reports."""
    skipped: Counter[tuple[str, str]] = Counter()
    for report in stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if not (isinstance(longrepr, tuple) and len(longrepr) == 3):
            continue
        found = SKIP_REASON.fullmatch(str(longrepr[2]).removeprefix("Skipped: "))
        if found:
            skipped[(found["component"], found["install"])] += 1
    return skipped


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = missing_components_skipped(terminalreporter.stats)
    if not skipped:
        return
    terminalreporter.section(SUMMARY_TITLE)
    for (component, install), count in sorted(skipped.items()):
        tests = "test" if count == 1 else "tests"
        terminalreporter.write_line(f"{component}: {count} {tests} skipped; install it with: {install}")
    packages = sorted(
        {install.removeprefix(APT_INSTALL) for _, install in skipped if install.startswith(APT_INSTALL)}
    )
    if len(packages) > 1:
        terminalreporter.write_line(f"all the Debian packages at once: {APT_INSTALL}{' '.join(packages)}")
