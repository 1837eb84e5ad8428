"""What a prompt-lookup match costs a decode step, by the length of the context.

    python benchmarks/prompt_lookup.py

The text is random tokens, so that few n-grams repeat (the worst case for a scan: every n is tried to the start).
Each step adds one token and asks for a match, as a generation does; the median of ``--steps`` is printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from lambdasplit.generation.drafting import PromptLookupDrafter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="500,4000,32000", help="context lengths, in tokens")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    rng = random.Random(0)
    print("| context tokens | first match (indexes the context), ms | a step after, median ms |")
    print("|---|---|---|")
    for n in (int(c) for c in args.contexts.split(",")):
        ids = [rng.randrange(49152) for _ in range(n)]
        drafter = PromptLookupDrafter(max_ngram=3, min_ngram=1)
        start = time.perf_counter()
        drafter.match(ids, 8)
        first = time.perf_counter() - start
        steps = []
        for _ in range(args.steps):
            ids.append(rng.randrange(49152))
            start = time.perf_counter()
            drafter.match(ids, 8)
            steps.append(time.perf_counter() - start)
        print(f"| {n} | {first * 1e3:.1f} | {statistics.median(steps) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
