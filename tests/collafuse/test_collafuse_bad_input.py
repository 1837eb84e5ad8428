"""Bad clients: each is told why and dropped (or refused at the door), and the round goes on with the others."""

from __future__ import annotations

import json
import time

import pytest
import torch
from collafuse_helpers import join_message, next_json, raw_client, run_deployment, tiny_parts
from websockets.exceptions import ConnectionClosed

from lambdasplit.collafuse.client import CollaFuseClient
from lambdasplit.collafuse.data import client_images
from lambdasplit.collafuse.messages import Batch
from lambdasplit.collafuse.model import PublicParts
from lambdasplit.collafuse.server import CollaFuseServer, ServerSettings
from lambdasplit.errors import WireError

ROUNDS = 3


@pytest.fixture(scope="module")
def parts() -> PublicParts:
    return tiny_parts()


def _batch(parts: PublicParts, round: int, t: list[int], side: int = 16) -> Batch:
    n = len(t)
    latent = (n, 4, side, side)
    return Batch(round, torch.randn(latent), torch.randn(latent), torch.tensor(t), torch.randn(n, 16, 64))


def _misbehaving(parts: PublicParts, name: str, act, outcome: dict) -> object:
    """A rogue client that joins as ``name``, waits for round 0 and then does ``act(ws)``; its reply in outcome."""

    def rogue(url: str) -> None:
        with raw_client(url) as ws:
            ws.send(join_message(parts, name))
            assert next_json(ws)["type"] == "welcome"
            assert next_json(ws) == {"type": "round", "round": 0, "loss": None}
            act(ws)
            try:
                outcome[name] = next_json(ws)
            except ConnectionClosed:
                outcome[name] = None

    return rogue


BAD = {
    "t at t_c": (lambda p, ws: ws.send(_batch(p, 0, [800, 500]).encode()), "bad_timestep"),
    "t below t_c": (lambda p, ws: ws.send(_batch(p, 0, [3]).encode()), "bad_timestep"),
    "t past T": (lambda p, ws: ws.send(_batch(p, 0, [1000]).encode()), "bad_timestep"),
    "another image size": (lambda p, ws: ws.send(_batch(p, 0, [900], side=8).encode()), "bad_shape"),
    "too many rows": (lambda p, ws: ws.send(_batch(p, 0, [900] * 9).encode()), "bad_shape"),
    "an old round": (lambda p, ws: ws.send(_batch(p, 7, [900]).encode()), "bad_round"),
    "not safetensors": (lambda p, ws: ws.send(b"\x00" * 40), "bad_frame"),
    "text instead of a batch": (lambda p, ws: ws.send(json.dumps({"type": "batch"})), "bad_frame"),
    "NaN": (lambda p, ws: ws.send(Batch(0, torch.full((1, 4, 16, 16), float("nan")), torch.zeros(1, 4, 16, 16),
                                       torch.tensor([900]), torch.zeros(1, 16, 64)).encode()), "bad_frame"),
    "leaves mid-round": (lambda p, ws: ws.close(), "peer_gone"),
}  # fmt: skip


def test_bad_batches_drop_their_clients_and_the_rounds_go_on(parts: PublicParts) -> None:
    """Ten clients, each bad in its own way, beside two good ones: each bad one is told its own code and dropped,
    every round trains on the two good ones."""
    outcome: dict = {}
    rogues = tuple(
        _misbehaving(parts, name, lambda ws, act=act: act(parts, ws), outcome) for name, (act, _) in BAD.items()
    )
    settings = ServerSettings(clients=2 + len(BAD), cut_ratio=0.2, rounds=ROUNDS, batch=8)
    run = run_deployment(parts, settings, clients=2, rogues=rogues)
    assert run.server.dropped == {name: code for name, (_, code) in BAD.items()}
    assert [r.clients for r in run.server.rounds] == [2] * ROUNDS
    assert not run.errors and all(r.rounds == ROUNDS for r in run.clients.values())
    for name, (_, code) in BAD.items():
        if code != "peer_gone":
            assert outcome[name]["type"] == "error" and outcome[name]["code"] == code, name
            assert outcome[name]["message"]


def test_a_silent_client_is_dropped_after_the_round_timeout(parts: PublicParts) -> None:
    outcome: dict = {}
    settings = ServerSettings(clients=3, cut_ratio=0.2, rounds=2, batch=4, round_timeout=1.0)
    run = run_deployment(
        parts, settings, clients=2, rogues=(_misbehaving(parts, "rogue", lambda ws: time.sleep(3), outcome),)
    )
    assert run.server.dropped == {"rogue": "timeout"} and [r.clients for r in run.server.rounds] == [2, 2]


@pytest.mark.parametrize(
    ("overrides", "code", "words"),
    [
        ({"latent_shape": [4, 8, 8]}, "bad_shape", "another image size"),
        ({"context_shape": [77, 768]}, "bad_shape", "contexts"),
        ({"fingerprint": "0" * 16}, "model_mismatch", "architecture"),
        ({"client": ""}, "bad_frame", "name"),
    ],
)
def test_a_client_that_does_not_fit_is_refused_at_the_door(parts: PublicParts, overrides, code, words) -> None:
    settings = ServerSettings(clients=1, cut_ratio=0.5, rounds=1, join_timeout=5)
    with CollaFuseServer(parts, settings) as server, raw_client(server.url) as ws:
        ws.send(join_message(parts, "odd", **overrides))
        reply = next_json(ws)
    assert reply["type"] == "error" and reply["code"] == code and words in reply["message"]


def test_a_second_client_of_the_same_name_and_one_too_many_are_refused(parts: PublicParts) -> None:
    settings = ServerSettings(clients=1, cut_ratio=0.5, rounds=1, join_timeout=5)
    with CollaFuseServer(parts, settings) as server, raw_client(server.url) as first:
        first.send(join_message(parts, "a"))
        time.sleep(0.3)
        with raw_client(server.url) as again:
            again.send(join_message(parts, "a"))
            assert next_json(again)["code"] == "duplicate_client"
        with raw_client(server.url) as extra:
            extra.send(join_message(parts, "b"))
            assert next_json(extra)["code"] == "too_many_clients"


def test_too_few_clients_end_the_wait_with_a_clear_error(parts: PublicParts) -> None:
    settings = ServerSettings(clients=2, cut_ratio=0.5, rounds=1, join_timeout=0.5)
    with CollaFuseServer(parts, settings) as server, pytest.raises(Exception, match="0 of 2 clients joined"):
        server.train()


def test_a_client_hears_the_servers_error(parts: PublicParts) -> None:
    """A client whose images are another size is refused, and the client raises the server's reason."""
    other = PublicParts.load(unet_config={**parts.unet_config, "sample_size": 8})
    client = CollaFuseClient(other, client_images(0, 1, 4, seed=0), name="small")
    settings = ServerSettings(clients=1, cut_ratio=0.5, rounds=1, join_timeout=5)
    with CollaFuseServer(parts, settings) as server, pytest.raises(WireError, match="another image size") as caught:
        client.run(server.url, timeout=10)
    assert caught.value.code == "bad_shape"
