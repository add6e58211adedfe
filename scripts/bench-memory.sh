#!/usr/bin/env bash
# Memory benchmark (issue "Bounded memory"): prints
#   - RSS growth per open payment held in the in-memory window (1,000,000 items), and
#     per open item of each other kind (refund request, refund line, chargeback,
#     reversal; 200,000 each),
#   - the worker's peak RSS (VmHWM) draining backlogs of ~100k and ~5M messages with
#     default settings, and whether they are within 10% of each other.
# Set BENCH_BIG_SCENARIOS to change the large backlog (≈2.1 messages per scenario), and
# BENCH_MIX to give the load generator a mix (e.g. `v1`: no refunds or chargebacks).
# Uses the services from scripts/dev-services.sh; takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/dev-services.sh up >/dev/null
cargo build --release --locked --quiet
bin=$PWD/target/release/recon-worker
tools=$PWD/target/release/recon-tools
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== window: 1,000,000 open payments in memory"
DATABASE_URL=postgres://unused@127.0.0.1/unused "$tools" bench window-memory --items 1000000
echo "== window: 200,000 open items of each other kind (one per key)"
for item in refund refund-line chargeback reversal; do
    DATABASE_URL=postgres://unused@127.0.0.1/unused "$tools" bench window-memory --items 200000 --item "$item"
done

drain() {
    local scenarios=$1 id
    id="mem$(date +%s)$scenarios"
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS bench_mem WITH (FORCE)" -c "CREATE DATABASE bench_mem" >/dev/null
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_mem
    export RECON_PAYMENTS_TOPIC="$id-p" RECON_SETTLEMENTS_TOPIC="$id-s" RECON_GROUP_ID="$id" RECON_METRICS_ADDR=127.0.0.1:0
    "$tools" create-topics --partitions 4 >/dev/null
    "$tools" loadgen --scenarios "$scenarios" --seed 5 --mix "${BENCH_MIX:-}" --id-prefix "$id-" >"$work/loadgen.txt"
    local messages started seconds
    messages=$(awk '/^produced/ {print $2}' "$work/loadgen.txt")
    started=$(date +%s.%N)
    RUST_LOG=warn "$bin" run >"$work/worker.log" 2>&1 &
    local worker=$!
    while :; do
        local done_count
        done_count=$(psql -h 127.0.0.1 -U postgres -d bench_mem -tAc "SELECT COALESCE(SUM(payments_next_offset + settlements_next_offset), 0) FROM recon_partition_pairs" 2>/dev/null || echo 0)
        [ "${done_count:-0}" -ge "$messages" ] && break
        kill -0 $worker 2>/dev/null || { tail "$work/worker.log"; exit 1; }
        sleep 1
    done
    seconds=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
    local peak_kb
    peak_kb=$(awk '/VmHWM/ {print $2}' "/proc/$worker/status")
    kill -TERM $worker; wait $worker || true
    echo "backlog: messages=$messages drain_seconds=$seconds peak_rss_mb=$((peak_kb / 1024))" >&2
    echo "$((peak_kb / 1024))"
}

echo "== draining a ~100k-message backlog"
small=$(drain 48000)
echo "== draining a large backlog"
big=$(drain "${BENCH_BIG_SCENARIOS:-2400000}")
flat=$(awk -v a="$small" -v b="$big" 'BEGIN {d = (b - a) / a; if (d < 0) d = -d; print (d <= 0.10) ? "yes" : "no"}')
echo "memory: peak_rss_mb_100k=$small peak_rss_mb_large=$big flat_within_10pct=$flat"
