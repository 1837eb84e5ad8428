"""The body on shares across processes: two `lambdasplit serve --share` servers and this process as the device.

    PYTHONPATH=src python benchmarks/mpc_network.py [--link loopback|1000/1000/1|60/100/30]
        [--apart server0|device] [--new-tokens 8] [--threads 1] [--json out.json]

Per decode step (after a chat prompt's prefill): seconds, bytes device <-> each server (shares up, output
shares down, the dealer's pools, requests and corrections with server 1), bytes and rounds server <-> server (as
the servers report them in each OUTPUT). ``--link UP/DOWN/RTT`` makes an emulated link with the packet delay
line (``bench.links``) and ``--apart`` says what is behind it: ``server0`` (share server 0 alone: the peer link
crosses it, the device sits with server 1) or ``device`` (both servers together on the far side, their peer link
on their own loopback: a device far from the cloud). Needs root for the namespaces; loopback needs nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from lambdasplit.bench.links import open_link, parse_link
from lambdasplit.generation import stream
from lambdasplit.mpc.device import SecretSharedLink
from lambdasplit.server.process import body_server_process
from lambdasplit.split import load_split
from lambdasplit.tls import TlsTrust

PROMPT = "Explain in two sentences why the sky is blue."


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link", default="loopback")
    parser.add_argument("--apart", choices=("server0", "device"), default="server0")
    parser.add_argument("--layers", default="2:28")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per share server")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    link_spec = parse_link(args.link)
    split = load_split("smollm2-135m-instruct", args.layers, parts=("head", "tail"), quiet=True)
    common = ["--layers", args.layers, "--threads", str(args.threads)]
    with ExitStack() as stack:
        ends = stack.enter_context(open_link(link_spec))
        far, wrap = ends.cloud_host, ends.cloud_command if link_spec.emulated else None
        if args.apart == "server0":  # server 0 behind the link, server 1 here with the device
            peer = f"{far}:{free_port() if far == '127.0.0.1' else 7733}"
            hosts, wraps = (far, "127.0.0.1"), (wrap, None)
        else:  # both servers behind the link, their peer link on their loopback
            peer, hosts, wraps = "127.0.0.1:7733", (far, far), (wrap, wrap)
        url0, url1 = (
            stack.enter_context(
                body_server_process(
                    ["--share", str(i), "--peer", peer, "--host", hosts[i], "--insecure", *common],
                    timeout=300,
                    wrap=wraps[i],
                )
            ).split()[0]
            for i in (0, 1)
        )
        # --insecure: plain ws:// to server 0 across the emulated link, as the benchmark's namespaces are ours
        link = SecretSharedLink([url0, url1], timeout=120, trust=TlsTrust(insecure=link_spec.emulated))
        stack.callback(link.close)
        run = stream(split, PROMPT, chat=True, link=link, max_new_tokens=args.new_tokens)
        marks: list[tuple[float, int, int, int, list[int], list[int], int]] = []
        for _ in run:
            marks.append(
                (time.perf_counter(), link.traffic.up_bytes, link.traffic.down_bytes, link.dealt,
                 list(link.peer_rounds), list(link.peer_bytes), link.requests)
            )  # fmt: skip
        result = run.result
    assert result is not None
    steps = len(marks) - 1
    first, last = marks[0], marks[-1]
    per = {
        "seconds": (last[0] - first[0]) / steps,
        "device_up_bytes": (last[1] - first[1]) / steps,
        "device_down_bytes": (last[2] - first[2]) / steps,
        "dealt_bytes": (last[3] - first[3]) / steps,
        "peer_rounds": (last[4][0] - first[4][0]) / steps,
        "peer_bytes_each_way": (last[5][0] - first[5][0]) / steps,
        "dealer_requests": (last[6] - first[6]) / steps,
    }
    out = {
        "link": link_spec.description or link_spec.name,
        "apart": args.apart if link_spec.emulated else None,
        "layers": args.layers,
        "threads_per_server": args.threads,
        "prompt_tokens": result.prompt_tokens,
        "prefill_seconds": result.prefill_seconds,
        "decode_steps": steps,
        "text": result.text,
        "per_token": per,
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
