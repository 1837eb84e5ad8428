"""Images in the device agent: ``/v1/images/generations`` through the official ``openai`` client, and the image
page in a real browser (Playwright driving Debian's Chromium).

A real diffusion body server (``serve --pipeline shapes-t2i``, the embedded default model) and a real agent
(``up --image-cloud URL``) on loopback; every image is compared with ``imagine``'s for the same seed against the
same server.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

import in_process
from lambdasplit.agent.run import READY
from lambdasplit.server.process import lambdasplit_process
from servers import body_server
from tiny_models import NUM_LAYERS

PROMPT = "a red circle at the top left on a blue background"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "test-ui"


@pytest.fixture(scope="module")
def stack(tiny_checkpoint) -> Iterator[tuple[str, str]]:
    """(agent URL, diffusion body server URL): a tiny text model on a local body server, and shapes-t2i."""
    path, _ = tiny_checkpoint("llama")
    with body_server("--pipeline", "shapes-t2i") as diffusion:
        args = ["up", "--port", "0", "--cloud", "local", "--model", str(path), "--layers", f"1:{NUM_LAYERS - 1}",
                "--image-cloud", diffusion, "--no-attack"]  # fmt: skip
        with lambdasplit_process(args, READY, timeout=180) as url:
            yield url, diffusion


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack[0]}/v1", api_key="not-needed-on-the-device", max_retries=0, timeout=120)


def pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def imagine(capsys, monkeypatch, tmp_path: Path, cloud: str, seed: int, steps: int, *extra: str) -> np.ndarray:
    out = tmp_path / f"imagine-{seed}-{steps}.png"
    argv = ["imagine", PROMPT, "--out", str(out), "--cloud", cloud, "--seed", str(seed), "--steps", str(steps), *extra]
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
    assert code == 0, err
    return pixels(out.read_bytes())


def test_images_generate_equals_imagine_for_the_seed(stack, client, capsys, monkeypatch, tmp_path) -> None:
    reply = client.images.generate(
        model="shapes-t2i", prompt=PROMPT, response_format="b64_json", extra_body={"seed": 7, "steps": 12}
    )
    assert reply.data is not None and reply.data[0].b64_json
    got = pixels(reply.data[0].b64_json)
    assert got.shape == (32, 32, 3) and reply.size == "32x32"
    assert np.array_equal(got, imagine(capsys, monkeypatch, tmp_path, stack[1], 7, 12))
    facts = reply.model_extra["lambdasplit"]  # type: ignore[index]
    assert facts["policy"] == "paper" and facts["steps"] == 12
    assert facts["frames_down"] >= 12 and facts["bytes_down"] > 12 * 16 * 16 * 4 * 2  # a float16 noise per step


def test_streaming_sends_partial_images_then_the_same_final_image(client) -> None:
    events = list(client.images.generate(model="shapes-t2i", prompt=PROMPT, stream=True, partial_images=3))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]  # type: ignore[union-attr]
    assert [e.model_extra["lambdasplit"]["step"] for e in events[:3]] == [5, 10, 15]  # type: ignore[index]
    final = pixels(events[-1].b64_json)
    whole = client.images.generate(model="shapes-t2i", prompt=PROMPT)
    assert whole.data is not None and np.array_equal(final, pixels(whole.data[0].b64_json or ""))
    assert not np.array_equal(pixels(events[0].b64_json), final)  # a preview is the image so far


def test_other_policies_draw_too(stack, client, capsys, monkeypatch, tmp_path) -> None:
    for policy, extra in (("unet-lambda", ()), ("collafuse", ("--cut-ratio", "0.5"))):
        body = {"seed": 2, "steps": 6, "policy": policy, "cut_ratio": 0.5}
        reply = client.images.generate(model="shapes-t2i", prompt=PROMPT, extra_body=body)
        assert reply.data is not None
        expected = imagine(capsys, monkeypatch, tmp_path, stack[1], 2, 6, "--policy", policy, *extra)
        assert np.array_equal(pixels(reply.data[0].b64_json or ""), expected), policy


def test_bad_image_requests_are_refused_naming_the_field(client) -> None:
    cases = [({"n": 2}, "n"), ({"size": "1024x1024"}, "size"), ({"response_format": "url"}, "response_format")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.images.generate(model="shapes-t2i", prompt=PROMPT, **kwargs)  # type: ignore[arg-type]
        assert err.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="steps"):
        client.images.generate(model="shapes-t2i", prompt=PROMPT, extra_body={"steps": 0})
    with pytest.raises(openai.NotFoundError, match="shapes-t2i"):
        client.images.generate(model="dall-e-3", prompt=PROMPT)


def test_the_image_model_is_listed_and_described(stack, client) -> None:
    assert "shapes-t2i" in [m.id for m in client.models.list()]
    with urllib.request.urlopen(f"{stack[0]}/v1/lambdasplit/info", timeout=30) as r:
        info = json.load(r)
    assert info["images"] == {"model": "shapes-t2i", "size": "32x32", "cloud": stack[1]}


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_image_page_previews_the_noise_and_draws_imagines_image(stack, capsys, monkeypatch, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{stack[0]}/images")
            expect(page.get_by_test_id("meta")).to_contain_text("32x32 images", timeout=30_000)
            page.get_by_test_id("prompt").fill(PROMPT)
            page.get_by_test_id("steps").fill("20")
            page.get_by_test_id("seed").fill("11")
            page.get_by_test_id("preview-every").fill("5")
            page.get_by_test_id("draw").click()
            image = page.get_by_test_id("image")
            expect(image).to_have_attribute("data-done", "true", timeout=60_000)
            # Previews at steps 5, 10 and 15 arrived before the finished image.
            assert image.get_attribute("data-previews") == "3"
            expect(page.get_by_test_id("wire-image")).to_have_attribute("data-step", "20")
            assert (page.get_by_test_id("wire-image").get_attribute("src") or "").startswith("data:image/png;base64,")
            expect(page.get_by_test_id("wire-caption")).to_contain_text("noise prediction (1×4×16×16)")
            expect(page.get_by_test_id("step-bytes")).to_contain_text("at step 20 of 20")
            expect(page.get_by_test_id("cloud-only")).to_contain_text(PROMPT)
            expect(page.get_by_test_id("status")).to_contain_text("done: 20 steps, paper")
            src = image.get_attribute("src") or ""
            drawn = pixels(src.removeprefix("data:image/png;base64,"))
            assert np.array_equal(drawn, imagine(capsys, monkeypatch, tmp_path, stack[1], 11, 20))
            shot = tmp_path / "web-ui-images.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "web-ui-images.png")
        finally:
            browser.close()
