"""Every curl example of the README's API section works against a real `vae-serve` with the shipped model, and
every output and picture README shows is what that server answers (tests/deploy/readme_examples.py says how
README abridges an answer, and regenerates both)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.components import apt_install, require_program

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REGENERATE = "python tests/deploy/readme_examples.py --write"
PROTOCOL_SECTION = "Open Inference Protocol (KServe v2, Triton)"
CLIENT_SECTION = "The explorer, docs and the Python client"
# README pictures that other tools make: `make compare` (the comparison) and a browser (the explorer).
PICTURES_MADE_ELSEWHERE = {"compare-pca.png", "compare-ae.png", "compare-vae.png", "explorer.png"}


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def test_readme_has_an_example_for_every_endpoint(readme_examples: ModuleType) -> None:
    commands = " ".join(readme_examples.curl_commands(readme()))
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


def test_readme_outputs_are_found_and_abridged_as_documented(readme_examples: ModuleType) -> None:
    found = [(output.command, output.inline) for output in readme_examples.shown_outputs(readme())]
    assert ("curl -F file=@digit.png localhost:8000/encode", False) in found
    assert any(command.startswith("curl localhost:8000/healthz ") and inline for command, inline in found)
    assert any(command.startswith("curl -i ") and not inline for command, inline in found), "the error's"
    answer = {
        "mean": [0.954, -1.5947, 0.2, 3.0],
        "shape": [1, 28, 28],
        "images": ["iVBORw0KGgo" + "A" * 40],
        "seed": None,
        "detail": "a long message stays whole, however long it is",
    }
    assert readme_examples.abridged(answer) == (
        '{"mean": [0.95, -1.59, 0.2, ...], "shape": [1, 28, 28],'
        ' "images": ["iVBORw0KGgoAAAAAAAAAAAAAAAAAAAAA..."], "seed": null,'
        ' "detail": "a long message stays whole, however long it is"}'
    )


@pytest.fixture(scope="module")
def server(
    readme_examples: ModuleType, deploy: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real `vae-serve` as `make run` starts it (the shipped model, default settings), on a free port."""
    log_path = tmp_path_factory.mktemp("readme-server") / "vae-serve.log"
    with readme_examples.serving(deploy.installed_script("vae-serve"), log_path) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def answers(
    readme_examples: ModuleType, server: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """The directory README's curl commands ran in (digit.png, ...), and their answers by command."""
    require_program("curl", apt_install("curl"))
    work_dir = tmp_path_factory.mktemp("readme-examples")
    return work_dir, readme_examples.run_examples(server, work_dir)


@pytest.mark.slow
def test_readme_curl_examples_work(answers: tuple[Path, dict[str, Any]]) -> None:
    work_dir, by_command = answers
    assert by_command and any("/v2/" in command for command in by_command)
    for command, answer in by_command.items():
        if " -i " in command:  # the documented error example
            assert answer.status == 422, command
            assert "content-type: application/problem+json" in answer.head.lower(), command
            continue
        assert answer.status == 200, f"{command}\n{answer.body}"
        output = re.search(r" -o (\S+)", command)
        if output:
            assert (work_dir / output.group(1)).read_bytes().startswith(PNG_SIGNATURE), command


@pytest.mark.slow
def test_readme_shows_what_the_server_answers(
    readme_examples: ModuleType, answers: tuple[Path, dict[str, Any]]
) -> None:
    _, by_command = answers
    for output in readme_examples.shown_outputs(readme()):
        assert output.shown == readme_examples.render(by_command[output.command], output.inline), (
            f"README's output of `{output.command}` is not what the server answers: {REGENERATE}"
        )


@pytest.mark.slow
def test_readme_example_images_are_single_images(answers: tuple[Path, dict[str, Any]]) -> None:
    work_dir, _ = answers
    for name in ("digit.png", "other.png"):  # made by the API section's first two commands
        with Image.open(work_dir / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28)), name  # no grid padding


@pytest.mark.slow
def test_readme_pictures_are_what_the_server_draws(readme_examples: ModuleType, server: str) -> None:
    drawn = readme_examples.drawn_pictures(server)
    images = REPO_ROOT / "docs" / "images"
    for name, png in drawn.items():
        assert readme_examples.same_picture(images / name, png), (
            f"docs/images/{name} is out of date: {REGENERATE}"
        )
    referenced = set(re.findall(r"\]\(docs/images/([\w-]+\.png)\)", readme()))
    assert referenced - drawn.keys() == PICTURES_MADE_ELSEWHERE


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heading", "printed"),
    [(PROTOCOL_SECTION, "(64, 1, 28, 28)"), (CLIENT_SECTION, "")],
    ids=["tritonclient", "client"],
)
def test_readme_python_examples_work(
    readme_examples: ModuleType, server: str, tmp_path: Path, heading: str, printed: str
) -> None:
    (example,) = re.findall(
        r"```python\n(.*?)```", readme_examples.section(readme(), heading), flags=re.DOTALL
    )
    for name, seed in (("digit.png", 3), ("other.png", 4)):  # as the API section's first commands make them
        (tmp_path / name).write_bytes(
            httpx.get(f"{server}/sample?n=1&seed={seed}", headers={"Accept": "image/png"}).content
        )
    host_port = server.removeprefix("http://")
    script = tmp_path / "example.py"
    script.write_text(example.replace("localhost:8000", host_port).replace("127.0.0.1:8000", host_port))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == printed
    if heading == CLIENT_SECTION:
        assert (tmp_path / "grid.png").read_bytes().startswith(PNG_SIGNATURE)
