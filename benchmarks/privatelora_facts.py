"""PrivateLoRA personalisation on SmolLM2: fine-tune on invented private facts across the split, measure recall.

    PYTHONPATH=src nice -n 10 python benchmarks/privatelora_facts.py [--people 12] [--relations 4] [--rank 32]
        [--epochs 12] [--lr 3e-3] [--lora-lr 1e-3] [--seq-len 64] [--json out.json]

One seeded corpus (``privatelora.facts``: people, places, pets and numbers that do not exist) is packed into
blocks of ``--seq-len`` tokens; three models are scored on its question/answer probes by teacher-forced recall
(every answer token the argmax):

- **base**: SmolLM2 as shipped (PrivateLoRA's M = 0 is the same model);
- **PrivateLoRA**: the device's M (rank ``--rank`` on q, k, v of all 30 layers) fine-tuned across the split over
  a real loopback WebSocket: the body with frozen A and B in an ``AdapterServer`` thread, head, tail and M on
  the device side (``SplitTrainer``), every step a forward and a backward with one round trip per layer each;
- **LoRA**: peft's LoRA of the same rank on the same projections, the whole model on the device alone.

Same blocks, same seeded order, same number of steps, AdamW. Also timed: a fine-tuning step split over
loopback vs the same PrivateLoRA computation in one process (``LocalAdapterBody``) vs a LoRA step.
Prints progress, a table, and JSON with ``--json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from lambdasplit.privatelora import AdapterLayout, AdapterLink, AdapterServer, LocalAdapterBody, SplitTrainer
from lambdasplit.privatelora.cloud import CloudAdapters
from lambdasplit.privatelora.facts import make_facts, recall, training_texts
from lambdasplit.privatelora.training import next_token_loss
from lambdasplit.split import load_split

console = Console(stderr=True)


def pack(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    """The texts as one stream (EOS between them) cut into (1, seq_len) blocks; the last is filled from the start,
    so no fact is dropped."""
    assert tokenizer.eos_token_id is not None
    ids: list[int] = []
    for text in texts:
        ids += [*tokenizer(text, add_special_tokens=False).input_ids, int(tokenizer.eos_token_id)]
    ids += ids[: (-len(ids)) % seq_len]
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids), seq_len)]


def order(n: int, epochs: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [i for _ in range(epochs) for i in torch.randperm(n, generator=generator).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=12)
    parser.add_argument("--relations", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3, help="PrivateLoRA's learning rate (M)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's learning rate (A and B)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, help="write the trained PrivateLoRA adapters here (.safetensors)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    facts = make_facts(args.people, args.relations, seed=args.seed)
    device = load_split(layers="0:", parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(layers="0:", parts=("body",), device="cpu", dtype="float32", quiet=True)
    tokenizer = device.tokenizer
    assert tokenizer is not None and device.head is not None and device.tail is not None
    blocks = pack(tokenizer, training_texts(facts, seed=args.seed), args.seq_len)
    steps = order(len(blocks), args.epochs, args.seed)
    console.print(
        f"{len(facts)} facts, {len(blocks)} blocks of {args.seq_len} tokens, {len(steps)} steps per method "
        f"({args.epochs} epochs)"
    )
    layout = AdapterLayout(rank_c2d=args.rank, rank_d2c=args.rank, seed=args.seed)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result: dict[str, Any] = {"settings": settings, "facts": len(facts), "blocks": len(blocks)}

    # base
    whole = AutoModelForCausalLM.from_pretrained(device.path, dtype=torch.float32).eval()
    with torch.no_grad():
        base = recall(lambda ids: whole(ids).logits, tokenizer, facts)
    result["base"] = {"exact": base.exact, "token_accuracy": base.token_accuracy}
    console.print(f"base: {base.exact}/{base.facts} recalled, token accuracy {base.token_accuracy:.3f}")

    # PrivateLoRA across the split, over loopback
    with AdapterServer(cloud, layout, timeout=120) as server, AdapterLink(server.url, timeout=120) as link:
        adapters = link.adapters
        trainer = SplitTrainer(device, adapters, link, lr=args.lr)
        losses, seconds = [], []
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("PrivateLoRA (split)", total=len(steps))
            for i in steps:
                report = trainer.step(blocks[i])
                losses.append(report.loss)
                seconds.append(report.seconds)
                bar.update(task, advance=1, description=f"PrivateLoRA (split) loss {report.loss:.3f}")
        train_seconds = time.perf_counter() - t0

        def split_logits(ids: torch.Tensor) -> torch.Tensor:
            assert device.head is not None and device.tail is not None
            out = link.forward(device.head(ids), 0, reset=True)
            return device.tail(out, None, logits_to_keep=0)

        private = recall(split_logits, tokenizer, facts)
        traffic = link.traffic
        result["privatelora"] = {
            "exact": private.exact,
            "token_accuracy": private.token_accuracy,
            "first_loss": losses[0],
            "last_loss": statistics.mean(losses[-len(blocks) :]),
            "train_seconds": train_seconds,
            "step_seconds_median": statistics.median(seconds),
            "exchanges": link.exchanges,
            "bytes_up": traffic.up_bytes,
            "bytes_down": traffic.down_bytes,
        }
        console.print(
            f"PrivateLoRA: {private.exact}/{private.facts} recalled, token accuracy {private.token_accuracy:.3f}, "
            f"{train_seconds:.0f} s training, median step {statistics.median(seconds):.2f} s"
        )
        trained = {k: v.detach().clone() for k, v in adapters.state_dict().items()}
        if args.save:
            adapters.save(args.save)

    # the same PrivateLoRA computation in one process: a step's time without the network
    body_split = load_split(layers="0:", parts=("body",), device="cpu", dtype="float32", quiet=True)
    assert body_split.body is not None
    local_adapters = type(adapters)(layout, adapters.layers)
    local_adapters.load_state_dict(trained)
    local = LocalAdapterBody(CloudAdapters(body_split.body, layout), local_adapters)
    local_trainer = SplitTrainer(device, local_adapters, local, lr=args.lr)
    local_seconds = [local_trainer.step(blocks[i]).seconds for i in steps[: args.timing_steps]]
    result["privatelora_local_step_seconds_median"] = statistics.median(local_seconds)

    # LoRA (peft), the whole model on the device
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(layout.targets), lora_dropout=0.0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(device.path, dtype=torch.float32), config)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=args.lora_lr, weight_decay=0)
    lora_seconds, lora_losses = [], []
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("LoRA (local)", total=len(steps))
        for i in steps:
            s = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = next_token_loss(lora(blocks[i]).logits, blocks[i])
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in lora.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            lora_seconds.append(time.perf_counter() - s)
            lora_losses.append(float(loss.detach()))
            bar.update(task, advance=1, description=f"LoRA (local) loss {lora_losses[-1]:.3f}")
    lora_train = time.perf_counter() - t0
    lora.eval()
    with torch.no_grad():
        lora_recall = recall(lambda ids: lora(ids).logits, tokenizer, facts)
    result["lora"] = {
        "exact": lora_recall.exact,
        "token_accuracy": lora_recall.token_accuracy,
        "first_loss": lora_losses[0],
        "last_loss": statistics.mean(lora_losses[-len(blocks) :]),
        "train_seconds": lora_train,
        "step_seconds_median": statistics.median(lora_seconds),
        "trainable_parameters": sum(p.numel() for p in lora.parameters() if p.requires_grad),
    }
    result["privatelora"]["trainable_parameters"] = sum(p.numel() for p in adapters.parameters())
    result["wall_seconds"] = time.perf_counter() - start

    table = Table(title=f"Recall of {len(facts)} private facts (teacher-forced, every answer token the argmax)")
    for column in ("model", "recalled", "token accuracy", "trainable params", "median step", "training"):
        table.add_column(column, justify="right")
    table.add_row("base", f"{base.exact}/{base.facts}", f"{base.token_accuracy:.3f}", "0", "", "")
    for name, key in (("PrivateLoRA (split, loopback)", "privatelora"), ("LoRA (device only)", "lora")):
        r = result[key]
        table.add_row(
            name,
            f"{r['exact']}/{len(facts)}",
            f"{r['token_accuracy']:.3f}",
            f"{r['trainable_parameters']:,}",
            f"{r['step_seconds_median']:.2f} s",
            f"{r['train_seconds']:.0f} s",
        )
    table.add_row(
        "PrivateLoRA (one process)", "", "", "", f"{result['privatelora_local_step_seconds_median']:.2f} s", ""
    )
    Console(width=120).print(table)
    console.print(f"wall time {result['wall_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
