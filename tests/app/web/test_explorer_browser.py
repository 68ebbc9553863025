"""The explorer and the docs in real Chromium (Debian's, driven by Playwright) against a real `vae-serve`
on the shipped models: drawing, sliders, traversals and edits, sampling, interpolation, the map, the model
picker and the compare view, API-key errors and offline docs, with no console error and no request leaving
127.0.0.1. Screenshots go to test-artifacts/explorer/."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright

from tests.app.test_server import serving
from tests.components import apt_install, require_program

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",  # as root in CI
    "--disable-background-networking",  # no calls home on a closed network
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "explorer"
KEY = "explorer-key"
# What a plain `vae-serve` serves, in GET /models' order, and its default.
SHIPPED_MODELS = ["mnist-ae", "mnist-pca", "mnist-vae"]
DEFAULT_MODEL = "mnist-vae"
# Chromium logs every 4xx or 5xx answer as a console error that starts so.
FAILED_LOAD = "Failed to load resource"
SLIDER_LATENCIES_MS: list[float] = []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_program(str(CHROMIUM), apt_install("chromium"), component="chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("explorer-server")) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("explorer-keyed"), "--api-key", KEY) as (base_url, _):
        yield base_url


@dataclass
class Watched:
    """A page, and what it logged and fetched."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    paths: list[str] = field(default_factory=list)  # every request's path and query, in order
    refused: list[str] = field(default_factory=list)  # the paths the service answered with 4xx or 5xx

    def check_clean(self, may_refuse: Callable[[str], bool] = lambda path: False) -> None:
        """No console error and no other host; `may_refuse` names the paths whose refusals are expected
        (shown on the page), and then the only console errors are Chromium's lines about those."""
        assert all(may_refuse(path) for path in self.refused), self.refused
        failed_loads = [message for message in self.console_errors if message.startswith(FAILED_LOAD)]
        assert failed_loads == self.console_errors, self.console_errors
        assert len(failed_loads) <= len(self.refused), (failed_loads, self.refused)
        assert self.hosts <= {"127.0.0.1"}, self.hosts

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_page(browser: Browser, url: str, width: int = 1400, height: int = 1000) -> Watched:
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    watched = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.console_errors.append(message.text)

    def on_request(request: Request) -> None:
        parsed = urlparse(request.url)
        if parsed.scheme in ("http", "https", "ws", "wss"):
            watched.hosts.add(parsed.hostname or "")
            watched.paths.append(parsed.path + (f"?{parsed.query}" if parsed.query else ""))

    def on_response(response: Response) -> None:
        if response.status >= 400:
            parsed = urlparse(response.url)
            watched.refused.append(parsed.path + (f"?{parsed.query}" if parsed.query else ""))

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.console_errors.append(str(error)))
    page.on("request", on_request)
    page.on("response", on_response)
    page.goto(url)
    return watched


@pytest.fixture
def explorer(browser: Browser, server: str) -> Iterator[Watched]:
    watched = open_page(browser, server + "/explorer")
    wait_until(watched.page, "document.querySelector('#samples').src !== ''")  # model, map, samples
    yield watched
    watched.page.context.close()


def wait_until(page: Page, expression: str, arg: object = None, timeout_seconds: float = 20) -> None:
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function compiles its
    predicate with eval, which the explorer's Content-Security-Policy forbids, as it should.)"""
    deadline = time.monotonic() + timeout_seconds
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"never true: {expression}"
        page.wait_for_timeout(25)  # poll interval


def draw(page: Page, stroke: list[tuple[float, float]]) -> None:
    """Draw one stroke on the pad; points are fractions of its width and height."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point, steps=4)
    page.mouse.up()


ONE = [(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)]
ZERO = [(0.5, 0.15), (0.3, 0.3), (0.3, 0.7), (0.5, 0.85), (0.7, 0.7), (0.7, 0.3), (0.5, 0.15)]


def src(page: Page, selector: str) -> str:
    return str(page.locator(selector).get_attribute("src") or "")


def wait_for_new_src(page: Page, selector: str, old: str) -> None:
    wait_until(
        page,
        "([selector, old]) => { const s = document.querySelector(selector).src; return s && s !== old; }",
        [selector, old],
    )


def test_a_drawing_shows_its_reconstruction_posterior_and_verdict(explorer: Watched) -> None:
    page = explorer.page
    draw(page, ZERO)
    wait_until(page, "document.querySelectorAll('#posterior .track').length === 16")
    wait_until(page, "document.querySelector('#reconstruction').src !== ''")
    assert page.locator("#verdict").inner_text().split("\n")[0] in ("Typical", "Anomalous")
    assert "nats" in page.locator("#verdict").inner_text()
    wait_until(page, "document.querySelector('#traversal').src !== ''")
    # The sliders now hold the drawing's posterior mean.
    assert any(float(page.locator(f"#z{dim}").input_value()) != 0 for dim in range(16))
    explorer.screenshot("drawn")
    explorer.check_clean()


def test_moving_a_slider_redraws_the_code(explorer: Watched) -> None:
    page = explorer.page
    slider = page.locator("#z0")
    for _ in range(5):
        before = src(page, "#decoded")
        slider.focus()
        for _ in range(8):
            page.keyboard.press("ArrowRight")  # the keyboard moves sliders too
        wait_for_new_src(page, "#decoded", before)
        SLIDER_LATENCIES_MS.append(float(page.locator("#decoded").get_attribute("data-ms") or "nan"))
    assert float(slider.input_value()) == pytest.approx(2.0)
    print(f"\nslider -> decoded image: median {statistics.median(SLIDER_LATENCIES_MS):.1f} ms over 5 moves")
    explorer.check_clean()


def test_traversal_and_attribute_edits_decode(explorer: Watched) -> None:
    page = explorer.page
    page.click("#traverse")
    wait_until(page, "document.querySelector('#traversal').src !== ''")
    page.select_option("#attribute", index=1)
    page.locator("#attribute-amount").fill("2")
    wait_until(page, "document.querySelector('#edited').src !== ''")
    before = src(page, "#edited")
    page.select_option("#to-label", "8")
    page.locator("#label-amount").fill("1")
    wait_for_new_src(page, "#edited", before)
    explorer.check_clean()


def test_sampling_rerolls_and_downloads_the_grid(explorer: Watched, tmp_path: Path) -> None:
    page = explorer.page
    before, seed = src(page, "#samples"), page.locator("#seed").input_value()
    page.click("#reroll")
    wait_for_new_src(page, "#samples", before)
    assert page.locator("#seed").input_value() != seed
    page.select_option("#label", "3")
    page.locator("#temperature").fill("0.5")
    before = src(page, "#samples")
    page.click("#sample-form button[type=submit]")
    wait_for_new_src(page, "#samples", before)
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "samples.png"
    download.value.save_as(saved)
    assert saved.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    explorer.check_clean()


def test_interpolating_between_two_drawings(explorer: Watched) -> None:
    page = explorer.page
    draw(page, ONE)
    wait_until(page, "document.querySelectorAll('#posterior .track').length === 16")
    page.click("#use-start")
    page.click("#clear")
    draw(page, ZERO)
    page.wait_for_timeout(300)  # the drawing's analysis is debounced; its blob is taken when it runs
    wait_until(page, "document.querySelector('#reconstruction').src !== ''")
    page.click("#use-end")
    page.select_option("#method", "slerp")
    page.click("#interpolate")
    wait_until(page, "document.querySelector('#strip').naturalWidth > 0")
    # One row of 8 frames.
    assert page.evaluate(
        "[document.querySelector('#strip').naturalWidth, document.querySelector('#strip').naturalHeight]"
    ) == [8 * 28 + 9 * 2, 28 + 2 * 2]
    explorer.check_clean()


def test_clicking_the_map_decodes_that_point(explorer: Watched) -> None:
    page = explorer.page
    assert page.locator("#legend > span").count() == 10
    before = src(page, "#decoded")
    page.locator("#map").click(position={"x": 120, "y": 200})
    wait_for_new_src(page, "#decoded", before)
    assert any(float(page.locator(f"#z{dim}").input_value()) != 0 for dim in range(16))
    before = src(page, "#decoded")
    page.locator("#map").focus()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Enter")
    wait_for_new_src(page, "#decoded", before)
    explorer.screenshot("map")
    explorer.check_clean()


def model_route(path: str, model: str) -> str | None:
    """The route of a call to `model` ('/encode'; '' for its description), or None for any other path."""
    prefix = f"/models/{model}"
    if path.split("?")[0] == prefix:
        return ""
    return path.removeprefix(prefix).split("?")[0] if path.startswith(prefix + "/") else None


def service_calls(paths: list[str]) -> list[str]:
    """The calls the page made to the service: everything but the page and its assets."""
    return [path for path in paths if not path.startswith("/explorer")]


def test_the_picker_lists_the_shipped_models_and_starts_on_the_default(explorer: Watched) -> None:
    page = explorer.page
    picker = page.get_by_label("Model", exact=True)
    assert picker.evaluate("select => [...select.options].map((option) => option.value)") == SHIPPED_MODELS
    assert picker.evaluate("select => [...select.options].every((option) => !option.disabled)")
    assert picker.input_value() == DEFAULT_MODEL
    assert page.locator("#model-name").inner_text().startswith(f"{DEFAULT_MODEL} ")
    # Every call but the listing went to the default model's routes.
    calls = service_calls(explorer.paths)
    assert calls[0] == "/models"
    assert all(model_route(path, DEFAULT_MODEL) is not None for path in calls[1:]), calls
    routes = {model_route(path, DEFAULT_MODEL) for path in calls[1:]}
    assert routes >= {"", "/decode", "/latent-map", "/sample"}, calls
    explorer.check_clean()


def test_picking_a_model_sends_every_call_to_its_routes(explorer: Watched) -> None:
    page = explorer.page
    draw(page, ZERO)
    wait_until(page, "document.querySelector('#traversal').src !== ''")  # the drawing's analysis is done
    picked_at = len(explorer.paths)
    page.select_option("#model", "mnist-ae")
    # The drawing is analysed again, and the code, map and samples come again, all from the picked model.
    wait_until(page, "document.querySelector('#model-name').textContent.startsWith('mnist-ae ')")
    for image in ("#reconstruction", "#decoded", "#traversal", "#samples"):
        wait_until(page, "(selector) => document.querySelector(selector).src !== ''", image)
    wait_until(page, "document.querySelectorAll('#legend > span').length === 10")
    wait_until(page, "document.querySelector('#verdict').textContent !== 'Draw something to see its scores.'")
    calls = service_calls(explorer.paths[picked_at:])
    routes = [model_route(path, "mnist-ae") for path in calls]
    assert None not in routes, calls
    assert set(routes) >= {"", "/encode", "/reconstruct", "/score", "/decode", "/traverse", "/sample"}, calls
    assert "/latent-map" in routes, calls
    # The autoencoder's score is its verdict, or the problem its /score answered.
    verdict = page.locator("#verdict").inner_text()
    assert verdict.split("\n")[0] in ("Typical", "Anomalous") or verdict.startswith("no scores: "), verdict
    explorer.screenshot("picked-mnist-ae")
    explorer.check_clean(may_refuse=lambda path: model_route(path, "mnist-ae") == "/score")


def test_a_second_quick_pick_wins(explorer: Watched) -> None:
    page = explorer.page
    page.select_option("#model", "mnist-ae")
    page.select_option("#model", "mnist-pca")  # before mnist-ae's answers come
    wait_until(page, "document.querySelector('#samples').src !== ''")
    wait_until(page, "document.querySelectorAll('#legend > span').length === 10")
    assert page.locator("#model-name").inner_text().startswith("mnist-pca ")
    assert page.locator("#error").is_hidden()
    explorer.check_clean()


def test_the_compare_view_sends_one_drawing_through_every_model(explorer: Watched) -> None:
    page = explorer.page
    draw(page, ZERO)
    compared_at = len(explorer.paths)
    page.click("#compare")
    wait_until(page, "document.querySelectorAll('#compare-columns .model-column').length === 3")
    wait_until(
        page,
        """[...document.querySelectorAll('#compare-columns .model-column')].every((column) =>
             column.querySelector('img.reconstruction').src !== '' &&
             column.querySelector('img.samples').src !== '' &&
             column.querySelector('.verdict').dataset.outcome !== undefined)""",
    )
    columns = page.locator("#compare-columns .model-column").evaluate_all(
        """(columns) => columns.map((column) => ({
             model: column.dataset.model,
             title: column.querySelector('h3').textContent,
             outcome: column.querySelector('.verdict').dataset.outcome,
             verdict: column.querySelector('.verdict').innerText,
             samples: column.querySelector('img.samples').naturalWidth,
           }))"""
    )
    # PCA, then the autoencoder, then the VAE, each column named by its model.
    assert [column["model"] for column in columns] == ["mnist-pca", "mnist-ae", "mnist-vae"]
    assert [column["title"] for column in columns] == ["mnist-pca", "mnist-ae", "mnist-vae"]
    refusing = set()
    for column in columns:
        assert column["samples"] > 0
        if column["outcome"] == "scored":
            assert column["verdict"].split("\n")[0] in ("Typical", "Anomalous"), column
            assert "p = " in column["verdict"], column
        else:
            assert column["outcome"] == "problem", column
            assert re.search(r"\(4\d\d\): .+", column["verdict"]), column  # title (status): detail
            refusing.add(column["model"])
    calls = service_calls(explorer.paths[compared_at:])
    for model in SHIPPED_MODELS:
        assert f"/models/{model}/reconstruct" in calls, calls
        assert any(model_route(path, model) == "/score" for path in calls), calls
        assert f"/models/{model}/sample?n=4&seed=0" in calls, calls
    explorer.screenshot("compare")
    explorer.check_clean(
        may_refuse=lambda path: any(model_route(path, model) == "/score" for model in refusing)
    )


def test_a_wrong_api_key_is_shown_and_the_right_one_works(browser: Browser, keyed_server: str) -> None:
    watched = open_page(browser, keyed_server + "/explorer")
    page = watched.page
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.locator("#error").inner_text()
    assert "API key" in page.locator("#error").inner_text()
    page.fill("#api-key", "wrong")
    page.click("#key-form button")
    wait_until(page, "document.querySelector('#error').textContent.includes('not valid')")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    wait_until(page, "document.querySelector('#samples').src !== ''")
    assert page.locator("#error").is_hidden()
    assert page.evaluate("sessionStorage.getItem('vae-service-api-key')") == KEY
    # Only the refused requests logged errors, and nothing left this machine.
    assert all("401" in message for message in watched.console_errors), watched.console_errors
    assert watched.hosts <= {"127.0.0.1"}
    watched.page.context.close()


def test_the_page_reads_well_on_a_narrow_screen(browser: Browser, server: str) -> None:
    watched = open_page(browser, server + "/explorer", width=320, height=720)  # WCAG reflow width
    page = watched.page
    wait_until(page, "document.querySelector('#samples').src !== ''")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    watched.screenshot("narrow")
    watched.check_clean()
    watched.page.context.close()


@pytest.mark.parametrize(
    ("path", "ready"), [("/docs", ".swagger-ui .info"), ("/redoc", ".redoc-wrap .api-content")]
)
def test_the_docs_render_with_no_network(browser: Browser, server: str, path: str, ready: str) -> None:
    watched = open_page(browser, server + path)
    watched.page.wait_for_selector(ready)
    assert "VAE service" in watched.page.content()
    watched.check_clean()
    watched.page.context.close()
