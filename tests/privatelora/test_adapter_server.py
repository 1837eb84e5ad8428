"""PrivateLoRA across a real connection: the bytes at the socket against the paper's formula, and bad input
(ranks that do not match, a gradient for an unknown step, a device that leaves mid-step) answered with clear
errors while the server goes on serving other devices."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from privatelora_helpers import LAYOUT, TIMEOUT, random_adapters
from websockets.sync.client import ClientConnection, connect

from lambdasplit.bench.relay import CountingRelay
from lambdasplit.errors import ConfigError, RemoteError
from lambdasplit.privatelora import AdapterLayout, AdapterLink, AdapterServer, PrivateAdapters, SplitTrainer
from lambdasplit.privatelora import messages as M
from lambdasplit.split import load_split

CUT = (0, 5)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    device = load_split(path, CUT, parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(path, CUT, parts=("body",), device="cpu", dtype="float32", quiet=True)
    return device, cloud


@pytest.fixture(scope="module")
def server(parts):
    with AdapterServer(parts[1], LAYOUT, timeout=TIMEOUT) as s:
        yield s


def wait_idle(server: AdapterServer) -> None:
    """Until no session is in progress on ``server`` (each ends within the timeout, whatever its device did)."""
    deadline = time.monotonic() + TIMEOUT
    while server.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.active == 0


def works(server: AdapterServer, device) -> None:
    """A fresh session on ``server`` runs a forward: the server still serves."""
    with AdapterLink(server.url, PrivateAdapters(LAYOUT, range(*CUT)), timeout=TIMEOUT) as link:
        out = link.forward(device.head(torch.tensor([[4, 5, 6]])), 0)
    assert out.shape == (1, 3, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_bytes_at_the_socket_are_the_formula_plus_framing(parts, server, dtype: str, itemsize: int) -> None:
    device, _ = parts
    adapters = random_adapters(LAYOUT, range(*CUT))
    with (
        CountingRelay(server.address) as relay,
        AdapterLink(relay.url(), adapters, dtype=dtype, timeout=TIMEOUT) as link,
    ):
        relay.reset()  # the handshake, open and ready are not per-token traffic
        before = link.traffic.up_bytes, link.traffic.down_bytes
        hidden = device.head(torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14]]))
        link.forward(hidden, 0)  # a prefill of 8 positions
        for position in range(8, 12):  # 4 decode steps
            link.forward(device.head(torch.tensor([[position]])), position)
        time.sleep(0.2)  # the relay's last reads
        measured = relay.up, relay.down
        counted = link.traffic.up_bytes - before[0], link.traffic.down_bytes - before[1]
    groups, layers, width = [len(g) for g in LAYOUT.groups()], CUT[1] - CUT[0], 64
    rank = (LAYOUT.rank_c2d, LAYOUT.rank_d2c)
    expected = [M.forward_bytes(groups, layers, width, rows, rank, itemsize) for rows in (8, 1, 1, 1, 1)]
    want = sum(e[0] for e in expected), sum(e[1] for e in expected)
    for got, formula in zip(measured, want, strict=True):
        assert abs(got - formula) <= 0.03 * formula, (measured, want)
    # the adapters' share of it is the paper's formula: 12 tokens x layers x 3 projections x r values each way
    adapter_values = 12 * layers * 3 * (LAYOUT.rank_c2d + LAYOUT.rank_d2c)
    rows_values = 2 * 12 * width
    payload = link.traffic.up_payload_bytes + link.traffic.down_payload_bytes
    assert payload == (adapter_values + rows_values) * itemsize
    # the link's own count is the messages without WebSocket framing: at most the socket's
    assert counted[0] <= measured[0] and counted[1] <= measured[1]


def test_ranks_that_do_not_match_the_servers_adapters_are_refused(parts, server) -> None:
    other = AdapterLayout(rank_c2d=4, rank_d2c=6, seed=LAYOUT.seed)
    with pytest.raises(RemoteError, match="do not match") as caught:
        AdapterLink(server.url, PrivateAdapters(other, range(*CUT)), timeout=TIMEOUT)
    assert caught.value.code == "adapter_mismatch"
    with pytest.raises(ConfigError, match="seed 7"):
        AdapterLink(server.url, PrivateAdapters(AdapterLayout(rank_c2d=8, rank_d2c=6, seed=8), range(*CUT)))
    with pytest.raises(ConfigError, match=r"layers \[0, 5\)"):
        AdapterLink(server.url, PrivateAdapters(LAYOUT, range(1, 5)), timeout=TIMEOUT)
    works(server, parts[0])


@contextlib.contextmanager
def _raw_session(server: AdapterServer) -> Iterator[ClientConnection]:
    """A session opened by hand, to send what a real device never would."""
    with connect(server.url, open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"type": "open", "adapters": LAYOUT.describe(), "dtype": "float32"}))
        ready = json.loads(ws.recv(timeout=TIMEOUT))
        assert ready["type"] == "ready" and ready["groups"] == [["q_proj", "k_proj", "v_proj"]]
        yield ws


def _error(ws) -> dict[str, str]:
    while True:
        data = ws.recv(timeout=TIMEOUT)
        if isinstance(data, str):
            return json.loads(data)


def test_a_gradient_for_an_unknown_step_is_an_error_and_others_go_on(parts, server) -> None:
    with _raw_session(server) as ws:
        ws.send(M.pack(M.Kind.GRAD, 3, torch.zeros(4, 64)))
        error = _error(ws)
    assert error["type"] == "error" and error["code"] == "unknown_step"
    assert "step 3" in error["message"]
    works(server, parts[0])


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"LSXX" + bytes(20), "bad_frame"),
        (M.pack(M.Kind.FORWARD, 0, torch.zeros(2, 63)), "bad_frame"),  # rows of the wrong width
        (M.pack(M.Kind.FORWARD, 5, torch.zeros(2, 64)), "out_of_step"),
        (M.pack(M.Kind.UP, 0, torch.zeros(3, 2, 6)), "bad_frame"),  # an answer nobody asked for
    ],
    ids=["not-privatelora", "wrong-width", "wrong-step", "unasked-answer"],
)
def test_malformed_frames_get_coded_errors(parts, server, frame: bytes, code: str) -> None:
    with _raw_session(server) as ws:
        ws.send(frame)
        error = _error(ws)
    assert error["code"] == code, error
    works(server, parts[0])


def test_an_answer_of_the_wrong_shape_is_refused(parts, server) -> None:
    with _raw_session(server) as ws:
        ws.send(M.pack(M.Kind.FORWARD, 0, torch.zeros(2, 64)))
        down = M.unpack(ws.recv(timeout=TIMEOUT))
        assert (down.kind, down.layer, down.group, down.rows) == (M.Kind.DOWN, 0, 0, 2)
        ws.send(M.pack(M.Kind.UP, 0, torch.zeros(3, 2, 5), layer=0, group=0))  # r_d2c is 6
        error = _error(ws)
    assert error["code"] == "bad_frame" and "UP" in error["message"]


def test_a_device_that_leaves_mid_step_ends_only_its_session(parts, server) -> None:
    device, _ = parts
    wait_idle(server)
    served = server.served
    # a training step left after its forward's second exchange: the server is inside the body's forward
    with _raw_session(server) as ws:
        ws.send(M.pack(M.Kind.TRAIN, 0, torch.zeros(3, 64)))
        for _ in range(2):
            msg = M.unpack(ws.recv(timeout=TIMEOUT))
            ws.send(M.pack(M.Kind.UP, 0, torch.zeros(3, 3, 6), layer=msg.layer, group=msg.group))
        assert M.unpack(ws.recv(timeout=TIMEOUT)).layer == 2
    wait_idle(server)
    assert server.served == served + 1  # the session ended, well within the timeout

    # and mid-backward, while another device trains beside it
    adapters = random_adapters(LAYOUT, range(*CUT), scale=0.1)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            with AdapterLink(server.url, adapters, timeout=TIMEOUT) as link:
                trainer = SplitTrainer(device, adapters, link, lr=1e-2)
                ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
                losses = [trainer.step(ids).loss for _ in range(4)]
            assert losses[-1] < losses[0]
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    served = server.served  # no session in progress (wait_idle above)
    other = threading.Thread(target=train)
    other.start()
    with AdapterLink(server.url, PrivateAdapters(LAYOUT, range(*CUT)), timeout=TIMEOUT) as link:
        step, _ = link.train_forward(device.head(torch.tensor([[1, 2, 3]])))
        link.ws.send(M.pack(M.Kind.GRAD, step, torch.ones(3, 64)))
        assert M.unpack(link.ws.recv(timeout=TIMEOUT)).kind == M.Kind.GRAD_DOWN
    other.join(60)
    wait_idle(server)
    assert server.served == served + 2  # the one that left mid-backward, and the trainer
    assert not other.is_alive() and not errors, errors
    works(server, device)


def test_m_never_crosses_the_socket_in_training(parts, server) -> None:
    """Every byte both ways during fine-tuning steps, searched for M's own bytes (float32 and float16 rows)."""
    device, _ = parts
    adapters = random_adapters(LAYOUT, range(*CUT), seed=21)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    with CountingRelay(server.address, keep=True) as relay:
        with AdapterLink(relay.url(), adapters, timeout=TIMEOUT) as link:
            trainer = SplitTrainer(device, adapters, link, lr=1e-2)
            for _ in range(2):
                trainer.step(ids)
            link.forward(device.head(ids), 0)
        time.sleep(0.2)
        traffic = bytes(relay.sent_up) + bytes(relay.sent_down)
    assert len(traffic) > 10_000
    for p in adapters.parameters():
        for row in p.detach()[:4]:
            for dtype in (torch.float32, torch.float16):
                assert row.to(dtype).numpy().tobytes() not in traffic


def test_a_device_with_another_model_is_refused(parts, server, tiny_checkpoint) -> None:
    other = load_split(tiny_checkpoint("qwen2")[0], CUT, parts=("head", "tail"), device="cpu", quiet=True)
    with AdapterLink(server.url, PrivateAdapters(LAYOUT, range(*CUT)), timeout=TIMEOUT) as link:
        link.check_model(parts[0])  # the same checkpoint: accepted
        with pytest.raises(ConfigError, match="pass the server's --model"):
            link.check_model(other)


@pytest.mark.parametrize(
    ("opening", "message"),
    [("hello", "type: open"), (json.dumps({"type": "open", "adapters": None, "dtype": "int8"}), "dtype")],
    ids=["not-json", "quantized-dtype"],
)
def test_a_bad_open_is_refused(parts, server, opening: str, message: str) -> None:
    with connect(server.url, open_timeout=TIMEOUT) as ws:
        ws.send(opening)
        error = _error(ws)
    assert error["code"] == "bad_frame" and message in error["message"]
    works(server, parts[0])
