"""The chat page in a real headless Chromium (Debian `chromium`, driven by Playwright): type, send, see the
reply stream in with a tokens/s line. Saves a screenshot (tests/artifacts/chat_page.png)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cakelm.serve import ServeConfig, build_app
from tests.serving import CHROMIUM, launch_chromium, make_chat_checkpoint, running

ARTIFACTS = Path(__file__).parent / "artifacts"

# CI sets CAKELM_REQUIRE_BROWSER=1 so a missing browser fails instead of skipping.
pytestmark = pytest.mark.skipif(not CHROMIUM and not os.environ.get("CAKELM_REQUIRE_BROWSER"),
                                reason="Debian chromium is not installed (apt-get install chromium)")


def test_chat_page_streams_a_reply(tok_dir, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ckpt = make_chat_checkpoint(tmp_path / "ckpt", tok_dir)
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", device="cpu"))
    with running(app) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(url + "/")
            expect(page.locator("#model")).to_have_text("model: tiny")
            page.fill("#max_tokens", "40")
            page.fill("#input", "Good morrow, what news?")
            page.keyboard.press("Enter")
            expect(page.locator(".msg.user")).to_have_text("Good morrow, what news?")
            reply = page.locator(".msg.assistant")
            expect(page.locator("#stats")).to_contain_text("tokens/s", timeout=20_000)
            expect(page.locator("#send")).to_be_enabled()
            # the streamed reply, or the notice for a model that ended its turn at once (a random model may)
            expect(reply).not_to_be_empty()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat_page.png"))
            # a second turn goes into the same conversation
            page.fill("#input", "And then?")
            page.keyboard.press("Enter")
            expect(page.locator(".msg.assistant")).to_have_count(2)
            expect(page.locator("#send")).to_be_enabled(timeout=20_000)
            assert page.locator(".msg.error").count() == 0
        finally:
            browser.close()
    assert (ARTIFACTS / "chat_page.png").stat().st_size > 5000
