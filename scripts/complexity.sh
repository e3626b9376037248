#!/usr/bin/env bash
# Regenerates the message-complexity tables of docs/complexity.md from the simulator:
# PBFT (n = 3f + 1), MinBFT and FastBFT (n = 2f + 1) side by side at the same f.
# Usage: scripts/complexity.sh [seeds] [faults]
#   seeds:  seeds per cluster size (default 5)
#   faults: the values of f, quoted (default "1 2 3 4 5 6 7 8 9 10")
# Example: scripts/complexity.sh 1 "1 2 5 10 25 50 100"   (FastBFT n = 3 ... 201)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-5}
faults=${2:-1 2 3 4 5 6 7 8 9 10}
cargo build --release -q -p diffuse-cli
measure() { # protocol n -> "msgs/op bytes/op"
  ./target/release/diffuse sim --protocol "$1" --n "$2" --seeds "$seeds" --faults none --json |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["violations"] == 0, "a violation in a fault-free run"
msgs, size = d["msgs_per_op"], d["bytes_per_op"]
print(f"{msgs:.1f} {size:.0f}")
'
}
echo "| f | FastBFT n | FastBFT msgs/op | FastBFT bytes/op | FastBFT msgs/op ÷ n | MinBFT msgs/op | MinBFT bytes/op | MinBFT msgs/op ÷ n² | PBFT n | PBFT msgs/op | PBFT bytes/op | PBFT msgs/op ÷ n² |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for f in $faults; do
  hn=$((2 * f + 1))
  pn=$((3 * f + 1))
  read -r fm fb <<<"$(measure fastbft "$hn")"
  read -r mm mb <<<"$(measure minbft "$hn")"
  read -r pm pb <<<"$(measure pbft "$pn")"
  python3 -c "
f, hn, fm, fb, mm, mb, pn, pm, pb = $f, $hn, $fm, $fb, $mm, $mb, $pn, $pm, $pb
print(f'| {f} | {hn} | {fm:.1f} | {fb:.0f} | {fm / hn:.2f} | {mm:.1f} | {mb:.0f} | {mm / hn**2:.2f} | {pn} | {pm:.1f} | {pb:.0f} | {pm / pn**2:.2f} |')
"
done
