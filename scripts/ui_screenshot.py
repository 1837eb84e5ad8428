"""Screenshot of the device agent's web UI for the README: `python scripts/ui_screenshot.py [OUT.png]`.

Starts `lambdasplit up --cloud local` on the default model (SmolLM2-135M-Instruct, layers 2:28), opens
the UI in Debian's headless Chromium (Playwright), asks one question, waits for the attacker panel to read
it back, and saves the page.
"""

from __future__ import annotations

import shutil
import sys

from playwright.sync_api import expect, sync_playwright

from lambdasplit.agent.run import READY
from lambdasplit.server.process import lambdasplit_process


def main(out: str = "docs/web-ui.png") -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    with (
        lambdasplit_process(["up", "--cloud", "local", "--port", "0"], READY, timeout=300) as url,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        expect(page.get_by_test_id("meta")).to_contain_text("wire", timeout=60_000)
        page.get_by_test_id("max-tokens").fill("80")
        page.get_by_test_id("input").fill("My name is Alice and my PIN is 4921. Why is the sky blue? Answer briefly.")
        page.get_by_test_id("send").click()
        expect(page.locator("[data-testid=answer]").last).to_have_attribute("data-done", "true", timeout=120_000)
        expect(page.get_by_test_id("attack-panel")).to_have_attribute("data-state", "done", timeout=120_000)
        page.screenshot(path=out, full_page=True)
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
