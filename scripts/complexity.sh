#!/usr/bin/env bash
# Regenerates the message-complexity table of docs/complexity.md from the simulator:
# PBFT (n = 3f + 1) and MinBFT (n = 2f + 1) side by side for f = 1..10.
# Usage: scripts/complexity.sh [seeds]   (default 20 seeds per cluster size)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-20}
cargo build --release -q -p diffuse-cli
measure() { # protocol n -> "msgs/op bytes/op votes/op"
  ./target/release/diffuse sim --protocol "$1" --n "$2" --seeds "$seeds" --faults none --json |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["violations"] == 0, "a violation in a fault-free run"
kinds = d["messages_by_kind"]
votes = sum(kinds.get(k, {}).get("msgs_per_op", 0) for k in ("prepare", "commit"))
msgs, size = d["msgs_per_op"], d["bytes_per_op"]
print(f"{msgs:.1f} {size:.0f} {votes:.1f}")
'
}
echo "| f | PBFT n | PBFT msgs/op | PBFT bytes/op | PBFT msgs/op ÷ n² | MinBFT n | MinBFT msgs/op | MinBFT bytes/op | MinBFT msgs/op ÷ n² | MinBFT ÷ PBFT msgs |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for f in 1 2 3 4 5 6 7 8 9 10; do
  pn=$((3 * f + 1))
  mn=$((2 * f + 1))
  read -r pm pb _ <<<"$(measure pbft "$pn")"
  read -r mm mb _ <<<"$(measure minbft "$mn")"
  python3 -c "
f, pn, pm, pb, mn, mm, mb = $f, $pn, $pm, $pb, $mn, $mm, $mb
print(f'| {f} | {pn} | {pm:.1f} | {pb:.0f} | {pm / pn**2:.2f} | {mn} | {mm:.1f} | {mb:.0f} | {mm / mn**2:.2f} | {mm / pm:.2f} |')
"
done
