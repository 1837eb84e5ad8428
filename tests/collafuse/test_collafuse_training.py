"""CollaFuse's training protocol over loopback: three clients, one server, what crosses the link, checkpoints."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from collafuse_helpers import run_deployment, tiny_parts, tiny_parts_on
from diffusers import UNet2DConditionModel

from lambdasplit.collafuse.data import client_images
from lambdasplit.collafuse.evaluate import inverted
from lambdasplit.collafuse.metrics import nearest_mse
from lambdasplit.collafuse.model import Learner, PublicParts, handoff_timestep
from lambdasplit.collafuse.sampling import sample
from lambdasplit.collafuse.server import CollaFuseServer, ServerSettings
from lambdasplit.diffusion.pipeline import load_pipeline
from lambdasplit.errors import ConfigError, ModelLoadError, SessionError


@pytest.fixture(scope="module")
def parts() -> PublicParts:
    return tiny_parts()


def _found(needle: bytes, haystack: bytes | bytearray) -> bool:
    return haystack.find(needle) >= 0


def test_three_clients_train_with_the_server_and_keep_their_images(parts: PublicParts, tmp_path: Path) -> None:
    settings = ServerSettings(clients=3, cut_ratio=0.4, rounds=4, batch=8, checkpoint_every=2)
    run = run_deployment(parts, settings, clients=3, out=tmp_path)
    assert not run.errors and set(run.clients) == {"client-0", "client-1", "client-2"}
    t_c = handoff_timestep(0.4)
    assert t_c == 600

    # Every round took all three clients; the server trained only on t > t_c, the clients on the rest.
    assert [r.clients for r in run.server.rounds] == [3, 3, 3, 3] and not run.server.dropped
    assert run.server.timesteps and min(run.server.timesteps) > t_c
    for report in run.clients.values():
        assert report.rounds == 4 and report.rows_sent + report.rows_local == 4 * 8
        assert report.handoff == t_c and report.rows_local > 0 and report.rows_sent > 0
    assert len(run.server.timesteps) == sum(r.rows_sent for r in run.clients.values())
    for name, batch in run.seen:
        assert bool((batch.t > t_c).all()), name

    # No client image and no clean latent crosses the link, in any encoding the client holds them.
    up = bytes(run.relay.sent_up)
    for k in range(3):
        images = client_images(k, 3, 16, seed=1).images
        latents = parts.encode(images)
        for i in range(len(images)):
            for tensor in (images[i, :, 0], latents[i, :, 0]):
                for dtype in (torch.float32, torch.float16):
                    assert not _found(tensor.to(dtype).numpy().tobytes(), up), (k, i, dtype)
    # What did cross: the rows the server counted, each x_t + noise + context in float16 plus t.
    rows = sum(r.rows for r in run.server.rounds)
    per_row = 2 * (4 * 16 * 16 * 2) + 16 * 64 * 2 + 8
    assert rows * per_row < run.relay.up < rows * per_row + 4 * 3 * 1200  # + headers, framing, joins

    # Checkpoints on each side, and pipelines that load as diffusers pipelines with a DDPM schedule.
    for side in ("server", "client-0", "client-1", "client-2"):
        assert (tmp_path / side / "state.json").is_file() and (tmp_path / side / "optimizer.pt").is_file()
        pipe = load_pipeline(tmp_path / side / "pipeline")
        assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    server_unet = UNet2DConditionModel.from_pretrained(tmp_path / "server" / "unet")
    client_unet = UNet2DConditionModel.from_pretrained(tmp_path / "client-0" / "unet")
    assert not torch.equal(server_unet.conv_in.weight, client_unet.conv_in.weight)


def test_what_the_server_receives_gives_it_the_images_back(parts: PublicParts) -> None:
    """The paper's rows carry x_t, the noise and t: x_0 follows exactly (the measurement docs/collafuse.md cites)."""
    run = run_deployment(parts, ServerSettings(clients=1, cut_ratio=0.6, rounds=2, batch=8), clients=1)
    batches = [b for _, b in run.seen]
    assert sum(len(b) for b in batches) > 0
    read = inverted(parts, batches)
    private = client_images(0, 1, 16, seed=1).images / 2 + 0.5
    decoded_private = parts.decode(parts.encode(client_images(0, 1, 16, seed=1).images))
    # Each read-back image is (within float16 rounding) the VAE's reconstruction of one private image.
    assert float(nearest_mse(read, decoded_private).max()) < 1e-3
    assert float(nearest_mse(read, private).max()) < 0.01


def test_an_unconditional_client_sends_no_caption(parts: PublicParts) -> None:
    run = run_deployment(
        parts, ServerSettings(clients=2, cut_ratio=0.8, rounds=2, batch=4), clients=2, conditional=False
    )
    empty = parts.contexts([""])[0].half()
    assert run.seen and all(torch.equal(row, empty) for _, b in run.seen for row in b.context)


def test_the_cut_ratio_ends_and_bad_values(parts: PublicParts) -> None:
    alone = run_deployment(parts, ServerSettings(clients=1, cut_ratio=0.0, rounds=2, batch=4), clients=1)
    assert alone.server.timesteps == [] and alone.clients["client-0"].rows_local == 8
    server_only = run_deployment(parts, ServerSettings(clients=1, cut_ratio=1.0, rounds=2, batch=4), clients=1)
    assert server_only.clients["client-0"].rows_sent == 8 - server_only.clients["client-0"].rows_local
    assert min(server_only.server.timesteps) > 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="server's share"):
            ServerSettings(clients=1, cut_ratio=bad, rounds=1)


def test_a_conditional_clients_rows_name_their_captions(parts: PublicParts) -> None:
    """The context is the public text encoder's output: the server matches it against every caption it can form."""
    from lambdasplit.diffusion.shapes import all_scenes

    run = run_deployment(parts, ServerSettings(clients=1, cut_ratio=0.8, rounds=2, batch=8), clients=1, images=8)
    captions = sorted({s.caption for s in all_scenes()})
    table = parts.contexts(captions).half().flatten(1).float()
    sent = client_images(0, 1, 8, seed=1).captions
    rows = [(b.context.flatten(1).float(), b) for _, b in run.seen]
    read = [captions[int(torch.cdist(c[None], table)[0].argmin())] for ctx, _ in rows for c in ctx]
    assert read and all(caption in sent for caption in read)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(parts: PublicParts, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    run_deployment(parts, ServerSettings(clients=2, cut_ratio=0.5, rounds=4, batch=4), clients=2, out=straight)
    split = tmp_path / "split"
    run_deployment(parts, ServerSettings(clients=2, cut_ratio=0.5, rounds=2, batch=4), clients=2, out=split)
    resumed = run_deployment(
        parts, ServerSettings(clients=2, cut_ratio=0.5, rounds=4, batch=4), clients=2, out=split, resume=True
    )
    assert [r.round for r in resumed.server.rounds] == [2, 3]
    for side in ("server", "client-0", "client-1"):
        a = UNet2DConditionModel.from_pretrained(straight / side / "unet").state_dict()
        b = UNet2DConditionModel.from_pretrained(split / side / "unet").state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), side


def test_a_stopped_run_checkpoints_every_side_and_resumes_to_the_same_weights(
    parts: PublicParts, tmp_path: Path
) -> None:
    """``stop()`` (SIGTERM on the CLI's server) mid-training: the round in progress is trained, every side saves a
    checkpoint at the round reached, and a resumed run ends with the weights of an uninterrupted one."""
    settings = ServerSettings(clients=2, cut_ratio=0.5, rounds=5, batch=4)
    straight = tmp_path / "straight"
    run_deployment(parts, settings, clients=2, out=straight)
    split = tmp_path / "split"
    stopped = run_deployment(parts, settings, clients=2, out=split, stop_after=1)
    reached = stopped.server.stopped
    assert not stopped.errors and reached is not None and 1 < reached < settings.rounds, reached
    assert [r.round for r in stopped.server.rounds] == list(range(reached))  # every round triggered was trained
    assert {r.stopped for r in stopped.clients.values()} == {reached} and len(stopped.clients) == 2
    for side in ("server", "client-0", "client-1"):
        assert json.loads((split / side / "state.json").read_text())["round"] == reached, side
    resumed = run_deployment(parts, settings, clients=2, out=split, resume=True)
    assert resumed.server.stopped is None and [r.round for r in resumed.server.rounds] == list(range(reached, 5))
    for side in ("server", "client-0", "client-1"):
        a = UNet2DConditionModel.from_pretrained(straight / side / "unet").state_dict()
        b = UNet2DConditionModel.from_pretrained(split / side / "unet").state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), side


def test_a_server_stopped_before_every_client_joined_says_so(parts: PublicParts) -> None:
    settings = ServerSettings(clients=2, cut_ratio=0.5, rounds=2, batch=4, join_timeout=60)
    with CollaFuseServer(parts, settings) as server:
        threading.Timer(0.5, server.stop, args=("SIGTERM",)).start()
        started = time.monotonic()
        with pytest.raises(SessionError, match="SIGTERM before every client joined") as caught:
            server.train()
    assert caught.value.code == "stopped" and time.monotonic() - started < 10


@pytest.mark.cuda
def test_a_cuda_server_trains_with_a_cpu_client_and_samples_on_cuda(tmp_path: Path) -> None:
    gpu = tiny_parts_on("cuda")
    cpu = tiny_parts_on("cpu")
    settings = ServerSettings(clients=1, cut_ratio=0.5, rounds=2, batch=8)
    run = run_deployment(gpu, settings, clients=1, out=tmp_path, client_parts=cpu)
    assert not run.errors and run.server.rounds[-1].loss is not None
    server = UNet2DConditionModel.from_pretrained(tmp_path / "server" / "unet").to("cuda")
    client = UNet2DConditionModel.from_pretrained(tmp_path / "client-0" / "unet")
    contexts = cpu.contexts(["a red circle in the center on a blue background"])
    on_gpu = sample(server, client.to("cuda"), 0.5, contexts, cpu.latent_shape, steps=6,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    on_cpu = sample(server.cpu(), client.cpu(), 0.5, contexts, cpu.latent_shape, steps=6,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert (on_gpu.latents - on_cpu.latents).abs().max() < 1e-3


def test_a_checkpoint_left_half_written_is_refused_not_restarted(parts: PublicParts, tmp_path: Path) -> None:
    """A process killed while saving leaves no state.json beside new weights: --resume refuses (it would otherwise
    start again from round 0 and overwrite the folder), and a whole checkpoint resumes."""
    settings = ServerSettings(clients=1, cut_ratio=0.5, rounds=2, batch=4)
    folder = tmp_path / "server"
    learner = Learner(parts.new_unet(0), 1e-3)
    learner.save(folder, {"round": 1, "cut_ratio": 0.5, "side": "server"})
    assert sorted(p.name for p in folder.iterdir()) == ["optimizer.pt", "state.json", "unet"]  # no partials left
    assert CollaFuseServer(parts, settings, out=folder, resume=True).first_round == 1
    (folder / "state.json").unlink()  # killed between removing the old state and writing the new one
    with pytest.raises(ModelLoadError, match="is incomplete"):
        CollaFuseServer(parts, settings, out=folder, resume=True)
