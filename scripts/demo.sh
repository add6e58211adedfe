#!/usr/bin/env bash
# The main job, end to end, on this machine: services up, co-partitioned topics,
# the worker running, a sample stream of payments, refunds and settlement lines of every
# type (with discrepancies, chargebacks, over-refunds, redeliveries and bad messages)
# and payouts announced on a third topic (balanced, short, in a wrong currency, with a
# wrong line count, unannounced, announced early or twice) flowing through it, then a
# summary of the outcomes, discrepancies and payouts read from PostgreSQL (compare with
# the expected counts loadgen prints) and a look at /metrics. Then an operator's daily
# routine (README, Operations): what is open by kind and age, a difference accepted and
# another annotated, with their history; the rejected messages, and a re-drive of those
# rejected as too large once the limit is raised (the worker restarted with a larger
# RECON_MAX_MESSAGE_BYTES, as a fix would be deployed).
#
# Each run uses its own topics and a fresh `recon_demo` database, so it can be rerun.
# KEEP_RUNNING=1 leaves the worker running afterwards (stop it with kill -TERM).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
started=$(date +%s)

scripts/dev-services.sh up

echo "== building recon-worker and recon-tools (release)"
cargo build --release --locked --quiet
bin=target/release/recon-worker
# Topic creation and the load generator: the tools package (tools/), not the worker.
tools=target/release/recon-tools

run_id=$(date +%s)
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/recon_demo"
export RECON_PAYMENTS_TOPIC="demo-payments-$run_id"
export RECON_SETTLEMENTS_TOPIC="demo-settlements-$run_id"
# Contract §7: payout announcements, co-partitioned with the other two.
export RECON_PAYOUTS_TOPIC="demo-payouts-$run_id"
export RECON_GROUP_ID="recon-demo-$run_id"
export RECON_METRICS_ADDR="${RECON_METRICS_ADDR:-127.0.0.1:9898}"
# Deadlines stay at their 72h defaults; the sample's stale events are days old. A
# short idle timeout lets the watermark follow the clock soon after the stream ends.
export RECON_IDLE_TIMEOUT=3s
# The sample's events are dated about 61h before the wall clock (loadgen moves its
# timeline back so that no late line is ahead of its Kafka timestamp), and a payout is
# paid within two hours of its payments. With a 12h grace every announced payout is
# due once the stream goes quiet (the global watermark then follows the clock), and
# none while it is still being read (the watermark is then about the stream's own
# time): each ends balanced or in its mismatch, never pending. Unannounced payouts
# fall due after their last line + O (72h), later than the demo: they show as
# `unannounced` with no `unannounced_payout` open yet.
export RECON_PAYOUT_GRACE=12h
# A message size limit below the default (64 KiB): loadgen's too-large messages are just
# over it, and the routine below raises it and re-drives them.
export RECON_MAX_MESSAGE_BYTES=16384
SCENARIOS=${SCENARIOS:-5000}

psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS recon_demo" -c "CREATE DATABASE recon_demo" >/dev/null
sql() { psql -h 127.0.0.1 -U postgres -d recon_demo "$@"; }

echo "== topics"
$tools create-topics --partitions 4

echo "== worker (log: target/demo-worker.log)"
RUST_LOG=info $bin run >target/demo-worker.log 2>&1 &
worker=$!
trap '[ "${KEEP_RUNNING:-0}" = 1 ] || kill -TERM $worker 2>/dev/null || true' EXIT

echo "== producing a sample stream ($SCENARIOS scenarios, payouts included)"
# `payouts`: the default mix plus every payout scenario (contract §7).
$tools loadgen --scenarios "$SCENARIOS" --seed "$run_id" --poison-every 40 --mix payouts | tee target/demo-loadgen.txt
produced=$(awk '/^produced/ {print $2}' target/demo-loadgen.txt)
# The payouts loadgen expects, whatever their status.
expected_payouts=$(awk '/^expected payouts/ {on = 1; next} on && /^  / {n += $2; next} {on = 0} END {print n + 0}' target/demo-loadgen.txt)

echo "== waiting until all $produced messages are reconciled"
for _ in $(seq 600); do
    done_count=$(sql -tAc "SELECT COALESCE(SUM(payments_next_offset + settlements_next_offset + COALESCE(payouts_next_offset, 0)), 0) FROM recon_partition_pairs" 2>/dev/null || echo 0)
    [ "${done_count:-0}" -ge "$produced" ] && break
    kill -0 $worker 2>/dev/null || { echo "worker exited:"; tail -20 target/demo-worker.log; exit 1; }
    sleep 0.5
done
# Stale payments and settlements fire once the watermark passes their deadlines: after
# the stream goes quiet, within the idle timeout.
sleep 5
# The payout evaluator runs every few seconds: wait until it has taken in every payout
# and none is left pending (at most 30 s).
for _ in $(seq 60); do
    evaluated=$(sql -tAc "SELECT count(*) FILTER (WHERE status <> 'pending') FROM recon_payouts" 2>/dev/null || echo 0)
    [ "${evaluated:-0}" -ge "$expected_payouts" ] && break
    sleep 0.5
done

echo
echo "== outcomes (recon_outcomes) by event kind and settlement line type"
sql -c "SELECT outcome, event_kind, COALESCE(line_type, '') AS line_type, count(*) FROM recon_outcomes GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
echo "== rejected messages (rejected_events)"
sql -c "SELECT topic, reason_class, count(*), min(left(reason, 60)) AS example FROM rejected_events GROUP BY 1, 2 ORDER BY 2"
echo "== discrepancies (recon_discrepancies) by kind and state"
# Chargebacks open until their reversal (resolution 'reversed'); over_refunded is a
# payment refunded and charged back, paid back twice (resolved 'recovered' once the
# position is back at zero); missing/orphan ones resolved in passing name the outcome
# their late counterpart gave.
sql -c "SELECT kind, CASE WHEN resolved_at IS NULL THEN 'open' ELSE 'resolved' END AS state,
               COALESCE(resolution, '') AS resolution, count(*)
        FROM recon_discrepancies GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
echo "== open discrepancies, oldest first"
sql -c "SELECT kind, count(*), min(opened_at) AS oldest FROM recon_discrepancies WHERE resolved_at IS NULL GROUP BY kind ORDER BY oldest"
echo "== payments paid back twice (over_refunded), first lines below zero"
sql -c "SELECT d.payment_id, CASE WHEN d.resolved_at IS NULL THEN 'open' ELSE d.resolution END AS state,
               d.settlement_event_id AS first_line_below_zero, o.line_type, o.amount_minor AS gross_minor
        FROM recon_discrepancies d LEFT JOIN recon_outcomes o ON o.event_kind = 'settlement' AND o.event_id = d.settlement_event_id
        WHERE d.kind = 'over_refunded' ORDER BY d.opened_at LIMIT 5"
echo "== payouts (recon_payouts) by status; loadgen expected:"
sed -n '/^expected payouts/,/^scenarios:/p' target/demo-loadgen.txt | sed '$d'
sql -c "SELECT status, count(*) FROM recon_payouts GROUP BY 1 ORDER BY 1"
echo "== unbalanced payouts, oldest first"
sql -c "SELECT payout_id, currency, expected_net_minor, lines_net_minor, expected_line_count, line_count, status, paid_at
        FROM recon_payouts WHERE status <> 'balanced' ORDER BY since, payout_id LIMIT 10"
echo "== metrics at http://$RECON_METRICS_ADDR/metrics (also /healthz, /readyz)"
curl -s "http://$RECON_METRICS_ADDR/metrics" | grep -E '^recon_(events_consumed_total|events_rejected_total|outcomes_total|assigned_partitions|window_items) ' | head -20 || true
curl -s "http://$RECON_METRICS_ADDR/metrics" | grep -E '^recon_outcomes_total' | head -12 || true
echo "readyz: $(curl -s "http://$RECON_METRICS_ADDR/readyz")"

echo
echo "== the daily routine (README, Operations)"
echo "\$ recon-worker discrepancies list | head -4    # open ones, oldest first"
$bin discrepancies list | head -4 || true
echo "\$ recon-worker discrepancies list --kind fee_mismatch --format csv | head -3"
$bin discrepancies list --kind fee_mismatch --format csv | head -3 || true
fee=$(sql -tAc "SELECT id FROM recon_discrepancies WHERE kind = 'fee_mismatch' AND resolved_at IS NULL ORDER BY opened_at, id LIMIT 1")
chargeback=$(sql -tAc "SELECT id FROM recon_discrepancies WHERE kind = 'chargeback' AND resolved_at IS NULL ORDER BY opened_at, id LIMIT 1")
if [ -n "$fee" ]; then
    echo "\$ recon-worker discrepancies accept $fee --actor finance.alice --note 'PSP fee tier changed on the 1st; agreed with the PSP'"
    $bin discrepancies accept "$fee" --actor finance.alice --note "PSP fee tier changed on the 1st; agreed with the PSP"
fi
if [ -n "$chargeback" ]; then
    echo "\$ recon-worker discrepancies annotate $chargeback --actor oncall.bob --note 'dispute evidence sent, ticket FIN-231'"
    $bin discrepancies annotate "$chargeback" --actor oncall.bob --note "dispute evidence sent, ticket FIN-231"
fi
history="SELECT discrepancy_id, action, actor, note FROM recon_discrepancy_actions WHERE discrepancy_id IN (${fee:-0}, ${chargeback:-0}) ORDER BY discrepancy_id, id"
echo "\$ psql -c \"$history\""
sql -c "$history"
echo "\$ recon-worker rejects list --reason-class too_large | head -3"
$bin rejects list --reason-class too_large | head -3 || true
echo "== the fix: the worker restarted with RECON_MAX_MESSAGE_BYTES=65536"
kill -TERM $worker
wait $worker || true
RECON_MAX_MESSAGE_BYTES=65536 RUST_LOG=info $bin run >>target/demo-worker.log 2>&1 &
worker=$!
echo "\$ recon-worker rejects redrive --reason-class too_large --wait 60s --actor oncall.bob"
$bin rejects redrive --reason-class too_large --wait 60s --actor oncall.bob
echo "\$ recon-worker rejects list --reason-class too_large --format json | head -1"
$bin rejects list --reason-class too_large --format json | head -1
echo
echo "demo finished in $(( $(date +%s) - started ))s; database recon_demo, topics $RECON_PAYMENTS_TOPIC / $RECON_SETTLEMENTS_TOPIC / $RECON_PAYOUTS_TOPIC"
if [ "${KEEP_RUNNING:-0}" = 1 ]; then
    echo "worker still running as pid $worker (kill -TERM $worker to stop it)"
else
    kill -TERM $worker
    wait $worker && echo "worker stopped cleanly (exit 0)"
fi
