#!/usr/bin/env bash
# Bulk loading (issue 26): `PutRecords` (500 records a request, IN_FLIGHT requests at once) against
# single `PutRecord`s at 64 in flight, on the same server in the same run, rounds alternating
# (this machine is shared and noisy: only the ratio within one run means anything); then
# `khlang import` of IMPORT records from a JSON Lines file, timed end to end.
#
#   bench/bulk.sh [SECONDS_PER_RUN=5] [ROUNDS=3]      (IMPORT=200000 IN_FLIGHT=4)
#
# Every record is durable and audited either way: its own data key, its own PutRecord entry.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-3}
IMPORT=${IMPORT:-200000}
IN_FLIGHT=${IN_FLIGHT:-4}
cargo build --release --bins --quiet
BIN=target/release
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

"$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/d" >"$WORK/out" 2>"$WORK/log" &
PID=$!
for _ in $(seq 100); do grep -q KHLANG_ADDR "$WORK/out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(grep -o 'http://[0-9.:]*' "$WORK/out" | head -1)
export KHLANG_ADDR=$ADDR
KHLANG_TOKEN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registration-app"])' "$WORK/d/dev-credentials.json")
export KHLANG_TOKEN

RESULTS="$WORK/results.jsonl"
run() { # label, bench args...
  local label=$1; shift
  "$BIN/khlang" bench "$@" --duration "$SECS" --warmup 1 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["label"]=sys.argv[1]; print(json.dumps(d))' "$label" >>"$RESULTS"
}
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 0 ]; then
    run put put --concurrency 64
    run put-many put-many --concurrency "$IN_FLIGHT"
  else
    run put-many put-many --concurrency "$IN_FLIGHT"
    run put put --concurrency 64
  fi
done

python3 - "$IMPORT" "$WORK/register.jsonl" <<'PY'
import json, sys
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"subject_id": f"import-{i}", "fields": {
            "name": "สมชาย ใจดี", "email": f"person{i}@example.go.th", "phone": "+66 81 234 5678",
            "postal_code": "80000", "card_number": "4111111111111111",
            "home_address": "99/1 ถนนราชดำเนิน ตำบลในเมือง อำเภอเมืองนครศรีธรรมราช"}}, ensure_ascii=False) + "\n")
PY
START=$(date +%s.%N)
"$BIN/khlang" import "$WORK/register.jsonl" --batch 500 --parallel "$IN_FLIGHT" 2>/dev/null >"$WORK/import.txt"
END=$(date +%s.%N)

python3 - "$RESULTS" "$IMPORT" "$START" "$END" "$WORK/import.txt" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
def runs(label): return [r["ops_per_sec"] for r in rows if r["label"] == label]
put, many = runs("put"), runs("put-many")
print(f"put      (1 record a request, 64 in flight): {[round(x) for x in put]} median {statistics.median(put):.0f} records/s")
print(f"put-many (500 a request, in flight as set) : {[round(x) for x in many]} median {statistics.median(many):.0f} records/s")
ratios = [m / p for m, p in zip(many, put)]
print(f"put-many/put per round {['%.2f' % r for r in ratios]} median {statistics.median(ratios):.2f}")
n, took = int(sys.argv[2]), float(sys.argv[4]) - float(sys.argv[3])
print(f"khlang import of {n} records: {took:.1f} s ({n / took:.0f} records/s); {open(sys.argv[5]).read().strip()}")
PY
kill -TERM "$PID" 2>/dev/null; wait 2>/dev/null || true; PID=
grep -o 'durability: .*' "$WORK/log" | tail -1 || true
