#!/usr/bin/env bash
# Regenerates the message-complexity table of docs/complexity.md from the simulator.
# Usage: scripts/complexity.sh [seeds]   (default 20 seeds per cluster size)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-20}
cargo build --release -q -p diffuse-cli
echo "| n | f | msgs/op | bytes/op | PREPARE + COMMIT per op | msgs/op ÷ n² |"
echo "|---|---|---|---|---|---|"
for n in 4 7 10 13 31; do
  ./target/release/diffuse sim --protocol pbft --n "$n" --seeds "$seeds" --faults none --json |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
n = d["n"]
kinds = d["messages_by_kind"]
votes = sum(kinds.get(k, {}).get("msgs_per_op", 0) for k in ("prepare", "commit"))
assert d["violations"] == 0, "a violation in a fault-free run"
f, msgs, size = d["f"], d["msgs_per_op"], d["bytes_per_op"]
print(f"| {n} | {f} | {msgs:.1f} | {size:.0f} | {votes:.1f} | {msgs / n**2:.2f} |")
'
done
