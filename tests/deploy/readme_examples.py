"""README's example outputs and pictures, as a real `vae-serve` on the shipped model answers them.

    python tests/deploy/readme_examples.py           # prints each shown output as the server answers it now
    python tests/deploy/readme_examples.py --write   # rewrites them in README.md, and changed docs/images/

Both start `vae-serve` as `make run` does (default settings, a free port) and run the curl commands of
README's API, Open Inference Protocol and Several models sections in order in an empty directory, so
`digit.png` and `other.png` are the ones the first two commands make. Commands that send `$VAE_API_KEY` (the
admin calls) are not run: the server has no key, so it refuses them. tests/deploy/test_readme_examples.py
checks README.md and docs/images/ against the same kind of server.

Which output shows which command's answer:
- a `# ...` comment after a curl command, on its line: the answer's body, exactly (`# {"status":"ok"}`);
- a ```json or plain ``` block after a ```sh block (prose may come between): the answer to that block's first
  curl command, as README abridges it (`shown`): JSON printed with ", " and ": ", floats rounded to 2 digits,
  lists of more than 3 items cut to their first 3 and `...`, base64 PNGs cut to 32 characters and `...`;
  with `curl -i`, the status line and the Content-Type header above the body (other headers left out).
The latent-space pictures (docs/images/, from docs/latent_space_pictures.py's seeded requests) count as the
same when their decoded pixels are: a Pillow or zlib upgrade may change the bytes, not what a reader sees.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
PICTURES_SCRIPT = REPO_ROOT / "docs" / "latent_space_pictures.py"
SECTIONS = ("API", "Open Inference Protocol (KServe v2, Triton)", "Several models")
NEEDS_API_KEY = "$VAE_API_KEY"
FLOAT_DIGITS = 2
LIST_ITEMS = 3
PNG_BASE64 = "iVBORw0KGgo"  # how every base64 PNG starts
PNG_BASE64_CHARACTERS = 32
STARTUP_SECONDS = 60
FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
INLINE_OUTPUT = re.compile(r"^curl .*?\s# (.+)$")


# --- What README shows ------------------------------------------------------------------------------------


def section_span(text: str, heading: str) -> tuple[int, int]:
    """Where the `## heading` section's body is in text: (start, end)."""
    start = text.index(f"\n## {heading}\n") + len(heading) + 5
    end = text.find("\n## ", start)
    return start, len(text) if end == -1 else end


def section(text: str, heading: str) -> str:
    start, end = section_span(text, heading)
    return text[start:end]


def joined_commands(block: str) -> list[str]:
    """The curl commands of a ```sh block that run without the API key, continuation lines joined."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.startswith("curl ") and NEEDS_API_KEY not in line]


def curl_commands(text: str, heading: str = "API") -> list[str]:
    """The curl commands of one README section's ```sh blocks, in order."""
    start, end = section_span(text, heading)
    blocks = FENCED_BLOCK.finditer(text, start, end)
    return [command for block in blocks if block[1] == "sh" for command in joined_commands(block[2])]


@dataclass(frozen=True)
class ShownOutput:
    command: str  # as README has it (continuation lines joined, a `# ...` comment kept)
    shown: str  # what README shows of its answer
    start: int  # where `shown` is in README.md's text
    inline: bool  # a `# ...` comment after the command, else a block of its own


def shown_outputs(text: str) -> list[ShownOutput]:
    """Every output README shows for a curl command of SECTIONS, in order."""
    outputs = []
    for heading in SECTIONS:
        first_command: str | None = None  # of the last ```sh block
        start, end = section_span(text, heading)
        for block in FENCED_BLOCK.finditer(text, start, end):
            language, body = block[1], block[2]
            if language == "sh":
                commands = joined_commands(body)
                first_command = commands[0] if commands else None
                offset = block.start(2)
                for line in body.splitlines(keepends=True):
                    inline = INLINE_OUTPUT.match(line.rstrip("\n"))
                    if inline:
                        outputs.append(ShownOutput(inline[0], inline[1], offset + inline.start(1), True))
                    offset += len(line)
            elif language in ("json", ""):
                assert first_command is not None, f"an output block with no curl command above it: {body}"
                outputs.append(ShownOutput(first_command, body.rstrip("\n"), block.start(2), False))
    return outputs


# --- What the server answers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    head: str  # with `curl -i`: the status line and headers as curl prints them; else ""
    body: str  # "" where `-o` wrote it to a file


def run_curl(command: str, base_url: str, work_dir: Path) -> Answer:
    """Run a README curl command in work_dir against base_url (for localhost:8000)."""
    # The same command, plus: fail on transport errors, and print the status as the last line.
    runnable = command.replace("localhost:8000", base_url.removeprefix("http://"))
    runnable = runnable.replace("curl ", "curl -sS -w '\\n%{http_code}' ", 1)
    # Bytes: text=True would turn the header lines' CRLF into LF.
    result = subprocess.run(["bash", "-c", runnable], cwd=work_dir, capture_output=True, check=False)
    assert result.returncode == 0, f"{command}\n{result.stderr.decode(errors='replace')}"
    output, _, status = result.stdout.decode().rpartition("\n")
    if " -i " in command:
        head, _, body = output.partition("\r\n\r\n")
        return Answer(int(status), head, body)
    return Answer(int(status), "", output)


def run_examples(base_url: str, work_dir: Path) -> dict[str, Answer]:
    """Every curl command of SECTIONS, run in README's order in work_dir: answers by command."""
    text = README.read_text()
    return {
        command: run_curl(command, base_url, work_dir)
        for heading in SECTIONS
        for command in curl_commands(text, heading)
    }


def abridged(value: Any) -> str:
    """A JSON value as README shows it (the rules are in this module's docstring)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {abridged(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        items = [abridged(item) for item in value[:LIST_ITEMS]]
        return "[" + ", ".join(items + ["..."] * (len(value) > LIST_ITEMS)) + "]"
    if isinstance(value, float):
        return json.dumps(round(value, FLOAT_DIGITS))
    if isinstance(value, str) and value.startswith(PNG_BASE64) and len(value) > PNG_BASE64_CHARACTERS:
        return json.dumps(value[:PNG_BASE64_CHARACTERS] + "...")
    return json.dumps(value, ensure_ascii=False)


def render(answer: Answer, inline: bool) -> str:
    """How README shows an answer: its exact body after the command, or abridged in a block."""
    if inline:
        return answer.body
    shown = abridged(json.loads(answer.body))
    if answer.head:
        status_line, *headers = answer.head.split("\r\n")
        (content_type,) = [header for header in headers if header.lower().startswith("content-type:")]
        shown = f"{status_line}\n{content_type}\n\n{shown}"
    return shown


def with_outputs(text: str, answers: dict[str, Answer]) -> str:
    """README's text with every shown output replaced by how README shows the server's answer."""
    for output in reversed(shown_outputs(text)):
        rendered = render(answers[output.command], output.inline)
        text = text[: output.start] + rendered + text[output.start + len(output.shown) :]
    return text


# --- Pictures ---------------------------------------------------------------------------------------------


def pictures_script() -> ModuleType:
    """docs/latent_space_pictures.py, which draws README's latent-space pictures through the API."""
    spec = importlib.util.spec_from_file_location("latent_space_pictures", PICTURES_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drawn_pictures(base_url: str) -> dict[str, bytes]:
    """README's latent-space pictures as the server at base_url draws them, by file name in docs/images/."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return dict(pictures_script().pictures(client))


def pixels(png: bytes | Path) -> tuple[str, np.ndarray]:
    """A PNG's mode and (H, W[, C]) uint8 pixels: what a reader sees, whatever zlib made of it."""
    with Image.open(png if isinstance(png, Path) else io.BytesIO(png)) as image:
        return image.mode, np.asarray(image)


def same_picture(committed: Path, drawn: bytes) -> bool:
    if not committed.is_file():
        return False
    (mode, seen), (drawn_mode, expected) = pixels(committed), pixels(drawn)
    return mode == drawn_mode and seen.shape == expected.shape and bool((seen == expected).all())


# --- A real server ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def serving(vae_serve: str, log_path: Path) -> Iterator[str]:
    """`vae-serve` on the shipped model with default settings (none of the caller's VAE_ variables) on a
    free port of 127.0.0.1, ready: its base URL. Stopped on exit."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("VAE_")}
    environment.update(VAE_HOST="127.0.0.1", VAE_PORT=str(port))
    with log_path.open("wb") as log:
        process = subprocess.Popen([vae_serve], env=environment, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not answers_ready(f"{base_url}/readyz"):
            if process.poll() is not None or time.monotonic() > deadline:
                log_tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"vae-serve did not get ready (exit {process.poll()}):\n{log_tail}")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(arguments: list[str]) -> None:
    if arguments not in ([], ["--write"]):
        sys.exit(f"usage: python {Path(__file__).relative_to(REPO_ROOT)} [--write]")
    if shutil.which("curl") is None:
        sys.exit("curl is not installed: sudo apt-get install -y curl")
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        with serving(str(Path(sys.executable).parent / "vae-serve"), work / "vae-serve.log") as base_url:
            answers = run_examples(base_url, work)
            drawn = drawn_pictures(base_url)
    text = README.read_text()  # read again: the commands took a while
    if not arguments:
        for output in shown_outputs(text):
            print(f"$ {output.command}\n{render(answers[output.command], output.inline)}\n")
        return
    updated = with_outputs(text, answers)
    if updated != text:
        README.write_text(updated)
        print("rewrote README.md's example outputs")
    images = PICTURES_SCRIPT.parent / "images"
    for name, png in drawn.items():
        if not same_picture(images / name, png):
            (images / name).write_bytes(png)
            print(f"wrote docs/images/{name}")


if __name__ == "__main__":
    main(sys.argv[1:])
