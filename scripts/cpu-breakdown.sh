#!/usr/bin/env bash
# Where a PBFT cluster's CPU goes, per operation: profiles a whole `diffuse bench`
# run (every process, every thread, the kernel included) with perf and prints the
# CPU microseconds per operation by category (storage, Ed25519, Noise, kernel TCP,
# tokio, ...) for the primary, the backups together, the bench's clients, and the
# rest of the machine (idle time, kernel workers). docs/performance.md, "Where the
# CPU goes, per operation", has a run and how to read it.
# Usage: scripts/cpu-breakdown.sh [clients] [seconds profiled] [extra bench args...]
# Needs perf (linux-perf) and python3; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-64}
seconds=${2:-4}
shift $(( $# > 2 ? 2 : $# ))
cargo build --release -q -p diffuse-cli
bin=$PWD/target/release/diffuse
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" bench --protocol pbft --n 4 --clients "$clients" --payload 64 \
  --duration $((seconds + 8)) --json --out "$work/bench" "$@" > "$work/bench.json" 2>/dev/null &
bench=$!
sleep 6   # replicas up, clients connected, pipelines full
for i in 0 1 2 3; do echo "$i $(pgrep -f "/replica-$i.toml" | head -1)"; done > "$work/pids"
echo "clients $bench" >> "$work/pids"
perf record -a -g -F 1999 -o "$work/perf.data" -- sleep "$seconds" > /dev/null 2>&1
wait "$bench"
ops=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ops_per_sec"])' "$work/bench.json")
echo "$clients clients: $(printf '%.0f' "$ops") ops/s over the whole run; $seconds s profiled"
perf script -F comm,pid,tid,ip,sym -i "$work/perf.data" 2>/dev/null |
  python3 scripts/cpu-breakdown.py "$work/pids" "$ops" "$seconds" 1999
