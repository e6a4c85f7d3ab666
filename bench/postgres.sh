#!/usr/bin/env bash
# sled against PostgreSQL, same build, same run: audited Put and Get at 64 in flight over 4
# connections, rounds alternating which backend goes first. Starts its own throwaway PostgreSQL
# cluster (initdb + pg_ctl from the installed server binaries, as `postgres` when run as root).
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
token() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registration-app"])' "$WORK/$1/dev-credentials.json"; }
bench() { # name mode
  KHLANG_TOKEN=$(token "$1") KHLANG_PREFILL_TOKEN=$(token "$1") "$BIN/khlang" --addr "$(cat "$WORK/$1.addr")" \
    bench "$2" --concurrency 64 --connections 4 --duration "$SECS" --warmup 1 --records 2000 --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], d["ops_per_sec"], d["p50_ms"], d["p99_ms"])' "$1" "$2" \
    >>"$WORK/results"
}
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then pair="sled postgres"; else pair="postgres sled"; fi
  for name in $pair; do bench "$name" put; done
  for name in $pair; do bench "$name" get; done
done
kill -TERM "${PIDS[@]}" 2>/dev/null || true
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
for name in sled postgres; do
  echo "$name: $(grep -o 'flushes=[0-9]* durable_writes=[0-9]*' "$WORK/$name.log" | tail -1)"
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("put", "get"):
    s = [float(r[2]) for r in rows if r[0] == "sled" and r[1] == mode]
    p = [float(r[2]) for r in rows if r[0] == "postgres" and r[1] == mode]
    p99 = [float(r[4]) for r in rows if r[0] == "postgres" and r[1] == mode]
    ratios = [b / a for a, b in zip(s, p)]
    print(f"{mode}: sled {[round(x) for x in s]} postgres {[round(x) for x in p]} (p99 ms {p99}) "
          f"postgres/sled {[f'{r:.2f}' for r in ratios]} median {statistics.median(ratios):.2f}")
PY
