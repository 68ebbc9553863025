"""Every curl example of the README's API section works against a real `vae-serve` with the shipped model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


PROTOCOL_SECTION = "Open Inference Protocol (KServe v2, Triton)"
CLIENT_SECTION = "The explorer, docs and the Python client"


def readme_section(heading: str) -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def curl_commands(heading: str = "API") -> list[str]:
    """The curl commands in the ```sh blocks of one README section, continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme_section(heading), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("curl "):
                commands.append(line)
    return commands


def test_readme_has_an_example_for_every_endpoint() -> None:
    commands = " ".join(curl_commands())
    endpoints = (
        "/encode",
        "/decode",
        "/sample",
        "/reconstruct",
        "/interpolate",
        "/traverse",
        "/edit",
        "/score",
        "/latent-map",
    )
    for path in (*endpoints, "/healthz", "/readyz"):
        assert f"localhost:8000{path}" in commands, path
    for path in ("/model", "/metrics"):
        assert f"localhost:8000{path}" in commands, path
    assert "-H 'Accept: image/png'" in commands and "-F file=@" in commands and "--data-binary" in commands


@pytest.mark.slow
def test_readme_curl_examples_work(deploy: Any, processes: Any, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (Debian: apt-get install curl; .ci/run does)")
    port = deploy.free_port()
    server = processes.start(
        [deploy.installed_script("vae-serve")], deploy.service_environment(port), tmp_path, "vae-serve"
    )
    processes.wait_until_answering(server, f"http://127.0.0.1:{port}/readyz", timeout_seconds=60)

    commands = curl_commands() + curl_commands(PROTOCOL_SECTION)
    assert commands and any("/v2/" in command for command in commands)
    for command in commands:
        # Same command, plus: fail on transport errors, and print the status as the last line.
        runnable = command.replace("localhost:8000", f"127.0.0.1:{port}").replace(
            "curl ", "curl -sS -w '\\n%{http_code}' ", 1
        )
        result = subprocess.run(
            ["bash", "-c", runnable], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        body, _, status = result.stdout.rpartition("\n")
        if " -i " in command:  # the documented error example
            assert status == "422" and "content-type: application/problem+json" in body.lower(), command
            continue
        assert status == "200", f"{command}\n{body}"
        output = re.search(r" -o (\S+)", command)
        if output:
            assert (tmp_path / output.group(1)).read_bytes().startswith(PNG_SIGNATURE), command
        elif "/metrics" not in command:
            json.loads(body)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heading", "printed"),
    [(PROTOCOL_SECTION, "(64, 1, 28, 28)"), (CLIENT_SECTION, "")],
    ids=["tritonclient", "client"],
)
def test_readme_python_examples_work(
    deploy: Any, processes: Any, tmp_path: Path, heading: str, printed: str
) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", readme_section(heading), flags=re.DOTALL)
    port = deploy.free_port()
    server = processes.start(
        [deploy.installed_script("vae-serve")], deploy.service_environment(port), tmp_path, "vae-serve"
    )
    base_url = f"http://127.0.0.1:{port}"
    processes.wait_until_answering(server, f"{base_url}/readyz", timeout_seconds=60)
    for name, seed in (("digit.png", 3), ("other.png", 4)):  # as the API section's first commands make them
        (tmp_path / name).write_bytes(
            httpx.get(f"{base_url}/sample?n=1&seed={seed}", headers={"Accept": "image/png"}).content
        )
    script = tmp_path / "example.py"
    script.write_text(
        example.replace("localhost:8000", f"127.0.0.1:{port}").replace("http://127.0.0.1:8000", base_url)
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == printed
    if heading == CLIENT_SECTION:
        assert (tmp_path / "grid.png").read_bytes().startswith(PNG_SIGNATURE)
