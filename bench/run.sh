#!/usr/bin/env bash
# Khlang benchmark: Put and Get at 64 concurrent requests over real gRPC, against baselines measured
# in the same run (this machine is shared and noisy, so only ratios within one run mean anything).
#
#   bench/run.sh [SECONDS_PER_RUN=5] [ROUNDS=3]
#
# Servers (release build, each on its own temporary data folder, all on 127.0.0.1):
#   enc       the product: encrypted fields, per-record data keys, group commit, regulations enforced
#   plain     baseline: the same gRPC + validation + sled + group-commit path, values stored unencrypted
#   per-req   encrypted, but one flush per write (what group commit is measured against)
#   nopolicy  encrypted, but every request allowed without consulting the regulations
#   noaudit   the product, but no audit entries written (and reads not flushed)
# Identities: puts and the encryption comparison run as `registration-app` (reads all 8 fields,
# masked, for service_delivery); the policy comparison runs as `billing-clerk` (card number and
# billing address in full, for billing), so both servers return the same bytes.
# Rounds interleave the servers so drift in machine load hits all of them alike.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-3}
cargo build --release --bins --quiet --features khlangd/bench
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

start() { # name, extra args...
  local name=$1; shift
  "$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q KHLANG_ADDR "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
  grep -o 'http://[0-9.:]*' "$WORK/$name.out" | head -1 >"$WORK/$name.addr"
}
start enc
start plain --bench-plaintext-baseline
start per-req --durability per-request
start nopolicy --bench-skip-policy
start noaudit --bench-skip-audit

RESULTS="$WORK/results.jsonl"
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/$1/dev-credentials.json" "$2"; }
bench() { # label server identity args...
  local label=$1 name=$2 who=$3; shift 3
  KHLANG_TOKEN=$(token "$name" "$who") KHLANG_PREFILL_TOKEN=$(token "$name" registration-app) \
    "$BIN/khlang" --addr "$(cat "$WORK/$name.addr")" bench "$@" \
    --concurrency 64 --duration "$SECS" --warmup 1 --records 2000 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["server"]=sys.argv[1]; d["label"]=sys.argv[2]; print(json.dumps(d))' "$name" "$label" >>"$RESULTS"
}
order() { if [ $((round % 2)) -eq 0 ]; then printf '%s\n' "$@" | tac; else printf '%s\n' "$@"; fi; }
for round in $(seq "$ROUNDS"); do
  # Alternate the order each round so running first or second biases neither side.
  # nopolicy runs the same puts and gets as enc (results unused) so that both hold as much data when
  # they are compared: a server's speed depends on the size of its store.
  for name in $(order enc plain per-req noaudit nopolicy); do bench put "$name" registration-app put; done
  for name in $(order enc plain noaudit nopolicy); do bench get "$name" registration-app get; done
  for name in $(order enc nopolicy); do
    bench get-billing "$name" billing-clerk get --purpose billing --fields card_number,billing_address
  done
done

kill -TERM "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null || true; PIDS=()
for name in enc per-req; do
  echo "$name: $(grep -o 'flushes=[0-9]* durable_writes=[0-9]*' "$WORK/$name.log" | tail -1)"
done

python3 - "$RESULTS" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
def pick(server, label): return [r for r in rows if r["server"] == server and r["label"] == label]
def med(server, label, key): return statistics.median(r[key] for r in pick(server, label))
print(f"{'server':9} {'run':12} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>6}  (median of rounds)")
for server, label in [("enc","put"),("plain","put"),("per-req","put"),("noaudit","put"),("enc","get"),("plain","get"),("noaudit","get"),("enc","get-billing"),("nopolicy","get-billing")]:
    errs = sum(r["errors"] for r in pick(server, label))
    print(f"{server:9} {label:12} {med(server,label,'ops_per_sec'):9.0f} {med(server,label,'p50_ms'):8.2f} {med(server,label,'p99_ms'):8.2f} {med(server,label,'p999_ms'):9.2f} {errs:6}")
put_cost = 1 - med("enc","put","ops_per_sec") / med("plain","put","ops_per_sec")
get_cost = 1 - med("enc","get","ops_per_sec") / med("plain","get","ops_per_sec")
policy_cost = 1 - med("enc","get-billing","ops_per_sec") / med("nopolicy","get-billing","ops_per_sec")
group = med("enc","put","ops_per_sec") / med("per-req","put","ops_per_sec")
audit_put = 1 - med("enc","put","ops_per_sec") / med("noaudit","put","ops_per_sec")
audit_get = 1 - med("enc","get","ops_per_sec") / med("noaudit","get","ops_per_sec")
print(f"encryption cost, put:   {put_cost*100:5.1f}% of throughput (target < 10%)")
print(f"encryption cost, get:   {get_cost*100:5.1f}% of throughput (target < 10%)")
print(f"policy decision, get:   {policy_cost*100:5.1f}% of throughput (target < 5%)")
print(f"auditing, put:           {audit_put*100:5.1f}% of throughput (target < 15%)")
print(f"auditing, get:           {audit_get*100:5.1f}% of throughput (target < 15%)")
print(f"group commit vs flush per request, put: {group:.2f}x (target >= 2x)")
PY
