"""The attacker panel in a real browser: after a chat turn at the default split, it shows the recovered prompt.

`lambdasplit up --cloud local` on the embedded SmolLM2 at its defaults (layers 2:28, float16 wire), driven by
Playwright in Debian's headless Chromium. One message sent; once the answer is in, the panel runs A1 on the
hidden states that turn sent and shows the prompt it read back (the user's message inside it), its token
accuracy against the real prompt, and which attackers can run it on a plain ws:// link. The screenshot is
kept in artifacts/test-ui/attack-panel.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lambdasplit.agent.run import READY
from lambdasplit.server.process import lambdasplit_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "test-ui"
MESSAGE = "My PIN is 4812 and my name is Alice."

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="needs Debian's chromium (apt-get install chromium); the README test command installs it",
    ),
]


def test_the_attacker_panel_shows_the_prompt_read_back_from_the_wire(tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with (
        lambdasplit_process(["up", "--cloud", "local", "--port", "0"], READY, timeout=240) as url,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            expect(page.get_by_test_id("split")).to_contain_text("body · cloud [2, 28)", timeout=30_000)
            expect(page.get_by_test_id("attack-who")).to_contain_text("TLS (wss://) removes this attacker")

            page.get_by_test_id("max-tokens").fill("12")
            page.get_by_test_id("input").fill(MESSAGE)
            page.get_by_test_id("send").click()
            answer = page.locator("[data-testid=answer]").last
            expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
            assert "error" not in (answer.get_attribute("class") or ""), answer.inner_text()

            panel = page.get_by_test_id("attack-panel")
            expect(panel).to_have_attribute("data-state", "done", timeout=90_000)
            expect(page.get_by_test_id("attack-prompt")).to_contain_text(MESSAGE)
            expect(page.get_by_test_id("attack-prompt")).to_contain_text("<|im_start|>system")  # the template too
            expect(page.get_by_test_id("attack-accuracy")).to_contain_text("%")
            expect(page.get_by_test_id("attack-user")).to_contain_text("%")
            expect(page.get_by_test_id("attack-name")).to_contain_text("A1 exact matching")
            assert answer.inner_text().strip() in page.get_by_test_id("attack-output").inner_text()
            expect(page.get_by_test_id("attack-who")).to_contain_text("TLS does not help")
            expect(page.get_by_test_id("privacy-note")).to_contain_text("99.7-100%")

            shot = tmp_path / "attack-panel.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "attack-panel.png")
            print(
                page.get_by_test_id("attack-accuracy").inner_text(),
                "|",
                page.get_by_test_id("attack-status").inner_text(),
            )
        finally:
            browser.close()
