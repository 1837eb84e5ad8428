"""Train the draft head shipped for the embedded SmolLM2-135M-Instruct (``--speculative head``), and record figures.

    pip download --no-deps --no-binary :all: alpaca-eval==0.6.6 -d /tmp/ae
    tar xzf /tmp/ae/alpaca_eval-0.6.6.tar.gz -C /tmp/ae
    python benchmarks/train_draft_head.py --prompts /tmp/ae/alpaca_eval-0.6.6/example/outputs.json

Prompts: AlpacaEval's 805 instructions (the ``instruction`` field only; the dataset mixes Self-Instruct, OASST,
Koala, Vicuna and Anthropic helpful-base prompts), and with ``--synthetic N`` N user messages the model writes
itself (Magpie), and with ``--steered N`` / ``--steered-2 N`` long-form requests it writes after an opening
(``OPENINGS``, ``OPENINGS_2``), with ``--steered-3 N`` questions of knowledge (``OPENINGS_3``: science, history,
economics, teaching); the answers and hidden states are the model's own (greedy, through its chat
template; training answers from a bfloat16 copy of the model, about twice as fast on a CPU with bf16 instructions).
A fixed 5% of the file's prompts is held out, answered by the float32 model, and scored as greedy drafting would be;
the head this run replaces is scored on the same answers. The answers are cached (``--answers``), so a second run
trains without regenerating them. With ``--head-layers N`` (default 2: the library's default split) the head also
reads what the model's first N layers make of each token, as a split device's head computes them; they are
recomputed from the cached answers each run (about 2 minutes for 5,400 answers).

``--init HEAD`` continues training from a head (its weights and draft vocabulary) instead of starting afresh, and
``--train-parts`` trains on some parts only (the others are neither generated nor read): together they add a part
of data to a trained head in minutes, e.g. ``--steered-3 1200 --train-parts steered-3 --init HEAD --epochs 2
--lr 3e-4``. Held-out scores are given per position (a draft starting at every answer position) and as live steps
(each starting where the last ended, as a generation walks; ``train.live_steps``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from lambdasplit.generation.drafthead.data import add_states
from lambdasplit.generation.drafthead.model import target_matrices
from lambdasplit.generation.drafthead.train import (
    accepted_length,
    by_answer,
    live_steps,
    tree_size,
    truth_ranks,
)
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.models.unsplit import load_unsplit
from lambdasplit.split import load_split

#: ``--steered``: openings of the user messages the model writes (the rest is its own), for long-form requests of
#: the kinds chat users make: writing, role play, explanations (STEM), discussion (humanities). None is a benchmark
#: prompt; the benchmark's prompts (``BENCH_PROMPTS``) are also excluded from all synthetic prompts.
OPENINGS = (
    "Write a blog post",
    "Write a short story",
    "Write a poem",
    "Write an essay",
    "Write a letter",
    "Draft an email",
    "Write a speech",
    "Compose a",
    "Describe",
    "Imagine you are",
    "Pretend to be",
    "Act as",
    "You are",
    "Explain",
    "How does",
    "What is the difference between",
    "Why do",
    "Discuss",
    "Analyze",
    "Compare",
    "What were the causes of",
    "Summarize",
)
#: ``--steered-2``: other phrasings of the same four kinds, for a second steered part (its own cache file, so adding
#: it answers only its prompts). None copies a benchmark prompt's opening.
OPENINGS_2 = (
    "Write a product review",
    "Write a travel guide",
    "Write a dialogue between",
    "Write a cover letter",
    "Write a news article",
    "Write a biography of",
    "Tell me a story about",
    "Tell me about",
    "Play the role of",
    "Take on the persona of",
    "Respond as if you were",
    "Let's role-play:",
    "How would you",
    "Give me advice on",
    "What are the pros and cons of",
    "Describe how",
    "Walk me through",
    "What are the main",
    "Evaluate",
    "Give an overview of",
    "What can we learn from",
    "Outline a plan",
)
#: ``--steered-3``: questions of knowledge, for the benchmark's STEM and humanities prompts, where the shipped head
#: keeps fewer tokens a step than on role play (docs/benchmarks.md). None copies a benchmark prompt's opening; none
#: of the messages written after them shares a run of 6 words with a benchmark prompt (checked on 1,200 of them).
OPENINGS_3 = (
    "Explain the concept of",
    "What is the role of",
    "Describe the process of",
    "How do scientists",
    "What happens when",
    "Outline the main stages of",
    "What are the key principles of",
    "Give a detailed explanation of",
    "What is the significance of",
    "How has",
    "In physics,",
    "In biology,",
    "In chemistry,",
    "In economics,",
    "In psychology,",
    "In philosophy,",
    "In history,",
    "Write a lesson plan",
    "Suggest ways to",
    "What are the implications of",
    "Describe the structure of",
    "How can teachers",
)
#: The steered parts, each with ``--NAME N``: (name, its openings' name, the openings, what they ask for). Their
#: seeds are 1, 2, 3 in turn.
STEERED = (
    ("steered", "OPENINGS", OPENINGS, "long-form requests"),
    ("steered-2", "OPENINGS_2", OPENINGS_2, "other phrasings"),
    ("steered-3", "OPENINGS_3", OPENINGS_3, "questions of knowledge"),
)
BENCH_PROMPTS = Path(__file__).with_name("prompts") / "mt-bench-open.jsonl"

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
        live = [n for one in by_answer(heldout, lengths) for n in live_steps(one)]
        out[name] = {
            "tokens_per_step": round(1 + sum(lengths) / len(lengths), 3),
            "tokens_per_live_step": round(1 + sum(live) / len(live), 3),
            "drafted": tree_size(shape),
        }
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
    for name, listed, _, what in STEERED:
        ap.add_argument(
            f"--{name}",
            type=int,
            default=0,
            help=f"also train on N prompts the model writes after an opening of {listed} ({what})",
        )
    ap.add_argument(
        "--train-parts",
        default=None,
        help="train on these parts only, comma-separated (file, synthetic, steered, steered-2, steered-3)",
    )
    ap.add_argument("--init", default=None, help="continue training from this head's weights and draft vocabulary")
    ap.add_argument("--answers", default="artifacts/draft-head/answers", help="folder caching the generated answers")
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

    cache = Path(args.answers)
    if cache.suffix == ".pt":  # the single-file cache of earlier versions of this script
        sys.exit(f"--answers is now a folder (one file per part of the data): {cache} is a file")
    part_started = time.perf_counter()
    generators: dict[str, torch.nn.Module] = {"float32": model}

    def generator() -> torch.nn.Module:
        if args.generation_dtype not in generators:
            generators[args.generation_dtype] = load_unsplit(path, Runtime.resolve("cpu", args.generation_dtype))
        return generators[args.generation_dtype]

    def shown(done: int, total: int, tokens: int) -> None:
        rate = tokens / max(1e-9, time.perf_counter() - part_started)
        print(f"answered {done}/{total} prompts, {tokens} tokens, {rate:.0f} tokens/s since the part began", flush=True)

    def answers_to(texts: list[str], by: torch.nn.Module) -> list[Answer]:
        return answer_prompts(
            by,
            chat_prompts(tokenizer, texts),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch,
            pad_token_id=tokenizer.pad_token_id,
            progress=shown,
        )

    # Each part of the data is cached on its own (``--answers`` folder), with the settings that made it: adding a
    # part (e.g. ``--steered``) answers only its prompts. Held-out answers come from the float32 model, as a device
    # decodes; training answers from ``--generation-dtype``.
    common = {"prompts": prompts, "max_new_tokens": args.max_new_tokens}
    dtype = {"generation_dtype": args.generation_dtype}
    parts: dict[str, tuple[dict[str, object], Callable[[], tuple[list[str], list[Answer]]]]] = {
        "heldout": (common, lambda: (prompts[:held], answers_to(prompts[:held], model))),
        "file": (common | dtype, lambda: (prompts[held:], answers_to(prompts[held:], generator()))),
    }
    made: dict[str, list[str]] = {}

    def synthetic_part(count: int, seed: int, openings: tuple[str, ...] = ()) -> Callable[[], Any]:
        def make() -> tuple[list[str], list[Answer]]:
            # Distinct from every prompt so far: the file's, the parts made before this one, the benchmark's.
            exclude = prompts + [t for texts in made.values() for t in texts] + bench
            texts = synthetic_prompts(
                generator(),
                tokenizer,
                count,
                batch_size=args.batch,
                seed=seed,
                exclude=exclude,
                openings=openings,
                progress=lambda kept, total: print(f"wrote {kept}/{total} synthetic prompts", flush=True),
            )
            return texts, answers_to(texts, generator())

        return make

    bench = [json.loads(line)["prompt"] for line in BENCH_PROMPTS.read_text().splitlines() if line.strip()]
    if args.synthetic:
        settings = common | dtype | {"count": args.synthetic}
        parts["synthetic"] = (settings, synthetic_part(args.synthetic, 0))
    before = ("synthetic", args.synthetic)  # each steered part's cache records the count of the part made before it
    for seed, (name, _, openings, _) in enumerate(STEERED, start=1):
        if count := int(getattr(args, name.replace("-", "_"))):
            after = {f"after_{before[0].replace('-', '_')}": before[1]}
            parts[name] = (
                common | dtype | {"count": count, "openings": openings} | after,
                synthetic_part(count, seed, openings),
            )
        before = (name, count)
    if args.train_parts is not None:
        wanted = [p.strip() for p in args.train_parts.split(",") if p.strip()]
        if unknown := [p for p in wanted if p not in parts or p == "heldout"]:
            sys.exit(f"--train-parts: no part {', '.join(unknown)} (this run's: {', '.join(list(parts)[1:])})")
        parts = {name: part for name, part in parts.items() if name == "heldout" or name in wanted}
    data: dict[str, list[Answer]] = {}
    gen_seconds = 0.0
    for name, (settings, make) in parts.items():
        file = cache / f"{name}.pt"
        saved = torch.load(file) if file.is_file() else None
        if saved is not None and saved["settings"] != settings:
            sys.exit(f"{file} was made with other prompts or settings: delete it or pass another --answers")
        if saved is None:
            print(f"generating the {name} part", flush=True)
            part_started = time.perf_counter()
            texts, answers = make()
            rows = [(a.start, a.features, a.tokens) for a in answers]
            saved = {
                "settings": settings,
                "seconds": time.perf_counter() - part_started,
                "prompts": texts,
                "rows": rows,
            }
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(saved, file)
        made[name] = saved["prompts"]
        data[name] = [Answer(*row) for row in saved["rows"]]
        gen_seconds += saved["seconds"]
        tokens = sum(len(a.tokens) for a in data[name])
        print(f"{name}: {len(data[name])} answers, {tokens} tokens (generated in {saved['seconds']:.0f} s)", flush=True)
    generators.clear()
    if recipe.head_layers:  # what the device's head (the first N layers) makes of every answer token
        points = (recipe.head_layers, int(model.config.num_hidden_layers))
        first = load_split(path, points, parts=("head",), dtype="float32", quiet=True).head
        assert first is not None
        started = time.perf_counter()
        for name, answers_of in data.items():

            def states_shown(done: int, total: int, name: str = name) -> None:
                print(f"{name}: states of {done}/{total} answers", flush=True)

            add_states(first, chat_prompts(tokenizer, made[name]), answers_of, progress=states_shown)
        seconds = time.perf_counter() - started
        print(f"states of the first {recipe.head_layers} layers added in {seconds:.0f} s", flush=True)
    heldout = data.pop("heldout")
    train = [a for answers in data.values() for a in answers]
    answers = heldout + train
    if args.train_limit is not None:  # a random subset of the training answers (quick recipe comparisons)
        train = random.Random(1).sample(train, min(args.train_limit, len(train)))

    embed, _ = target_matrices(model)
    eos = sorted(int(t) for t in tokenizer.all_special_ids)
    report = lambda s: print(f"epoch {s}", flush=True)  # noqa: E731
    init = None
    if args.init is not None:
        init, _ = DraftHead.load(args.init, model.config, *(w.detach().float() for w in target_matrices(model)))
    head, log = train_head(model, train, recipe, always=eos, heldout=heldout, progress=report, init=init)
    scores = scored(head, heldout)
    if init is not None:  # where training started, on the same held-out answers
        scores["initial_head"] = scored(init, heldout)
    if Path(args.out).is_file():  # the head this run replaces, scored on the same held-out answers
        try:
            replaced, _ = DraftHead.load(args.out, model.config, *(w.detach().float() for w in target_matrices(model)))
            scores["replaced_head"] = scored(replaced, heldout)
        except ConfigError as exc:  # another model's head or layout: say so, go on
            print(f"the head at {args.out} was not scored: {exc}", flush=True)
    print(f"held-out greedy drafting ({len(heldout)} answers): {json.dumps(scores)}", flush=True)
    steered_record: dict[str, object] = {}
    for name, _, openings, _ in STEERED:
        suffix = name.removeprefix("steered").replace("-", "_")
        steered_record[f"steered{suffix}"] = len(data.get(name, []))
        steered_record[f"openings{suffix}"] = list(openings) if name in data else []
    record = {
        "model": args.model,
        "prompts": {
            "file": Path(args.prompts).name,
            "train": len(data.get("file", [])),
            "synthetic": len(data.get("synthetic", [])),
            **steered_record,
            "trained_parts": list(data),
            "heldout": len(heldout),
        },
        "continued_from": Path(args.init).name if args.init else None,
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
    info = HeadInfo(
        args.model, int(embed.shape[0]), int(embed.shape[1]), head._fingerprint, record, head_layers=head.head_layers
    )
    size = head.save(args.out, info)
    record["file_bytes"] = size
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) and {args.log}", flush=True)


if __name__ == "__main__":
    main()
