#!/usr/bin/env bash
# Khlang key-rotation benchmark (issue "Key lifecycle"): a vault with N encrypted records, then
# `khlang keys rotate` while 64 concurrent readers keep going. Reports, from one run:
#   - rewrap rate (data keys per second) and time to rotate, from the job's own counters;
#   - peak memory of the server (VmHWM) before and after the rotation;
#   - Get throughput during the rotation as a share of the throughput just before it (same run,
#     same server, same store: the ratio is what means something on this shared machine).
#
#   bench/rotation.sh [RECORDS=1000000] [SECONDS=10] [EXTRA khlangd FLAGS...]
#
# e.g. `bench/rotation.sh 1000000 10 --key-job-duty 50` trades rotation speed for serving.
# The records are stored in bulk by a hidden benchmark-only flag (`khlangd dev --bench-populate`):
# real per-record data keys and encrypted fields, written straight to the store (1M records through
# the API would take ten minutes here).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
SECS=${2:-10}
shift 2 2>/dev/null || shift $#
cargo build --release --bins --quiet --features khlangd/bench
BIN=target/release
# KHLANG_BENCH_DIR keeps the populated vault between runs (populating a million records takes a
# minute or two); otherwise a temporary folder is used and removed.
if [ -n "${KHLANG_BENCH_DIR:-}" ]; then WORK=$KHLANG_BENCH_DIR; mkdir -p "$WORK"; KEEP=1; else WORK=$(mktemp -d); KEEP=; fi
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; [ -n "$KEEP" ] || rm -rf "$WORK"' EXIT

start=$(date +%s.%N)
rm -f "$WORK/out" "$WORK/log"
"$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/vault" --bench-populate "$N" "$@" \
  >"$WORK/out" 2>"$WORK/log" &
PID=$!
until grep -q KHLANG_ADDR "$WORK/out" 2>/dev/null; do sleep 0.5; kill -0 "$PID"; done
ADDR=$(grep -o 'http://[0-9.:]*' "$WORK/out" | head -1)
echo "khlangd flags: ${*:-(defaults)}"
echo "populated $N records in $(grep -o 'secs=[0-9.]*' "$WORK/log" | tail -1 | cut -d= -f2) s (0: kept from an earlier run); store $(du -sh "$WORK/vault" | cut -f1)"
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/vault/dev-credentials.json" "$1"; }
ADMIN=$(token key-admin)
READER=$(token registration-app)
hwm() { awk '/VmHWM/ {print $2}' "/proc/$PID/status"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
getbench() { # seconds, records
  KHLANG_TOKEN=$READER "$BIN/khlang" --addr "$ADDR" bench get --concurrency 64 --duration "$1" --warmup 1 \
    --records "$2" --json
}
# Warm up (and write the 2000 records the readers read), then the baseline just before rotating.
getbench 2 2000 >/dev/null
HWM_BEFORE=$(hwm)
NORMAL=$(getbench "$SECS" 2000)
KHLANG_TOKEN=$ADMIN "$BIN/khlang" --addr "$ADDR" keys rotate >/dev/null
DURING=$(getbench "$SECS" 2000)
STATUS_MID=$(KHLANG_TOKEN=$ADMIN "$BIN/khlang" --addr "$ADDR" keys status --no-count --json)
until KHLANG_TOKEN=$ADMIN "$BIN/khlang" --addr "$ADDR" keys status --no-count --json |
  python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["job"]["finished_ms"] else 1)'; do
  sleep 0.5
done
STATUS=$(KHLANG_TOKEN=$ADMIN "$BIN/khlang" --addr "$ADDR" keys status --json)
HWM_AFTER=$(hwm)
RSS_AFTER=$(rss)
AFTER=$(getbench "$SECS" 2000)

python3 - "$NORMAL" "$DURING" "$AFTER" "$STATUS_MID" "$STATUS" "$HWM_BEFORE" "$HWM_AFTER" "$RSS_AFTER" "$N" <<'PY'
import json, sys
normal, during, after, mid, status = (json.loads(a) for a in sys.argv[1:6])
hwm_before, hwm_after, rss_after, n = (int(a) for a in sys.argv[6:10])
job = status["job"]
secs = (job["finished_ms"] - job["started_ms"]) / 1000
still_running = mid["job"]["finished_ms"] is None
print(f"records               {n}")
print(f"rewrapped             {job['changed']} changed, {job['skipped']} already current, {job['total']} at start")
print(f"time to rotate        {secs:.1f} s   (rotate call -> last data key rewrapped)")
print(f"rewrap rate           {job['changed'] / secs:,.0f} data keys/s   (target >= 100,000)")
print(f"data keys per version " + ", ".join(f"v{v['version']} {v['state']}: {v['data_keys']}" for v in status["versions"]))
print(f"peak memory (VmHWM)   {hwm_before/1024:.0f} MiB before rotating, {hwm_after/1024:.0f} MiB after (RSS now {rss_after/1024:.0f} MiB)")
for label, r in [("get before", normal), ("get during", during), ("get after", after)]:
    print(f"{label:21} {r['ops_per_sec']:8.0f} ops/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}")
share = during["ops_per_sec"] / normal["ops_per_sec"]
print(f"serving during rotation {share:.0%} of normal (target >= 70%)" + ("" if still_running else
      "  [the rotation finished inside the window: use more records or fewer seconds]"))
PY
