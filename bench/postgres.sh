#!/usr/bin/env bash
# sled against PostgreSQL, same build, same run: audited Put and Get at 64 in flight over 4
# connections, on sled, on PostgreSQL with one node, and on PostgreSQL with two nodes sharing one
# database (32 in flight over 2 connections to each, run at once, ops summed), rounds rotating
# which goes first. Starts its own throwaway PostgreSQL cluster (initdb + pg_ctl from the
# installed server binaries, as `postgres` when run as root). At the end, each PostgreSQL node's
# log gives how long its batches held the chain head's lock.
#
#   bench/postgres.sh [SECONDS=5] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-3}
PGBIN=${KHLANG_PG_BIN:-$(dirname "$(readlink -f "$(command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1)")")}
cargo build --release --bins --quiet
BIN=target/release
WORK=$(mktemp -d)
chmod 755 "$WORK"
AS=(); [ "$(id -u)" -eq 0 ] && AS=(runuser -u postgres --)
mkdir "$WORK/pg"; [ "$(id -u)" -eq 0 ] && chown postgres: "$WORK/pg"
PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${AS[@]}" "$PGBIN/initdb" -D "$WORK/pg/data" -A trust -U khlang -E UTF8 --no-instructions >/dev/null
"${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
  -o "-p $PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
"$PGBIN/psql" -q -h 127.0.0.1 -p "$PORT" -U khlang postgres -c "CREATE DATABASE vault"
"$PGBIN/psql" -q -h 127.0.0.1 -p "$PORT" -U khlang postgres -c "CREATE DATABASE vault2"
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT (fsync on, synchronous_commit on)"

start() { # name, extra flags...
  local name=$1; shift
  "$BIN/khlangd" dev --listen 127.0.0.1:0 --data-dir "$WORK/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PIDS+=($!)
  until grep -q KHLANG_ADDR "$WORK/$name.out" 2>/dev/null; do sleep 0.2; kill -0 "${PIDS[-1]}"; done
  grep -o 'http://[0-9.:]*' "$WORK/$name.out" | head -1 >"$WORK/$name.addr"
}
start sled
start postgres --storage "postgres://khlang@127.0.0.1:$PORT/vault"
start nodea --storage "postgres://khlang@127.0.0.1:$PORT/vault2"
start nodeb --storage "postgres://khlang@127.0.0.1:$PORT/vault2"
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registration-app"])' "$WORK/$1/dev-credentials.json"; }
run() { # node mode concurrency connections -> "ops p50 p99"
  KHLANG_TOKEN=$(token "$1") KHLANG_PREFILL_TOKEN=$(token "$1") "$BIN/khlang" --addr "$(cat "$WORK/$1.addr")" \
    bench "$2" --concurrency "$3" --connections "$4" --duration "$SECS" --warmup 1 --records 2000 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ops_per_sec"], d["p50_ms"], d["p99_ms"])'
}
bench() { # name mode
  if [ "$1" = two ]; then
    run nodea "$2" 32 2 >"$WORK/a.res" & local a=$!
    run nodeb "$2" 32 2 >"$WORK/b.res" & local b=$!
    wait "$a" "$b"
    python3 - "$2" "$WORK/a.res" "$WORK/b.res" >>"$WORK/results" <<'PY'
import sys
a, b = (open(f).read().split() for f in sys.argv[2:4])
print("two", sys.argv[1], float(a[0]) + float(b[0]), max(float(a[1]), float(b[1])), max(float(a[2]), float(b[2])))
PY
  else
    echo "$1 $2 $(run "$1" "$2" 64 4)" >>"$WORK/results"
  fi
}
orders=("sled postgres two" "postgres two sled" "two sled postgres")
for round in $(seq "$ROUNDS"); do
  order=${orders[$(((round - 1) % 3))]}
  for name in $order; do bench "$name" put; done
  for name in $order; do bench "$name" get; done
done
kill -TERM "${PIDS[@]}" 2>/dev/null || true
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
for name in sled postgres nodea nodeb; do
  echo "$name: $(grep -o 'flushes=[0-9]* durable_writes=[0-9]*' "$WORK/$name.log" | tail -1)"
done
for name in postgres nodea nodeb; do
  echo "$name head lock: $(grep -o 'lock_batches=.*lock_max_us=[0-9]*' "$WORK/$name.log" | tail -1)"
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("put", "get"):
    s = [float(r[2]) for r in rows if r[0] == "sled" and r[1] == mode]
    p = [float(r[2]) for r in rows if r[0] == "postgres" and r[1] == mode]
    t = [float(r[2]) for r in rows if r[0] == "two" and r[1] == mode]
    p99 = [float(r[4]) for r in rows if r[0] == "postgres" and r[1] == mode]
    t99 = [float(r[4]) for r in rows if r[0] == "two" and r[1] == mode]
    ratios = [b / a for a, b in zip(s, p)]
    twos = [b / a for a, b in zip(p, t)]
    print(f"{mode}: sled {[round(x) for x in s]} postgres {[round(x) for x in p]} (p99 ms {p99}) "
          f"two nodes {[round(x) for x in t]} (p99 ms {t99})")
    print(f"  postgres/sled {[f'{r:.2f}' for r in ratios]} median {statistics.median(ratios):.2f}; "
          f"two nodes/one node {[f'{r:.2f}' for r in twos]} median {statistics.median(twos):.2f}")
PY
