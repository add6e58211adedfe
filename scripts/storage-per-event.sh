#!/usr/bin/env bash
# Storage the worker's tables take per accepted event, measured end to end: a fresh
# database, the real worker (`recon-worker run`) reading fresh random topics that
# `recon-tools loadgen` fills with the default mix (payments, refunds, chargebacks,
# every kind of mismatch, duplicates, redeliveries, bad messages) with every capture
# line in a payout announced on the payouts topic (contract §7), so that every table
# the worker writes fills as it would in production. Once the worker has caught up
# and its deadlines and payout evaluations have settled: VACUUM ANALYZE, then per
# table of the schema rows, heap, index and TOAST bytes and bytes per accepted event,
# the totals, and the extrapolation to a year of 1M payments a day. docs/retention.md
# holds the figures and what to do about them.
#
#   scripts/storage-per-event.sh                 # 200,000 scenarios
#   SCENARIOS=600000 scripts/storage-per-event.sh
#
# Settings (environment):
#   SCENARIOS      loadgen scenarios (payment ids), default 200000
#   MIX            loadgen --mix, default empty: the default mix (contract §1-§6)
#   PAYOUT_LINES   capture lines per payout (loadgen --payouts-every-line), default 100;
#                  0: no announcements (loadgen still gives each refund line a payout of
#                  its own, never announced)
#   POISON_EVERY   one bad message every N scenarios (loadgen --poison-every), default
#                  50, loadgen's own default
#   PARTITIONS     partitions per topic, default 4
#   PROFILE        debug (default) or release: which build of the binaries to run.
#                  Storage does not depend on it; only the time to drain does.
#   SEED           loadgen --seed, default random (printed)
#   KEEP=1         keep the database (its name is printed) instead of dropping it
#   WORKER_FIRST=1 start the worker before the stream is produced (default: after)
#   TIMEOUT        seconds to wait for the worker to catch up, default 3600
#   IDLE_SECONDS   the worker's RECON_IDLE_TIMEOUT in seconds, default 30 (its default)
#
# "Accepted event" is what contract §3 counts: one row of recon_outcomes, i.e. one row
# of recon_events (payments, refund requests, settlement lines of every type).
# Payout announcements are accepted messages too but appear in recon_payouts, not
# recon_outcomes: their bytes are in the totals, they are not counted as events.
# A "payment" is a payment_captured event (event_kind `payment` in recon_outcomes,
# duplicates included); bytes per payment are the totals over that count, so they
# carry every other event of the mix (settlement lines, refunds, chargebacks, orphan
# lines) in the proportions the mix has, which the script prints.
#
# Idempotent: each run has its own topics, group and database (`recon_storage_<id>`).
# The topics stay on the broker (recon-tools cannot delete them); the test broker
# starts on empty storage after `scripts/dev-services.sh down` and `up`.
#
# Machine-readable last line:
#   storage: bytes_per_event=… bytes_per_payment=… year_1m_per_day_gb=…
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

SCENARIOS=${SCENARIOS:-200000}
MIX=${MIX:-}
PAYOUT_LINES=${PAYOUT_LINES:-100}
POISON_EVERY=${POISON_EVERY:-50}
PARTITIONS=${PARTITIONS:-4}
PROFILE=${PROFILE:-debug}
TIMEOUT=${TIMEOUT:-3600}
IDLE_SECONDS=${IDLE_SECONDS:-30}
case "$PROFILE" in
    debug) profile_flag=() ;;
    release) profile_flag=(--release) ;;
    *) echo "PROFILE must be debug or release, not $PROFILE" >&2; exit 2 ;;
esac

scripts/dev-services.sh up >/dev/null

# The worker and the tools, as the profile asks (a no-op when already built).
cargo build --locked --quiet --bins "${profile_flag[@]}"
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/$PROFILE/recon-worker
tools=$target_dir/$PROFILE/recon-tools

# Random names per run: topics, group and database never collide with an earlier run
# or with another one running beside it.
run_id="$(date +%s)-$$-$RANDOM"
db="recon_storage_${run_id//-/_}"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
export RECON_PAYMENTS_TOPIC="storage-payments-$run_id"
export RECON_SETTLEMENTS_TOPIC="storage-settlements-$run_id"
export RECON_PAYOUTS_TOPIC="storage-payouts-$run_id"
export RECON_GROUP_ID="recon-storage-$run_id"
# Port 0: any free port, so this runs beside a demo or another worker.
export RECON_METRICS_ADDR=127.0.0.1:0
# The stream's stale events are days old: once the stream ends and the idle timeout
# passes, the watermark follows the clock and every deadline the stream holds fires
# (missing, orphan, payout), so the tables reach the state a long-running deployment
# would hold for these events, discrepancies included. The idle timeout is the
# worker's default (30s) rather than scripts/demo.sh's 3s: a deployment's setting,
# and with 3s and the worker started before the stream (WORKER_FIRST=1), deadlines
# of payments whose settlement was still unread fired and resolved in passing (40k
# extra discrepancy rows and updates in a 200k run; docs/retention.md).
export RECON_IDLE_TIMEOUT="${IDLE_SECONDS}s"
export RECON_PAYOUT_GRACE=12h

pg() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres "$@"; }
sql() { pg -d "$db" "$@"; }

log_dir=$target_dir/storage-per-event
mkdir -p "$log_dir"
worker_log=$log_dir/worker-$run_id.log
loadgen_out=$log_dir/loadgen-$run_id.txt
worker=
cleanup() {
    if [ -n "$worker" ] && kill -0 "$worker" 2>/dev/null; then
        kill -TERM "$worker" 2>/dev/null || true
        wait "$worker" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "database $db kept (KEEP=1)" >&2
    else
        pg -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

pg -d postgres -c "CREATE DATABASE $db" >/dev/null
seed=${SEED:-$RANDOM}
echo "== run $run_id: database $db, $SCENARIOS scenarios, seed $seed, mix '${MIX:-default}', $PAYOUT_LINES lines per payout, build $PROFILE"
$tools create-topics --partitions "$PARTITIONS" >/dev/null

loadgen_args=(--scenarios "$SCENARIOS" --seed "$seed" --poison-every "$POISON_EVERY"
    --payouts-every-line "$PAYOUT_LINES")
[ -n "$MIX" ] && loadgen_args+=(--mix "$MIX")
start_worker() {
    RUST_LOG=${RUST_LOG:-info} $bin run >"$worker_log" 2>&1 &
    worker=$!
    worker_started=$(date +%s)
}
# The stream is produced before the worker starts, so the worker drains a backlog and
# no input of a pair looks idle while its messages are still being produced.
# WORKER_FIRST=1 starts the worker on the empty topics instead (scripts/demo.sh's
# order): a pair whose inputs were idle at the start, then had one input's messages
# applied before the other's, took the other input for idle and fired deadlines of
# payments whose settlements were still unread (docs/retention.md, "Found on the way").
if [ "${WORKER_FIRST:-0}" = 1 ]; then start_worker; fi
started=$(date +%s)
$tools loadgen "${loadgen_args[@]}" >"$loadgen_out"
produced=$(awk '/^produced/ {print $2}' "$loadgen_out")
expected_payouts=$(awk '/^expected payouts/ {on = 1; next} on && /^  / {n += $2; next} {on = 0} END {print n + 0}' "$loadgen_out")
echo "produced $produced messages in $(( $(date +%s) - started ))s (loadgen output: $loadgen_out)"
if [ -z "$worker" ]; then start_worker; fi

# Caught up: the offsets the worker stored in PostgreSQL (the source of truth, committed
# with the rows) account for every message produced. On fresh, non-transactional
# topics an offset is a message count.
echo "== waiting for the worker to store all $produced offsets (log: $worker_log)"
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    stored=$(sql -tAc "SELECT COALESCE(SUM(COALESCE(payments_next_offset, 0) + COALESCE(settlements_next_offset, 0)
                                           + COALESCE(payouts_next_offset, 0)), 0)
                       FROM recon_partition_pairs" 2>/dev/null || echo 0)
    [ "${stored:-0}" -ge "$produced" ] && break
    kill -0 "$worker" 2>/dev/null || { echo "worker exited:"; tail -20 "$worker_log"; exit 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { echo "not caught up after ${TIMEOUT}s ($stored of $produced)"; exit 1; }
    sleep 1
done
echo "caught up $(( $(date +%s) - worker_started ))s after the worker started"

# Then the deadlines (after the idle timeout) and the payout evaluator (every 5 s)
# write their outcomes, discrepancies and payout rows: wait until those tables have
# not changed for 8 s (longer than an evaluation period) and every payout is in.
# (recon_partition_pairs is left out: an idle pair writes its watermark every second.)
fingerprint() {
    sql -tAc "SELECT (SELECT count(*) FROM recon_discrepancies) || '/' ||
                     (SELECT count(*) FILTER (WHERE outcome = 'pending') FROM recon_events) || '/' ||
                     (SELECT count(*) || ':' || COALESCE(max(updated_at)::text, '') FROM recon_payout_state) || '/' ||
                     (SELECT COALESCE(sum(n_tup_upd + n_tup_ins), 0) FROM pg_stat_user_tables
                      WHERE relname IN ('recon_events', 'recon_discrepancies', 'recon_payout_state'))"
}
# Not before the idle timeout has passed: until then the deadlines cannot fire.
settle_from=$(( $(date +%s) + IDLE_SECONDS + 2 ))
settle_deadline=$(( settle_from + 180 ))
last=$(fingerprint); stable=0
while [ "$stable" -lt 8 ] || [ "$(date +%s)" -lt "$settle_from" ]; do
    [ "$(date +%s)" -lt "$settle_deadline" ] || { echo "warning: still changing after 180s"; break; }
    sleep 1
    now=$(fingerprint)
    if [ "$now" = "$last" ]; then stable=$((stable + 1)); else stable=0; last=$now; fi
done
payouts=$(sql -tAc "SELECT count(*) FROM recon_payout_state")
[ "$payouts" -ge "$expected_payouts" ] || echo "warning: $payouts payouts evaluated, loadgen expected $expected_payouts"

# The worker is stopped before measuring: nothing writes while VACUUM and the sizes run.
kill -TERM "$worker"
wait "$worker" || { echo "worker did not exit cleanly:"; tail -20 "$worker_log"; exit 1; }
worker=

# Dead tuples before VACUUM: what outcome updates left behind (an update of `outcome`
# is never HOT: the column is indexed and in partial index predicates).
echo "== before VACUUM: dead tuples and sizes as autovacuum left them"
sql -c "SELECT relname AS table, n_live_tup AS live, n_dead_tup AS dead, n_tup_upd AS updates,
               n_tup_hot_upd AS hot_updates, autovacuum_count AS autovacuums,
               pg_size_pretty(pg_total_relation_size(relid)) AS total
        FROM pg_stat_user_tables WHERE n_live_tup + n_dead_tup > 0 ORDER BY pg_total_relation_size(relid) DESC"
sql -c "VACUUM ANALYZE" >/dev/null

# Per table of the worker's schema: exact rows (count(*) through query_to_xml: no
# function to create), heap (main fork with its free-space and visibility maps),
# indexes, TOAST (its heap and its index), and bytes per accepted event.
report="WITH accepted AS (SELECT count(*)::numeric AS events FROM recon_events),
     t AS (
       SELECT c.relname AS table_name,
              (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', n.nspname, c.relname),
                                                   false, true, '')))[1]::text::bigint AS rows,
              COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast,
              pg_indexes_size(c.oid) AS idx,
              pg_table_size(c.oid) - COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS heap
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p'))
SELECT table_name AS \"table\", rows, heap AS heap_bytes, idx AS index_bytes, toast AS toast_bytes,
       heap + idx + toast AS total_bytes,
       round((heap + idx + toast) / NULLIF(accepted.events, 0), 1) AS bytes_per_event,
       round(100.0 * (heap + idx + toast) / sum(heap + idx + toast) OVER (), 1) AS pct
FROM t, accepted
UNION ALL
SELECT 'TOTAL', sum(rows), sum(heap), sum(idx), sum(toast), sum(heap + idx + toast),
       round(sum(heap + idx + toast) / NULLIF(max(accepted.events), 0), 1), 100.0
FROM t, accepted
ORDER BY total_bytes DESC"
echo
echo "== per table after VACUUM ANALYZE (bytes per event: over the accepted events, the rows of recon_events)"
sql -c "$report"
echo "== per index"
sql -c "SELECT indexrelid::regclass AS index, pg_relation_size(indexrelid) AS bytes,
               round(pg_relation_size(indexrelid) / (SELECT count(*) FROM recon_events)::numeric, 1) AS bytes_per_event
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND pg_relation_size(indexrelid) > 8192
        ORDER BY 2 DESC"

# What of that grows with history. VACUUM leaves in the heap the space of the dead
# versions that outcome updates made (a pending payment matched later is written
# twice), and in the indexes the pages emptied of such versions' entries (nearly all
# of recon_events_open_items: an item is in it only while open). Later inserts and
# page splits reuse both, so a long-running database keeps a bounded amount of that
# slack, not an amount per event: "occupied" is the allocated size without it (heap:
# pgstattuple's free space; B-tree indexes: pgstatindex's empty and deleted pages).
sql -c "CREATE EXTENSION IF NOT EXISTS pgstattuple" >/dev/null
occupied="WITH rel AS (SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = current_schema() AND c.relkind = 'r'),
     heap AS (SELECT r.relname, s.table_len, s.free_space FROM rel r, LATERAL pgstattuple(r.oid) s),
     idx AS (SELECT r.relname, sum(pg_relation_size(i.indexrelid)) AS bytes,
                    sum((s.deleted_pages + s.empty_pages) * 8192) AS reusable
             FROM rel r JOIN pg_index i ON i.indrelid = r.oid, LATERAL pgstatindex(i.indexrelid::regclass) s
             GROUP BY r.relname),
     ev AS (SELECT count(*)::numeric AS n FROM recon_events),
     t AS (SELECT h.relname, h.table_len, h.free_space, i.bytes AS index_bytes, i.reusable
           FROM heap h JOIN idx i USING (relname))
SELECT relname AS \"table\", table_len AS heap_bytes, free_space AS heap_free_bytes, index_bytes,
       reusable AS index_reusable_bytes,
       table_len - free_space + index_bytes - reusable AS occupied_bytes,
       round((table_len - free_space + index_bytes - reusable) / ev.n, 1) AS occupied_per_event
FROM t, ev
UNION ALL
SELECT 'TOTAL', sum(table_len), sum(free_space), sum(index_bytes), sum(reusable),
       sum(table_len - free_space + index_bytes - reusable),
       round(sum(table_len - free_space + index_bytes - reusable) / max(ev.n), 1)
FROM t, ev
ORDER BY occupied_bytes DESC"
echo "== occupied: allocated minus the heap's free space and the indexes' reusable pages (pgstattuple, pgstatindex; TOAST left out)"
sql -c "$occupied"

# Empty and deleted pages of an index (entries of rows updated away, such as pending
# items once matched) are reused by later page splits: they are the part of an index
# that does not grow with history.
echo "== B-tree indexes of recon_events and recon_discrepancies (pgstatindex)"
sql -c "SELECT c.relname AS index, s.leaf_pages, s.empty_pages, s.deleted_pages, s.avg_leaf_density,
               s.leaf_fragmentation
        FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid,
             LATERAL pgstatindex(c.oid::regclass) s
        WHERE i.indrelid IN ('recon_events'::regclass, 'recon_discrepancies'::regclass)
        ORDER BY pg_relation_size(c.oid) DESC"

echo "== what a payment brings (recon_outcomes rows per payment_captured event; duplicates included)"
sql -c "WITH o AS (SELECT event_kind, COALESCE(line_type, '') AS line_type, count(*) AS n FROM recon_outcomes GROUP BY 1, 2),
             p AS (SELECT sum(n) FILTER (WHERE event_kind = 'payment') AS payments FROM o)
        SELECT event_kind, line_type, n AS events, round(n / p.payments, 4) AS per_payment FROM o, p
        UNION ALL SELECT 'all', '', sum(n), round(sum(n) / max(p.payments), 4) FROM o, p
        ORDER BY 1, 2"
echo "== messages read"
sql -c "SELECT (SELECT SUM(COALESCE(payments_next_offset, 0) + COALESCE(settlements_next_offset, 0) + COALESCE(payouts_next_offset, 0))
                FROM recon_partition_pairs) AS messages,
               (SELECT count(*) FROM recon_events) AS accepted_events,
               (SELECT count(*) FROM recon_payout_announcements) AS announcements,
               (SELECT count(*) FROM rejected_events) AS rejected,
               (SELECT SUM(COALESCE(payments_next_offset, 0) + COALESCE(settlements_next_offset, 0) + COALESCE(payouts_next_offset, 0))
                FROM recon_partition_pairs)
               - (SELECT count(*) FROM recon_events) - (SELECT count(*) FROM recon_payout_announcements)
               - (SELECT count(*) FROM rejected_events) AS redeliveries"

totals=$(sql -tAF ' ' -c "
    WITH sizes AS (SELECT sum(pg_total_relation_size(c.oid)) AS bytes
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')),
         rejected AS (SELECT pg_total_relation_size('rejected_events') AS bytes),
         counts AS (SELECT count(*)::numeric AS events,
                           count(*) FILTER (WHERE event_kind = 'payment' AND refund_id IS NULL)::numeric AS payments
                    FROM recon_events)
    SELECT round(sizes.bytes / counts.events, 1),
           round(sizes.bytes / counts.payments, 1),
           round(sizes.bytes / counts.payments * 1e6 * 365 / 1e9, 1),
           round(counts.events / counts.payments, 3),
           round((sizes.bytes - rejected.bytes) / counts.events, 1),
           sizes.bytes, counts.events, counts.payments
    FROM sizes, rejected, counts")
read -r per_event per_payment year_gb events_per_payment per_event_no_rejects total_bytes events payments <<<"$totals"
occupied_bytes=$(sql -tAc "SELECT occupied_bytes FROM ($occupied) o WHERE \"table\" = 'TOTAL'")
read -r occupied_per_event occupied_per_payment occupied_year_gb <<<"$(sql -tAF ' ' -c "
    SELECT round($occupied_bytes / count(*)::numeric, 1),
           round($occupied_bytes / count(*) FILTER (WHERE event_kind = 'payment' AND refund_id IS NULL)::numeric, 1),
           round($occupied_bytes / count(*) FILTER (WHERE event_kind = 'payment' AND refund_id IS NULL)::numeric * 1e6 * 365 / 1e9, 1)
    FROM recon_events")"
echo "totals: $total_bytes bytes for $events accepted events ($payments payments, $events_per_payment events per payment);"
echo "        $per_event bytes per event ($per_event_no_rejects without rejected_events), $per_payment bytes per payment"
echo "        one year of 1M payments a day: $per_payment B x 1e6 x 365 = $year_gb GB (10^9 bytes), build $PROFILE, $SCENARIOS scenarios"
echo "        occupied (without the reusable slack): $occupied_per_event bytes per event, $occupied_per_payment per payment, $occupied_year_gb GB a year"
echo "storage: bytes_per_event=$per_event bytes_per_payment=$per_payment year_1m_per_day_gb=$year_gb"
