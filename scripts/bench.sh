#!/usr/bin/env bash
# One-command benchmark: on this machine and Apache Kafka, in one run, measures and
# prints
#   - raw broker consume rate of the benchmark backlog (a consumer that only counts),
#   - raw PostgreSQL write rate of as many simple outcome rows (batched UNNEST insert:
#     one pair, one connection, short ascending ids, all matched),
#   - raw PostgreSQL insert rate of THE SAME ROWS the pipeline stores for its stream
#     (`bench pg-same-rows`: the pipeline's final rows, inserted with the checkpoint's
#     statements in its batches and concurrent transactions, nothing else), the
#     reference of the pipeline below (`pg_raw_rows_per_s`, in messages of the stream
#     per second, as the pipeline's eps),
#   - recon-worker end to end draining that backlog (first assignment to last commit),
#   - the pipeline alone, without the broker (pre-decoded events → engine → checkpoint),
#   - the live maximum: the rate the load generator produces at, flat out, while the
#     worker reads and commits as it goes,
#   - p50/p99 latency from Kafka timestamp to PostgreSQL commit at 50% of that live
#     maximum,
#   - the worker's peak RSS,
#   - CPU seconds of broker, PostgreSQL and worker during the raw consume and the drain,
# and ends with one `bench:` line (its ratios compare figures of the same run: the
# machine is shared and its speed varies between runs). Every stream is the version-1
# mix (`--mix v1`, as in earlier sessions) except in the refunds phase, which compares
# the pipeline on a capture-only stream with the same stream plus 10% refunds and 1%
# chargebacks (contract §6), and the payouts phase, which compares it with the same
# stream with every capture line in a payout of 500 (contract §7), in alternating runs. BENCH_SCENARIOS sets the backlog size (≈2.1
# messages per scenario); BENCH_LATENCY_RATE fixes the latency phase's rate (msg/s).
# Uses the services from scripts/dev-services.sh. Figures are
# echoed with `tee -a /dev/stderr`: without -a, a log file given as stderr is truncated.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SCENARIOS=${BENCH_SCENARIOS:-150000}
LATENCY_SECONDS=${BENCH_LATENCY_SECONDS:-30}
PARTITIONS=4
# The Apache Kafka broker's JVM, as scripts/dev-services.sh starts it.
BROKER_PROCESS="kafka.Kafka "

scripts/dev-services.sh up >/dev/null
cargo build --release --locked --quiet
bin=$PWD/target/release/recon-worker
# Topics, the load generator and the measurements around the worker.
tools=$PWD/target/release/recon-tools
id=$(date +%s)
work=$(mktemp -d)
psql_() { psql -q -h 127.0.0.1 -U postgres "$@"; }
# CPU seconds (user + system, with reaped children) of the processes matching $1: on
# a machine shared by broker, database and worker this shows where the time goes.
cpu_seconds() {
    local pid total=0
    for pid in $(pgrep -f "$1"); do
        total=$((total + $(awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz}'
}
# Each phase leaves work behind that would be billed to the next one: autovacuum of
# the rows it wrote, a checkpoint of its WAL. Measured here: the pipeline phase ran at
# 35-43k events/s right after the drain and at 90k on a quiet machine. So the rows are
# vacuumed and checkpointed between phases (what autovacuum would do anyway), and each
# phase starts only once the machine is idle.
quiesce() {
    local db
    for db in "$@"; do psql_ -d "$db" -c "VACUUM (ANALYZE)"; done
    psql_ -c "CHECKPOINT"
    local busy0 total0 busy1 total1
    for _ in $(seq 30); do
        read -r busy0 total0 < <(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
        sleep 1
        read -r busy1 total1 < <(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
        awk -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) 'BEGIN {exit !(b <= 0.1 * t)}' && return 0
    done
    echo "(the machine did not go idle within 30 s; measuring anyway)"
}
# Messages the worker has committed so far (both topics), as stored with the results.
stored_offsets() {
    psql_ -d bench_e2e -tAc "SELECT COALESCE(SUM(payments_next_offset + settlements_next_offset), 0) FROM recon_partition_pairs" 2>/dev/null || echo 0
}
# Waits up to 4 minutes for the worker to have committed $1 messages; else shows the
# tail of its log ($2) and fails.
await_stored() {
    for _ in $(seq 1200); do
        [ "$(stored_offsets)" -ge "$1" ] && return 0
        sleep 0.2
    done
    echo "the worker did not commit $1 messages"
    tail "$2"
    exit 1
}
for db in bench_e2e bench_pg bench_pipe; do
    psql_ -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
done
export RECON_PAYMENTS_TOPIC="bench-p-$id" RECON_SETTLEMENTS_TOPIC="bench-s-$id" RECON_GROUP_ID="bench-$id"
export RECON_METRICS_ADDR=127.0.0.1:19898 RUST_LOG=warn,recon_worker=info
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_e2e
worker=""
cleanup() { [ -n "$worker" ] && kill -TERM "$worker" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$tools" create-topics --partitions $PARTITIONS >/dev/null
echo "== backlog: $SCENARIOS scenarios"
"$tools" loadgen --scenarios "$SCENARIOS" --seed "$id" --poison-every 200 --mix v1 --id-prefix "b$id-" >"$work/loadgen.txt"
messages=$(awk '/^produced/ {print $2}' "$work/loadgen.txt")
echo "produced $messages messages"

quiesce
echo "== raw consume"
broker0=$(cpu_seconds "$BROKER_PROCESS")
raw=$("$tools" bench consume --messages "$messages" | tee -a /dev/stderr)
echo "cpu during raw consume: broker=$(awk -v a="$broker0" -v b="$(cpu_seconds "$BROKER_PROCESS")" 'BEGIN {printf "%.1f", b - a}')s"
raw_eps=$(sed -E 's/.* eps=([0-9]+).*/\1/' <<<"$raw")

echo "== raw PostgreSQL write (simple rows)"
pg=$(DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_pg "$tools" bench pg-write --rows "$messages" | tee -a /dev/stderr)
pg_simple_rps=$(sed -E 's/.* rows_per_s=([0-9]+).*/\1/' <<<"$pg")
psql_ -c "DROP DATABASE bench_pg WITH (FORCE)"
quiesce

echo "== raw PostgreSQL insert of the pipeline's own rows (the pipeline phase's reference)"
# The pipeline runs once into bench_pg_src (not timed); its final rows are then
# inserted into bench_pg and timed. events_per_s counts the stream's messages.
for db in bench_pg bench_pg_src; do
    psql_ -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
done
pg=$(DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_pg "$tools" bench pg-same-rows --scenarios "$SCENARIOS" --partitions $PARTITIONS --mix v1 --scratch-database bench_pg_src | tee -a /dev/stderr)
pg_rps=$(sed -E 's/.* events_per_s=([0-9]+).*/\1/' <<<"$pg")
psql_ -c "DROP DATABASE bench_pg WITH (FORCE)" -c "DROP DATABASE bench_pg_src WITH (FORCE)"
quiesce

echo "== recon-worker end to end (draining the backlog)"
broker0=$(cpu_seconds "$BROKER_PROCESS"); postgres0=$(cpu_seconds "postgres")
"$bin" run >"$work/worker.log" 2>&1 &
worker=$!
await_stored "$messages" "$work/worker.log"
peak_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$worker/status")
echo "cpu during the drain: broker=$(awk -v a="$broker0" -v b="$(cpu_seconds "$BROKER_PROCESS")" 'BEGIN {printf "%.1f", b - a}')s" \
    "postgres=$(awk -v a="$postgres0" -v b="$(cpu_seconds "postgres")" 'BEGIN {printf "%.1f", b - a}')s" \
    "worker=$(cpu_seconds "$bin run")s (postgres: backends that exited are not counted)"
first=$(grep -m1 "took ownership" "$work/worker.log" | awk '{print $1}')
e2e_seconds=$(psql_ -d bench_e2e -tAc "SELECT extract(epoch FROM max(updated_at) - '$first'::timestamptz) FROM recon_partition_pairs")
e2e_eps=$(awk -v m="$messages" -v s="$e2e_seconds" 'BEGIN {printf "%d", m / s}')
echo "e2e: messages=$messages seconds=$e2e_seconds eps=$e2e_eps peak_rss_mb=$((peak_rss_kb / 1024))"
kill -TERM "$worker"; wait "$worker" || true; worker=""
quiesce bench_e2e

echo "== pipeline only (no broker)"
pipe=$(DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_pipe "$tools" bench pipeline --scenarios "$SCENARIOS" --partitions $PARTITIONS --mix v1 | tee -a /dev/stderr)
pipeline_eps=$(sed -E 's/.* eps=([0-9]+).*/\1/' <<<"$pipe")
psql_ -c "DROP DATABASE bench_pipe WITH (FORCE)"
quiesce

echo "== refunds and chargebacks: the pipeline on a capture-only stream and with 10% refunds, 1% chargebacks"
# 11 refund and 1 chargeback scenarios per 95 version-1 ones: 10.3% and 0.9% of the
# payment ids. Alternating runs, so the machine's drift falls on both alike; the
# figure is messages per second (a refund scenario has four messages, not two).
refunds_mix="v1,refund=11,chargeback=1"
capture_sum=0; refunds_sum=0
for round in 1 2; do
    for mix in v1 "$refunds_mix"; do
        psql_ -c "DROP DATABASE IF EXISTS bench_pipe WITH (FORCE)" -c "CREATE DATABASE bench_pipe" >/dev/null
        run=$(DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_pipe "$tools" bench pipeline --scenarios "$SCENARIOS" --partitions $PARTITIONS --mix "$mix")
        echo "mix=$mix $run" >&2
        eps=$(sed -E 's/.* eps=([0-9]+).*/\1/' <<<"$run")
        if [ "$mix" = v1 ]; then capture_sum=$((capture_sum + eps)); else refunds_sum=$((refunds_sum + eps)); fi
        quiesce bench_pipe
    done
done
psql_ -c "DROP DATABASE bench_pipe WITH (FORCE)"
refunds_ratio=$(awk -v r="$refunds_sum" -v c="$capture_sum" 'BEGIN {printf "%.2f", r / c}')
echo "refunds: capture_only_eps=$((capture_sum / 2)) with_refunds_eps=$((refunds_sum / 2)) ratio=$refunds_ratio"
echo "== payouts: the pipeline on the version-1 stream, and on the same stream with every capture line in a payout"
# Contract §7: each line adds to its payout's partial sum in its own checkpoint, and
# each payout of 500 lines has its announcement on the payouts topic. Alternating runs.
plain_sum=0; payouts_sum=0
for round in 1 2; do
    for every in 0 500; do
        psql_ -c "DROP DATABASE IF EXISTS bench_pipe WITH (FORCE)" -c "CREATE DATABASE bench_pipe" >/dev/null
        run=$(DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_pipe "$tools" bench pipeline --scenarios "$SCENARIOS" --partitions $PARTITIONS --mix v1 --payouts-every-line $every)
        echo "payouts_every_line=$every $run" >&2
        eps=$(sed -E 's/.* eps=([0-9]+).*/\1/' <<<"$run")
        if [ "$every" = 0 ]; then plain_sum=$((plain_sum + eps)); else payouts_sum=$((payouts_sum + eps)); fi
        quiesce bench_pipe
    done
done
psql_ -c "DROP DATABASE bench_pipe WITH (FORCE)"
payouts_ratio=$(awk -v p="$payouts_sum" -v c="$plain_sum" 'BEGIN {printf "%.2f", p / c}')
echo "payouts: without_eps=$((plain_sum / 2)) with_payouts_eps=$((payouts_sum / 2)) ratio=$payouts_ratio"
echo "== bytes per open item in the window, by kind (200,000 items each)"
for item in payment refund refund-line chargeback reversal; do
    DATABASE_URL=postgres://unused@127.0.0.1/unused "$tools" bench window-memory --items 200000 --item "$item"
done

echo "== live maximum: the load generator producing as fast as it can, the worker reading as it goes"
# The latency below is measured live: the broker takes the generator's writes and
# serves the worker's reads at the same time, on the same two cores. The drain above
# only reads, so half of its rate is not half of what the system sustains live.
# Measured here at half the drain rate (25k msg/s): the broker used 86% of a core,
# and one more reader pushed its own p50 from 29 to 608 ms. The live maximum is the
# rate at which the generator produced while the worker kept up.
"$bin" run >"$work/worker-live.log" 2>&1 &
worker=$!
for _ in $(seq 100); do curl -sf "http://$RECON_METRICS_ADDR/readyz" >/dev/null && break; sleep 0.2; done
before=$(stored_offsets)
"$tools" loadgen --scenarios "$SCENARIOS" --seed $((id + 3)) --poison-every 200 --mix v1 --id-prefix "m$id-" >"$work/live.txt" 2>/dev/null
produced_at=$(date +%s.%N)
live_messages=$(awk '/^produced/ {print $2}' "$work/live.txt")
produce_seconds=$(sed -nE 's/^produced .* in ([0-9.]+)s.*/\1/p' "$work/live.txt")
await_stored $((before + live_messages)) "$work/worker-live.log"
last_commit=$(psql_ -d bench_e2e -tAc "SELECT extract(epoch FROM max(updated_at)) FROM recon_partition_pairs")
kill -TERM "$worker"; wait "$worker" || true; worker=""
live_eps=$(awk -v m="$live_messages" -v end="$produced_at" -v p="$produce_seconds" -v last="$last_commit" \
    'BEGIN {s = last - (end - p); if (s < p) s = p; printf "%d", m / s}')
echo "live: messages=$live_messages produce_seconds=$produce_seconds eps=$live_eps (first message produced to last commit)"
quiesce bench_e2e

# BENCH_LATENCY_RATE overrides the rate, e.g. half the drain rate instead (see the
# README's "What 50% load means").
rate=${BENCH_LATENCY_RATE:-$((live_eps / 2))}
latency_scenarios=$((rate * LATENCY_SECONDS * 10 / 21))
echo "== the broker's share of latency at the same load: a consumer with the worker's fetch settings, no worker"
(
    # Topics of its own: the worker below resumes where the drain stopped.
    export RECON_PAYMENTS_TOPIC="bench-kp-$id" RECON_SETTLEMENTS_TOPIC="bench-ks-$id"
    "$tools" create-topics --partitions $PARTITIONS >/dev/null
    "$tools" bench broker-latency --messages $((latency_scenarios * 2)) >"$work/broker-latency.txt" &
    probe=$!
    sleep 2
    "$tools" loadgen --scenarios "$latency_scenarios" --seed $((id + 2)) --poison-every 0 --mix v1 --id-prefix "k$id-" --rate "$rate" >/dev/null 2>&1
    wait "$probe"
)
cat "$work/broker-latency.txt" >&2
quiesce bench_e2e

echo "== latency at 50% load: $rate msg/s for ${LATENCY_SECONDS}s"
"$bin" run >"$work/worker2.log" 2>&1 &
worker=$!
for _ in $(seq 100); do curl -sf "http://$RECON_METRICS_ADDR/readyz" >/dev/null && break; sleep 0.2; done
"$tools" loadgen --scenarios "$latency_scenarios" --seed $((id + 1)) --poison-every 0 --mix v1 --id-prefix "l$id-" --rate "$rate" >/dev/null
sleep 2
curl -s "http://$RECON_METRICS_ADDR/metrics" >"$work/metrics.txt"
peak2_kb=$(awk '/VmHWM/ {print $2}' "/proc/$worker/status")
kill -TERM "$worker"; wait "$worker" || true; worker=""
read -r p50 p99 < <(python3 - "$work/metrics.txt" <<'PY'
import sys
buckets = []
for line in open(sys.argv[1]):
    if line.startswith("recon_processing_latency_seconds_bucket"):
        le = line.split('le="')[1].split('"')[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
buckets.sort()
total = buckets[-1][1] if buckets else 0
def quantile(q):
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le * 1000
            fraction = (rank - prev_count) / (count - prev_count) if count > prev_count else 1
            return (prev_le + (le - prev_le) * fraction) * 1000
        prev_le, prev_count = le, count
    return float("nan")
print(f"{quantile(0.5):.1f} {quantile(0.99):.1f}")
PY
)
echo "latency: p50_ms=$p50 p99_ms=$p99 (histogram interpolation) peak_rss_mb=$((peak2_kb / 1024))"
peak_mb=$(( (peak_rss_kb > peak2_kb ? peak_rss_kb : peak2_kb) / 1024 ))
ratio=$(awk -v e="$e2e_eps" -v r="$raw_eps" 'BEGIN {printf "%.2f", e / r}')
pipeline_ratio=$(awk -v e="$pipeline_eps" -v r="$pg_rps" 'BEGIN {printf "%.2f", e / r}')
pipeline_simple_ratio=$(awk -v e="$pipeline_eps" -v r="$pg_simple_rps" 'BEGIN {printf "%.2f", e / r}')
# pg_raw_rows_per_s: the same rows as the pipeline's (rows = the stream's events, per
# second); pg_raw_simple_rows_per_s: `bench pg-write`'s simple rows, as before session 14.
echo "bench: e2e_eps=$e2e_eps raw_consume_eps=$raw_eps e2e_ratio=$ratio pipeline_eps=$pipeline_eps pg_raw_rows_per_s=$pg_rps pipeline_ratio=$pipeline_ratio pg_raw_simple_rows_per_s=$pg_simple_rps pipeline_simple_ratio=$pipeline_simple_ratio refunds_ratio=$refunds_ratio payouts_ratio=$payouts_ratio p50_ms=$p50 p99_ms=$p99 peak_rss_mb=$peak_mb"
