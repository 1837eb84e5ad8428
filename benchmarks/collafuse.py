"""CollaFuse's measurements on this machine: KID per client against the cut ratio c, disclosure, compute, bytes.

    PYTHONPATH=src python benchmarks/collafuse.py [--cut-ratios 0,0.2,0.4,0.6,0.8,1] [--rounds 1200]
        [--clients 3] [--images 256] [--batch 32] [--eval-images 200] [--steps 50] [--unconditional]
        [--out artifacts/collafuse] [--json F] [--markdown F] [--plot docs/collafuse-kid.png]

For each c, a fresh deployment is trained from scratch over loopback with the real commands' code: a
`CollaFuseServer` in this process behind a counting relay (bytes at the socket), and ``--clients`` processes of
``lambdasplit collafuse client``, each holding its own non-IID part of the coloured shapes (``--images`` images).
Then, per client (``collafuse.evaluate``): KID of ``--eval-images`` images generated collaboratively (DDPM,
``--steps`` steps, the server's U-Net for t > t_c, the client's below) against held-out images of its own
distribution; caption adherence; the paper's disclosure (the server's images at t_c against the client's private
images: KID and pixel MSE); the client's CPU seconds per image and per training round; and the server reading
x_0 back from the last round's training rows. KID is in the features of a shapes classifier trained here first
(``collafuse.metrics``). c = 0 is each client alone, c = 1 the server alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from lambdasplit.bench.relay import CountingRelay
from lambdasplit.collafuse.evaluate import evaluate_client
from lambdasplit.collafuse.messages import Batch
from lambdasplit.collafuse.metrics import cached_features
from lambdasplit.collafuse.model import PublicParts, handoff_timestep
from lambdasplit.collafuse.server import CollaFuseServer, RoundLog, ServerSettings
from lambdasplit.lifetime import child_environment


def train(c: float, args: argparse.Namespace, parts: PublicParts, folder: Path) -> dict[str, Any]:
    """One deployment at cut ratio ``c``: the server here, the clients as `lambdasplit collafuse client`.

    With ``--reuse``, a deployment this script finished before in ``folder`` is loaded instead of trained again.
    """
    summary = folder / "training.json"
    if args.reuse and summary.is_file():
        run = json.loads(summary.read_text())
        if run["rounds"] == args.rounds:
            run["server_unet"] = UNet2DConditionModel.from_pretrained(folder / "server" / "unet")
            run["traffic"] = {
                name: [
                    Batch(args.rounds - 1, **load_file(path))
                    for path in sorted(folder.glob(f"last-{name}.safetensors"))
                ]
                for name in (f"client-{k}" for k in range(args.clients))
            }
            print(f"  c={c}: reusing the deployment trained in {folder}", flush=True)
            return run
    last: dict[str, list[Batch]] = {}

    def keep(name: str, batch: Batch) -> None:  # the last round's rows of each client, for the inversion
        if batch.round == args.rounds - 1:
            last.setdefault(name, []).append(batch)

    settings = ServerSettings(clients=args.clients, cut_ratio=c, rounds=args.rounds, batch=args.batch, seed=args.seed)
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with (
        CollaFuseServer(parts, settings, out=folder / "server", tap=keep) as server,
        CountingRelay(server.address) as relay,
    ):
        procs = []
        for k in range(args.clients):
            command = [
                sys.executable, "-c", "from lambdasplit.cli import main; main()", "collafuse", "client",
                "--server", relay.url(), "--client", str(k), "--clients", str(args.clients),
                "--images", str(args.images), "--out", str(folder / f"client-{k}"),
                "--report", str(folder / f"client-{k}.json"), "--seed", str(args.seed), "--no-progress",
                "--checkpoint-every", "0", *(["--unconditional"] if args.unconditional else []),
            ]  # fmt: skip
            log = (folder / f"client-{k}.log").open("w")
            env = child_environment({**os.environ, "OMP_NUM_THREADS": str(args.client_threads)})
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))

        def show(log: RoundLog) -> None:
            if (log.round + 1) % max(1, args.rounds // 10) == 0 or log.round + 1 == args.rounds:
                loss = "-" if log.loss is None else f"{log.loss:.4f}"
                elapsed = time.perf_counter() - started
                print(f"  c={c}: round {log.round + 1}/{args.rounds}, loss {loss}, {elapsed:.0f} s", flush=True)

        report = server.train(show)
        for k, proc in enumerate(procs):
            if proc.wait(timeout=300) != 0:
                raise SystemExit(f"client {k} exited with {proc.returncode}: see {folder / f'client-{k}.log'}")
        seconds = time.perf_counter() - started
        up, down = relay.up, relay.down
        server_unet = server.learner.unet
    clients = [json.loads((folder / f"client-{k}.json").read_text()) for k in range(args.clients)]
    for name, batches in last.items():  # what --reuse reads back
        tensors = {k: torch.cat([getattr(b, k) for b in batches]) for k in ("x_t", "noise", "t", "context")}
        save_file(tensors, str(folder / f"last-{name}.safetensors"))
    run = {
        "rounds": args.rounds,
        "seconds": seconds,
        "bytes_up_per_round": up / args.rounds,
        "bytes_down_per_round": down / args.rounds,
        "server_rows": sum(r.rows for r in report.rounds),
        "server_cpu_seconds_per_round": report.cpu_seconds / args.rounds,
        "dropped": report.dropped,
        "min_server_t": min(report.timesteps, default=None),
        "clients": clients,
    }
    summary.write_text(json.dumps(run, indent=1))
    return {**run, "server_unet": server_unet, "traffic": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cut-ratios", default="0,0.2,0.4,0.6,0.8,1")
    parser.add_argument("--rounds", type=int, default=1200)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="private images per client")
    parser.add_argument("--batch", type=int, default=32, help="images each client noises per round")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50, help="DDPM sampling steps")
    parser.add_argument("--feature-steps", type=int, default=1500, help="training steps of the KID features")
    parser.add_argument("--unconditional", action="store_true")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads of each client process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="evaluate deployments trained before in --out again")
    parser.add_argument("--out", type=Path, default=Path("artifacts/collafuse"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    cut_ratios = [float(c) for c in args.cut_ratios.split(",")]
    for c in cut_ratios:
        handoff_timestep(c)
    started = time.perf_counter()
    features = cached_features(args.feature_steps, folder=args.out / "features")
    print(f"KID features: attribute accuracy {features.accuracy}", flush=True)
    parts = PublicParts.load()
    results: list[dict[str, Any]] = []
    for c in cut_ratios:
        folder = args.out / f"c{c:g}"
        run = train(c, args, parts, folder)
        figures = []
        for k in range(args.clients):
            client = UNet2DConditionModel.from_pretrained(folder / f"client-{k}" / "unet")
            fig = evaluate_client(
                parts, features.model, run["server_unet"], client, index=k, clients=args.clients, cut_ratio=c,
                private_images=args.images, data_seed=1, count=args.eval_images, steps=args.steps,
                conditional=not args.unconditional, traffic=run["traffic"].get(f"client-{k}", []),
            )  # fmt: skip
            figures.append({**asdict(fig), **{f"train_{key}": v for key, v in run["clients"][k].items()}})
            print(f"  c={c} client {k}: {fig}", flush=True)
        run.pop("server_unet"), run.pop("traffic")
        results.append({"cut_ratio": c, "handoff": handoff_timestep(c), **run, "per_client": figures})
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(_summary(args, features.accuracy, results, started), indent=1))
    summary = _summary(args, features.accuracy, results, started)
    table = markdown(summary)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.plot:
        plot(summary, args.plot)


def _summary(
    args: argparse.Namespace, accuracy: dict[str, float], results: list[dict[str, Any]], started: float
) -> dict[str, Any]:
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "feature_accuracy": accuracy,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - started,
        "results": results,
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return sum(values) / len(values) if values else None


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| c | t_c | KID per client | KID mean | adherence | disclosure KID | disclosure MSE | x_0 read back, MSE "
        "| client CPU s / image | client CPU s / round | bytes up / round | train wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        rows = r["per_client"]
        kids = " / ".join(f"{_f(x['kid'])}±{_f(x.get('kid_std'))}" for x in rows)
        lines.append(
            f"| {r['cut_ratio']:g} | {r['handoff']} | {kids} | {_f(_mean(rows, 'kid'))} | "
            f"{_f(_mean(rows, 'adherence'), 2)} | {_f(_mean(rows, 'disclosure_kid'))} | "
            f"{_f(_mean(rows, 'disclosure_mse'), 4)} | {_f(_mean(rows, 'inverted_mse'), 4)} | "
            f"{_f(_mean(rows, 'client_cpu_seconds_per_image'), 3)} | "
            f"{_f(_mean(rows, 'train_cpu_seconds_per_step'), 3)} | {r['bytes_up_per_round']:,.0f} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    cs = [r["cut_ratio"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    clients = len(results[0]["per_client"])
    for k in range(clients):
        kids = [r["per_client"][k]["kid"] for r in results]
        errors = [r["per_client"][k].get("kid_std", 0.0) for r in results]
        left.errorbar(cs, kids, yerr=errors, marker="o", capsize=3, label=f"client {k}")
    left.set(xlabel="cut ratio c (server's share of the steps)", ylabel="KID (lower is better)", title="Quality")
    left.legend()
    right.plot(cs, [_mean(r["per_client"], "disclosure_kid") for r in results], marker="o", label="KID at t_c")
    ax2 = right.twinx()
    ax2.plot(cs, [_mean(r["per_client"], "disclosure_mse") for r in results], marker="s", color="C3", label="MSE")
    right.set(xlabel="cut ratio c", ylabel="server's images at t_c: KID", title="Disclosure (lower: more disclosed)")
    ax2.set_ylabel("nearest-image pixel MSE", color="C3")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
