#!/usr/bin/env bash
# Cost as the store grows (issue "storage port", performance): audited Put and Get at 64 in flight
# on a vault holding N records against a fresh vault, both served by the same build at the same
# time, rounds alternating which goes first. Reports per-round big/fresh ratios and the store's
# bytes per record.
#
#   bench/growth.sh [RECORDS=1000000] [SECONDS=8] [ROUNDS=3]
#
# The big vault is filled by the rotation benchmark's bulk populate (`khlangd dev --bench-populate`:
# real data keys and encrypted fields straight to the store, no API, no audit entries).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
SECS=${2:-8}
ROUNDS=${3:-3}
cargo build --release --bins --quiet --features khlangd/bench
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

start() { # name, extra flags...
  local name=$1; shift
  "$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PIDS+=($!)
  until grep -q KHLANG_ADDR "$WORK/$name.out" 2>/dev/null; do sleep 0.5; kill -0 "${PIDS[-1]}"; done
  grep -o 'http://[0-9.:]*' "$WORK/$name.out" | head -1 >"$WORK/$name.addr"
}
t0=$(date +%s)
start big --bench-populate "$N"
echo "populated $N records in $(($(date +%s) - t0)) s"
start fresh
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/$1/dev-credentials.json" registration-app; }
bench() { # name mode
  KHLANG_TOKEN=$(token "$1") KHLANG_PREFILL_TOKEN=$(token "$1") "$BIN/khlang" --addr "$(cat "$WORK/$1.addr")" \
    bench "$2" --concurrency 64 --connections 4 --duration "$SECS" --warmup 1 --records 2000 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], d["ops_per_sec"])' "$1" "$2" \
    >>"$WORK/results"
}
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then pair="big fresh"; else pair="fresh big"; fi
  for name in $pair; do bench "$name" put; done
  for name in $pair; do bench "$name" get; done
done
bytes() { du -sb "$WORK/$1/$2" | cut -f1; }
python3 - "$WORK/results" "$N" "$(bytes big db)" "$(bytes big audit 2>/dev/null || echo 0)" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
n, db, audit = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for mode in ("put", "get"):
    big = [float(r[2]) for r in rows if r[0] == "big" and r[1] == mode]
    fresh = [float(r[2]) for r in rows if r[0] == "fresh" and r[1] == mode]
    ratios = [b / f for b, f in zip(big, fresh)]
    print(f"{mode}: big {[round(x) for x in big]} fresh {[round(x) for x in fresh]} "
          f"big/fresh {[f'{r:.2f}' for r in ratios]} median {statistics.median(ratios):.2f}")
print(f"big store: sled {db / 1e9:.2f} GB ({db / n:.0f} bytes per record), audit log {audit / 1e6:.0f} MB")
PY
