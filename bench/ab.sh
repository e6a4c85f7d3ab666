#!/usr/bin/env bash
# A/B of two builds of the product: audited Put and Get at 64 concurrent requests over real gRPC,
# the build of BASE_REV (e.g. the commit before a change) against the working tree's, in the same
# run, rounds alternating which goes first (the machine is shared and noisy: only the ratio
# within one run means anything).
#
#   bench/ab.sh BASE_REV [SECONDS_PER_RUN=5] [ROUNDS=5]     (CONNECTIONS=4: HTTP/2 connections)
#
# BASE_REV is checked out into a worktree under target/ab-src and built into target/ab-base (both
# kept between runs, so a second A/B against the same base builds only the working tree). Both servers are
# `khlangd dev` on their own temporary folders; the load generator is the working tree's `khlang
# bench` (the Records API it drives is the same in both).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_REV=${1:?usage: bench/ab.sh BASE_REV [SECONDS] [ROUNDS]}
SECS=${2:-5}
ROUNDS=${3:-5}
CONNECTIONS=${CONNECTIONS:-4}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cargo build --release --bins --quiet
SRC="target/ab-src/$(git rev-parse --short "$BASE_REV")"
[ -d "$SRC" ] || git worktree add --detach --quiet "$SRC" "$BASE_REV"
CARGO_TARGET_DIR="$(pwd)/target/ab-base" cargo build --release --bins --quiet --manifest-path "$SRC/Cargo.toml"

start() { # name, khlangd binary
  "$2" dev --listen 127.0.0.1:0 --data-dir "$WORK/$1" >"$WORK/$1.out" 2>"$WORK/$1.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q KHLANG_ADDR "$WORK/$1.out" 2>/dev/null && break; sleep 0.1; done
  grep -o 'http://[0-9.:]*' "$WORK/$1.out" | head -1 >"$WORK/$1.addr"
}
start new target/release/khlangd
start base target/ab-base/release/khlangd

RESULTS="$WORK/results.jsonl"
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/$1/dev-credentials.json" "$2"; }
bench() { # label server args...
  local label=$1 name=$2; shift 2
  KHLANG_TOKEN=$(token "$name" registration-app) KHLANG_PREFILL_TOKEN=$(token "$name" registration-app) \
    target/release/khlang --addr "$(cat "$WORK/$name.addr")" bench "$@" \
    --concurrency 64 --connections "$CONNECTIONS" --duration "$SECS" --warmup 1 --records 2000 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["server"]=sys.argv[1]; d["label"]=sys.argv[2]; print(json.dumps(d))' "$name" "$label" >>"$RESULTS"
}
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 0 ]; then pair="new base"; else pair="base new"; fi
  for name in $pair; do bench put "$name" put; done
  for name in $pair; do bench get "$name" get; done
  for name in $pair; do bench list "$name" list; done
done
# Stop both gracefully: each logs how many durable writes shared how many flushes.
kill -TERM "${PIDS[@]}" 2>/dev/null || true
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
for name in base new; do
  grep -o 'flushes=[0-9]* durable_writes=[0-9]*' "$WORK/$name.log" | tail -1 | sed "s/^/$name: /" >>"$WORK/flushes.txt" || true
done

python3 - "$RESULTS" "$BASE_REV" "$WORK/flushes.txt" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
def ops(server, label): return [r["ops_per_sec"] for r in rows if r["server"] == server and r["label"] == label]
print(f"base = {sys.argv[2]}, new = working tree; ops/s per round, then the median")
for label in ("put", "get", "list"):
    b, n = ops("base", label), ops("new", label)
    print(f"{label}: base {[round(x) for x in b]} median {statistics.median(b):.0f}")
    print(f"{label}: new  {[round(x) for x in n]} median {statistics.median(n):.0f}")
    ratios = [x / y for x, y in zip(n, b)]
    print(f"{label}: new/base per round {[f'{r:.3f}' for r in ratios]}  median {statistics.median(ratios):.3f}")
# The baseline: ListRecords of an empty subject (authenticated, decided, audited; no record, no
# crypto), measured in the same round; Put and Get as ratios to it, per build.
for server in ("base", "new"):
    base_list = ops(server, "list")
    for label in ("put", "get"):
        r = [x / y for x, y in zip(ops(server, label), base_list)]
        print(f"{server}: {label}/list per round {[f'{v:.3f}' for v in r]}  median {statistics.median(r):.3f}")
for line in open(sys.argv[3]):
    name, rest = line.split(": ", 1)
    f = dict(kv.split("=") for kv in rest.split())
    flushes, writes = int(f["flushes"]), int(f["durable_writes"])
    print(f"{name}: {writes} durable writes over {flushes} flushes: {writes / max(flushes, 1):.1f} per flush")
PY
