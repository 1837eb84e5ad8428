#!/usr/bin/env bash
# Speculative steps against plain cached split decoding, as recorded in docs/benchmarks.md.
# Three tasks (benchmarks/prompts/): a copy-heavy code edit, quoting a passage, an open question;
# on the emulated 5G (30 ms RTT) and wireless (250 ms RTT) links. Needs root (network namespaces).
set -euo pipefail
out=${1:-artifacts/speculative}
mkdir -p "$out"
for task in code-comments quote-passage open-question; do
  lambdasplit bench llm --method cache --local-layers 2 --speculative lookup --speculative self \
    --prompt-file "benchmarks/prompts/$task.txt" --stop-at-eos --new-tokens 128 --device-threads 1 \
    --link 5g --link wireless --json "$out/$task.json" --markdown "$out/$task.md" 2>&1 | tee "$out/$task.txt"
done
