"""Body replicas on Ray Serve, on a two-node local Ray cluster: the same protocol through Serve's proxy, devices
spread over replicas, a replica lost mid-generation, and scaling up and down under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import ray
from ray import serve

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.client.connection import RemoteBodyLink
from lambdasplit.errors import RemoteError
from lambdasplit.generation import generate
from lambdasplit.rayserve.deployment import APP_NAME, DEPLOYMENT_NAME, ReplicaSpec, Scaling
from lambdasplit.rayserve.run import deploy
from lambdasplit.server import ServerSettings
from lambdasplit.split import load_split
from servers import in_threads
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
PROMPTS = [[1, 17 + i, 42, 99 - i, 7, 3 * i + 5] for i in range(8)]
NEW_TOKENS = 24
TOKEN = "ray-s3cret"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    return path


@pytest.fixture(scope="module")
def expected(tiny) -> list[list[int]]:
    """Each prompt's tokens from the body in process: what every device must get from any replica."""
    local = load_split(tiny, LAYERS)
    return [generate(local, p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]


def deployed(tiny, port: int, scaling: Scaling) -> Iterator[str]:
    settings = ServerSettings(port=port, tokens=(TOKEN,), drain_seconds=20)
    url = deploy(ReplicaSpec(str(tiny), LAYERS, settings), scaling)
    try:
        yield url
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny, serve_port) -> Iterator[str]:
    yield from deployed(tiny, serve_port, Scaling(replicas=2, cpus_per_replica=0.5))


@dataclass
class Device:
    """One device connected to the deployment; ``pause_at`` holds its generation at that position until ``go``."""

    tiny: object
    url: str
    pause_at: int | None = None
    reached: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    go: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.split, self.client = connect_device(self.url, self.tiny, token=TOKEN, reconnect_deadline=90)
        self.replica = self.client.welcome["replica"]

    def run(self, prompt: list[int]) -> tuple[list[int], RemoteBodyLink]:
        link = self.client.open_session("float32")
        forward, held = link.forward, False

        def pausing(hidden, position, reset=False, last=False):
            nonlocal held
            if self.pause_at is not None and position >= self.pause_at and not held:
                held = True
                self.reached.release()
                assert self.go.wait(120)
            return forward(hidden, position, reset, last)

        link.forward = pausing  # type: ignore[method-assign]
        result = generate(self.split, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, link=link)
        return result.token_ids, link


def replica_tags() -> dict[str, str]:
    """Running replicas of the deployment: tag -> actor name."""
    named = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    return {a["name"].removeprefix(prefix): a["name"] for a in named if a["name"].startswith(prefix)}


def test_eight_devices_on_two_replicas_each_get_their_single_client_tokens(two_replicas, tiny, expected) -> None:
    devices = [Device(tiny, two_replicas) for _ in PROMPTS]
    try:
        # Serve's proxy spread the connections: both replicas hold devices, each device stays on its replica.
        assert len({d.replica for d in devices}) == 2
        outputs = in_threads(lambda i: devices[i].run(PROMPTS[i])[0], len(devices))
        assert outputs == expected
        assert all(d.client.reconnects == 0 and d.client.welcome["replica"] == d.replica for d in devices)
    finally:
        for d in devices:
            d.client.close()


def test_a_replica_killed_mid_generation_loses_no_device(two_replicas, tiny, expected) -> None:
    devices = [Device(tiny, two_replicas, pause_at=len(PROMPTS[0]) + 8) for _ in PROMPTS]
    try:
        doomed = devices[0].replica
        assert doomed in replica_tags()
        runs: dict[int, tuple[list[int], RemoteBodyLink]] = {}
        threads = [threading.Thread(target=lambda i=i: runs.update({i: devices[i].run(PROMPTS[i])})) for i in range(8)]
        for t in threads:
            t.start()
        for d in devices:  # every device is 8 tokens into its answer, its KV cache on its replica
            assert d.reached.acquire(timeout=120)
        ray.kill(ray.get_actor(replica_tags()[doomed], namespace="serve"), no_restart=True)
        for d in devices:
            d.go.set()
        for t in threads:
            t.join(180)
        assert [runs[i][0] for i in range(8)] == expected
        moved = [i for i, d in enumerate(devices) if d.replica == doomed]
        assert moved, "no device was on the killed replica"
        for i in moved:  # reconnected through the same URL to a live replica and replayed its session there
            recoveries = runs[i][1].recoveries
            assert len(recoveries) == 1 and recoveries[0].replayed_positions >= len(PROMPTS[i]) + 8
            assert devices[i].client.welcome["replica"] != doomed
            print(f"device {i}: recovered in {recoveries[0].seconds * 1000:.0f} ms ({recoveries[0].reason})")
        assert all(not runs[i][1].recoveries for i in range(8) if i not in moved)
    finally:
        for d in devices:
            d.client.close()


def test_the_bearer_token_is_checked_by_each_replica(two_replicas, tiny) -> None:
    with pytest.raises(RemoteError, match="token"):
        CloudClient(two_replicas, token="wrong")


@pytest.fixture
def staged(ray_cluster, tiny, serve_port, two_replicas) -> Iterator[str]:
    serve.delete(APP_NAME)
    settings = ServerSettings(port=serve_port, tokens=(TOKEN,), drain_seconds=20)
    # Each replica's body as two stage actors, one per node of the cluster.
    url = deploy(ReplicaSpec(str(tiny), LAYERS, settings, stages=2), Scaling(cpus_per_replica=0.5))
    try:
        yield url
    finally:
        serve.delete(APP_NAME)


def test_a_replica_can_drive_its_body_as_stage_actors_on_two_nodes(staged, tiny, expected) -> None:
    device = Device(tiny, staged)
    try:
        first, last = (int(x) for x in LAYERS.split(":"))
        (a, b), (c, d) = device.client.welcome["stages"]
        assert (a, d) == (first, last) and b == c
        assert device.run(PROMPTS[0])[0] == expected[0]
    finally:
        device.client.close()


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return int(status.replica_states.get("RUNNING", 0))


def wait_for(condition, seconds: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"{what} did not happen within {seconds:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.fixture
def autoscaled(ray_cluster, tiny, serve_port, two_replicas) -> Iterator[str]:
    serve.delete(APP_NAME)  # the fixed deployment's replicas give their CPUs back first
    scaling = Scaling(
        replicas=None,
        min_replicas=1,
        max_replicas=2,
        target_sessions=2,
        upscale_delay_s=1,
        downscale_delay_s=2,
        look_back_period_s=2,
        metrics_interval_s=0.5,
        cpus_per_replica=0.5,
    )
    yield from deployed(tiny, serve_port, scaling)


def test_scales_up_under_load_and_drains_devices_on_scale_down(autoscaled, tiny, expected) -> None:
    assert running_replicas() == 1
    first = [Device(tiny, autoscaled) for _ in range(4)]  # 4 devices, target 2 per replica: a second one starts
    up = wait_for(lambda: running_replicas() == 2, 90, "scaling up to 2 replicas")
    print(f"scaled up in {up:.1f} s")
    # The router prefers the new, empty replica once its view holds it; that view is updated asynchronously,
    # so a device that connects in the same instant may still land on the old one: the next ones must not.
    devices = [*first]
    try:
        while len({d.replica for d in devices}) < 2 and len(devices) < len(PROMPTS):
            devices.append(Device(tiny, autoscaled))
            time.sleep(0.5)
        assert len({d.replica for d in devices}) == 2, "no late device reached the new replica"
        outputs = in_threads(lambda i: devices[i].run(PROMPTS[i])[0], len(devices))
        assert outputs == expected[: len(devices)]
        # Load falls: all but one device on each replica leave, the autoscaler removes a replica, which drains:
        # its device gets GOAWAY and moves, through the same URL, to the replica that stays.
        keep = {d.replica: d for d in devices}
        for d in devices:
            if d not in keep.values():
                d.client.close()
        down = wait_for(lambda: running_replicas() == 1, 90, "scaling down to 1 replica")
        print(f"scaled down in {down:.1f} s")
        wait_for(lambda: _noticed(keep), 30, "GOAWAY from the replica that stops")
        outputs = [d.run(PROMPTS[i])[0] for i, d in enumerate(keep.values())]
        assert outputs == expected[: len(keep)]
        assert all(d.client.welcome["replica"] in replica_tags() for d in keep.values())
        assert sum(d.client.moves for d in keep.values()) == 1  # moved on GOAWAY, before the replica went away
        assert sum(d.client.reconnects for d in keep.values()) == 0
    finally:
        for d in devices:
            d.client.close()


def _noticed(devices: dict[str, Device]) -> bool:
    """Let idle clients read what the server sent unasked (GOAWAY arrives between requests)."""
    for d in devices.values():
        with d.client._lock:
            d.client._notice_goaway(d.client._ws)
    return any(d.client.going_away for d in devices.values())
