"""STIP's three attackers (issue 19), measured on a lambdasplit model in STIP's own layout (X = 0).

    PYTHONPATH=src python scripts/stip_attackers.py [--model smollm2-135m-instruct] [--json F] [--markdown F]
                                                     [--plot F] [--quick] [--seed 0]

The developer's private model is transformed with a fresh permutation key with every inner secret
(``make_key(..., inner=INNER)``, ``protect``) over all its layers (cut ``0:``: the device sends only the
permuted embedding; the wire is float16). Three attackers, each with what it holds:

- **T1**: the public weights, and the private model *is* the public model (no fine-tune). Key recovery from
  the transformed body (``weight_matching``), then the audit prompts read from the traffic decoded with the
  recovered key: A1 exact matching and A2 nearest neighbour through the public head.
- **T2**: the transformed body and the traffic, no original weights. Frequency analysis of the traffic as a
  substitution cipher (``audit.attacks.frequency``) against unigram and bigram statistics of public text in
  the public tokenizer: on the uplink (each token id's vector repeats exactly) and on the downlink (the argmax
  index of logits under a secret vocabulary permutation), against the amount of traffic intercepted. The
  public text is one half of the offline corpus (even documents), the traffic the other half (odd ones), so
  the attacker never has the traffic's text.
- **T3**: the public base of which the private model is a fine-tune (``developer.finetune``: LoRA merged, or
  full). T1's attacks against the base, per fine-tune, beside how far it moved (relative change per body
  matrix, ``finetune.json``) and its utility (held-out perplexity before and after).

Writes JSON, a markdown table and the T3 curve (PNG). ``--quick`` runs a tiny version for tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lambdasplit.audit.attacks.exact_matching import exact_matching
from lambdasplit.audit.attacks.frequency import codebook, decipher, language_statistics
from lambdasplit.audit.attacks.nearest_neighbour import nearest_neighbour
from lambdasplit.audit.attacks.permutation import decode_with, weight_matching
from lambdasplit.audit.corpus import documents
from lambdasplit.audit.prompts import DEFAULT_PROMPTS
from lambdasplit.developer import FinetuneSettings, finetune
from lambdasplit.generation.text import encode_prompt
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.privacy.keys import INNER, make_key
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.split import load_split
from lambdasplit.split.loader import SplitModel
from lambdasplit.wire.tensors import WireDtype, decode_tensor, encode_tensor

WIRE = "float16"
#: Below this share of prompt tokens an attack counts as failing (issue 19).
THRESHOLD = 0.10


@dataclass(frozen=True)
class Tune:
    """One fine-tune of the T3 grid."""

    name: str
    method: str
    rank: int
    lr: float
    steps: int


#: seq_len 64, batch 4: 4-10 s a step on one shared core for SmolLM2-135M; high learning rates push the drift.
#: (LoRA r=64 at lr 1e-2 diverged to NaN weights here, so the grid stops at 2e-3 for LoRA.)
GRID = (
    Tune("LoRA r=8, lr 2e-4, 30 steps", "lora", 8, 2e-4, 30),
    Tune("LoRA r=8, lr 2e-3, 30 steps", "lora", 8, 2e-3, 30),
    Tune("LoRA r=64, lr 2e-3, 30 steps", "lora", 64, 2e-3, 30),
    Tune("full, lr 5e-5, 30 steps", "full", 0, 5e-5, 30),
    Tune("full, lr 5e-4, 30 steps", "full", 0, 5e-4, 30),
    Tune("full, lr 3e-3, 30 steps", "full", 0, 3e-3, 30),
)
QUICK_GRID = (
    Tune("LoRA r=4, lr 1e-2, 3 steps", "lora", 4, 1e-2, 3),
    Tune("full, lr 1e-2, 3 steps", "full", 0, 1e-2, 3),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _wire(t: torch.Tensor) -> torch.Tensor:
    payload, shape = encode_tensor(t, WIRE)
    return decode_tensor(payload, WireDtype.parse(WIRE), shape, dtype=torch.float32, device=t.device)


def protected(model: str | Path, seed: int) -> tuple[SplitModel, Any]:
    """The model cut at 0: with its body transformed by a fresh permutation key with every inner secret."""
    split = load_split(str(model), "0:", device="cpu", dtype="float32", quiet=True)
    key = make_key(split.config, split.points, split.fingerprint, kind="permutation", inner=INNER, seed=seed)
    return protect(split, key), key


@torch.inference_mode()
def prompt_traffic(split: SplitModel, key: Any, count: int) -> list[Intercept]:
    """The audit prompts (chat template, planted secrets) as the device sends them at X = 0: the permuted
    embedding of each prompt token over the float16 wire (the prefill's uplink; the body need not run)."""
    assert split.head is not None and split.tokenizer is not None
    out = []
    for p in DEFAULT_PROMPTS[:count]:
        ids = encode_prompt(split.tokenizer, p.text, chat=True)
        sent = _wire(key.encode(split.head(torch.tensor([ids]))[0].float()))
        out.append(Intercept(prompt_ids=ids, output_ids=[], uplink=sent, downlink=torch.empty(0, sent.shape[1])))
    return out


def _pooled(results: Sequence[Any]) -> float:
    right = sum(sum(r == t for r, t in zip(x.recovered, x.target, strict=False)) for x in results)
    return right / max(1, sum(len(x.target) for x in results))


def key_attacks(public: SplitModel, private: SplitModel, key: Any, traffic: list[Intercept]) -> dict[str, Any]:
    """T1/T3: key from the transformed body against the public body, then A1 and A2 on the decoded traffic."""
    assert private.body is not None
    estimate = weight_matching(public, private.body, truth=key)
    decoded = [decode_with(estimate, item) for item in traffic]
    a1 = exact_matching(public, decoded, wire_dtype=torch.float16)
    a2 = nearest_neighbour(public, decoded)
    return {
        "key_accuracy": estimate.key_accuracy,
        "key_seconds": round(estimate.seconds, 2),
        "prompt_tokens": sum(len(t.prompt_ids) for t in traffic),
        "a1_exact_matching": _pooled(a1),
        "a2_nearest_neighbour": _pooled(a2),
    }


# --- T2 --------------------------------------------------------------------------------------------------------


def _streams(tokenizer: Any, docs: list[str], window: int) -> list[torch.Tensor]:
    """Each document's ids cut into conversations of at most ``window`` tokens."""
    out = []
    for doc in docs:
        ids = torch.tensor(tokenizer(doc, add_special_tokens=False).input_ids, dtype=torch.long)
        out += [w for w in ids.split(window) if len(w) > 1]
    return out


def _first(streams: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    out, total = [], 0
    for s in streams:
        if total >= tokens:
            break
        out.append(s[: tokens - total])
        total += len(out[-1])
    return out


@torch.inference_mode()
def t2(split: SplitModel, key: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Frequency analysis of uplink vectors and downlink argmax indices against public text statistics."""
    tok = split.tokenizer
    assert tok is not None and split.head is not None and split.body is not None and split.tail is not None
    docs = documents("all")
    public = _streams(tok, docs[0::2], args.window)
    traffic = _streams(tok, docs[1::2], args.window)
    prompts = [torch.tensor(encode_prompt(tok, p.text, chat=True)) for p in DEFAULT_PROMPTS[: args.prompts]]
    stats = language_statistics(public, candidates=args.candidates)
    log(f"T2: public text {stats.text_tokens} tokens, traffic available {sum(map(len, traffic))} tokens")
    rows: list[dict[str, Any]] = []
    vocab = split.config.vocab_size
    vperm = torch.randperm(vocab, generator=torch.Generator().manual_seed(args.seed + 99))
    for side, sizes in (("prompt (uplink)", args.uplink_tokens), ("output (downlink)", args.downlink_tokens)):
        for size in sizes:
            chosen = _first(traffic, size) + (prompts if side.startswith("prompt") else [])
            start = time.perf_counter()
            if side.startswith("prompt"):  # what the device sends: key.encode(embed(ids)) over a float16 wire
                seen = [_wire(key.encode(split.head(ids[None])[0].float())) for ids in chosen]
                truth = chosen
            else:  # STIP's body returns logits[..., vperm]: the argmax index is vperm^-1[predicted token]
                truth, seen = [], []
                for ids in chosen:
                    hidden = split.body(key.encode(split.head(ids[None])))
                    logits = split.tail(key.decode(hidden), logits_to_keep=0)[0].float()  # (T, V): every position
                    truth.append(logits.argmax(-1))
                    seen.append(logits[:, vperm].argmax(-1))
            forward = time.perf_counter() - start
            codes, count = codebook(seen)
            found = decipher(codes, stats, codes=count, rounds=args.rounds)
            n_traffic = sum(map(len, truth)) - (sum(map(len, prompts)) if side.startswith("prompt") else 0)
            row: dict[str, Any] = {"side": side, "traffic_tokens": n_traffic, "codes": count}
            for name, unigram in (("unigram rank", True), ("bigram decipherment", False)):
                decoded = [torch.tensor(found.decode(c, unigram_only=unigram)) for c in codes]
                right = [(d == t).sum().item() for d, t in zip(decoded, truth, strict=True)]
                row[name] = sum(right[: len(right) - (len(prompts) if side.startswith("prompt") else 0)]) / max(
                    1, sum(len(t) for t in truth[: len(truth) - (len(prompts) if side.startswith("prompt") else 0)])
                )
                if side.startswith("prompt"):
                    row[f"{name}, audit prompts"] = sum(right[-len(prompts) :]) / sum(map(len, prompts))
            row["seconds"] = round(found.seconds + forward, 1)
            rows.append(row)
            log(f"T2 {side} {row['traffic_tokens']} tokens: unigram {row['unigram rank']:.1%}, "
                f"bigram {row['bigram decipherment']:.1%} ({row['seconds']} s)")  # fmt: skip
    return {"public_text_tokens": stats.text_tokens, "candidates": stats.candidates, "rows": rows}


# --- T3 --------------------------------------------------------------------------------------------------------


def body_drift(change: dict[str, float | None]) -> dict[str, float]:
    """Median and max relative change over the body's weight matrices, and the embedding's."""
    body = [v for n, v in change.items() if v is not None and ".layers." in n and n.endswith("proj.weight")]
    embed = [v for n, v in change.items() if v is not None and "embed_tokens" in n]
    return {
        "median_matrix_change": statistics.median(body) if body else 0.0,
        "max_matrix_change": max(body) if body else 0.0,
        "embedding_change": embed[0] if embed else 0.0,
    }


class Progress:
    """Prints a fine-tune's phase at most every 30 s, and when each phase ends."""

    def __init__(self) -> None:
        self.last = 0.0

    def update(self, phase: str, done: int, total: int, loss: float | None) -> None:
        if done == total or time.perf_counter() - self.last > 30:
            self.last = time.perf_counter()
            log(f"  {phase} {done}/{total}" + ("" if loss is None else f" loss {loss:.3f}"))


def t3(public: SplitModel, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    text = documents("train")[: args.documents]
    for i, tune in enumerate(args.grid):
        log(f"T3 {i + 1}/{len(args.grid)}: fine-tune {tune.name}")
        settings = FinetuneSettings(
            method=tune.method,  # type: ignore[arg-type]
            rank=max(1, tune.rank),
            alpha=2.0 * max(1, tune.rank),
            steps=tune.steps,
            lr=tune.lr,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            held_out=args.held_out,
            seed=args.seed,
        )
        out = work / f"tune{i}"
        report = finetune(args.model, text, settings, out=out, overwrite=True, progress=Progress().update)
        row: dict[str, Any] = {
            "fine-tune": tune.name,
            "method": tune.method,
            "rank": tune.rank if tune.method == "lora" else None,
            "lr": tune.lr,
            "steps": tune.steps,
            "perplexity_before": report.perplexity_before,
            "perplexity_after": report.perplexity_after,
            "train_seconds": round(report.train_seconds, 1),
            **body_drift(report.relative_change),
        }
        if math.isfinite(report.perplexity_after):
            private, key = protected(out, args.seed + 10 + i)
            row |= key_attacks(public, private, key, prompt_traffic(private, key, args.prompts))
            del private
        else:  # the fine-tune diverged: no model worth attacking (and NaN weights break the assignment)
            row |= {"key_accuracy": None, "a1_exact_matching": None, "a2_nearest_neighbour": None, "diverged": True}
            log(f"  diverged (perplexity {report.perplexity_after}); not attacked")
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            continue
        rows.append(row)
        if args.json:  # a long run keeps what it has measured
            Path(args.json + ".partial").write_text(json.dumps(rows, indent=2, default=str))
        log(f"  drift {row['median_matrix_change']:.2e}, key {row['key_accuracy']:.1%}, "
            f"A1 {row['a1_exact_matching']:.1%}, A2 {row['a2_nearest_neighbour']:.1%}, "
            f"ppl {row['perplexity_before']:.2f} -> {row['perplexity_after']:.2f}")  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    return rows


def smallest_protecting(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fine-tune with the smallest drift at which every attack reads < THRESHOLD of prompt tokens."""
    attacked = [r for r in rows if not r.get("diverged")]
    below = [r for r in attacked if max(r["a1_exact_matching"], r["a2_nearest_neighbour"]) < THRESHOLD]
    return min(below, key=lambda r: r["median_matrix_change"]) if below else None


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in result["t3"] if not r.get("diverged")), key=lambda r: r["median_matrix_change"])
    x = [max(r["median_matrix_change"], 1e-12) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(x, [r["key_accuracy"] for r in rows], "o-", label="key recovered (weight matching)")
    ax.plot(x, [r["a1_exact_matching"] for r in rows], "s--", label="prompt tokens, A1 exact matching")
    ax.plot(x, [r["a2_nearest_neighbour"] for r in rows], "^:", label="prompt tokens, A2 nearest neighbour")
    ax.axhline(THRESHOLD, color="grey", lw=0.8)
    for r, xi in zip(rows, x, strict=True):
        label = f"ppl {r['perplexity_after']:.1f}\n{r['fine-tune'].split(',')[0]}"
        ax.annotate(label, (xi, 0.02 + 0.12 * (rows.index(r) % 3)), fontsize=7, ha="center")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlabel("median relative change per body matrix, ||W' - W|| / ||W|| (log)")
    ax.set_ylabel("fraction recovered")
    base = rows[0]["perplexity_before"] if rows else float("nan")
    ax.set_title(f"T3 on {result['settings']['model']}: attacks vs fine-tune drift (base ppl {base:.1f})", fontsize=10)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def extend(args: argparse.Namespace) -> dict[str, Any]:
    """T3 only, for ``args.grid``, appended to the results of an earlier run (``--extend JSON``): more points on
    the curve without running T1, T2 and the earlier fine-tunes again."""
    torch.manual_seed(args.seed)
    out: dict[str, Any] = json.loads(Path(args.extend).read_text())
    public = load_split(args.model, "0:", device="cpu", dtype="float32", quiet=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stip-attackers-") as work:
        added = t3(public, args, Path(work))
    out["t3"] = out["t3"] + added
    out["settings"]["grid"] = out["settings"]["grid"] + [vars(t) for t in args.grid]
    out["seconds"]["t3_extended"] = round(time.perf_counter() - start, 1)
    out["extended"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out["t3_protecting"] = smallest_protecting(out["t3"])
    return out


def parse_tune(spec: str) -> Tune:
    """``lora:RANK:LR:STEPS`` or ``full:LR:STEPS``, e.g. ``lora:8:2e-3:120``."""
    parts = spec.split(":")
    try:
        if parts[0] == "lora" and len(parts) == 4:
            rank, lr, steps = int(parts[1]), float(parts[2]), int(parts[3])
            return Tune(f"LoRA r={rank}, lr {parts[2]}, {steps} steps", "lora", rank, lr, steps)
        if parts[0] == "full" and len(parts) == 3:
            lr, steps = float(parts[1]), int(parts[2])
            return Tune(f"full, lr {parts[1]}, {steps} steps", "full", 0, lr, steps)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"a fine-tune is lora:RANK:LR:STEPS or full:LR:STEPS, not {spec!r}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.extend:
        return extend(args)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    out: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "plot", "grid")}
        | {"grid": [vars(t) if hasattr(t, "__dict__") else t.__dict__ for t in args.grid], "wire": WIRE,
           "layers": "0:", "inner": list(INNER)},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": {},
    }  # fmt: skip
    public = load_split(args.model, "0:", device="cpu", dtype="float32", quiet=True)
    private, key = protected(args.model, args.seed)
    log("T1: the private model is the public one")
    start = time.perf_counter()
    out["t1"] = key_attacks(public, private, key, prompt_traffic(private, key, args.prompts))
    out["seconds"]["t1"] = round(time.perf_counter() - start, 1)
    log(f"T1: key {out['t1']['key_accuracy']:.1%}, A1 {out['t1']['a1_exact_matching']:.1%}")
    start = time.perf_counter()
    out["t2"] = t2(private, key, args)
    out["seconds"]["t2"] = round(time.perf_counter() - start, 1)
    if args.json:  # a long run keeps what it has measured
        Path(args.json + ".partial").write_text(json.dumps(out, indent=2, default=str))
    del private
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stip-attackers-") as work:
        out["t3"] = t3(public, args, Path(work))
    out["seconds"]["t3"] = round(time.perf_counter() - start, 1)
    out["t3_protecting"] = smallest_protecting(out["t3"])
    out["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return out


# --- tables ----------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    """The T1/T2/T3 table (one row per attacker, attack and configuration) and the T3 statement."""
    t1 = result["t1"]
    holds = {"T1": "public weights = private model", "T2": "transformed body + traffic"}
    prompts = f"{result['settings']['prompts']} audit prompts ({t1['prompt_tokens']} tokens)"
    lines = [
        _row("attacker", "holds", "attack", "traffic", "key", "prompt tokens", "output tokens"),
        "|---|---|---|---|---|---|---|",
    ]
    for attack, column in (
        ("A1 exact matching", "a1_exact_matching"),
        ("A2 nearest neighbour", "a2_nearest_neighbour"),
    ):
        lines.append(_row("T1", holds["T1"], f"weight matching -> {attack}", prompts, _pct(t1["key_accuracy"]),
                          _pct(t1[column]), "-"))  # fmt: skip
    for r in result["t2"]["rows"]:
        prompt = r["side"].startswith("prompt")
        traffic = f"{r['traffic_tokens']:,} tokens, {r['side']}, {r['codes']:,} distinct codes"
        for name in ("unigram rank", "bigram decipherment"):
            extra = f" (audit prompts {_pct(r[f'{name}, audit prompts'])})" if prompt else ""
            value = _pct(r[name]) + extra
            lines.append(_row("T2", holds["T2"], f"frequency analysis, {name}", traffic, "-",
                              value if prompt else "-", "-" if prompt else value))  # fmt: skip
    for r in result["t3"]:
        private = (f"public base; private = {r['fine-tune']} (median change {r['median_matrix_change']:.2e}, "
                   f"ppl {r['perplexity_before']:.2f} -> {r['perplexity_after']:.2f})")  # fmt: skip
        for attack, column in (
            ("A1 exact matching", "a1_exact_matching"),
            ("A2 nearest neighbour", "a2_nearest_neighbour"),
        ):
            lines.append(_row("T3", private, f"weight matching -> {attack}", prompts, _pct(r["key_accuracy"]),
                              _pct(r[column]), "-"))  # fmt: skip
    found = result["t3_protecting"]
    lines.append("")
    if found is None:
        lines.append(f"No fine-tune tried brought every attack below {THRESHOLD:.0%} of prompt tokens.")
    else:
        lines.append(
            f"Smallest drift with every attack below {THRESHOLD:.0%} of prompt tokens: {found['fine-tune']} "
            f"(median change {found['median_matrix_change']:.2e}, ppl {found['perplexity_after']:.2f})."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS), help="audit prompts (T1, T3)")
    parser.add_argument("--uplink-tokens", type=int, nargs="*", default=[1000, 10000, 100000],
                        help="T2 traffic sizes (capped by the corpus half: about 51k SmolLM2 tokens)")  # fmt: skip
    parser.add_argument("--downlink-tokens", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--window", type=int, default=256, help="T2 tokens per intercepted conversation")
    parser.add_argument("--candidates", type=int, default=4096, help="T2 candidate tokens (most frequent)")
    parser.add_argument("--rounds", type=int, default=12, help="T2 bigram re-assignment rounds")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--held-out", type=float, default=0.03, help="fine-tune held-out fraction of documents")
    parser.add_argument("--documents", type=int, default=None, help="fine-tune on the first N train documents")
    parser.add_argument("--quick", action="store_true", help="a tiny run for tests: 2 prompts, 2 fine-tunes")
    parser.add_argument(
        "--tune",
        type=parse_tune,
        action="append",
        default=None,
        help="a T3 fine-tune instead of the default grid: lora:RANK:LR:STEPS or full:LR:STEPS",
    )
    parser.add_argument("--extend", metavar="JSON",
                        help="run only T3 for the fine-tunes given and append them to this earlier result")  # fmt: skip
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot", help="the T3 curve (PNG)")
    args = parser.parse_args(argv)
    args.grid = tuple(args.tune) if args.tune else GRID
    if args.extend and not args.tune:
        parser.error("--extend needs the fine-tunes to add (--tune ...)")
    if args.quick:
        args.grid, args.prompts, args.seq_len = tuple(args.tune or QUICK_GRID), 2, 16
        args.uplink_tokens, args.downlink_tokens, args.window, args.candidates = [300, 3000], [200], 64, 512
        args.held_out, args.rounds, args.documents = 0.1, 4, 40
    return args


def main() -> None:
    args = parse_args()
    result = run(args)
    table = markdown(result)
    print(table)
    print(f"seconds: {result['seconds']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
