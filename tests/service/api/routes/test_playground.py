"""GET / and /static/: the playground page and its files; and the page itself, driven in Chromium."""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, sync_playwright
from pydantic import SecretStr

from service.api.bodies import quoted
from service.api.routes.playground import STATIC_DIR
from service.config import Settings
from service.main import create_app
from tests.conftest import REPO
from tests.service.helpers import decoded_png, detail, digit_png, digits, files
from tests.service.test_main import service_env, stop, uvicorn, wait_ready

# Debian's Chromium (`apt-get install chromium`; .ci/run installs it). Playwright never downloads one here.
CHROMIUM = Path("/usr/bin/chromium")
# Headless in a container as root: no sandbox, no GPU, and no network traffic of the browser's own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# How long one step in the page may take (ms): each is a few API calls, so this only bounds a hang.
STEP_MS = 15_000
KEY = "playground-key-0123456789"
# Every image of the sample grid has loaded (the page asks for 16 by default).
SIXTEEN_SAMPLES = """() => {
    const images = [...document.querySelectorAll('#samples img')];
    return images.length === 16 && images.every((i) => i.complete && i.naturalWidth > 0);
}"""

browser_test = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


def page_assets() -> list[str]:
    """The paths of the files that index.html references (relative to the page, which is at /)."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return ["/" + path for path in re.findall(r'(?:src|href)="(static/[^"]+)"', html)]


def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>VAE playground</title>" in page.text
    types = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
    assets = page_assets()
    assert {Path(path).suffix for path in assets} == set(types)
    for path in assets:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(types[Path(path).suffix]), path
        assert response.content == (STATIC_DIR / Path(path).name).read_bytes()


def test_the_page_and_its_files_ask_the_browser_to_run_nothing_else(client: TestClient) -> None:
    """No script, style or frame from elsewhere, no other form target, no framing by another site (the
    page holds the API key typed into it), no sniffing a file as another type. The browser tests run the
    page under this policy, and fail on any violation it logs."""
    for path in ["/", *page_assets()]:
        headers = client.get(path).headers
        policy = dict(rule.strip().split(" ", 1) for rule in headers["content-security-policy"].split(";"))
        assert policy == {
            "default-src": "'self'",
            "img-src": "'self' data:",
            "object-src": "'none'",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }, path
        assert (headers["x-content-type-options"], headers["x-frame-options"]) == ("nosniff", "DENY"), path


@pytest.mark.parametrize(
    "name",
    ["missing.js", "index", "playground.py", "a\0.js", "a" * 300 + ".js"],
    ids=["missing", "no-suffix", "python", "nul", "name-too-long-for-the-filesystem"],
)
def test_only_the_page_files_are_served(client: TestClient, name: str) -> None:
    assert detail(client.get(f"/static/{quote(name)}"), 404) == f"no static file {quoted(name)}"


def test_nothing_outside_the_static_folder_is_reachable(client: TestClient) -> None:
    assert client.get("/static/../main.py").status_code == 404
    assert client.get("/static/%2e%2e/main.py").status_code == 404


def test_the_page_is_not_part_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/static")]


def test_the_page_loads_without_a_key_where_the_api_needs_one(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"api_keys": [SecretStr(KEY)]}))) as keyed:
        for path in ["/", *page_assets()]:
            assert keyed.get(path).status_code == 200, path
        assert keyed.get("/model").status_code == 401
        assert keyed.get("/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_page_files_ship_in_the_package() -> None:
    """A non-editable install carries every file of service/static/ (package-data in pyproject.toml)."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in STATIC_DIR.iterdir():
        relative = path.relative_to(STATIC_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns["service"]), relative


# In Chromium


@contextmanager
def served(model_dir: Path, port: int, **env: str) -> Iterator[tuple[str, httpx2.Client]]:
    """The service in a real uvicorn on `port`, once ready: its base URL and a client for direct calls."""
    process = uvicorn(port, service_env(model_dir, **env))
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx2.Client(base_url=base, timeout=5.0) as http:
            wait_ready(process, http)
            yield base, http
    finally:
        stop(process)


@contextmanager
def chromium(console: list[tuple[str, str]]) -> Iterator[Page]:
    """A 1280x800 page in Debian's Chromium; console errors and uncaught exceptions go to `console`."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(STEP_MS)
            page.on(
                "console",
                lambda message: (
                    console.append((message.text, message.location.get("url", "")))
                    if message.type == "error"
                    else None
                ),
            )
            page.on("pageerror", lambda error: console.append((f"uncaught: {error}", "")))
            yield page
        finally:
            browser.close()


def refused(status: str, url_prefix: str) -> tuple[str, str]:
    """The console line Chromium itself logs for a response with an error status."""
    return (f"Failed to load resource: the server responded with a status of {status}", url_prefix)


def only_expected(console: list[tuple[str, str]], expected: tuple[str, str]) -> None:
    """The browser logged `expected` (an API refusal the test caused) once, and no other console error."""
    text, url_prefix = expected
    matching = [entry for entry in console if entry[0] == text and entry[1].startswith(url_prefix)]
    assert len(matching) == 1, console
    assert [entry for entry in console if entry not in matching] == []


def pixels(data_url: str | None) -> np.ndarray:
    """The pixels of a PNG data: URL as the page shows it."""
    prefix = "data:image/png;base64,"
    assert data_url is not None and data_url.startswith(prefix)
    return decoded_png(base64.b64decode(data_url.removeprefix(prefix)))


def shrunk(image: np.ndarray, side: int) -> np.ndarray:
    """An image enlarged by nearest neighbour, back at `side` pixels (every k-th pixel)."""
    step = image.shape[0] // side
    return image[::step, ::step]


def choose_file(page: Page, name: str, data: bytes) -> None:
    """Pick a file in the page's file chooser, as a PNG called `name`."""
    page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png", "buffer": data}])


def drop_file(page: Page, name: str, data: bytes, on: str = "#drop") -> bool:
    """Drop a file called `name` on the element `on` (the page's drop zone by default), as a drag from the
    desktop does; whether the page took it (cancelled the event, so the browser does not open the file)."""
    taken: bool = page.evaluate(
        """([name, bytes, on]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
            const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
            return !document.querySelector(on).dispatchEvent(drop);
        }""",
        [name, list(data), on],
    )
    return taken


def sample_sources(page: Page) -> list[str]:
    sources: list[str] = page.eval_on_selector_all("#samples img", "images => images.map((i) => i.src)")
    return sources


@pytest.mark.slow
@pytest.mark.browser
@browser_test
def test_the_playground_in_chromium(model_dir: Path, free_port: int, tmp_path: Path) -> None:
    console: list[tuple[str, str]] = []
    with served(model_dir, free_port) as (base, http), chromium(console) as page:
        side = http.get("/model").json()["input_shape"][1]
        page.goto(f"{base}/")

        # 16 prior samples (the default n), every one decoded by the browser.
        page.wait_for_function(SIXTEEN_SAMPLES)
        first = sample_sources(page)
        assert page.inner_text("#invert-label") == "dark strokes on a light background"
        assert page.input_value("#seed") == "0"

        # Another seed: other images, the ones /sample gives for that seed.
        page.fill("#seed", "1")
        page.press("#seed", "Tab")
        page.wait_for_function(
            f"(old) => document.querySelector('#samples img').src !== old[0] && ({SIXTEEN_SAMPLES})()",
            arg=first,
        )
        second = sample_sources(page)
        assert not set(first) & set(second)
        expected = http.get("/sample", params={"n": 16, "seed": 1}).json()["images"]
        for shown, png in zip(second, expected, strict=True):
            np.testing.assert_array_equal(shrunk(pixels(shown), side), decoded_png(png))

        # An upload: what the model sees, its reconstruction, and the KL that /kl gives for it.
        digit = digit_png(0)
        choose_file(page, "zero.png", digit)
        alert = page.locator("#upload-panel > .error")
        page.wait_for_selector("#upload-result:not([hidden]), #upload-panel > .error:not([hidden])")
        assert alert.is_hidden(), alert.inner_text()
        assert page.evaluate("document.querySelector('#recon-image').naturalWidth") > 0
        seen = shrunk(pixels(page.get_attribute("#input-image", "src")), side)
        np.testing.assert_array_equal(seen, (digits()[0] / 16.0 * 255.0).round())
        kl = http.post("/kl", files=files(digit)).json()
        # The page shows 3 decimals: within half a unit of the last place.
        assert abs(float(page.inner_text("#kl-total")) - kl["kl"][0]) <= 0.0005 + 1e-9
        assert page.locator("#posterior tbody tr").count() == len(kl["kl_per_dim"][0])

        # A slider re-decodes the explorer's image (now the upload's mu).
        page.wait_for_selector("#explorer-panel:not([aria-busy])")
        before = page.get_attribute("#explorer-image", "src")
        slider = page.locator("#sliders input[type=range]").first
        slider.press("End" if float(slider.input_value()) < 0 else "Home")
        page.wait_for_function("(old) => document.querySelector('#explorer-image').src !== old", arg=before)
        page.wait_for_selector("#explorer-panel:not([aria-busy])")
        page.wait_for_selector("#interpolation-panel:not([aria-busy]) #strip img")

        screenshot = tmp_path / "playground.png"
        page.screenshot(path=str(screenshot))
        assert decoded_png(screenshot.read_bytes()).shape[:2] == (800, 1280)

        # A corrupt file dropped on the page: the API's 400 detail in words, and no stale result.
        junk = b"this is not an image"
        reason = detail(http.post("/reconstruct", files=files(junk)), 400)
        drop_file(page, "image0.png", junk)
        alert.wait_for(state="visible")
        assert reason in alert.inner_text()
        assert page.locator("#upload-result").is_hidden()

    only_expected(console, refused("400 (Bad Request)", f"{base}/reconstruct?"))


@pytest.mark.slow
@pytest.mark.browser
@browser_test
def test_invert_names_the_polarity_the_model_was_not_trained_on(
    model_dir: Path, free_port: int, tmp_path: Path
) -> None:
    """A model of dark strokes on light: invert reads light strokes on a dark background (the page said
    "dark strokes on a light background" whatever the model, the very images it reads without invert)."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card["input"]["foreground"] = "dark"
    (copy / "model.json").write_text(json.dumps(card))
    console: list[tuple[str, str]] = []
    with served(copy, free_port) as (base, _), chromium(console) as page:
        page.goto(f"{base}/")
        page.wait_for_function(SIXTEEN_SAMPLES)
        assert page.inner_text("#invert-label") == "light strokes on a dark background"
    assert console == []


@pytest.mark.slow
@pytest.mark.browser
@browser_test
def test_the_playground_keeps_within_the_servers_limits(model_dir: Path, free_port: int) -> None:
    """With VAE_MAX_IMAGES below the 32 images the explorer probes, the probe was refused and the explorer
    came up without sliders, and without a word: it now draws as many samples as VAE_MAX_LATENTS allows and
    encodes them VAE_MAX_IMAGES at a time, and finds the same dimensions as with the default limits."""
    console: list[tuple[str, str]] = []
    slider_ids = "inputs => inputs.map((i) => i.id)"
    with served(model_dir, free_port) as (base, _), chromium(console) as page:
        page.goto(f"{base}/")
        page.locator("#sliders input[type=range]").first.wait_for()
        default = page.eval_on_selector_all("#sliders input", slider_ids)
    limits = {"VAE_MAX_IMAGES": "3", "VAE_MAX_LATENTS": "32"}
    with served(model_dir, free_port, **limits) as (base, _), chromium(console) as page:
        encodes: list[str] = []
        page.on("request", lambda r: encodes.append(r.url) if r.url.startswith(f"{base}/encode") else None)
        page.goto(f"{base}/")
        page.wait_for_function(SIXTEEN_SAMPLES)
        page.locator("#sliders input[type=range]").first.wait_for()
        assert "over 32 decoded prior samples" in page.inner_text("#sliders-note")
        assert len(encodes) == 11  # 32 images, 3 a request
        assert page.get_attribute("#n", "max") == "32"
        assert page.eval_on_selector_all("#sliders input", slider_ids) == default
    assert console == []


@pytest.mark.slow
@pytest.mark.browser
@browser_test
def test_the_playground_with_api_keys(model_dir: Path, free_port: int) -> None:
    console: list[tuple[str, str]] = []
    with served(model_dir, free_port, VAE_API_KEYS=KEY) as (base, _), chromium(console) as page:
        page.goto(f"{base}/")
        alert = page.locator("#top > .error")
        alert.wait_for(state="visible")
        assert "GET /model answered 401: an API key is required" in alert.inner_text()

        with page.expect_request(f"{base}/model") as model_request:
            page.fill("#api-key", KEY)
            page.press("#api-key", "Tab")
        assert model_request.value.headers["authorization"] == f"Bearer {KEY}"
        page.wait_for_function(SIXTEEN_SAMPLES)
        assert alert.is_hidden()

        # A file dropped outside the drop zone is read too (once), not opened by the browser instead.
        reads: list[str] = []
        page.on("request", lambda r: reads.append(r.url) if r.url.startswith(f"{base}/reconstruct") else None)
        assert drop_file(page, "digit.png", digit_png(3), on="#model-card")
        page.locator("#upload-result").wait_for(state="visible")
        assert len(reads) == 1

        # A key that stops working: what the old one showed is cleared, and the sliders are gone with it.
        page.fill("#api-key", KEY + "-wrong")
        page.press("#api-key", "Tab")
        alert.wait_for(state="visible")
        assert "GET /model answered 403" in alert.inner_text()
        assert page.locator("#samples img").count() == 0
        assert page.locator("#sliders input").count() == 0
        assert page.locator("#upload-result").is_hidden()

    expected = [refused("401 (Unauthorized)", f"{base}/model"), refused("403 (Forbidden)", f"{base}/model")]
    for text, url_prefix in expected:
        assert len([entry for entry in console if entry[0] == text and entry[1].startswith(url_prefix)]) == 1
    assert [entry for entry in console if not any(entry[0] == text for text, _ in expected)] == [], console
