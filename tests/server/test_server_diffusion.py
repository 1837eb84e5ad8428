"""A diffusion body server in a subprocess: split images over loopback equal the unsplit pipeline; bad input is
refused with typed errors and the connection keeps serving."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

import in_process
from lambdasplit.client import CloudClient, RemoteDiffusionLink
from lambdasplit.diffusion import SessionOptions, SplitPipeline, load_pipeline
from lambdasplit.diffusion.pipeline import unet_fingerprint
from lambdasplit.errors import ConfigError, RemoteError, WireError
from lambdasplit.wire import Frame, MessageType, tensor_frame
from servers import body_server, http_url, proc_kill
from tiny_pipelines import tiny_sd_pipeline, unsplit

PROMPT = "a yellow triangle in the center on a black background"
EXACT = {"wire_dtype": "float32", "input_dtype": "float32"}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(folder / "tokenizer-src").save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def server(pipeline_dir: Path):
    with body_server("--pipeline", str(pipeline_dir), token="s3cret") as url:
        yield url


@pytest.fixture(scope="module")
def pipe(pipeline_dir: Path):
    return load_pipeline(pipeline_dir, device="cpu", dtype="float32")


def _client(url: str, pipe, **kw) -> CloudClient:
    return CloudClient(url, token="s3cret", fingerprint=unet_fingerprint(pipe.unet.config), **kw)


@pytest.mark.parametrize("policy", ["paper", "unet-lambda", "collafuse"])
def test_split_image_over_loopback_equals_unsplit(server, pipe, policy):
    reference = unsplit(pipe, PROMPT, steps=5, seed=7, guidance=4.0)
    with _client(server, pipe) as client:
        before = client.socket_bytes()
        out = SplitPipeline(pipe).generate(
            PROMPT,
            RemoteDiffusionLink(client),
            policy=policy,
            steps=5,
            seed=7,
            guidance_scale=4.0,
            wire_dtype="float32",
            input_dtype="float32",
        )
        socket = client.socket_bytes() - before
    assert (out.image - reference).abs().max().item() <= 1e-5
    # The link counts whole frames; the socket adds WebSocket framing (2-14 bytes a message) on top.
    assert out.traffic.bytes_up <= socket.sent <= out.traffic.bytes_up + 14 * out.traffic.frames_up
    assert out.traffic.bytes_down <= socket.received <= out.traffic.bytes_down + 14 * out.traffic.frames_down
    assert out.cloud_seconds > 0


def test_ddpm_collafuse_over_loopback_equals_unsplit_by_seed(server, pipe):
    """A stochastic sampler under collafuse: the cloud draws its steps' noise from the device's generator stream,
    so the image is the unsplit pipeline's for the seed, bit for bit."""
    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(original.config)
    try:
        reference = unsplit(pipe, PROMPT, steps=5, seed=7, guidance=4.0)
        with _client(server, pipe) as client:
            link = RemoteDiffusionLink(client)
            run = {"policy": "collafuse", "steps": 5, "guidance_scale": 4.0, "cut_ratio": 0.5, **EXACT}
            images = [SplitPipeline(pipe).generate(PROMPT, link, seed=seed, **run) for seed in (7, 7, 8)]
    finally:
        pipe.scheduler = original
    assert torch.equal(images[0].image, reference) and torch.equal(images[1].image, reference)
    assert (images[2].image - reference).abs().max().item() > 1e-3
    assert images[0].cloud_seconds > 0


@pytest.mark.cuda
def test_unet_served_on_cuda_to_a_cpu_device(pipeline_dir, pipe, record_property):
    reference = unsplit(pipe, PROMPT, steps=5, seed=7, guidance=4.0)
    with body_server("--pipeline", str(pipeline_dir), "--device", "cuda", "--dtype", "float32") as url:
        client = CloudClient(url, fingerprint=unet_fingerprint(pipe.unet.config))
        with client:
            out = SplitPipeline(pipe).generate(
                PROMPT, RemoteDiffusionLink(client), steps=5, seed=7, guidance_scale=4.0, wire_dtype="float32",
                input_dtype="float32",
            )  # fmt: skip
    error = (out.image - reference).abs().max().item()
    record_property("max_abs_diff_vs_cpu", error)
    assert error <= 1e-3


def test_quantized_paper_traffic_down_is_packed(server, pipe):
    with _client(server, pipe) as client:
        out = SplitPipeline(pipe).generate(
            PROMPT, RemoteDiffusionLink(client), steps=4, wire_dtype="int4", granularity="tensor"
        )
    # (1, 1024) int4 noise: 512 bytes of codes + one scale and offset, 24-byte header, plus OPENED and CLOSED.
    assert out.traffic.frames_down == 4 + 2
    noise_frames = 4 * (24 + 512 + 8)
    assert noise_frames < out.traffic.bytes_down < noise_frames + 400


def test_bad_requests_get_typed_errors_and_the_connection_survives(server, pipe):
    with _client(server, pipe) as client:
        with pytest.raises(RemoteError) as bad:
            client.request(Frame.json(MessageType.OPEN, {"policy": "teleport"}))
        assert bad.value.code == "bad_options"
        with pytest.raises(RemoteError) as unknown:
            client.request(tensor_frame(MessageType.FORWARD, torch.zeros(1, 4), "float16", session=99, position=0))
        assert unknown.value.code == "unknown_session"
        options = {
            "policy": "paper",
            "family": "sd",
            "steps": 4,
            "guidance_scale": 4.0,
            "scheduler": dict(pipe.scheduler.config),
            "latent_shape": [1, 3, 16, 16],
            "inputs": {"prompt_embeds": [2, 16, 32]},
        }
        with pytest.raises(RemoteError, match="this U-Net takes 4") as channels:
            client.request(Frame.json(MessageType.OPEN, options))
        assert channels.value.code == "bad_options"
        options["latent_shape"], options["scheduler"] = [1, 4, 16, 16], {"_class_name": "os.system"}
        with pytest.raises(RemoteError, match="not a diffusers scheduler"):
            client.request(Frame.json(MessageType.OPEN, options))
        options["scheduler"] = {**pipe.scheduler.config, "_class_name": "EulerAncestralDiscreteScheduler"}
        with pytest.raises(RemoteError, match="draws fresh noise"):
            client.request(Frame.json(MessageType.OPEN, options))
        link = RemoteDiffusionLink(client)
        with pytest.raises(ConfigError, match="cannot run 2000 steps"):
            SplitPipeline(pipe).generate(PROMPT, link, steps=2000)
        client.ping()  # still serving
        out = SplitPipeline(pipe).generate(PROMPT, link, steps=2)
        assert out.image.shape == (1, 3, 32, 32)


def test_wrong_token_and_wrong_model_are_refused(server, pipe):
    with pytest.raises(RemoteError) as no_token:
        CloudClient(server, token="wrong")
    assert no_token.value.code == "unauthorized"
    with pytest.raises(RemoteError) as mismatch:
        CloudClient(server, token="s3cret", fingerprint="0" * 16)
    assert mismatch.value.code == "model_mismatch"


def test_llm_client_on_a_diffusion_server_is_told(server, pipe):
    with _client(server, pipe) as client:
        assert client.mode == "diffusion"
        with pytest.raises(RemoteError) as err:
            client.request(Frame.json(MessageType.OPEN, {}))
        assert err.value.code == "bad_options"


@pytest.mark.parametrize("policy", ["paper", "unet-lambda"])
def test_imagine_cli_writes_a_png_over_the_network(server, pipeline_dir, tmp_path, capsys, monkeypatch, policy):
    """paper runs the console script as a real process, as users run it; unet-lambda goes through the same entry
    point in this process (a new process would spend most of its time importing torch and diffusers again)."""
    png = tmp_path / "out.png"
    argv = ["imagine", PROMPT, "--pipeline", str(pipeline_dir), "--cloud", server, "--token", "s3cret",
            "--steps", "3", "--policy", policy, "--out", str(png), "--dtype", "float32"]  # fmt: skip
    if policy == "paper":
        command = [sys.executable, "-c", "from lambdasplit.cli import main; main()", *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        code, err = result.returncode, result.stderr
    else:
        code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
    assert code == 0, err
    assert "wrote" in err and "socket" in err
    from PIL import Image

    assert Image.open(png).size == (32, 32)


def test_imagine_refuses_a_bad_policy(tmp_path):
    with pytest.raises(ConfigError, match="unknown policy"):
        from lambdasplit.cli.imagine import imagine

        imagine("x", tmp_path / "x.png", policy="teleport")
    assert torch.is_tensor(torch.zeros(1))


def _metrics(url: str) -> dict:
    request = urllib.request.Request(http_url(url, "/metrics"), headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_device_that_leaves_mid_image_stops_its_stream(server, pipe):
    before = _metrics(server)
    client = _client(server, pipe)
    link = RemoteDiffusionLink(client)
    split = SplitPipeline(pipe)
    gen = split.ends.start(PROMPT, steps=400, seed=0, guidance_scale=4.0)
    cond = gen.conditioning
    options = SessionOptions(
        policy="paper",
        family="sd",
        steps=400,
        guidance_scale=4.0,
        scheduler={**gen.scheduler.config, "_class_name": type(gen.scheduler).__name__},
        latent_shape=tuple(gen.latents.shape),
        inputs={"prompt_embeds": tuple(cond.prompt_embeds.shape)},
    )
    link.open(options)
    for tensor in (cond.prompt_embeds, gen.latents):
        link.send(tensor_frame(MessageType.FORWARD, tensor, "float16", link.handle, 0))
    assert link.receive().position == 0 and link.receive().position == 1
    client.close()  # gone, 398 steps before the end
    deadline = time.monotonic() + 30
    while (after := _metrics(server))["images_abandoned"] == before["images_abandoned"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    assert after["sessions"] == 0
    assert after["steps"] - before["steps"] < 100  # the stream stopped, it did not run to step 400


def test_a_diffusion_server_drains_like_the_llm_server(pipeline_dir, pipe) -> None:
    """POST /admin/drain: GOAWAY to the connected device, /health draining, newcomers refused (HTTP 503, draining)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from lambdasplit.wire import decode_frame

    with body_server("--pipeline", str(pipeline_dir)) as url:
        client = _client(url, pipe)
        with connect(url, open_timeout=10) as held:  # a second device, to keep the server draining
            request = urllib.request.Request(http_url(url, "/admin/drain?seconds=30"), method="POST")
            with urllib.request.urlopen(request, timeout=5) as r:
                assert json.loads(r.read())["status"] == "draining"
            assert decode_frame(held.recv(timeout=5)).type is MessageType.GOAWAY
            with urllib.request.urlopen(http_url(url, "/health"), timeout=5) as r:
                assert json.loads(r.read())["status"] == "draining"
            with pytest.raises(InvalidStatus) as refused:
                connect(url, open_timeout=10)
            assert json.loads(refused.value.response.body)["error"]["code"] == "draining"
            client.ping()  # the device still connected is still served, and has the GOAWAY noted
            assert client.going_away is not None and client.going_away["deadline_s"] == 30
        client.close()


def test_the_next_image_reconnects_after_the_server_restarts(pipeline_dir, pipe) -> None:
    """A diffusion server lost between two images (stopped, then started again on its port): the device's next
    image opens on a new connection, and equals the unsplit pipeline's (the agent's image link stays usable)."""
    reference = unsplit(pipe, PROMPT, steps=3, seed=7, guidance=4.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ("--pipeline", str(pipeline_dir), "--port", str(port))
    split = SplitPipeline(pipe)

    def image(link: RemoteDiffusionLink) -> torch.Tensor:
        return split.generate(PROMPT, link, policy="paper", steps=3, seed=7, guidance_scale=4.0, **EXACT).image

    with body_server(*args, token="s3cret") as url:
        client = _client(url, pipe, reconnect_deadline=60)
        link = RemoteDiffusionLink(client)
        assert (image(link) - reference).abs().max().item() <= 1e-5
    with client, body_server(*args, token="s3cret"):
        assert (image(link) - reference).abs().max().item() <= 1e-5
        assert client.reconnects == 1


def test_an_agent_image_lost_mid_way_starts_again_on_a_restarted_server(pipeline_dir, pipe) -> None:
    """The diffusion server crashes (SIGKILL) at an image's third step and comes back on its port: the agent's
    image service starts the image again on a new connection and returns the image the seed gives. (unet-lambda:
    each step waits on the device, so the kill always lands mid-image; the paper policy streams ahead.)"""
    from lambdasplit.agent.images import ImageService
    from lambdasplit.agent.schema import ImageRequest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ("--pipeline", str(pipeline_dir), "--port", str(port))
    request = ImageRequest(prompt=PROMPT, steps=6, seed=3, policy="unet-lambda")
    events: list[dict] = []
    restarted: list[threading.Thread] = []

    with ExitStack() as stack:
        url = stack.enter_context(body_server(*args, token="s3cret"))
        client = stack.enter_context(_client(url, pipe, reconnect_deadline=120))
        service = ImageService(SplitPipeline(pipe), RemoteDiffusionLink(client), "tiny-sd", url)

        class Feed:  # the agent's NetworkFeed, as far as the service uses it: crashes the server at step 3
            def publish(self, event: dict) -> None:
                events.append(event)
                if event["type"] == "image_step" and event["step"] == 3 and not restarted:
                    proc_kill(port)
                    restart = threading.Thread(target=lambda: stack.enter_context(body_server(*args, token="s3cret")))
                    restarted.append(restart)
                    restart.start()

        made = service.generate(request, "req-1", Feed())  # type: ignore[arg-type]
        restarted[0].join(120)
        kinds = [e["type"] for e in events]
        assert kinds.count("image_restart") == 1 and client.reconnects == 1
        assert kinds.index("image_restart") < kinds.index("image_done")
        counted = ("image_inputs", "image_step", "image_close", "image_restart")  # every byte the link counted
        up = sum(e["up_bytes"] for e in events if e["type"] in counted)
        assert up == service.link.traffic.bytes_up  # type: ignore[attr-defined]
        again = service.generate(request, "req-2", Feed())  # type: ignore[arg-type]
    assert torch.equal(made.image.image, again.image.image) and made.png == again.png


def test_imagine_starts_an_image_lost_mid_way_again_on_a_restarted_server(
    pipeline_dir, tmp_path, capsys, monkeypatch
) -> None:
    """The CLI as the agent: the server is killed at the image's second step and comes back on its port; the image
    starts again on a new connection and is the image the seed gives (the same PNG as an uninterrupted run)."""
    from lambdasplit.diffusion import SplitPipeline as Split

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ("--pipeline", str(pipeline_dir), "--port", str(port))
    restarted: list[threading.Thread] = []
    generate = Split.generate

    def killing(self, *a, on_step=None, **kw):  # the first image's second step kills the server, then restarts it
        def step(done: int, total: int) -> None:
            if done == 2 and not restarted:
                proc_kill(port)
                restarted.append(threading.Thread(target=lambda: stack.enter_context(body_server(*args))))
                restarted[0].start()
            if on_step is not None:
                on_step(done, total)

        return generate(self, *a, on_step=step, **kw)

    def imagine(png: Path) -> str:
        argv = ["imagine", PROMPT, "--pipeline", str(pipeline_dir), "--cloud", f"ws://127.0.0.1:{port}/v1/split",
                "--steps", "4", "--policy", "unet-lambda", "--out", str(png), "--dtype", "float32"]  # fmt: skip
        code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
        assert code == 0, err
        return err

    with ExitStack() as stack:
        stack.enter_context(body_server(*args))
        clean = imagine(tmp_path / "clean.png")
        monkeypatch.setattr(Split, "generate", killing)
        err = imagine(tmp_path / "lost.png")
        restarted[0].join(120)
    assert "starting the image again" not in clean and err.count("starting the image again") == 1
    assert (tmp_path / "lost.png").read_bytes() == (tmp_path / "clean.png").read_bytes()


def test_an_agent_image_on_a_server_that_stays_down_fails_once(pipeline_dir, pipe) -> None:
    """Lost before the image opened, and not back within the reconnect deadline: one failure, no restart."""
    from lambdasplit.agent.images import ImageService
    from lambdasplit.agent.schema import ImageRequest

    events: list[dict] = []

    class Feed:
        def publish(self, event: dict) -> None:
            events.append(event)

    with body_server("--pipeline", str(pipeline_dir), token="s3cret") as url:
        client = _client(url, pipe, reconnect_deadline=2)
        service = ImageService(SplitPipeline(pipe), RemoteDiffusionLink(client), "tiny-sd", url)
    with client, pytest.raises(WireError, match="could not reconnect within 2 s"):
        service.generate(ImageRequest(prompt=PROMPT, steps=3), "req-1", Feed())  # type: ignore[arg-type]
    assert not any(e["type"] == "image_restart" for e in events) and client.reconnects == 0
