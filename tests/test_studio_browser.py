"""The studio end to end in a real headless Chromium: read a run's episodes in their authors'
colours, then co-write one problem with the tiny senior and check the saved episode row.

Chromium is the Debian package (`make install` apt-installs it), driven by Playwright's Python
API pointed at that executable: no browser download. Screenshots go to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest

from tandem.episode import HUMAN, SENIOR
from tandem.studio.app import Studio, create_app


def _chromium() -> str | None:
    for name in (os.environ.get("TANDEM_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed: `apt-get install -y chromium` (make install "
    "does it) or set TANDEM_CHROMIUM to a Chromium/Chrome executable")

SENIOR_BG, JUNIOR_BG, HUMAN_BG = "rgb(207, 227, 255)", "rgb(255, 224, 184)", "rgb(200, 240, 200)"
"""The authors' colours in static/style.css."""


@pytest.fixture
def served(saved_run, studio_room):
    """The studio app on a free local port, in a thread of this process (it drives the
    session's senior engine); stopped after the test."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Studio([saved_run], room=studio_room)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="studio", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the studio did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture
def page(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)  # a co-write turn on 2 busy cores
            yield page
        finally:
            browser.close()


def _background(locator) -> str:
    return locator.evaluate("node => getComputedStyle(node).backgroundColor")


def test_read_a_run_then_cowrite_a_problem_in_the_browser(served, page, studio_room, tmp_path):
    page.goto(served)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#episodes .episode").count() == 12
    first = page.locator("#episodes .episode").nth(2)
    assert _background(first.locator("span.tok.senior").first) == SENIOR_BG
    assert _background(first.locator("span.tok.junior").first) == JUNIOR_BG
    assert first.locator("span.tok.handoff").count() == 4
    assert "reward 1" in first.locator(".meta").inner_text()
    page.screenshot(path=tmp_path / "episodes.png", full_page=False)

    page.fill("#f-min-reward", "1")
    page.click("#f-apply")
    page.wait_for_function("document.querySelectorAll('#episodes .episode').length === 4")
    page.locator("#episodes .episode .group-button").first.click()
    page.wait_for_selector("#group:not([hidden]) .episode")
    assert page.locator("#group-columns .episode").count() == 3

    page.click("#tab-runs")
    page.wait_for_selector("#chart svg polyline")
    assert page.locator("#reports table").count() == 1

    page.click("#tab-cowrite")
    page.fill("#cw-typed", "What is 7 - 3?")
    page.fill("#cw-answer", "4")
    page.select_option("#cw-schedule", "word")
    page.click("#cw-start")
    page.wait_for_selector("#cw-text span.tok.senior")
    assert "your turn" in page.inner_text("#cw-status")
    page.fill("#cw-turn", " so x is 4")
    page.press("#cw-turn", "Control+Enter")  # sends the turn, as the Send button does
    page.wait_for_selector("#cw-text span.tok.human")
    page.fill("#cw-turn", " The answer is \\boxed{4}.")
    page.click("#cw-finish")
    page.wait_for_function("document.getElementById('cw-result').textContent.includes('reward')")
    assert "reward 1 · verdict correct" in page.inner_text("#cw-result")
    assert _background(page.locator("#cw-text span.tok.human").first) == HUMAN_BG
    page.screenshot(path=tmp_path / "cowrite.png", full_page=False)

    saved = json.loads((studio_room.out_dir / "episodes" / "step_000000.jsonl")
                       .read_text().splitlines()[-1])
    assert saved["problem"] == "What is 7 - 3?" and saved["reward"] == 1.0
    assert saved["author_mask"][0] == SENIOR and HUMAN in saved["author_mask"]
    assert " so x is 4" in saved["response_text"]
    assert saved["response_text"].endswith(" The answer is \\boxed{4}.")

    # the co-write directory is a run of its own: its saved episode shows the person in green
    page.select_option("#run-select", label=studio_room.out_dir.name)
    page.click("#tab-episodes")
    page.wait_for_selector("#episodes .episode span.tok.human")
    page.screenshot(path=tmp_path / "cowrite-episode.png", full_page=False)
