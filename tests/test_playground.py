"""The playground page in a real headless Chromium: load it, move a slider, send a prompt,
and watch a steered answer stream in that differs from the unsteered one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

from tools.server_process import running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the machine's own check starts it: no sandbox as root, no calls home on a closed network
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_ENV = "EDGE_STEER_SCREENSHOT"  # where to keep the screenshot (tools/results/...)


@pytest.fixture(scope="module")
def server(demo_path) -> str:
    with running_server(
        ["--model", "demo", "--parallel", "2", "--preset", "cheerful=happy:1"]
    ) as url:
        yield url


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_slider_steers_a_streamed_answer(server, tmp_path: Path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(server)
        slider = page.locator("#vector-happy")
        slider.wait_for()
        slider.focus()
        for _ in range(30):  # 30 steps of 0.05: happy +1.5
            slider.press("ArrowRight")
        assert page.locator("#steered .spec").inner_text() == "happy +1.5"
        page.select_option("#mode", "completion")
        page.fill("#prompt", "The best thing about mornings is")
        page.fill("#max-tokens", "40")
        page.fill("#temperature", "0")
        page.evaluate(
            """() => { window.updates = 0;
            new MutationObserver(() => window.updates++).observe(
              document.querySelector('#steered .text'),
              {childList: true, characterData: true, subtree: true}); }"""
        )
        page.click("#send")
        page.wait_for_selector("#plain[data-done]", state="attached", timeout=120_000)
        page.wait_for_selector("#steered[data-done]", state="attached", timeout=120_000)
        plain = page.locator("#plain .text").inner_text()
        steered = page.locator("#steered .text").inner_text()
        shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "playground.png")
        page.screenshot(path=str(shot), full_page=True)
        updates = page.evaluate("window.updates")
        status = page.locator("#steered .meta").inner_text()
        browser.close()
    assert plain and steered and plain != steered
    assert updates > 5  # the answer arrived piece by piece, not at once
    assert status.startswith("done (length)")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_the_page_fits_a_phone_reruns_what_was_sent_and_stops(server):
    """From a browser sweep: the page was 548 px wide on a 390 px phone and a long unbroken
    word widened a column off screen; a slider re-run took the prompt last sent but the
    mode and settings of the moment, once per arrow-key press; nothing could stop a reply."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(server)
        page.locator("#vector-happy").wait_for()
        page.evaluate("document.querySelector('#plain .text').textContent = 'ab'.repeat(2000)")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        posts: list[dict] = []
        page.on("request", lambda r: r.method == "POST" and posts.append(r.post_data_json))
        page.select_option("#mode", "completion")
        page.fill("#prompt", "The best thing about mornings is")
        page.fill("#max-tokens", "8")
        page.click("#send")
        page.wait_for_selector("#steered[data-done]", state="attached", timeout=120_000)
        page.fill("#prompt", "Another prompt")
        page.select_option("#mode", "chat")
        page.fill("#max-tokens", "")  # not sent as 0: the re-run keeps the 8 it was sent with
        page.locator("#vector-happy").focus()
        # the re-run can finish (8 tokens) before a check for its start would see it
        with page.expect_request(lambda r: r.method == "POST", timeout=30_000):
            for _ in range(6):
                page.keyboard.press("ArrowRight")
        page.wait_for_selector("#steered[data-done]", state="attached", timeout=120_000)
        rerun = posts[2:]
        assert len(rerun) == 1 and rerun[0]["prompt"] == "The best thing about mornings is"
        assert rerun[0]["max_tokens"] == 8 and rerun[0]["steering"] == {"happy": 0.3}
        page.click("#send")  # the empty Max tokens is flagged, nothing is sent
        assert len(posts) == 3
        page.fill("#max-tokens", "400")
        page.click("#send")
        page.wait_for_selector("#steered .text:not(:empty)", timeout=120_000)
        page.click("#stop")
        page.wait_for_function("document.querySelector('#steered .meta').textContent === 'stopped'")
        assert page.is_disabled("#stop") and not page.locator("#steered[data-done]").count()
        browser.close()
