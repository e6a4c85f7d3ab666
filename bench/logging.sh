#!/usr/bin/env bash
# What the server log costs: the same release build served twice on sled, once at KHLANG_LOG=info
# (a line per request, text and JSON) and once at warn (no request lines) as the baseline;
# audited Put and Get at 64 in flight over 4 connections, rounds rotating which goes first.
#
#   bench/logging.sh [SECONDS=5] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-3}
cargo build --release --bins --quiet
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
start() { # name level format
  KHLANG_LOG=$2 "$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/$1" --log-format "$3" \
    >"$WORK/$1.out" 2>"$WORK/$1.log" &
  PIDS+=($!)
  until grep -q KHLANG_ADDR "$WORK/$1.out" 2>/dev/null; do sleep 0.2; kill -0 "${PIDS[-1]}"; done
  grep -o 'http://[0-9.:]*' "$WORK/$1.out" | head -1 >"$WORK/$1.addr"
}
start warn warn text
start text info text
start json info json
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registration-app"])' "$WORK/$1/dev-credentials.json"; }
bench() { # name mode
  echo "$1 $2 $(KHLANG_TOKEN=$(token "$1") "$BIN/khlang" --addr "$(cat "$WORK/$1.addr")" \
    bench "$2" --concurrency 64 --connections 4 --duration "$SECS" --warmup 1 --records 2000 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ops_per_sec"])')" >>"$WORK/results"
}
orders=("warn text json" "text json warn" "json warn text")
for round in $(seq "$ROUNDS"); do
  order=${orders[$(((round - 1) % 3))]}
  for name in $order; do bench "$name" put; done
  for name in $order; do bench "$name" get; done
done
echo "request lines written: text $(grep -c 'khlang::request' "$WORK/text.log") json $(grep -c 'khlang::request' "$WORK/json.log")"
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("put", "get"):
    base = [float(r[2]) for r in rows if r[0] == "warn" and r[1] == mode]
    for name in ("text", "json"):
        x = [float(r[2]) for r in rows if r[0] == name and r[1] == mode]
        ratios = [b / a for a, b in zip(base, x)]
        print(f"{mode}: warn {[round(v) for v in base]} {name} {[round(v) for v in x]} "
              f"{name}/warn {[f'{r:.3f}' for r in ratios]} median {statistics.median(ratios):.3f}")
PY
