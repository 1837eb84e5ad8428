#!/usr/bin/env bash
# The paper's Table I for SmolLM2 on four links, as recorded in docs/benchmarks.md.
# One run per link so a long link does not hold the others' results hostage. Needs root and tcpdump.
set -euo pipefail
out=${1:-artifacts/table1}
mkdir -p "$out"
for link in loopback gigabit 5g wireless; do
  lambdasplit bench llm --link "$link" --new-tokens 300 --device-threads 1 --capture "$out/pcap" \
    --json "$out/$link.json" --markdown "$out/$link.md" --plot "$out/$link.png" 2>&1 | tee "$out/$link.txt"
done
