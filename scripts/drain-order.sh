#!/usr/bin/env bash
# How a drain reads a pair's two topics: loads a backlog (loadgen, version-1 mix, 4
# partitions), starts the release worker on it, and when every message is committed
# prints the drain time, the worker's peak RSS, when each partition's payments and
# settlements were stored (first and last checkpoint) and how many outcome updates
# the drain cost (a payment stored pending and updated once its settlement came,
# instead of both matched in one checkpoint).
#
#   SCENARIOS=300000 scripts/drain-order.sh                    # ≈2.1 messages each
#   RECON_KAFKA_PROP_MAX_PARTITION_FETCH_BYTES=1048576 scripts/drain-order.sh
#
# Anything in the environment (RECON_KAFKA_PROP_*, RECON_*) reaches the worker, so
# runs with and without a setting can alternate. Uses the services from
# scripts/dev-services.sh and a database `drain_order`, dropped first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SCENARIOS=${SCENARIOS:-100000}
scripts/dev-services.sh up >/dev/null
cargo build --release --locked --quiet
bin=$PWD/target/release/recon-worker
tools=$PWD/target/release/recon-tools
work=$(mktemp -d)
worker=""
cleanup() { [ -n "$worker" ] && kill -TERM "$worker" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

psql_() { psql -q -X -h 127.0.0.1 -U postgres "$@"; }
id="order$(date +%s)"
psql_ -c "DROP DATABASE IF EXISTS drain_order WITH (FORCE)" -c "CREATE DATABASE drain_order" >/dev/null
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/drain_order
export RECON_PAYMENTS_TOPIC="$id-p" RECON_SETTLEMENTS_TOPIC="$id-s" RECON_GROUP_ID="$id"
export RECON_METRICS_ADDR=127.0.0.1:0 RUST_LOG=${RUST_LOG:-warn}
"$tools" create-topics --partitions 4 >/dev/null
"$tools" loadgen --scenarios "$SCENARIOS" --seed 3 --mix v1 --id-prefix "$id-" >"$work/loadgen.txt"
messages=$(awk '/^produced/ {print $2}' "$work/loadgen.txt")

started=$(date +%s.%N)
"$bin" run >"$work/worker.log" 2>&1 &
worker=$!
stored=0
while [ "$stored" -lt "$messages" ]; do
    kill -0 "$worker" 2>/dev/null || { echo "the worker exited"; tail "$work/worker.log"; exit 1; }
    sleep 0.5
    stored=$(psql_ -d drain_order -tAc "SELECT COALESCE(SUM(payments_next_offset + settlements_next_offset), 0) FROM recon_partition_pairs" 2>/dev/null || echo 0)
done
seconds=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
peak_kb=$(awk '/VmHWM/ {print $2}' "/proc/$worker/status")
kill -TERM "$worker"
wait "$worker" || true
worker=""

psql_ -d drain_order -c "SELECT kafka_partition AS pair, event_kind, count(*), min(created_at)::time(1) AS first_stored, max(created_at)::time(1) AS last_stored FROM recon_events GROUP BY 1, 2 ORDER BY 1, 2"
updates=$(psql_ -d drain_order -tAc "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'recon_events'")
echo "drain_order: messages=$messages seconds=$seconds peak_rss_mb=$((peak_kb / 1024)) outcome_updates=$updates"
