"""The agent's web UI in a real browser: Playwright driving Debian's Chromium, headless.

`lambdasplit up --cloud local` (the one-command demo: it starts its own body server), a message typed
and sent, the answer streamed in, and the "What the network sees" panel updated. The screenshot is
kept in artifacts/test-ui/ (and in the test's tmp folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lambdasplit.agent.run import READY
from lambdasplit.server.process import lambdasplit_process
from tiny_models import NUM_LAYERS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "test-ui"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); the README test command installs it"
)


def test_chat_streams_and_the_network_panel_updates(tiny_checkpoint, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    path, _ = tiny_checkpoint("llama")
    args = ["up", "--cloud", "local", "--model", str(path), "--layers", f"1:{NUM_LAYERS - 1}", "--port", "0"]
    args.append("--no-attack")  # the attacker panel has its own tests; here it would only compete for the CPU
    with lambdasplit_process(args, READY, timeout=180) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(url)
            expect(page.get_by_test_id("meta")).to_contain_text("wire float16", timeout=30_000)
            expect(page.get_by_test_id("split")).to_contain_text(f"body · cloud [1, {NUM_LAYERS - 1})")
            expect(page.get_by_test_id("total-bytes")).to_have_text("0 B / 0 B")

            page.get_by_test_id("max-tokens").fill("24")  # the tiny model's context is 256 positions
            page.get_by_test_id("input").fill("the quick brown fox")
            page.get_by_test_id("send").click()
            answer = page.locator("[data-testid=answer]").last
            expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
            assert "error" not in (answer.get_attribute("class") or ""), answer.inner_text()
            assert answer.inner_text().strip(), "the streamed answer is empty"
            assert "error" not in (answer.get_attribute("class") or "")

            # The panel: bytes counted, the transmitted hidden state drawn, the plain prompt shown beside it.
            expect(page.get_by_test_id("total-bytes")).not_to_have_text("0 B / 0 B")
            expect(page.get_by_test_id("steps")).not_to_have_text("0")
            assert int(page.get_by_test_id("heatmap").get_attribute("data-updates") or 0) >= 2
            expect(page.get_by_test_id("step-bytes")).to_contain_text("B /")
            expect(page.get_by_test_id("cloud-only")).to_contain_text("the quick brown fox")

            # A second message keeps the history: two user bubbles, two answers.
            page.get_by_test_id("input").fill("hello world")
            page.get_by_test_id("input").press("Enter")
            expect(page.locator("[data-testid=answer]")).to_have_count(2)
            second = page.locator("[data-testid=answer]").last
            expect(second).to_have_attribute("data-done", "true", timeout=60_000)
            assert "error" not in (second.get_attribute("class") or ""), second.inner_text()
            expect(page.locator(".msg.user")).to_have_count(2)

            shot = tmp_path / "web-ui.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "web-ui.png")
        finally:
            browser.close()
