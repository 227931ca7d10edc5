"""The upload page in a real browser: Debian's chromium driven by Playwright, headless."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import running_uvicorn

from histolite.serve.app import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# .ci/run sets this: there a missing browser is a failure, not a skip.
BROWSER_REQUIRED = os.environ.get("HISTOLITE_REQUIRE_BROWSER") == "1"
try:
    import playwright.sync_api as playwright_api
except ImportError:  # pragma: no cover - the dev extra installs it
    playwright_api = None


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    missing = []
    if playwright_api is None:
        missing.append("playwright (pip install 'histolite[dev]')")
    if not Path(CHROMIUM).exists():
        missing.append("Debian chromium (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if BROWSER_REQUIRED:
            pytest.fail(message + "; HISTOLITE_REQUIRE_BROWSER=1 makes that a failure")
        pytest.skip(message + "; .ci/run installs them")


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _serve(model_dir: Path, root: Path) -> Iterator[str]:
    app = create_app(ServeSettings(model_dir=model_dir, audit_db=root / "audit.sqlite"))
    with running_uvicorn(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, exported_model: Path) -> Iterator[str]:
    yield from _serve(exported_model, tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def repository_server(tmp_path_factory: pytest.TempPathFactory, repository: Path) -> Iterator[str]:
    yield from _serve(repository, tmp_path_factory.mktemp("browser_repo"))


def test_upload_shows_class_bars_and_heatmap(
    server: str, synthetic_dir: Path, tmp_path: Path
) -> None:
    tile = sorted((synthetic_dir / "lympho").iterdir())[0]
    expected = httpx.post(
        f"{server}/v1/predict", files={"files": (tile.name, tile.read_bytes())}
    ).json()
    expected_class = expected["predictions"][0]["class"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server)
            # locator waits, not wait_for_function: a string predicate that has to be polled
            # is eval'd in the page, which the page's CSP (no 'unsafe-eval') refuses
            playwright_api.expect(page.locator("#model-line")).to_have_text(
                re.compile(r"^Model"), timeout=20_000
            )
            page.set_input_files("#file-input", str(tile))
            result = page.wait_for_selector("article.result", timeout=20_000)
            assert result is not None
            assert page.inner_text("article.result .class-name") == expected_class
            assert page.locator("article.result .bars li").count() == 4
            assert page.get_attribute("article.result canvas.heatmap", "data-cells") == "1"
            width = page.evaluate("document.querySelector('article.result canvas.image').width")
            assert width == 32  # the uploaded image was drawn
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # bad input shows the server's message, not a crash
            bad = tmp_path / "bad.png"
            bad.write_bytes(b"not an image")
            page.set_input_files("#file-input", str(bad))
            page.wait_for_selector("#status.error")
            assert "415" in page.inner_text("#status")
        finally:
            browser.close()


def test_real_kather_tile_renders_a_patch_grid(server: str, kather_dir: Path) -> None:
    """A real 150 px H&E tile larger than the model's 32 px patches gives a 4 x 4 heatmap."""
    tile = sorted((kather_dir / "04_LYMPHO").iterdir())[0]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server)
            page.set_input_files("#file-input", str(tile))
            page.wait_for_selector("article.result")
            assert page.get_attribute("article.result canvas.heatmap", "data-cells") == "16"
        finally:
            browser.close()


def test_model_picker_and_attention_heatmap_of_a_bag_model(
    repository_server: str, mosaic_bags: Path, tmp_path: Path
) -> None:
    image = sorted((mosaic_bags / "positive").glob("*.png"))[0]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(repository_server)
            page.locator("#model-select option").first.wait_for(state="attached", timeout=20_000)
            options = page.eval_on_selector_all(
                "#model-select option", "els => els.map(e => e.value)"
            )
            assert options == ["bags/1", "tiles/10", "tiles/2", "tiles/1"]
            assert page.input_value("#model-select") == "bags/1"  # the default model
            page.select_option("#model-select", "tiles/2")
            assert "tiles v2" in page.inner_text("#model-line")
            page.select_option("#model-select", "bags/1")
            assert "attention MIL" in page.inner_text("#model-line")
            page.set_input_files("#file-input", str(image))
            page.wait_for_selector("article.result", timeout=20_000)
            heat = "article.result canvas.heatmap"
            assert page.get_attribute(heat, "data-kind") == "attention"
            assert page.get_attribute(heat, "data-cells") == "4"
            assert "attention" in page.inner_text("article.result .legend")
            assert not page.is_visible("article.result .gradcam-toggle")  # no Grad-CAM for bags
            assert "bags v1" in page.inner_text("article.result .meta")
            # the most-attended patch is painted most opaque
            alpha = page.evaluate(
                """() => {
                  const c = document.querySelector('article.result canvas.heatmap');
                  const d = c.getContext('2d');
                  return [[16, 16], [48, 16], [16, 48], [48, 48]].map(([x, y]) =>
                    d.getImageData(x, y, 1, 1).data[3]);
                }"""
            )
            assert max(alpha) > 0 and len(set(alpha)) > 1
            page.screenshot(path=str(tmp_path / "bag.png"), full_page=True)
        finally:
            browser.close()


def test_patch_model_draws_its_gradcam_through_the_overlay(
    server: str, synthetic_dir: Path, tmp_path: Path
) -> None:
    """Grad-CAM for patch models on the page (issue 14): painted over the image, strongest
    cell most opaque, with the patch heatmap one click away."""
    tile = sorted((synthetic_dir / "tumor").iterdir())[3]
    expected = httpx.post(
        f"{server}/v1/predict", files={"files": (tile.name, tile.read_bytes())}
    ).json()["predictions"][0]["explanation"]
    values = expected["values"]
    flat = [(v, r, c) for r, row in enumerate(values) for c, v in enumerate(row)]
    (_, hot_r, hot_c), (_, cold_r, cold_c) = max(flat), min(flat)
    cell = expected["cell_width"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server)
            page.set_input_files("#file-input", str(tile))
            page.wait_for_selector("article.result", timeout=20_000)
            cam = "article.result canvas.gradcam"
            assert page.get_attribute(cam, "data-kind") == "gradcam"
            assert page.get_attribute(cam, "data-cells") == str(len(flat)) == "64"
            assert page.is_visible("article.result .gradcam-toggle")
            assert "Grad-CAM" in page.inner_text("article.result .legend")
            visibility = "sel => getComputedStyle(document.querySelector(sel)).visibility"
            assert page.evaluate(visibility, cam) == "visible"
            assert page.evaluate(visibility, "article.result canvas.heatmap") == "hidden"
            alpha = page.evaluate(
                """([points]) => {
                  const d = document.querySelector('article.result canvas.gradcam')
                    .getContext('2d');
                  return points.map(([x, y]) => d.getImageData(x, y, 1, 1).data[3]);
                }""",
                [[[(hot_c + 0.5) * cell, (hot_r + 0.5) * cell],
                  [(cold_c + 0.5) * cell, (cold_r + 0.5) * cell]]],
            )  # fmt: skip
            assert alpha[0] > 150 and alpha[1] == 0, alpha  # 0.7 opaque at the strongest cell
            page.screenshot(path=str(tmp_path / "gradcam.png"), full_page=True)
            page.click("article.result .show-heatmap")
            assert page.evaluate(visibility, "article.result canvas.heatmap") == "visible"
            page.click("article.result .show-gradcam")
            assert page.evaluate(visibility, cam) == "hidden"
        finally:
            browser.close()
