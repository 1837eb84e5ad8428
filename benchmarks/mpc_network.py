"""The body on shares across processes: two `lambdasplit serve --share` servers and this process as the device.

    PYTHONPATH=src python benchmarks/mpc_network.py [--server-link loopback|1000/1000/1] [--new-tokens 8]
        [--threads 1] [--json out.json]

Per decode step (after a chat prompt's prefill): seconds, bytes device <-> each server (shares up, output
shares down, the dealer's requests and corrections with server 1), bytes and rounds server <-> server (as the
servers report them in each OUTPUT). ``--server-link UP/DOWN/RTT`` puts share server 0 in its own network
namespace behind the packet delay line (``bench.links``), so the peer link (and the device's link to server 0,
two messages per step) crosses an emulated link; the device and server 1 share this namespace, so the dealer's
requests stay local. Needs root for the namespaces; loopback needs nothing.
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
    parser.add_argument("--server-link", default="loopback")
    parser.add_argument("--layers", default="2:28")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per share server")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    link_spec = parse_link(args.server_link)
    split = load_split("smollm2-135m-instruct", args.layers, parts=("head", "tail"), quiet=True)
    common = ["--layers", args.layers, "--threads", str(args.threads)]
    with ExitStack() as stack:
        ends = stack.enter_context(open_link(link_spec))
        peer_host = ends.cloud_host
        peer = f"{peer_host}:{free_port() if peer_host == '127.0.0.1' else 7733}"
        wrap = ends.cloud_command if link_spec.emulated else None
        url0 = stack.enter_context(
            body_server_process(
                ["--share", "0", "--peer", peer, "--host", peer_host, "--insecure", *common], timeout=300, wrap=wrap
            )
        ).split()[0]
        url1 = stack.enter_context(body_server_process(["--share", "1", "--peer", peer, *common], timeout=300))
        # --insecure: plain ws:// to server 0 across the emulated link, as the benchmark's namespaces are ours
        link = SecretSharedLink([url0, url1], timeout=120, trust=TlsTrust(insecure=link_spec.emulated))
        stack.callback(link.close)
        run = stream(split, PROMPT, chat=True, link=link, max_new_tokens=args.new_tokens)
        marks: list[tuple[float, int, int, int, list[int], list[int]]] = []
        for _ in run:
            marks.append(
                (time.perf_counter(), link.traffic.up_bytes, link.traffic.down_bytes, link.dealt,
                 list(link.peer_rounds), list(link.peer_bytes))
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
    }
    out = {
        "server_link": link_spec.description or link_spec.name,
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
