"""End to end in headless Chromium: start the server, upload a synthetic CXR on the page, check what renders.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``); driven by Playwright for
Python. Skipped, with the reason, only when that browser is absent.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from covidcxr.data.synth import draw_cxr
from covidcxr.io.files import save_png
from covidcxr.service.analysis import ServeSettings
from covidcxr.web.app import create_app
from covidcxr.web.toy import make_toy_assets

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
K = 6

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed: apt-get install -y chromium "
                                                      "chromium-driver (provides /usr/bin/chromium)"),
]

torch.set_num_threads(2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    import uvicorn

    toy = make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=10, image_size=96, seg_mode="mask")
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=K))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_upload_renders_probability_overlays_and_similar_cases(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    image, _, _ = draw_cxr(np.random.default_rng(11), "covid", size=192)
    upload = save_png(tmp_path / "synthetic_cxr.png", image)
    shot = tmp_path / "page.png"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(server + "/")
            expect(page.locator("#drop-zone")).to_be_visible()
            expect(page.locator("#model-version")).to_contain_text("archived cases")

            # 1. the file button
            page.set_input_files("#file-input", str(upload))
            expect(page.locator("#findings")).to_be_visible(timeout=60_000)
            expect(page.locator("#probability")).to_have_text(re.compile(r"^\d{1,3}\.\d%$"))
            expect(page.locator("#threshold-text")).to_have_text("threshold 50%")
            expect(page.locator(".case-tile")).to_have_count(K)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.case-tile img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            assert page.locator("#layer-image").evaluate("img => img.naturalWidth") == 192
            expect(page.locator("#layer-outline")).to_be_visible()
            expect(page.locator("#layer-heat")).to_be_hidden()
            page.check("#toggle-heat")
            page.uncheck("#toggle-outline")
            expect(page.locator("#layer-heat")).to_be_visible()
            expect(page.locator("#layer-outline")).to_be_hidden()
            page.check("#toggle-outline")
            labels = page.locator(".case-tile .label-chip").all_inner_texts()
            assert set(labels) <= {"COVID-19", "non-COVID"} and len(labels) == K
            assert all(re.fullmatch(r"similarity -?\d\.\d{3}", s)
                       for s in page.locator(".case-tile .similarity").all_inner_texts())
            page.screenshot(path=str(shot), full_page=True)

            # 2. drag and drop of the same file onto the drop zone
            page.click("#new-button")
            expect(page.locator("#drop-zone")).to_be_visible()
            data = list(upload.read_bytes())
            transfer = page.evaluate_handle(
                "bytes => { const dt = new DataTransfer();"
                " dt.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'})); return dt; }",
                data,
            )
            page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
            expect(page.locator("#findings")).to_be_visible(timeout=60_000)
            expect(page.locator(".case-tile")).to_have_count(K)
            expect(page.locator("#error")).to_be_hidden()
            assert not errors, errors
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def test_blank_image_shows_no_result_and_no_verdict(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    upload = save_png(tmp_path / "blank.png", np.zeros((160, 160), np.float32))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server + "/")
            page.set_input_files("#file-input", str(upload))
            expect(page.locator("#findings")).to_be_visible(timeout=60_000)
            expect(page.locator("#probability")).to_have_text("No result")
            expect(page.locator("#label")).to_contain_text("not a usable frontal chest X-ray")
            assert "chip-pos" not in (page.locator("#label").get_attribute("class") or "")  # no red verdict
            expect(page.locator("#qc-ok")).to_be_hidden()
            expect(page.locator(".case-tile")).to_have_count(0)
        finally:
            browser.close()
