#!/usr/bin/env bash
# What a backup costs: a release build (bench features, for the bulk populate) holding N encrypted
# records; three backups one after another, then one under a Get load, each logging how long
# every commit was held off (commits_held_ms); then restore and verify of the last one, timed.
# The load's p99.9 against the same load's p50 shows what the hold does to requests.
#
#   bench/backup.sh [RECORDS=100000]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
cargo build --release --features khlangd/bench --bin khlangd --bin khlang --quiet
BIN=$PWD/target/release
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK"
KHLANG_LOG="warn,khlang_server::api::operator=info" "$BIN/khlangd" dev --listen 127.0.0.1:0 \
  --data-dir v --bench-populate "$N" >dev.out 2>dev.log &
PID=$!
until grep -q KHLANG_ADDR dev.out 2>/dev/null; do sleep 0.5; kill -0 "$PID"; done
export KHLANG_ADDR=$(grep -o 'http://[0-9.:]*' dev.out | head -1)
tok() { python3 -c 'import json,sys; print(json.load(open("v/dev-credentials.json"))[sys.argv[1]])' "$1"; }
for n in 1 2 3; do
  /usr/bin/time -f "backup $n: %e s end to end" env KHLANG_TOKEN=$(tok key-admin) \
    "$BIN/khlang" operator backup --output b$n.bin >/dev/null
done
KHLANG_TOKEN=$(tok registration-app) "$BIN/khlang" bench get --concurrency 16 --connections 2 \
  --duration 8 --warmup 1 --records 500 --json >get.json &
LOAD=$!
sleep 4
KHLANG_TOKEN=$(tok key-admin) "$BIN/khlang" operator backup --output b4.bin >/dev/null
wait "$LOAD"
echo "get under a backup: $(cat get.json)"
grep -o 'records=[0-9]* bytes=[0-9]* commits_held_ms=[0-9]*' dev.log
PUBLIC_KEY=$(KHLANG_TOKEN=$(tok security-officer) "$BIN/khlang" audit public-key)
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
/usr/bin/time -f "restore: %e s, %M KB max RSS" "$BIN/khlangd" restore b3.bin --data-dir r --audit-public-key "$PUBLIC_KEY" >/dev/null
(umask 077; echo khlang-development-passphrase-not-for-real-data >pass)
KHLANG_LOG=warn /usr/bin/time -f "verify: %e s, %M KB max RSS" "$BIN/khlangd" verify --data-dir r --passphrase-file pass
