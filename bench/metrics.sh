#!/usr/bin/env bash
# What the metrics cost: the same release build served twice on sled, with --metrics-listen (and
# a scrape every second, as Prometheus would) and without (the baseline); KHLANG_LOG=warn for
# both, so request log lines do not blur the figure. In each round both servers are loaded AT
# THE SAME TIME (audited Put, then Get, 32 in flight over 4 connections each): the shared
# machine's slow moments (its disk above all: Put waits for fsync) hit both alike, so the ratio
# of a round compares like with like. Two figures per round: throughput, and each server's CPU
# time per request (utime + stime from /proc over the round / requests answered). Last, the
# metrics code alone (server/benches/metrics.rs: nanoseconds per request with the recorder
# installed, against the same calls with metrics off), as a share of the baseline server's CPU
# time per request measured above: the figure that noise cannot hide.
#
#   bench/metrics.sh [SECONDS=4] [ROUNDS=9]
#   METRICS_AA=1 bench/metrics.sh ...   # an A/A run: "on" served without metrics too (the noise floor)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-4}
ROUNDS=${2:-9}
cargo build --release --bins --quiet
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start() { # name extra flags...
  local name=$1; shift
  KHLANG_LOG=warn "$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/$name" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PIDS+=($!)
  echo $! >"$WORK/$name.pid"
  until grep -q KHLANG_ADDR "$WORK/$name.out" 2>/dev/null; do sleep 0.2; kill -0 "${PIDS[-1]}"; done
  grep -o 'http://[0-9.:]*' "$WORK/$name.out" | head -1 >"$WORK/$name.addr"
}
start off
if [ -n "${METRICS_AA:-}" ]; then start on; else start on --metrics-listen "127.0.0.1:$MPORT"; fi
( while sleep 1; do python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$MPORT/metrics').read()" 2>/dev/null; done ) &
PIDS+=($!)
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registration-app"])' "$WORK/$1/dev-credentials.json"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
bench() { # name mode: run in the background, one per server at once
  local pid; pid=$(cat "$WORK/$1.pid")
  local before; before=$(cpu_ticks "$pid")
  # No warm-up and few records to read back: every request the server answers is counted.
  local json; json=$(KHLANG_TOKEN=$(token "$1") "$BIN/khlang" --addr "$(cat "$WORK/$1.addr")" \
    bench "$2" --concurrency 32 --connections 4 --duration "$SECS" --warmup 0 --records 200 --json)
  local after; after=$(cpu_ticks "$pid")
  echo "$1 $2 $(python3 -c 'import json,sys,os; d=json.loads(sys.argv[1]); t=os.sysconf("SC_CLK_TCK");
print(d["ops_per_sec"], (int(sys.argv[3]) - int(sys.argv[2])) / t * 1e6 / d["ok"])' "$json" "$before" "$after")" >"$WORK/$1.row"
}
for round in $(seq "$ROUNDS"); do
  for mode in put get; do
    bench off "$mode" & a=$!
    bench on "$mode" & b=$!
    wait "$a" "$b"
    cat "$WORK/off.row" "$WORK/on.row" >>"$WORK/results"
  done
done
[ -n "${METRICS_AA:-}" ] || python3 -c "import urllib.request; b=urllib.request.urlopen('http://127.0.0.1:$MPORT/metrics').read().decode(); print('series scraped:', sum(1 for l in b.splitlines() if l and not l.startswith('#')))"
NS=$(cargo bench -p khlang-server --bench metrics --quiet 2>/dev/null | tee /dev/stderr | awk '/^cost:/ {print $2}')
python3 - "$WORK/results" "$NS" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("put", "get"):
    off = [float(r[2]) for r in rows if r[0] == "off" and r[1] == mode]
    on = [float(r[2]) for r in rows if r[0] == "on" and r[1] == mode]
    ratios = [b / a for a, b in zip(off, on)]
    print(f"{mode} ops/s (both loaded at once): off {[round(v) for v in off]} on {[round(v) for v in on]} "
          f"on/off {[f'{r:.3f}' for r in ratios]} median {statistics.median(ratios):.3f}, "
          f"all rounds together {sum(on) / sum(off):.3f}")
    off = [float(r[3]) for r in rows if r[0] == "off" and r[1] == mode]
    on = [float(r[3]) for r in rows if r[0] == "on" and r[1] == mode]
    ratios = [b / a for a, b in zip(off, on)]
    print(f"{mode} server CPU µs/request: off {[round(v, 1) for v in off]} on {[round(v, 1) for v in on]} "
          f"on/off {[f'{r:.3f}' for r in ratios]} median {statistics.median(ratios):.3f}")
    base = statistics.median(off)
    print(f"{mode}: the metrics code, {float(sys.argv[2]):.0f} ns per request, is "
          f"{float(sys.argv[2]) / (base * 1000) * 100:.2f}% of the baseline's {base:.1f} µs of server CPU per request")
PY
