"""The report and the live viewer in a real browser: Playwright driving Debian's Chromium.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` (``.ci/run`` installs it with
apt). Screenshots of the default model's report and viewer go to ``docs/screenshots/`` (the
README shows them); the tiny-model tests keep theirs under pytest's tmp dir.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import headatlas as ha
from conftest import XSS, XSS_TEXT, requires_default_model
from headatlas.report.data import display_token
from headatlas.report.html import write_report
from headatlas.report.maps import encode_text, token_strings
from headatlas.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
# Screenshots go to a temp dir; set HEADATLAS_SCREENSHOTS=docs/screenshots to refresh the README's.
_SCREENSHOT_DIR = os.environ.get("HEADATLAS_SCREENSHOTS")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--headless",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


class Page:
    """A page that records console errors, page errors and dialogs (an ``alert`` means XSS)."""

    def __init__(self, browser: Any, width: int = 1360, height: int = 900) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        self.page.on("dialog", on_dialog)

    def clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], f"a script from the data ran: {self.dialogs}"
        assert self.page.locator("img").count() == 0, "an element was built from data"


class Server:
    """uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the viewer did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_report_in_the_browser(browser: Any, tiny_atlas_dir: Path, tmp_path: Path) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    report = write_report(atlas, tmp_path, figures=False)
    p = Page(browser)
    page = p.page
    page.goto(report.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    info = atlas.meta["model"]
    assert page.locator("#grid .cell").count() == info["n_layers"] * info["n_heads"]
    page.click("#grid .cell[data-layer='1'][data-head='2']")
    assert page.text_content("#head-title") == "Layer 1 · head 2"
    assert page.locator("#heatmap canvas").count() == 1
    assert page.locator("#grid .cell.sel").get_attribute("data-layer") == "1"
    # the stored example holds the XSS prompt: its tokens are text in the token view
    page.click("#example-tabs button:first-child")
    tokens = page.locator("#lineview .col.q span").all_text_contents()
    assert "".join(tokens) == "".join(display_token(t, 14) for t in atlas.examples[0].tokens)
    assert "<" in tokens and "img" in "".join(tokens)
    # hovering shows every score; colour by a score; sort and filter the table
    page.hover("#grid .cell[data-layer='2'][data-head='3']")
    assert "layer 2, head 3" in page.text_content(".tip")
    page.select_option("#color-by", "induction")
    page.click("#heads-table th[data-key='induction']")
    first = page.locator("#heads-table tbody tr").first
    best = atlas.table.sort_values("induction", ascending=False).iloc[0]
    assert (first.get_attribute("data-layer"), first.get_attribute("data-head")) == (
        str(best["layer"]),
        str(best["head"]),
    )
    page.fill("#filter", "l2h1")
    assert page.locator("#heads-table tbody tr").count() == 1
    page.locator("#heads-table tbody tr").first.click()
    assert page.text_content("#head-title") == "Layer 2 · head 1"
    for token in ("\n", "  x", "\x10", "", " ", "a" * 30, XSS):
        assert page.evaluate("t => HA.displayToken(t)", token) == display_token(token)
    page.screenshot(path=str(tmp_path / "report.png"))
    p.clean()


def test_viewer_in_the_browser(
    browser: Any, tiny_atlas_dir: Path, tiny_loaded: ha.LoadedModel, tmp_path: Path
) -> None:
    app = create_app(ha.Atlas.load(tiny_atlas_dir), tiny_loaded, max_tokens=128)
    with Server(app) as url:
        p = Page(browser)
        page = p.page
        page.goto(url)
        page.wait_for_selector("#slot-a canvas")
        assert page.locator("#grid .cell").count() == 12
        # choose head L2H3 for panel A, and L0H1 for panel B with a shift-click on the grid
        page.fill("#slot-a input[aria-label='layer']", "2")
        page.fill("#slot-a input[aria-label='head']", "3")
        page.locator("#slot-a input[aria-label='head']").dispatch_event("change")
        page.wait_for_selector("#slot-a .slot-body[data-layer='2'][data-head='3'] canvas")
        assert page.text_content("#slot-a-title") == "L2H3"
        page.click("#grid .cell[data-layer='0'][data-head='1']", modifiers=["Shift"])
        page.wait_for_selector("#slot-b .slot-body[data-layer='0'][data-head='1'] canvas")
        # submit a text with the XSS string: a map appears, the tokens are text
        page.uncheck("#live")
        page.fill("#text", XSS_TEXT)
        page.click("#run")
        expected = token_strings(tiny_loaded, encode_text(tiny_loaded, XSS_TEXT))
        page.locator("#status", has_text=f"{len(expected)} tokens ·").wait_for()
        page.wait_for_selector("#slot-a .slot-body[data-layer='2'] canvas")
        labels = page.locator("#slot-a .hm .yl span").all_text_contents()
        assert "<" in labels and "img" in "".join(labels)
        page.click("#slot-a .tabs button:has-text('tokens')")
        tokens = page.locator("#slot-a .lv .col.q span").all_text_contents()
        assert tokens == [display_token(t, 14) for t in expected]
        page.screenshot(path=str(tmp_path / "viewer.png"))
        p.clean()
        # a refused request is shown as a message; the browser only logs the HTTP status
        page.fill("#text", "word " * 200)
        page.click("#run")
        page.wait_for_selector("#status.error")
        assert "over the limit" in page.text_content("#status")
        assert [e for e in p.errors if "status of 413" not in e] == []


@pytest.mark.slow
@requires_default_model
def test_default_model_report_and_viewer_screenshots(browser: Any, tmp_path: Path) -> None:
    """The real thing: scan the default model, check the report budget, take the README's pictures."""
    loaded = ha.load("default")
    out = tmp_path / "atlas"
    atlas = ha.scan(loaded, n_prompts=4, seq_len=128, batch_size=4, out=out)
    report = write_report(atlas, out, figures=False)
    assert report.stat().st_size <= 5_000_000
    SCREENSHOTS = Path(_SCREENSHOT_DIR) if _SCREENSHOT_DIR else tmp_path / "screenshots"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    p = Page(browser, 1360, 1160)
    page = p.page
    page.goto(report.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#grid .cell").count() == 270
    page.screenshot(path=str(SCREENSHOTS / "report.png"))
    page.locator("#table-card").evaluate("card => card.scrollIntoView()")
    page.click("#heads-table th[data-key='previous_token']")
    page.screenshot(path=str(SCREENSHOTS / "report-table.png"))
    p.clean()
    with Server(create_app(atlas, loaded)) as url:
        v = Page(browser, 1360, 1300)
        v.page.goto(url)
        v.page.wait_for_selector("#slot-b canvas")
        v.page.locator("#status", has_text="tokens ·").wait_for()
        v.page.screenshot(path=str(SCREENSHOTS / "viewer.png"))
        v.clean()
