"""End to end in headless Chromium: start the server, upload a synthetic CXR on the page, check what renders.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``); driven by Playwright for
Python. Skipped, with the reason, only when that browser is absent.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from covidcxr.data.synth import draw_cxr
from covidcxr.io.files import save_png
from covidcxr.service.settings import ServeSettings
from covidcxr.web.app import create_app
from covidcxr.web.toy import make_toy_assets

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
K = 6
PROB_TEXT = re.compile(r"^(> 99%|< 1%|[1-9]\d?%)$")
BAD_PROB = re.compile(r"100(\.0)? ?%|(^|\D)0(\.0)? ?%")
# Tabbing through the page after an upload reaches each of these once (and nothing twice before it cycles).
CONTROLS = ["toggle-outline", "toggle-heat", "new-button"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed: apt-get install -y chromium "
                                                      "chromium-driver (provides /usr/bin/chromium)"),
]

torch.set_num_threads(2)


@contextmanager
def _page(width: int, height: int, *, console: bool = False) -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page and the page errors it raised (console errors too with ``console``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            if console:
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield page, errors
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=10, image_size=96, seg_mode="mask")


@pytest.fixture(scope="module")
def server(toy):
    yield from _serve(toy, ServeSettings(k=K))


TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def token_server(toy):
    if "token" not in {f.name for f in dataclasses.fields(ServeSettings)}:
        pytest.skip("ServeSettings has no token field: the server has no token authentication yet")
    yield from _serve(toy, ServeSettings(k=K, token=TOKEN))


def _serve(toy, settings: ServeSettings):
    import uvicorn

    app = create_app(toy.model_dir, toy.index_dir, settings)
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
    from playwright.sync_api import expect

    image, _, _ = draw_cxr(np.random.default_rng(11), "covid", size=192)
    upload = save_png(tmp_path / "synthetic_cxr.png", image)
    shot = tmp_path / "page.png"

    with _page(1280, 1000, console=True) as (page, errors):
        page.goto(server + "/")
        expect(page.locator("#drop-zone")).to_be_visible()
        expect(page.locator("#model-version")).to_contain_text("archived cases")

        # 1. the file button
        page.set_input_files("#file-input", str(upload))
        expect(page.locator("#findings")).to_be_visible(timeout=60_000)
        expect(page.locator("#probability")).to_have_text(PROB_TEXT)
        assert not BAD_PROB.search(page.locator("#probability").inner_text())
        expect(page.locator("#threshold-text")).to_have_text("threshold 50%")
        expect(page.locator(".case-tile")).to_have_count(K)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.case-tile img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=30_000,
        )
        assert page.locator("#layer-image").evaluate("img => img.naturalWidth") == 192
        expect(page.locator("#layer-outline")).to_be_visible()
        expect(page.locator("#layer-heat")).to_be_hidden()
        expect(page.locator("#heat-legend")).to_be_hidden()
        page.check("#toggle-heat")
        page.uncheck("#toggle-outline")
        expect(page.locator("#layer-heat")).to_be_visible()
        expect(page.locator("#heat-legend")).to_be_visible()
        expect(page.locator("#heat-legend")).to_contain_text("weak")
        expect(page.locator("#heat-legend")).to_contain_text("strong")
        expect(page.locator("#layer-outline")).to_be_hidden()
        page.check("#toggle-outline")
        # QC: never "passed" next to a warning; one summary line when something is wrong.
        qc_ok = page.locator("#qc-ok").is_visible()
        qc_box = page.locator("#qc-box").is_visible()
        assert qc_ok != qc_box
        if "outside the lungs" in page.locator("#lung-energy").inner_text():
            assert not qc_ok and "outside the lungs" in page.locator("#qc-list").inner_text()
        # model identity, not only a hash
        expect(page.locator("#model-facts")).to_contain_text("Version")
        expect(page.locator("#model-facts")).to_contain_text("MODEL_CARD.md")
        # similarity explained, rank shown
        expect(page.locator("#cases-help")).to_contain_text("1.00 = identical image")
        expect(page.locator("#cases-help")).to_contain_text("not by diagnosis")
        expect(page.locator(".case-tile .case-rank").first).to_have_text("most similar")
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
    assert shot.stat().st_size > 10_000


def test_blank_image_shows_no_result_and_no_verdict(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    upload = save_png(tmp_path / "blank.png", np.zeros((160, 160), np.float32))
    with _page(1280, 1000) as (page, errors):
        page.goto(server + "/")
        page.set_input_files("#file-input", str(upload))
        expect(page.locator("#findings")).to_be_visible(timeout=60_000)
        expect(page.locator("#probability")).to_have_text("No result")
        expect(page.locator("#label")).to_contain_text("not a usable frontal chest X-ray")
        assert "chip-pos" not in (page.locator("#label").get_attribute("class") or "")  # no red verdict
        expect(page.locator("#qc-ok")).to_be_hidden()
        expect(page.locator("#qc-box")).to_be_visible()
        expect(page.locator("#qc-summary")).to_contain_text("No result")
        expect(page.locator(".case-tile")).to_have_count(0)
        assert "%" not in page.locator("#probability").inner_text()
        assert page.locator("#prob-fill").evaluate("e => e.getBoundingClientRect().width") == 0
        expect(page.locator("#toggle-heat")).to_be_disabled()
        expect(page.locator("#heat-legend")).to_be_hidden()
        assert not errors, errors


def _tab_cycle(page, limit: int = 40) -> list[str]:
    """Ids of the elements Tab reaches, in order, up to the first repeat (the cycle); body/None entries skipped."""
    page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.focus(); }")
    seen: list[str] = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        ident = page.evaluate("() => { const a = document.activeElement;"
                              " return !a || a === document.body ? '' : (a.id || a.tagName + ':' + a.outerHTML.slice(0, 60)); }")
        if not ident:
            if seen:
                break  # left the page: one full cycle done
            continue
        if ident in seen:
            assert ident == seen[0], f"{ident} reached twice before the cycle: {seen}"
            break
        seen.append(ident)
    return seen


def test_phone_layout_thumbnails_grid_and_tab_order(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    image, _, _ = draw_cxr(np.random.default_rng(5), "non_covid", size=192)
    upload = save_png(tmp_path / "cxr.png", image)
    with _page(375, 800) as (page, errors):
        page.goto(server + "/")
        # before an upload: one tab stop for choosing a file (not the drop zone and its button both)
        assert _tab_cycle(page) == ["choose-button"]
        page.set_input_files("#file-input", str(upload))
        expect(page.locator("#findings")).to_be_visible(timeout=60_000)
        expect(page.locator(".case-tile")).to_have_count(K)
        text = page.locator("#probability").inner_text()
        assert PROB_TEXT.fullmatch(text) and not BAD_PROB.search(text), text
        page.wait_for_function(
            "() => [...document.querySelectorAll('.case-tile img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=30_000,
        )
        # thumbnails come as blob: URLs (fetched with the token header when there is one)
        assert all(src.startswith("blob:") for src in
                   page.locator(".case-tile img").evaluate_all("imgs => imgs.map(i => i.src)"))
        boxes = page.locator(".case-tile img").evaluate_all(
            "imgs => imgs.map(i => { const r = i.getBoundingClientRect();"
            " return [r.width, r.height, i.naturalWidth, i.naturalHeight]; })")
        for w, h, nw, nh in boxes:
            assert w > 0 and h > 0
            assert abs((w / h) / (nw / nh) - 1) < 0.02, (w, h, nw, nh)
        tops = page.locator(".case-tile").evaluate_all("ts => ts.map(t => Math.round(t.getBoundingClientRect().top))")
        rows: dict[int, int] = {}
        for top in tops:
            rows[top] = rows.get(top, 0) + 1
        counts = [rows[t] for t in sorted(rows)]
        assert len(counts) == 1 or len(set(counts)) == 1, f"orphan row: tiles per row {counts}"
        # nothing wider than the phone
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
        # tab order: each control once, no positive tabindex, no focusable inside another focusable
        cycle = _tab_cycle(page)
        assert len(cycle) == len(set(cycle))
        for ident in CONTROLS:
            assert cycle.count(ident) == 1, cycle
        assert page.evaluate("() => [...document.querySelectorAll('[tabindex]')].filter(e => e.tabIndex > 0).length") == 0
        nested = page.evaluate(
            "() => { const sel = 'a[href],button,input,select,textarea,[tabindex]:not([tabindex=\"-1\"])';"
            " return [...document.querySelectorAll(sel)].filter(e => e.parentElement && e.parentElement.closest(sel))"
            ".map(e => e.id || e.tagName); }")
        assert not nested, nested
        assert not errors, errors


def test_token_form_refuses_a_wrong_token_and_accepts_the_right_one(token_server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    image, _, _ = draw_cxr(np.random.default_rng(3), "covid", size=160)
    upload = save_png(tmp_path / "cxr.png", image)
    with _page(1280, 1000) as (page, errors):
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        auth_headers: list[str] = []
        page.on("request", lambda r: auth_headers.append(r.headers.get("authorization") or "")
                if "/api/" in r.url else None)
        page.goto(token_server + "/")
        expect(page.locator("#drop-zone")).to_be_visible()
        expect(page.locator("#token-form")).to_be_hidden()  # /healthz without a token: {"status": "ok"} only
        page.set_input_files("#file-input", str(upload))
        expect(page.locator("#token-form")).to_be_visible(timeout=30_000)
        expect(page.locator("#token-message")).to_contain_text("needs an access token")
        page.fill("#token-input", "wrong-token")
        page.click("#token-submit")
        expect(page.locator("#token-message")).to_contain_text("refused", timeout=30_000)
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#findings")).to_be_hidden()
        page.fill("#token-input", TOKEN)
        page.press("#token-input", "Enter")
        expect(page.locator("#findings")).to_be_visible(timeout=60_000)
        expect(page.locator("#token-form")).to_be_hidden()
        expect(page.locator(".case-tile")).to_have_count(K)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.case-tile img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=30_000,
        )
        expect(page.locator("#model-version")).to_contain_text("archived cases")
        assert page.evaluate("() => sessionStorage.getItem('covidcxr.token')") == TOKEN
        assert auth_headers.count("Bearer " + TOKEN) >= 1 + K  # the analysis and every thumbnail
        # a second upload uses the kept token: no form
        page.click("#new-button")
        page.set_input_files("#file-input", str(upload))
        expect(page.locator("#findings")).to_be_visible(timeout=60_000)
        expect(page.locator("#token-form")).to_be_hidden()
        assert not dialogs and not errors, (dialogs, errors)
