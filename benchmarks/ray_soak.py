"""Soak: 8 devices generating without pause through the body on Ray Serve for 30 minutes; errors and memory.

    PYTHONPATH=src python benchmarks/ray_soak.py [--minutes 30] [--clients 8] [--replicas 2] [--new-tokens 48]
        [--warm-up 3] [--sample 30] [--json artifacts/ray/soak.json]

A local Ray (--cpus logical CPUs) runs the body of SmolLM2 (2:-2) as --replicas replicas behind Serve's proxy. Each
device (a thread here; the head and tail shared) opens a session, generates --new-tokens greedily with a float32
wire, checks the tokens against the same prompt's in-process run, closes the session, and starts again; every 10th
generation it also drops its connection and opens a new one, so connections come and go as sessions do.

Every --sample seconds it records each replica's resident memory (from /proc, by the replica actors' PIDs) and
the errors so far. The verdict: errors (exceptions and wrong tokens) must be 0, and memory flat after the first
--warm-up minutes: the growth from the first post-warm-up sample to the last, per replica, and the slope of a
least-squares line through the post-warm-up samples (MiB per 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lambdasplit.client import CloudClient
from lambdasplit.generation import generate
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.split import load_split

sys.path.insert(0, str(Path(__file__).parent))  # sibling scripts
from load_test import prompt
from ray_serve import free_port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def replica_pids() -> dict[str, int]:
    """The replicas' processes, by the title Ray gives them (``ray::ServeReplica:APP:DEPLOYMENT``): the state API
    would need Ray's dashboard, which this run does not start."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ServeReplica:lambdasplit:BodyReplica"):
            found[f"pid {proc.name}"] = int(proc.name)
    return found


def slope_per_10min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--layers", default="2:-2")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--warm-up", type=float, default=3, help="minutes before memory must stay flat")
    ap.add_argument("--sample", type=float, default=30, help="seconds between memory samples")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import ray
    from ray import serve

    from lambdasplit.rayserve import ReplicaSpec, Scaling, deploy
    from lambdasplit.server import ServerSettings

    local = load_split(args.model, args.layers, quiet=True)
    device = load_split(args.model, args.layers, parts=["head", "tail"], quiet=True)
    expected = {
        i: generate(local, prompt(i), chat=True, max_new_tokens=args.new_tokens, ignore_eos=True).token_ids
        for i in range(args.clients)
    }
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    url = deploy(
        ReplicaSpec(args.model, args.layers, ServerSettings(port=free_port())),
        Scaling(replicas=args.replicas, cpus_per_replica=args.cpus / args.replicas),
    )
    stop = threading.Event()
    errors: list[str] = []
    done = [0] * args.clients

    def device_loop(i: int) -> None:
        conn: CloudClient | None = None
        while not stop.is_set():
            try:
                if conn is None or done[i] % 10 == 0:
                    if conn is not None:
                        conn.close()
                    conn = CloudClient(url, fingerprint=device.fingerprint)
                link = conn.open_session("float32")
                result = generate(device, prompt(i), chat=True, max_new_tokens=args.new_tokens, ignore_eos=True,
                                  link=link)  # fmt: skip
                link.close()
                if result.token_ids != expected[i]:
                    errors.append(f"device {i}, generation {done[i]}: tokens differ from the in-process run")
                done[i] += 1
            except Exception as exc:
                errors.append(f"device {i}: {exc!r}")
                conn = None
                time.sleep(1)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=device_loop, args=(i,), daemon=True) for i in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    samples: list[dict[str, Any]] = []
    try:
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            time.sleep(min(args.sample, args.minutes * 60 - elapsed))
            memory = {name: rss_mib(pid) for name, pid in replica_pids().items()}
            samples.append({"t": time.monotonic() - start, "rss_mib": memory, "generations": sum(done),
                            "errors": len(errors)})  # fmt: skip
            print(
                f"{samples[-1]['t'] / 60:5.1f} min: {sum(done)} generations, {len(errors)} errors, replica RSS "
                + ", ".join(f"{m:.0f}" for m in memory.values())
                + " MiB",
                flush=True,
            )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        serve.shutdown()
        ray.shutdown()
    warm = [s for s in samples if s["t"] >= args.warm_up * 60]
    report: dict[str, Any] = {"errors": errors, "generations": sum(done), "tokens": sum(done) * args.new_tokens}
    per_replica = {}
    for name in warm[0]["rss_mib"] if warm else []:
        points = [(s["t"], s["rss_mib"][name]) for s in warm if name in s["rss_mib"]]
        per_replica[name] = {
            "after_warm_up_mib": points[0][1], "end_mib": points[-1][1], "growth_mib": points[-1][1] - points[0][1],
            "slope_mib_per_10min": slope_per_10min(points),
        }  # fmt: skip
    report["memory"] = per_replica
    print(json.dumps(report | {"errors": len(errors), "first_errors": errors[:5]}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = vars(args) | {"json": str(args.json), "machine": platform.platform(), "url": url}
        args.json.write_text(json.dumps({"meta": meta, "report": report, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
