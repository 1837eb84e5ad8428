"""PrivateLoRA personalisation on SmolLM2: fine-tune on invented private facts across the split, measure recall.

    PYTHONPATH=src nice -n 10 python benchmarks/privatelora_facts.py [--people 12] [--relations 4] [--rank 32]
        [--epochs 12] [--lr 1e-2] [--lora-lr 3e-3] [--seq-len 64] [--save M.safetensors] [--json out.json]

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from lambdasplit.models import DEFAULT_MODEL
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


def train(name: str, steps: list[int], step: Callable[[int], float]) -> dict[str, Any]:
    """Run ``step(block index) -> loss`` over ``steps`` with a progress bar: losses, step times, wall time."""
    losses, seconds = [], []
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(name, total=len(steps))
        for i in steps:
            s = time.perf_counter()
            losses.append(step(i))
            seconds.append(time.perf_counter() - s)
            bar.update(task, advance=1, description=f"{name} loss {losses[-1]:.3f}")
    return {"losses": losses, "seconds": seconds, "train_seconds": time.perf_counter() - t0}


def summary(run: dict[str, Any], exact: int, token_accuracy: float, blocks: int) -> dict[str, Any]:
    return {
        "exact": exact,
        "token_accuracy": token_accuracy,
        "first_epoch_loss": statistics.mean(run["losses"][:blocks]),
        "last_epoch_loss": statistics.mean(run["losses"][-blocks:]),
        "train_seconds": run["train_seconds"],
        "step_seconds_median": statistics.median(run["seconds"]),
    }


def order(n: int, epochs: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [i for _ in range(epochs) for i in torch.randperm(n, generator=generator).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=12)
    parser.add_argument("--relations", type=int, default=4)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model name or checkpoint folder (tests: a tiny one)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2, help="PrivateLoRA's learning rate (M)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's learning rate (A and B)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, help="write the trained PrivateLoRA adapters here (.safetensors)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    facts = make_facts(args.people, args.relations, seed=args.seed)
    device = load_split(args.model, "0:", parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(args.model, "0:", parts=("body",), device="cpu", dtype="float32", quiet=True)
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
        run = train("PrivateLoRA (split)", steps, lambda i: trainer.step(blocks[i]).loss)

        def split_logits(ids: torch.Tensor) -> torch.Tensor:
            assert device.head is not None and device.tail is not None
            out = link.forward(device.head(ids), 0, reset=True)
            return device.tail(out, None, logits_to_keep=0)

        private = recall(split_logits, tokenizer, facts)
        traffic = link.traffic
        result["privatelora"] = summary(run, private.exact, private.token_accuracy, len(blocks))
        result["privatelora"].update(exchanges=link.exchanges, bytes_up=traffic.up_bytes, bytes_down=traffic.down_bytes)
        console.print(
            f"PrivateLoRA: {private.exact}/{private.facts} recalled, token accuracy {private.token_accuracy:.3f}, "
            f"{run['train_seconds']:.0f} s training, median step {statistics.median(run['seconds']):.2f} s"
        )
        trained = {k: v.detach().clone() for k, v in adapters.state_dict().items()}
        if args.save:
            adapters.save(args.save)

    # the same PrivateLoRA computation in one process: a step's time without the network
    body_split = load_split(args.model, "0:", parts=("body",), device="cpu", dtype="float32", quiet=True)
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
    trainable = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lora_lr, weight_decay=0)

    def lora_step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss(lora(blocks[i]).logits, blocks[i])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return float(loss.detach())

    lora_run = train("LoRA (local)", steps, lora_step)
    lora.eval()
    with torch.no_grad():
        lora_recall = recall(lambda ids: lora(ids).logits, tokenizer, facts)
    result["lora"] = summary(lora_run, lora_recall.exact, lora_recall.token_accuracy, len(blocks))
    result["lora"]["trainable_parameters"] = sum(p.numel() for p in trainable)
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
