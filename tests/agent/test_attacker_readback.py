"""The attacker panel's plumbing: a chat turn through a real agent, read back by the audit's live attack.

The agent runs in this process (uvicorn on a thread) against a real body server subprocess (the tiny Llama at
1:4, float16 wire, the agent's default), with ``audit.live.LiveAttacker`` as its attacker, the way
``lambdasplit up`` wires it. After one turn, ``GET /v1/lambdasplit/attack`` holds what A1 recovered from the
uplink and B3 from the downlink, scored by the device against the true ids.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lambdasplit.agent import AgentSettings, DeviceAgent
from lambdasplit.agent.attack_panel import AttackPanel, CapturingLink, Overheard
from lambdasplit.audit.live import LiveAttacker
from lambdasplit.client import connect_device
from lambdasplit.generation.text import encode_prompt
from lambdasplit.wire import FrameLimits, MessageType, WireDtype, encode_frame, tensor_frame
from servers import app_in_thread

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


@contextmanager
def serving(agent: DeviceAgent) -> Iterator[str]:
    """The agent's app on 127.0.0.1 (a free port), in this process; its base URL."""
    with app_in_thread(agent.app) as port:
        yield f"http://127.0.0.1:{port}"


def call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def attack_report(url: str, request: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report = call(f"{url}/v1/lambdasplit/attack")
        if report.get("request") == request and report["status"] in ("done", "failed"):
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.2)


def test_a_chat_turn_is_read_back_whole(tiny_checkpoint, llama_server) -> None:
    path, _ = tiny_checkpoint("llama")
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    assert split.tokenizer is not None
    with client:
        agent = DeviceAgent(split, client, attacker=LiveAttacker(split))
        with serving(agent) as url:
            assert call(f"{url}/v1/lambdasplit/attack")["status"] == "idle"
            body = {"model": agent.model_id, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
            reply = call(f"{url}/v1/chat/completions", body)
            report = attack_report(url, "r1")
    assert report["status"] == "done", report
    prompt, output = report["results"]
    ids = encode_prompt(split.tokenizer, MESSAGES, chat=True)
    assert prompt["side"] == "prompt" and prompt["attack"].startswith("A1")
    assert prompt["token_accuracy"] == 1.0 and prompt["correct"] == prompt["tokens"] == len(ids)
    assert prompt["text"] == split.tokenizer.decode(ids) and "the quick brown fox" in prompt["text"]
    assert prompt["user_accuracy"] == 1.0 and prompt["user_tokens"] > 0  # "be brief" and the user's message
    assert all(ok for _, ok in prompt["pieces"]) and "".join(t for t, _ in prompt["pieces"]) == prompt["text"]
    assert output["side"] == "output" and output["token_accuracy"] == 1.0
    assert output["tokens"] == reply["usage"]["completion_tokens"]
    assert output["text"].startswith(reply["choices"][0]["message"]["content"])
    # No TLS on this link: the eavesdropper is one of the attackers, and the panel says TLS removes it.
    assert report["tls"] is False and report["keyed"] is False
    eavesdropper, cloud = report["attackers"]
    assert eavesdropper["sees"] and "TLS (wss://) removes this attacker" in eavesdropper["text"]
    assert cloud["sees"] and "TLS does not help" in cloud["text"]


def test_a_streamed_turn_is_read_back_too(tiny_checkpoint, llama_server) -> None:
    """The web UI streams; the attack follows the streamed turn once it ends."""
    path, _ = tiny_checkpoint("llama")
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    with client:
        agent = DeviceAgent(split, client, attacker=LiveAttacker(split))
        with serving(agent) as url:
            body = {
                "model": agent.model_id,
                "messages": MESSAGES[1:],
                "max_tokens": 6,
                "stream": True,
                "temperature": 0,
            }
            request = urllib.request.Request(
                f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                assert b"data: [DONE]" in response.read()
            report = attack_report(url, "r1")
    assert [r["token_accuracy"] for r in report["results"]] == [1.0, 1.0]


def test_speculative_steps_are_read_back(tiny_checkpoint, llama_server) -> None:
    """With drafted tokens per round trip (frames of several rows, rolled back where drafts were rejected)."""
    path, _ = tiny_checkpoint("llama")
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    with client:
        agent = DeviceAgent(split, client, AgentSettings(speculative="lookup"), attacker=LiveAttacker(split))
        with serving(agent) as url:
            text = "the quick brown fox jumps over the lazy dog the quick brown fox"
            body = {"model": agent.model_id, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
            reply = call(f"{url}/v1/chat/completions", body | {"temperature": 0})
            report = attack_report(url, "r1")
    prompt, output = report["results"]
    assert prompt["token_accuracy"] == 1.0 and output["token_accuracy"] == 1.0
    content = reply["choices"][0]["message"]["content"]
    assert output["tokens"] == reply["usage"]["completion_tokens"] and output["text"].startswith(content)
    assert output["text"][len(content) :] in ("", split.tokenizer.eos_token)  # an EOS at most, no rejected draft


def test_without_an_attacker_the_route_says_off(tiny_checkpoint, llama_server) -> None:
    path, _ = tiny_checkpoint("llama")
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    with client:
        agent = DeviceAgent(split, client)
        assert agent.attacks is None
        with serving(agent) as url:
            assert call(f"{url}/v1/lambdasplit/attack") == {"type": "attack", "status": "off"}


def heard(wire: WireDtype = WireDtype.FLOAT16) -> Overheard:
    return Overheard(torch.zeros(3, 64), torch.zeros(3, 64), 2, wire)


def test_a_keyed_deployment_is_not_attacked_live_and_the_panel_says_so(tiny_checkpoint) -> None:
    from lambdasplit.split import load_split

    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 4), parts=["head", "tail"])
    prompt, output = LiveAttacker(split, key_kind="rotation").read(heard())
    assert prompt.ids is None and "Not run live" in prompt.note and "99.7-100%" in prompt.note
    assert output.ids is None and "100% of generated tokens" in output.note
    prompt, output = LiveAttacker(split).read(heard(WireDtype.QINT4))
    assert prompt.ids is None and "not run" in prompt.note and "int4" in prompt.note


def test_a_tls_link_rules_the_eavesdropper_out(tiny_checkpoint) -> None:
    from lambdasplit.agent.feed import NetworkFeed
    from lambdasplit.split import load_split

    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 4), parts=["head", "tail"])
    assert split.tokenizer is not None
    panel = AttackPanel(LiveAttacker(split), NetworkFeed(), split.tokenizer, cloud_url="wss://cloud:443/v1/split")
    try:
        eavesdropper, cloud = panel.threat()["attackers"]
        assert not eavesdropper["sees"] and "TLS removes this attacker" in eavesdropper["text"]
        assert cloud["sees"]
    finally:
        panel.close()


def test_a_permutation_key_is_read_off_the_traffic_first(tiny_checkpoint, tmp_path) -> None:
    """`up --key` against an obfuscated body: A4 sorted matching recovers the key from the turn's own rows, and
    A1 and B3 then read the turn back as if there were no key (the attacker wired as `lambdasplit up` does)."""
    from lambdasplit.cli.up import _attacker
    from lambdasplit.privacy.keys import make_key
    from lambdasplit.privacy.obfuscate import obfuscate_body, write_obfuscated_body
    from lambdasplit.split import load_split
    from servers import body_server

    path, _ = tiny_checkpoint("llama")
    cloud = load_split(path, "1:4", parts=("body",), quiet=True)
    assert cloud.body is not None
    key = make_key(cloud.config, cloud.points, cloud.fingerprint, kind="permutation", seed=3)
    obfuscate_body(cloud.body, key, cloud.config)
    body_dir = write_obfuscated_body(cloud.body, key, cloud.config, tmp_path / "body")
    key_file = key.save(tmp_path / "device.key")
    with body_server("--model", str(body_dir), "--layers", "1:4") as server:
        split, client = connect_device(server, path, key=key_file, device="cpu", dtype="float32", quiet=True)
        with client:
            agent = DeviceAgent(split, client, attacker=_attacker(split, str(path), str(key_file)))
            with serving(agent) as url:
                body = {"model": agent.model_id, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
                call(f"{url}/v1/chat/completions", body)
                report = attack_report(url, "r1")
    assert report["status"] == "done" and report["keyed"] is True, report
    prompt, output = report["results"]
    assert prompt["attack"].startswith("A4 sorted matching") and "key fitted to" in prompt["note"]
    assert prompt["token_accuracy"] == 1.0 and "the quick brown fox" in prompt["text"]
    assert output["token_accuracy"] == 1.0


class _Frames:
    """Stands in for an ``ObservedLink`` and its ``RemoteBodyLink``: real frames, the body an identity."""

    def __init__(self) -> None:
        self.link = self
        self.client = self
        self.limits = FrameLimits()
        self.wire_dtype = WireDtype.FLOAT32
        self.last_sent = self.last_received = b""

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        frame = encode_frame(tensor_frame(MessageType.FORWARD, hidden[0], self.wire_dtype, 1, position))
        self.last_sent = self.last_received = frame
        return hidden


def test_the_capture_keeps_the_rows_the_body_kept() -> None:
    """Rows overwritten by a later frame at their position are replaced; rows of drafts rejected at the last step
    (no later frame) are dropped at the end, as the fed tokens say."""
    capture = CapturingLink(_Frames())  # type: ignore[arg-type]
    rows = torch.arange(7 * 4, dtype=torch.float32).reshape(1, 7, 4)
    capture.forward(rows[:, :3], 0)  # the prompt: 3 positions
    capture.forward(-rows[:, 3:6], 3)  # a token and two drafts; one draft rejected
    capture.forward(rows[:, 4:7], 4)  # the rejected position again, a token and a draft, rejected at the end
    heard = capture.overheard(6)  # 3 prompt tokens + 3 new: the last draft was never kept
    assert heard is not None and heard.prompt_length == 3
    assert torch.equal(heard.uplink, torch.cat([rows[0, :3], -rows[0, 3:4], rows[0, 4:6]]))
    assert torch.equal(heard.downlink, heard.uplink)
