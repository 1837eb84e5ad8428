"""A body across machines: the body of a tiny Llama as a chain of stage actors on two Ray nodes equals the unsplit
model (prefill and step-by-step decode), rolls back and resets across its stages, and serves devices through the
ordinary body server.

One chain (body [1, 4) as stages [1, 3) and [3, 4), one per node) is placed for the whole module: each stage is a
Ray worker process that pays seconds of imports when it starts.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel

from drafters import ScriptedDrafter
from lambdasplit.client import connect_device
from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError, Refusal, RemoteError, SessionError
from lambdasplit.generation import generate
from lambdasplit.rayserve.chain import ChainBody, ChainState, StageChain, stage_ranges
from lambdasplit.rayserve.stages import StagedBodyServer, staged_split
from lambdasplit.server.settings import ServerSettings
from lambdasplit.split import SplitModel, load_split
from lambdasplit.split.parts import with_cache
from lambdasplit.split.state import BodyState
from servers import app_in_thread
from tiny_models import NUM_LAYERS

POINTS = (1, NUM_LAYERS - 1)  # body [1, 4): stages [1, 3) and [3, 4)
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 12]
STEPS = 20
ATOL = 1e-5


def test_stage_ranges_are_even_or_explicit_and_name_bad_values() -> None:
    assert stage_ranges((2, 28), 3) == [(2, 11), (11, 20), (20, 28)]
    assert stage_ranges((1, 4), 2) == [(1, 3), (3, 4)]
    assert stage_ranges((1, 5), [3]) == [(1, 3), (3, 5)]
    assert stage_ranges((0, 4), 1) == [(0, 4)]
    with pytest.raises(ConfigError, match=r"between 1 and the body's 3 layers \[1, 4\), got 4"):
        stage_ranges((1, 4), 4)
    with pytest.raises(ConfigError, match=r"strictly increasing .* inside the body \(1, 5\), got \[3, 3\]"):
        stage_ranges((1, 5), [3, 3])
    with pytest.raises(ConfigError, match=r"\[2, 2\) holds no layers"):
        stage_ranges((2, 2), 1)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    path, _ = tiny_checkpoint("llama")
    return path


@pytest.fixture(scope="module")
def staged(ray_cluster, tiny: Path) -> Iterator[SplitModel]:
    """The body [1, 4) of the tiny Llama as two stages, one per node, and this process's handle to them."""
    split = staged_split(str(tiny), POINTS, 2, device="cpu", dtype="float32", timeout=180)
    assert isinstance(split.body, ChainBody)
    yield split
    split.body.chain.shutdown()


@pytest.fixture(scope="module")
def device_parts(tiny: Path) -> SplitModel:
    return load_split(tiny, POINTS, parts=["head", "tail"], device="cpu", dtype="float32")


def reference_step_logits(ref: PreTrainedModel, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy decode with the unsplit model and its own cache: logits (T, V) of the prompt, then of each step."""
    cache = DynamicCache(config=ref.config)
    logits, tokens = [], []
    with torch.no_grad():
        ids = prompt
        for _ in range(steps + 1):
            logits.append(ref(torch.tensor([ids]), use_cache=True, **with_cache(ref, cache)).logits[0])
            ids = [int(logits[-1][-1].argmax())]
            tokens.append(ids[0])
    return logits, tokens[:-1]


def chain_of(staged: SplitModel) -> StageChain:
    assert isinstance(staged.body, ChainBody)
    return staged.body.chain


def test_the_stages_run_on_different_nodes_and_the_replica_holds_no_weights(ray_cluster, staged) -> None:
    chain = chain_of(staged)
    nodes = [info.node_id for info in chain.check()]
    assert len(set(nodes)) == 2 and set(nodes) == set(ray_cluster.node_ids)
    assert [info.layers for info in chain.infos] == [(1, 3), (3, 4)]
    assert all(info.parameters > 0 for info in chain.infos)
    assert staged.body is not None and sum(p.numel() for p in staged.body.parameters()) == 0
    assert staged.points == SplitPoints(1, 4, NUM_LAYERS)


def test_prefill_and_decode_through_the_stages_equal_the_unsplit_model(tiny_checkpoint, staged, device_parts) -> None:
    """Head and tail here, the body on two nodes: logits within ATOL of the unsplit model at every step."""
    _, ref = tiny_checkpoint("llama")
    expected, tokens = reference_step_logits(ref, PROMPT, STEPS)
    head, tail = device_parts.head, device_parts.tail
    assert head is not None and tail is not None and isinstance(staged.body, ChainBody)
    state = ChainState(staged.body)
    head_cache, tail_cache = head.new_cache(), tail.new_cache()

    def run(ids: list[int]) -> torch.Tensor:
        hidden = state.forward(head(torch.tensor([ids]), head_cache), state.length)
        return tail(hidden, tail_cache, logits_to_keep=0)[0]  # (T, V)

    try:
        torch.testing.assert_close(run(PROMPT), expected[0], atol=ATOL, rtol=0)
        for step, tok in enumerate(tokens):
            torch.testing.assert_close(run([tok]), expected[step + 1], atol=ATOL, rtol=0, msg=f"decode step {step}")
        assert chain_of(staged).held_positions(state.session) == [len(PROMPT) + STEPS] * 2
    finally:
        state.close()


def test_rollback_and_reset_cross_every_stage(tiny, staged) -> None:
    """Drafted rows rolled back (position < length), then the no-cache reset: each output equals one local body's,
    and every stage holds what the session's state says."""
    local = load_split(tiny, POINTS, parts=["body"], device="cpu", dtype="float32")
    assert local.body is not None and isinstance(staged.body, ChainBody)
    mine, theirs = BodyState(local.body), ChainState(staged.body)
    chain = chain_of(staged)
    gen = torch.Generator().manual_seed(0)
    rows = lambda n: torch.randn(1, n, local.hidden_size, generator=gen)  # noqa: E731
    p = len(PROMPT)
    # (hidden, position, reset): a prompt, a 3-token draft, a rollback of 2 of them, a step, then a reset.
    script = [(rows(p), 0, False), (rows(3), p, False), (rows(2), p + 1, False), (rows(1), p + 3, False)]
    script += [(rows(p + 2), 0, True)]
    try:
        for hidden, position, reset in script:
            want = mine.forward(hidden, position, reset)
            got = theirs.forward(hidden, position, reset)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            assert theirs.length == mine.length and chain.held_positions(theirs.session) == [mine.length] * 2
        last = theirs.forward(rows(4), theirs.length, last=True)
        assert last.shape == (1, 1, local.hidden_size)
        with pytest.raises(SessionError) as info:
            theirs.forward(rows(1), theirs.length + 1)  # skips ahead: refused here, before any stage runs
        assert info.value.code == "bad_position"
    finally:
        theirs.close()
    assert chain.held_positions(theirs.session) == [0, 0]  # closed on every stage
    with pytest.raises(SessionError) as info:
        theirs.forward(rows(1), 0)
    assert info.value.code == "unknown_session"


def test_a_stage_that_lost_a_session_says_unknown_session(staged) -> None:
    """What a stage refuses comes back as the lambdasplit error it raised: a device then replays its history."""
    chain = chain_of(staged)
    with pytest.raises(SessionError, match=r"stage \[1, 3\) holds no session") as info:
        chain.run(chain.new_session(), torch.zeros(1, staged.hidden_size), 5, False, False)
    assert info.value.code == "unknown_session"


def test_more_stages_than_nodes_is_refused_unless_packing_is_allowed(ray_cluster, tiny) -> None:
    with pytest.raises(ConfigError, match=r"3 stages .* need 3 Ray nodes; the cluster has 2 alive.*spread=False"):
        staged_split(str(tiny), POINTS, 3, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server_url(staged) -> Iterator[tuple[str, StagedBodyServer]]:
    """The staged body behind an ordinary body server (uvicorn on a thread of this process) on loopback."""
    server = StagedBodyServer(staged, ServerSettings(port=0, tls="off", idle_ttl=60))
    with app_in_thread(server.app, ws="websockets-sansio") as port:
        yield f"ws://127.0.0.1:{port}/v1/split", server


def test_a_device_served_by_the_stages_gets_what_it_gets_in_process(tiny, staged, server_url) -> None:
    """The unchanged protocol and client: greedy and speculative output equal in-process generation; WELCOME names
    the stages; closing the sessions frees them on every stage."""
    url, server = server_url
    local = load_split(tiny, POINTS, device="cpu", dtype="float32")
    new = 16
    expected = generate(local, PROMPT, max_new_tokens=new, ignore_eos=True).token_ids
    split, client = connect_device(url, tiny, device="cpu", dtype="float32", quiet=True)
    with client:
        assert client.welcome["stages"] == [[1, 3], [3, 4]] and client.welcome["layers"] == [1, 4]
        plain = generate(split, PROMPT, max_new_tokens=new, ignore_eos=True, link=client.open_session("float32"))
        assert plain.token_ids == expected
        drafter = ScriptedDrafter(expected, len(PROMPT), int(split.config.vocab_size))
        link = client.open_session("float32")
        spec = generate(split, PROMPT, max_new_tokens=new, ignore_eos=True, link=link, drafter=drafter)
        assert spec.token_ids == expected and 0 < spec.accepted_tokens < spec.drafted_tokens
    chain = chain_of(staged)
    deadline = time.monotonic() + 30
    while any(info.sessions for info in chain.check()):  # the connection went away: its sessions are closed
        assert time.monotonic() < deadline, chain.check()
        time.sleep(0.1)
    assert len(server.store) == 0


def test_the_stages_verify_token_trees_and_keep_the_branch(tiny, staged, server_url) -> None:
    """WELCOME says trees; a tree's FORWARD runs under its mask on every stage, the TREE frame's keep holds the
    branch on every stage, and the next step equals the body in one process doing the same."""
    from lambdasplit.client import CloudClient

    url, server = server_url
    body = load_split(tiny, POINTS, parts=["body"], device="cpu", dtype="float32").body
    local = BodyState(body)
    g = torch.Generator().manual_seed(2)
    with CloudClient(url) as client:
        assert client.welcome["trees"] is True
        link = client.open_session("float32")
        d = int(client.welcome["hidden_size"])
        prompt, tree, step = (torch.randn(1, n, d, generator=g) for n in (5, 4, 1))
        torch.testing.assert_close(link.forward(prompt, 0), local.forward(prompt, 0), atol=ATOL, rtol=ATOL)
        parents = [-1, 0, 0, 2]
        out = link.forward_tree(tree, 5, parents, None)
        torch.testing.assert_close(out, local.forward(tree, 5, tree=parents), atol=ATOL, rtol=ATOL)
        local.keep(5, [0, 2, 3])
        out = link.forward_tree(step, 8, None, (5, [0, 2, 3]))
        torch.testing.assert_close(out, local.forward(step, 8), atol=ATOL, rtol=ATOL)
        assert not link.recoveries
        (state,) = [held.value for held in server.store]
        assert chain_of(staged).held_positions(state.session) == [9, 9]  # the prompt, the branch, the step
        link.close()


class Owner:
    """Stands in for a Serve replica: an actor that places a chain, and so owns its stage actors."""

    def __init__(self, model: str) -> None:
        self.split = staged_split(model, POINTS, 2, device="cpu", dtype="float32", timeout=180)

    def stage_pids(self) -> list[int]:
        assert isinstance(self.split.body, ChainBody)
        return [info.pid for info in self.split.body.chain.infos]


def test_stages_die_with_the_process_that_placed_them(ray_cluster, tiny) -> None:
    """Ray kills an actor whose owner died and removes its placement group: a killed replica leaks no stages."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    owner = ray.remote(num_cpus=0)(Owner).remote(str(tiny))
    pids = ray.get(owner.stage_pids.remote(), timeout=300)
    assert all(alive(pid) for pid in pids)
    ray.kill(owner)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"stage processes {pids} outlived their owner"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class KillingLink:
    """A device's body link that runs ``kills[n]`` just before its n-th forward (mid-generation)."""

    def __init__(self, link: Any, kills: dict[int, Callable[[], None]]) -> None:
        self.link, self.kills, self.calls = link, kills, 0

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.kills:
            self.kills[self.calls]()
        return self.link.forward(hidden, position, reset, last)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.link, name)


def test_stages_killed_mid_generation_are_restarted_and_the_device_loses_nothing(tiny, staged, server_url) -> None:
    """Ray restarts a stage's process with no sessions; the step that met the loss is refused with unknown_session
    once the stage answers again, and the device replays its history: the same tokens. The first stage lost fails
    the second's call as its input, the last fails its own."""
    import ray

    url, _ = server_url
    chain = chain_of(staged)
    local = load_split(tiny, POINTS, device="cpu", dtype="float32")
    new = 12
    expected = generate(local, PROMPT, max_new_tokens=new, ignore_eos=True).token_ids
    before = [info.pid for info in chain.check()]
    split, client = connect_device(url, tiny, device="cpu", dtype="float32", quiet=True)
    with client:
        kills = {i: lambda i=i: ray.kill(chain.actors[i // 6], no_restart=False) for i in (3, 6)}
        link = KillingLink(client.open_session("float32"), kills)
        out = generate(split, PROMPT, max_new_tokens=new, ignore_eos=True, link=link)
        assert out.token_ids == expected
        assert [r.reason for r in link.link.recoveries] == ["session unknown to the server (evicted or restarted)"] * 2
    after = [info.pid for info in chain.check()]
    assert after[0] != before[0] and after[1] != before[1] and chain.restarts == 2


def test_a_stage_dead_for_good_is_stage_unavailable_to_the_device_and_the_health_check(
    tiny, staged, server_url
) -> None:
    """No restarts left: the device gets stage_unavailable (not a hang), and the replica's health check fails, so
    Serve would replace the replica. Runs last: the module's chain is broken after it."""
    import ray

    url, _ = server_url
    chain = chain_of(staged)
    split, client = connect_device(url, tiny, device="cpu", dtype="float32", quiet=True)
    with client:
        link = KillingLink(client.open_session("float32"), {3: lambda: ray.kill(chain.actors[0], no_restart=True)})
        with pytest.raises(RemoteError) as info:
            generate(split, PROMPT, max_new_tokens=8, ignore_eos=True, link=link)
        assert info.value.code == "stage_unavailable"
    with pytest.raises(Refusal) as refused:
        chain.check(timeout=5)
    assert refused.value.code == "stage_unavailable"
