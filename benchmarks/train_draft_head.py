"""Train the draft head shipped for the embedded SmolLM2-135M-Instruct (``--speculative head``), and record figures.

    pip download --no-deps --no-binary :all: alpaca-eval==0.6.6 -d /tmp/ae
    tar xzf /tmp/ae/alpaca_eval-0.6.6.tar.gz -C /tmp/ae
    python benchmarks/train_draft_head.py --prompts /tmp/ae/alpaca_eval-0.6.6/example/outputs.json

Prompts: AlpacaEval's 805 instructions (the ``instruction`` field only; the dataset mixes Self-Instruct, OASST,
Koala, Vicuna and Anthropic helpful-base prompts), and with ``--synthetic N`` N user messages the model writes
itself (Magpie); the answers and hidden states are the model's own (greedy, through its chat template; training
answers from a bfloat16 copy of the model, about twice as fast on a CPU with bf16 instructions). A fixed 5% of the
file's prompts is held out, answered by the float32 model, and scored as greedy drafting would be; the head this
run replaces is scored on the same answers. The answers are cached (``--answers``), so a second run trains without
regenerating them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lambdasplit.config import Runtime
from lambdasplit.errors import ConfigError
from lambdasplit.generation.drafthead import (
    HEAD_FILE,
    Answer,
    DraftHead,
    HeadInfo,
    Recipe,
    answer_prompts,
    chat_prompts,
    read_prompts,
    synthetic_prompts,
    train_head,
)
from lambdasplit.generation.drafthead.model import target_matrices
from lambdasplit.generation.drafthead.train import accepted_length, tree_size, truth_ranks
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.models.unsplit import load_unsplit

#: Draft shapes scored on the held-out answers: chains of k, and token trees (branches per level).
SHAPES = {
    "chain 4": (1, 1, 1, 1),
    "chain 6": (1,) * 6,
    "chain 8": (1,) * 8,
    "tree 2-2-1-1-1-1": (2, 2, 1, 1, 1, 1),
    "tree 3-2-1-1-1-1": (3, 2, 1, 1, 1, 1),
    "tree 4-2-2-1-1-1": (4, 2, 2, 1, 1, 1),
}


def scored(head: DraftHead, heldout: list[Answer]) -> dict[str, dict[str, float]]:
    ranks = truth_ranks(head, heldout, 8)
    out = {}
    for name, shape in SHAPES.items():
        lengths = [accepted_length(r, shape) for r in ranks]
        out[name] = {"tokens_per_step": round(1 + sum(lengths) / len(lengths), 3), "drafted": tree_size(shape)}
    out["first_token_acceptance"] = {"rate": round(sum(1 for r in ranks if r and r[0] == 0) / len(ranks), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="training prompts (JSON, JSON lines or text)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="use the first N prompts (after shuffling)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=64, help="prompts answered (or written) at once")
    ap.add_argument("--train-limit", type=int, default=None, help="train on N of the answers, chosen at random")
    ap.add_argument("--synthetic", type=int, default=0, help="also train on N prompts the model writes itself")
    ap.add_argument(
        "--generation-dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="the model's dtype for the training answers (held-out answers always come from float32)",
    )
    ap.add_argument("--answers", default="artifacts/draft-head/answers.pt", help="cache of the generated answers")
    ap.add_argument("--out", default=str(HEAD_FILE), help="where the weights go")
    ap.add_argument("--log", default="artifacts/draft-head/training.json")
    ap.add_argument("--threads", type=int, default=None)
    for name, value in vars(Recipe()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # --unroll / --no-unroll (type=bool would read "False" as true)
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(**{k: getattr(args, k) for k in vars(Recipe())})

    path = resolve_checkpoint(args.model, quiet=True)
    model = load_unsplit(path, Runtime.resolve("cpu", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = read_prompts(args.prompts)
    random.Random(0).shuffle(prompts)
    prompts = prompts[: args.limit]
    held = max(1, len(prompts) // 20)
    settings = {
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "synthetic": args.synthetic,
        "generation_dtype": args.generation_dtype,
    }

    cache = Path(args.answers)
    started = time.perf_counter()
    if cache.is_file():
        saved = torch.load(cache)
        if saved["settings"] != settings:
            sys.exit(f"{cache} was made with other prompts or settings: delete it or pass another --answers")
        heldout, train = ([Answer(*row) for row in saved[part]] for part in ("heldout", "train"))
        synthetic, gen_seconds = saved["synthetic_prompts"], saved["seconds"]
        print(f"{len(heldout) + len(train)} answers from {cache} (generated in {gen_seconds:.0f} s)", flush=True)
    else:
        tokens_before = 0

        def shown(done: int, total: int, tokens: int) -> None:
            rate = (tokens_before + tokens) / (time.perf_counter() - started)
            print(f"answered {done}/{total} prompts, {tokens} tokens, {rate:.0f} tokens/s overall", flush=True)

        def answers_to(texts: list[str], generator: torch.nn.Module) -> list[Answer]:
            return answer_prompts(
                generator,
                chat_prompts(tokenizer, texts),
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch,
                pad_token_id=tokenizer.pad_token_id,
                progress=shown,
            )

        # Held-out answers come from the float32 model, as a device decodes; training answers from a faster dtype.
        heldout = answers_to(prompts[:held], model)
        tokens_before = sum(len(a.tokens) for a in heldout)
        generator = model
        if args.generation_dtype != "float32":
            generator = load_unsplit(path, Runtime.resolve("cpu", args.generation_dtype))
        synthetic = synthetic_prompts(
            generator,
            tokenizer,
            args.synthetic,
            batch_size=args.batch,
            exclude=prompts,
            progress=lambda kept, total: print(f"wrote {kept}/{total} synthetic prompts", flush=True),
        )
        train = answers_to(prompts[held:] + synthetic, generator)
        del generator
        gen_seconds = time.perf_counter() - started
        cache.parent.mkdir(parents=True, exist_ok=True)
        rows = {
            part: [(a.start, a.features, a.tokens) for a in answers]
            for part, answers in (("heldout", heldout), ("train", train))
        }
        torch.save({"settings": settings, "seconds": gen_seconds, "synthetic_prompts": synthetic, **rows}, cache)
    answers = heldout + train
    if args.train_limit is not None:  # a random subset of the training answers (quick recipe comparisons)
        train = random.Random(1).sample(train, min(args.train_limit, len(train)))

    embed, _ = target_matrices(model)
    eos = sorted(int(t) for t in tokenizer.all_special_ids)
    report = lambda s: print(f"epoch {s}", flush=True)  # noqa: E731
    head, log = train_head(model, train, recipe, always=eos, heldout=heldout, progress=report)
    scores = scored(head, heldout)
    if Path(args.out).is_file():  # the head this run replaces, scored on the same held-out answers
        try:
            replaced, _ = DraftHead.load(args.out, model.config, *(w.detach().float() for w in target_matrices(model)))
            scores["replaced_head"] = scored(replaced, heldout)
        except ConfigError as exc:  # another model's head or layout: say so, go on
            print(f"the head at {args.out} was not scored: {exc}", flush=True)
    print(f"held-out greedy drafting ({len(heldout)} answers): {json.dumps(scores)}", flush=True)
    record = {
        "model": args.model,
        "prompts": {
            "file": Path(args.prompts).name,
            "train": len(answers) - len(heldout) - len(synthetic),
            "synthetic": len(synthetic),
            "heldout": len(heldout),
        },
        "generation_dtype": args.generation_dtype,
        "answer_tokens": sum(len(a.tokens) for a in answers),
        "trained_on": {"answers": len(train), "tokens": sum(len(a.tokens) for a in train)},
        "generation_seconds": round(gen_seconds, 1),
        "training_seconds": round(log.seconds, 1),
        "recipe": vars(recipe),
        "log": log.to_dict(),
        "heldout": scores,
        "threads": torch.get_num_threads(),
    }
    info = HeadInfo(args.model, int(embed.shape[0]), int(embed.shape[1]), head._fingerprint, record)
    size = head.save(args.out, info)
    record["file_bytes"] = size
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) and {args.log}", flush=True)


if __name__ == "__main__":
    main()
