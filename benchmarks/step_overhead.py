"""Per-step overhead on loopback: a split step with the body in a `lambdasplit serve` against the body in process.

    python benchmarks/step_overhead.py [--rounds 5] [--steps 200] [--new-tokens 64] [--layers 2:28]
                                       [--device-threads N] [--server-threads N] [--wire float16] [--json out.json]

Overhead per step = (a step with the body in `lambdasplit serve` on 127.0.0.1) - (the same step with the body in
this process, ``LocalBodyLink``): same model, same split, same threads. Two workloads, SmolLM2-135M-Instruct:

- **one-layer body** (layer 15 alone): ``--steps`` single-position body steps after a 32-position prompt, through
  ``link.forward`` directly. Compute is ~1 ms, so what is left is the protocol: framing, sockets, the server's
  event loop and its compute thread, and the device's WebSocket reader thread.
- **split 2:28** (``--layers``): greedy decode, time between consecutive tokens (head, body, tail, sampling), for
  ``--new-tokens`` tokens. Overhead here includes what the two processes do to each other on shared cores.

Each round runs every arm once, interleaved (in process, plain serve, timestamped serve), so drift hits all arms
alike; a round's figure is the median step, and the table shows the median over rounds with the spread. This
machine is shared (2 cores, other people's tests): absolute times drift by tens of percent between runs; compare
arms within one run.

The breakdown comes from a second server, ``serve`` with timestamps (CLOCK_MONOTONIC, which both processes share)
at fixed points of the path: the device's encode + send, the socket up to uvicorn's ``data_received``, uvicorn's
parse and the reader task up to ``decode_frame``, dispatch up to the compute thread, the compute, the compute
thread back to the event loop and the send, the socket down to the device's ``recv``, and decoding. Its total is
printed beside plain serve's, so what the stamps cost shows.
"""

from __future__ import annotations

import os

# Before torch loads (see lambdasplit.cli.main): idle OpenMP threads must not spin while another process computes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

STAMPED = "--stamped-serve"  # child mode: `lambdasplit serve ARGS` with timestamps on the per-step path
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]

# Server-side points, in path order; each record is one WebSocket message (one step).
SERVER_POINTS = ("received", "decoded", "compute_start", "compute_end", "encoded", "sent")
DEVICE_POINTS = ("start", "sent", "received", "end")
# (label, from point, to point); "d." is the device, "s." the server.
SEGMENTS = (
    ("device: encode + send", "d.start", "d.sent"),
    ("socket up -> server data_received", "d.sent", "s.received"),
    ("server: parse, reader task, inbox -> decode", "s.received", "s.decoded"),
    ("server: dispatch -> compute thread starts", "s.decoded", "s.compute_start"),
    ("server: body compute", "s.compute_start", "s.compute_end"),
    ("server: back to the loop, result frame", "s.compute_end", "s.encoded"),
    ("server: encode + send", "s.encoded", "s.sent"),
    ("socket down -> device recv returns", "s.sent", "d.received"),
    ("device: decode", "d.received", "d.end"),
)


# --- the timestamped server (a child process) ---------------------------------------------------------------------
def stamped_serve(argv: list[str]) -> None:
    """Run ``lambdasplit serve ARGV`` with timestamps at ``SERVER_POINTS``; GET /metrics returns and clears them."""
    from starlette.websockets import WebSocket
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from lambdasplit.server import app, base, batching

    records: list[dict[str, float]] = []

    def stamp(point: str) -> None:
        if records:
            records[-1].setdefault(point, time.perf_counter())

    def wrap(fn: Callable[..., Any], point: str, after: bool = False) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not after:
                stamp(point)
            out = fn(*args, **kwargs)
            if after:
                stamp(point)
            return out

        return wrapped

    received = WebSocketsSansIOProtocol.data_received

    def data_received(self: WebSocketsSansIOProtocol, data: bytes) -> None:
        now = time.perf_counter()
        if not records or "sent" in records[-1]:
            records.append({"received": now})
        elif "decoded" not in records[-1]:
            records[-1]["received"] = now  # a frame in several chunks (or a pong before it): its last chunk counts
        # else a pong to the server's keepalive ping while a step is in flight: not a message of ours
        received(self, data)

    WebSocketsSansIOProtocol.data_received = data_received  # type: ignore[method-assign]
    base.decode_frame = wrap(base.decode_frame, "decoded")  # type: ignore[attr-defined]
    base.encode_frame = wrap(base.encode_frame, "encoded")  # type: ignore[attr-defined]
    run = batching.Batcher._run

    def timed_run(self: batching.Batcher, jobs: list[batching.Job]) -> list[Any]:
        stamp("compute_start")
        out = run(self, jobs)
        stamp("compute_end")
        return out

    batching.Batcher._run = timed_run  # type: ignore[method-assign]
    send_bytes = WebSocket.send_bytes

    async def sent(self: WebSocket, data: bytes) -> None:
        await send_bytes(self, data)
        stamp("sent")

    WebSocket.send_bytes = sent  # type: ignore[method-assign]
    metrics_body = app.BodyServer.metrics_body

    def with_stamps(self: app.BodyServer) -> dict[str, Any]:
        done = [r for r in records if set(SERVER_POINTS) <= r.keys()]
        records.clear()
        return {**metrics_body(self), "stamps": done}

    app.BodyServer.metrics_body = with_stamps  # type: ignore[method-assign]
    sys.argv = ["lambdasplit", *argv]
    from lambdasplit.cli import main

    main()


def _stamps(url: str) -> list[dict[str, float]]:
    metrics = url.replace("ws://", "http://").removesuffix("/v1/split") + "/metrics"
    with urllib.request.urlopen(metrics, timeout=30) as response:
        return list(json.load(response)["stamps"])


# --- the device side ------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One way of running the body (in process, plain serve, stamped serve) for one workload."""

    name: str
    run: Callable[[], list[float]]  # one round: seconds per step
    rounds: list[float] = field(default_factory=list)  # the median step of each round
    breakdown: list[dict[str, float]] = field(default_factory=list)  # stamped arm: one dict of segments per round
    link: list[float] = field(default_factory=list)  # decode: the median step's time in the body link, per round


def device_stamps(link: Any) -> Iterator[list[dict[str, float]]]:
    """Timestamps on the device's side of ``link`` (a RemoteBodyLink): forward start/end, sent, received."""
    records: list[dict[str, float]] = []
    client, forward_once = link.client, link._forward_once
    send, recv = client._send, client._recv

    def timed_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        records.append({"start": time.perf_counter()})
        out = forward_once(*args, **kwargs)
        records[-1]["end"] = time.perf_counter()
        return out

    def timed_send(ws: Any, data: bytes) -> None:
        send(ws, data)
        if records:
            records[-1]["sent"] = time.perf_counter()

    def timed_recv(ws: Any) -> bytes:
        out = recv(ws)
        if records:
            records[-1]["received"] = time.perf_counter()
        return out

    link._forward_once, client._send, client._recv = timed_forward, timed_send, timed_recv
    try:
        yield records
    finally:
        del link._forward_once, client._send, client._recv


def segments(device: list[dict[str, float]], server: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds of each segment of the path, pairing device and server records in order."""
    device = [r for r in device if set(DEVICE_POINTS) <= r.keys()]
    if len(device) != len(server):
        print(f"breakdown skipped: {len(device)} device but {len(server)} server records", file=sys.stderr)
        return {}
    out: dict[str, float] = {}
    for label, a, b in SEGMENTS:
        values = []
        for d, s in zip(device, server, strict=True):
            points = {**{f"d.{k}": v for k, v in d.items()}, **{f"s.{k}": v for k, v in s.items()}}
            values.append(points[b] - points[a])
        # Means, not medians: they add up to the total (a segment's rare stall is part of the cost).
        out[label] = statistics.fmean(values) * 1e3
    out["total (device start -> end)"] = statistics.fmean(d["end"] - d["start"] for d in device) * 1e3
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == STAMPED:
        stamped_serve(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="2:28", help="the split of the decode workload")
    ap.add_argument("--one-layer", type=int, default=15, help="the layer of the one-layer body")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="one-layer body steps per round")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps per round (split workload)")
    ap.add_argument("--wire", default="float16")
    ap.add_argument("--device-threads", type=int, default=None, help="torch threads here (default: torch's)")
    ap.add_argument("--server-threads", type=int, default=None, help="`serve --threads` (default: torch's)")
    ap.add_argument("--skip-split", action="store_true", help="the one-layer body only")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.device_threads is not None:
        torch.set_num_threads(args.device_threads)

    from lambdasplit.client import connect_device
    from lambdasplit.generation import LocalBodyLink, SamplingParams, prompt_ids, stream
    from lambdasplit.server.process import body_server_process
    from lambdasplit.split import load_split

    one = f"{args.one_layer}:{args.one_layer + 1}"
    workloads: dict[str, str] = {"one-layer body": one}
    if not args.skip_split:
        workloads[f"split {args.layers}"] = args.layers
    arms: dict[str, list[Arm]] = {}
    with ExitStack() as stack:

        def server(layers: str, stamped: bool) -> str:
            argv = ["--model", args.model, "--layers", layers, "--host", "127.0.0.1"]
            argv += ["--threads", str(args.server_threads)] if args.server_threads else []
            here = os.path.abspath(__file__)

            def wrap(command: list[str]) -> list[str]:  # `python THIS --stamped-serve serve ...` instead of the CLI
                return [sys.executable, here, STAMPED, *command[3:]] if stamped else command

            return stack.enter_context(body_server_process(argv, wrap=wrap, env={"OMP_WAIT_POLICY": "PASSIVE"}))

        # One-layer body: raw body steps, the same hidden states on every arm.
        one_split = load_split(args.model, one, parts=("body",), device="cpu", dtype="float32", quiet=True)
        body, d = one_split.body, one_split.hidden_size
        assert body is not None
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randn(1, 32, d, generator=gen)
        steps = [torch.randn(1, 1, d, generator=gen) for _ in range(args.steps)]

        def timed(link: Any) -> list[float]:
            """The prompt, then each step timed on its own."""
            link.forward(prompt, 0)
            times = []
            for i, hidden in enumerate(steps):
                start = time.perf_counter()
                link.forward(hidden, 32 + i)
                times.append(time.perf_counter() - start)
            return times

        def body_steps(make_link: Callable[[], Any]) -> list[float]:
            link = make_link()
            times = timed(link)
            link.close()
            return times

        plain_url, stamped_url = server(one, False), server(one, True)
        _, plain = connect_device(plain_url, args.model, quiet=True)
        _, stamped = connect_device(stamped_url, args.model, quiet=True)
        stack.callback(plain.close)
        stack.callback(stamped.close)
        one_arms = [
            Arm("in process", lambda: body_steps(lambda: LocalBodyLink(body))),
            Arm("plain serve", lambda: body_steps(lambda: plain.open_session(args.wire))),
        ]
        stamped_arm = Arm("stamped serve", lambda: [])

        def stamped_steps(client: Any = stamped, url: str = stamped_url, arm: Arm = stamped_arm) -> list[float]:
            link = client.open_session(args.wire)
            _stamps(url)  # drop the OPEN's
            records = device_stamps(link)
            mine = next(records)
            times = timed(link)
            next(records, None)
            if parts := segments(mine[1:], _stamps(url)[1:]):  # without the prompt
                arm.breakdown.append(parts)
            link.close()
            return times

        stamped_arm.run = stamped_steps
        arms["one-layer body"] = [*one_arms, stamped_arm]

        if not args.skip_split:
            full = load_split(args.model, args.layers, device="cpu", dtype="float32", quiet=True)
            ids = prompt_ids(full, PROMPT, chat=True)
            params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
            split_plain_url, split_stamped_url = server(args.layers, False), server(args.layers, True)
            device, split_plain = connect_device(split_plain_url, args.model, quiet=True)
            _, split_stamped = connect_device(split_stamped_url, args.model, quiet=True)
            stack.callback(split_plain.close)
            stack.callback(split_stamped.close)

            def decode_steps(link: Any, split: Any, arm: Arm) -> list[float]:
                """Seconds between consecutive tokens; the body link's share of each step goes to ``arm.link``."""
                forward, in_link = link.forward, []

                def timed(*a: Any, **k: Any) -> torch.Tensor:
                    start = time.perf_counter()
                    out = forward(*a, **k)
                    in_link.append(time.perf_counter() - start)
                    return out

                link.forward = timed
                last, gaps = time.perf_counter(), []
                for _ in stream(split, ids, params=params, link=link):
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
                link.close()
                arm.link.append(statistics.median(in_link[1:]) * 1e3)
                return gaps[1:]  # the first gap is the prompt

            split_stamped_arm = Arm("stamped serve", lambda: [])

            def stamped_decode(arm: Arm = split_stamped_arm) -> list[float]:
                link = split_stamped.open_session(args.wire)
                _stamps(split_stamped_url)
                records = device_stamps(link)
                mine = next(records)
                gaps = decode_steps(link, device, arm)
                next(records, None)
                if parts := segments(mine[1:], _stamps(split_stamped_url)[1:]):
                    arm.breakdown.append(parts)
                return gaps

            split_stamped_arm.run = stamped_decode
            local_arm, plain_arm = Arm("in process", lambda: []), Arm("plain serve", lambda: [])
            assert full.body is not None
            local_arm.run = lambda: decode_steps(LocalBodyLink(full.body), full, local_arm)
            plain_arm.run = lambda: decode_steps(split_plain.open_session(args.wire), device, plain_arm)
            arms[f"split {args.layers}"] = [local_arm, plain_arm, split_stamped_arm]

        for round_ in range(args.rounds + 1):  # round 0 warms every arm up and is not counted
            for name, group in arms.items():
                order = group if round_ % 2 else group[::-1]  # alternate the order: no arm always runs first
                for arm in order:
                    seconds = arm.run()
                    if round_ > 0:
                        arm.rounds.append(statistics.median(seconds) * 1e3)
                    else:
                        arm.breakdown.clear()
                        arm.link.clear()
                print(f"round {round_}/{args.rounds}: {name} done", file=sys.stderr, flush=True)

    report(args, arms)


def report(args: argparse.Namespace, arms: dict[str, list[Arm]]) -> None:
    results: dict[str, Any] = {}
    print(f"\nPer-step overhead on loopback ({args.model}, wire {args.wire}, {args.rounds} rounds; ms, median over")
    print("rounds of each round's median step, [min-max] of the rounds). Shared machine: compare within one run.\n")
    print("| workload | in process | plain serve | overhead | overhead, best rounds | stamped serve |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, group in arms.items():
        local, plain, stamped = (statistics.median(a.rounds) for a in group)
        spread = {a.name: f"[{min(a.rounds):.2f}-{max(a.rounds):.2f}]" for a in group}
        # Overhead per round (arms of one round ran back to back), then the median of those; and the best round of
        # each arm against each other (interference only ever adds time).
        per_round = [p - q for p, q in zip(group[1].rounds, group[0].rounds, strict=True)]
        overhead, best = statistics.median(per_round), min(group[1].rounds) - min(group[0].rounds)
        print(
            f"| {name} | {local:.2f} {spread['in process']} | {plain:.2f} {spread['plain serve']} | "
            f"**{overhead:.2f}** [{min(per_round):.2f}-{max(per_round):.2f}] | {best:.2f} | {stamped:.2f} |"
        )
        stamped_arm = group[2]
        breakdown = {
            label: statistics.median(b[label] for b in stamped_arm.breakdown) for label in stamped_arm.breakdown[0]
        }
        if group[0].link:  # decode: the step without the body link is the device's own work (head, tail, sampling)
            for arm in group:
                link = statistics.median(arm.link)
                rest = statistics.median(r - x for r, x in zip(arm.rounds, arm.link, strict=True))
                print(f"|   {arm.name}: body link {link:.2f}, device's own work {rest:.2f} | | | | | |")
        results[name] = {
            "in_process_ms": round(local, 3),
            "serve_ms": round(plain, 3),
            "overhead_ms": round(overhead, 3),
            "overhead_per_round_ms": [round(x, 3) for x in per_round],
            "overhead_best_ms": round(best, 3),
            "rounds_ms": {a.name: [round(x, 3) for x in a.rounds] for a in group},
            "link_ms": {a.name: [round(x, 3) for x in a.link] for a in group if a.link},
            "breakdown_ms": {k: round(v, 4) for k, v in breakdown.items()},
        }
    for name, result in results.items():
        print(f"\nWhere a step goes, {name} (stamped serve; ms, mean over steps, median over rounds):\n")
        print("| segment | ms |")
        print("|---|---:|")
        for label, ms in result["breakdown_ms"].items():
            print(f"| {label} | {ms:.3f} |")
    meta = {
        "model": args.model,
        "layers": args.layers,
        "one_layer": args.one_layer,
        "wire": args.wire,
        "rounds": args.rounds,
        "steps": args.steps,
        "new_tokens": args.new_tokens,
        "device_threads": torch.get_num_threads(),
        "server_threads": args.server_threads or "torch default",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    out = {"meta": meta, "results": results}
    print("\n" + json.dumps(out))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
