//! End to end against a real Kafka-protocol broker and a real PostgreSQL: the worker
//! runs as a separate process; tests compare its tables with the load generator's
//! independent ground truth.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use recon_tools::loadgen::Mix;
use recon_worker::engine::Outcome;
use recon_worker::event::EventKind;
use sqlx::{PgPool, Row};

const WITHIN: Duration = Duration::from_secs(90);

#[sqlx::test(migrations = false)]
async fn a_known_mix_reaches_exactly_the_expected_outcomes_and_rejections(pool: PgPool) {
    let world = World::new(pool, 3).await;
    // 150 scenarios with a bad message every 3: 50 bad messages, every class at least
    // once; and every outcome (25 scenarios, those of contract §6 included: 60 missed
    // some).
    let plan = world.plan(150, 7, full_mix());
    let (records, truth) = generate(&plan);
    let classes: std::collections::BTreeSet<&str> =
        truth.rejected.iter().map(|(_, c)| *c).collect();
    assert_eq!(
        classes.len(),
        recon_worker::event::Rejection::CLASSES.len(),
        "every rejection class is produced"
    );
    for outcome in Outcome::ALL {
        assert!(
            truth.outcome_counts().contains_key(&outcome),
            "scenario for {outcome} is produced"
        );
    }
    world.produce(&records).await;

    let mut worker = world.spawn_worker("worker", &[]);
    world.await_truth(&truth, WITHIN).await;
    world.await_discrepancies(&truth, WITHIN).await;

    // The contract's columns, by name.
    let row = sqlx::query(
        "SELECT event_id, event_kind, payment_id, outcome, counterpart_event_id, updated_at FROM recon_outcomes LIMIT 1",
    )
    .fetch_one(&world.pool)
    .await
    .expect("recon_outcomes has the contract's columns");
    let _: chrono::DateTime<chrono::Utc> = row.get("updated_at");
    let rejected = sqlx::query(
        "SELECT topic, kafka_partition, kafka_offset, reason, payload, rejected_at, payload_size, reason_class
         FROM rejected_events",
    )
    .fetch_all(&world.pool)
    .await
    .expect("rejected_events has the contract's columns");
    for row in &rejected {
        let reason: String = row.get("reason");
        assert!(!reason.is_empty());
        let payload: Option<Vec<u8>> = row.get("payload");
        let size: i32 = row.get("payload_size");
        match row.get::<String, _>("reason_class").as_str() {
            "empty" => assert!(payload.is_none() && size == 0),
            "too_large" => {
                assert_eq!(
                    payload.map(|p| p.len()),
                    Some(recon_worker::rejection::REJECTED_PAYLOAD_CAP)
                );
                assert!(size as usize > 64 * 1024);
            }
            _ => assert_eq!(payload.map(|p| p.len()), Some(size as usize)),
        }
    }
    // Offsets in PostgreSQL account for every message produced, per topic partition.
    let stored: i64 = stored_offsets_total(&world).await;
    assert_eq!(
        stored as usize,
        records.len(),
        "stored offsets cover every message"
    );
    // The same offsets reach Kafka too (advisory, for lag tools), soon after.
    let started = std::time::Instant::now();
    loop {
        let behind = kafka_offsets_behind(&world);
        if behind.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "Kafka committed offsets behind the end: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Deadline discrepancies are in the history.
    let open_missing = world
        .count("SELECT count(*) FROM recon_discrepancies WHERE kind = 'missing_settlement' AND resolved_at IS NULL")
        .await;
    assert_eq!(
        open_missing as usize,
        truth.outcome_counts()[&Outcome::MissingSettlement]
    );
    // Open items and the age of the oldest, from the worker's gauges (refreshed every 15 s).
    let addr = worker.metrics_addr(Duration::from_secs(10));
    let expected = [
        (EventKind::Payment, Outcome::MissingSettlement),
        (EventKind::Settlement, Outcome::OrphanSettlement),
        (EventKind::Payment, Outcome::Pending),
    ];
    let started = std::time::Instant::now();
    for (event_kind, outcome) in expected {
        let labels = [
            format!("event_kind=\"{event_kind}\""),
            format!("outcome=\"{outcome}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let want = truth.count(event_kind, outcome) as f64;
        loop {
            let got = scrape_series(&addr, "recon_open_items", &labels).await;
            if got == Some(want) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "recon_open_items{labels:?} = {got:?}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let age = scrape_series(&addr, "recon_oldest_open_item_age_seconds", &labels)
            .await
            .unwrap_or(0.0);
        assert!(
            age > 0.0,
            "age of the oldest {event_kind} {outcome} is reported"
        );
    }

    worker.stop_cleanly();
}

/// Issue 21 (contract §6): every refund and chargeback scenario of the load generator
/// (refunds matched, late, mismatched, missing, orphaned, requested twice and settled
/// twice; a chargeback open, one reversed and a reversal alone; a payment refunded and
/// charged back, with and without the reversal that recovers it) amid ordinary
/// traffic, read by one worker, reaches exactly its ground truth: every event's
/// outcome and counterpart, and every discrepancy's kind, state and resolution.
#[sqlx::test(migrations = false)]
async fn every_refund_and_chargeback_scenario_reaches_its_outcomes_and_discrepancies(pool: PgPool) {
    use recon_tools::loadgen::version_2_scenario_names;
    use recon_worker::engine::{DiscrepancyKind, RECOVERED, REVERSED};
    let world = World::new(pool, 2).await;
    let mix = Mix {
        matched: 4,
        duplicate_payment: 1,
        missing_settlement: 1,
        orphan_settlement: 1,
        redelivery: 1,
        poison_every: 25,
        ..Mix::version_2_only(2)
    };
    let plan = world.plan(200, 91, mix);
    let (mut records, truth) = generate(&plan);
    let redelivered_in_mix = 2 * truth.scenarios.get("redelivery").copied().unwrap_or(0);
    for name in version_2_scenario_names() {
        assert!(
            truth.scenarios.get(name) >= Some(&2),
            "scenario {name} is generated twice at least: {:?}",
            truth.scenarios
        );
    }
    for outcome in [
        Outcome::DuplicateRefund,
        Outcome::ChargebackOpen,
        Outcome::ChargebackReversed,
    ] {
        assert!(truth.outcome_counts().contains_key(&outcome), "{outcome}");
    }
    let states = truth.discrepancy_counts();
    for state in [
        (DiscrepancyKind::Chargeback, None),
        (DiscrepancyKind::Chargeback, Some(REVERSED.to_owned())),
        (DiscrepancyKind::OverRefunded, None),
        (DiscrepancyKind::OverRefunded, Some(RECOVERED.to_owned())),
    ] {
        assert!(states.contains_key(&state), "{state:?} in {states:?}");
    }
    // At the end, as an at-least-once producer would: every refund request and refund
    // line again; and a refund request reusing a payment's event id, which the payments
    // topic has accepted already (payments and refund requests share its id space,
    // contract §1): all of them redeliveries, which change nothing.
    let json = |r: &recon_tools::loadgen::Record| -> serde_json::Value {
        serde_json::from_slice(r.value.as_deref().unwrap_or_default()).unwrap_or_default()
    };
    let mut again: Vec<_> = records
        .iter()
        .filter(|r| {
            let value = json(r);
            value["type"] == "refund_requested" || value["line_type"] == "refund"
        })
        .cloned()
        .collect();
    let payment = records
        .iter()
        .map(json)
        .find(|v| v["type"] == "payment_captured")
        .expect("a payment");
    let payment_id = payment["payment_id"].as_str().expect("payment_id");
    again.push(record(
        recon_worker::event::Input::Payments,
        payment_id,
        serde_json::json!({
            "event_id": payment["event_id"], "type": "refund_requested",
            "refund_id": "refund-reusing-an-event-id", "payment_id": payment_id,
            "amount_minor": 1, "currency": payment["currency"],
            "requested_at": payment["occurred_at"]}),
    ));
    assert!(again.len() > 20, "{} sent again", again.len());
    let redelivered = redelivered_in_mix + again.len();
    records.extend(again);
    world.produce(&records).await;

    let mut worker = world.spawn_worker("refunds", &[]);
    world.await_truth(&truth, WITHIN).await;
    world.await_discrepancies(&truth, WITHIN).await;
    let addr = worker.metrics_addr(Duration::from_secs(10));
    assert_counter_settles_at(&addr, "recon_events_redelivered_total", redelivered as f64).await;

    // The columns version 2 adds to recon_outcomes say what each message said.
    type Columns = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let stored: std::collections::BTreeMap<(String, String), Columns> = sqlx::query(
        "SELECT event_kind, event_id, line_type, refund_id, dispute_id, payout_id FROM recon_outcomes",
    )
    .fetch_all(&world.pool)
    .await
    .expect("recon_outcomes has the version 2 columns")
    .into_iter()
    .map(|row| {
        (
            (row.get(0), row.get(1)),
            (row.get(2), row.get(3), row.get(4), row.get(5)),
        )
    })
    .collect();
    let mut checked = 0;
    for record in &records {
        let Some(value) = record
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
        else {
            continue;
        };
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let kind = match field("type").as_deref() {
            Some("payment_captured") => EventKind::Payment,
            Some("refund_requested") => EventKind::Refund,
            Some("settlement_line") => EventKind::Settlement,
            _ => continue,
        };
        let Some(event_id) = field("event_id") else {
            continue;
        };
        if !truth.outcomes.contains_key(&(kind, event_id.clone())) {
            continue; // a bad message
        }
        let line_type = (kind == EventKind::Settlement)
            .then(|| field("line_type").unwrap_or_else(|| "capture".to_owned()));
        let expected = (
            line_type,
            field("refund_id"),
            field("dispute_id"),
            field("payout_id"),
        );
        assert_eq!(
            stored.get(&(kind.as_str().to_owned(), event_id.clone())),
            Some(&expected),
            "{kind} {event_id}"
        );
        checked += 1;
    }
    assert!(checked >= truth.outcomes.len(), "{checked} rows checked");
    worker.stop_cleanly();
}

/// The same scenarios read in the worst order the contract allows: every settlement
/// line first (each chargeback's reversal moved before its chargeback), the payments
/// topic (payments and refund requests) only once all of them are committed, a few
/// messages per batch. Refund lines wait for their requests, reversals for their
/// chargebacks (a reversal read first still leaves a resolved `chargeback`
/// discrepancy), over-refunds are computed before their payments arrive; and every
/// outcome and discrepancy ends as in production order. (Lines that turned orphan
/// while they waited are resolved by their counterparts: history the truth allows.)
#[sqlx::test(migrations = false)]
async fn refunds_and_chargebacks_read_settlements_first_reach_the_same_truth(pool: PgPool) {
    use recon_tools::loadgen::Record;
    use recon_worker::event::Input;
    let world = World::new(pool, 2).await;
    let mix = Mix {
        matched: 4,
        ..Mix::version_2_only(2)
    };
    let (records, truth) = generate(&world.plan(120, 92, mix));
    let (payments, lines): (Vec<Record>, Vec<Record>) = records
        .into_iter()
        .partition(|r| r.input() == Some(Input::Payments));
    let dispute_of = |record: &Record, line_type: &str| -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(record.value.as_deref()?).ok()?;
        if value["line_type"] != line_type {
            return None;
        }
        value["dispute_id"].as_str().map(str::to_owned)
    };
    let charged_back: std::collections::HashSet<String> = lines
        .iter()
        .filter_map(|r| dispute_of(r, "chargeback"))
        .collect();
    let mut settlements = Vec::with_capacity(lines.len());
    let mut moved = 0;
    for line in &lines {
        if dispute_of(line, "chargeback_reversal").is_some_and(|d| charged_back.contains(&d)) {
            continue; // goes before its chargeback
        }
        if let Some(dispute) = dispute_of(line, "chargeback") {
            let reversal = lines.iter().find(|r| {
                dispute_of(r, "chargeback_reversal").as_deref() == Some(dispute.as_str())
            });
            if let Some(reversal) = reversal {
                settlements.push(reversal.clone());
                moved += 1;
            }
        }
        settlements.push(line.clone());
    }
    assert_eq!(settlements.len(), lines.len());
    assert!(
        moved >= 2,
        "{moved} reversals read before their chargebacks"
    );

    world.produce(&settlements).await;
    let mut worker = world.spawn_worker("settlements-first", &[("RECON_BATCH_MAX_MESSAGES", "7")]);
    await_committed(&world, &worker, settlements.len()).await;
    world.produce(&payments).await;
    world.await_truth(&truth, WITHIN).await;
    world.await_discrepancies(&truth, WITHIN).await;
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn sigterm_mid_stream_and_restart_lose_nothing_and_count_nothing_twice(pool: PgPool) {
    let world = World::new(pool, 4).await;
    let plan = world.plan(3_000, 11, Mix::default());
    let (records, truth) = generate(&plan);
    world.produce(&records).await;

    // Small batches so the stream takes a while and the signal lands mid-stream.
    let small = [("RECON_BATCH_MAX_MESSAGES", "20")];
    let mut worker = world.spawn_worker("first", &small);
    let total = truth.outcomes.len() as i64;
    let started = std::time::Instant::now();
    loop {
        let rows = world.count("SELECT count(*) FROM recon_outcomes").await;
        if rows > 200 {
            assert!(
                rows < total,
                "stream finished before the signal; make it longer"
            );
            break;
        }
        assert!(
            started.elapsed() < WITHIN,
            "worker made no progress:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.signal("TERM");
    let stopping = std::time::Instant::now();
    let status = worker.wait(Duration::from_secs(35));
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        worker.log_text()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "shutdown within its bound"
    );
    let at_stop = world.count("SELECT count(*) FROM recon_outcomes").await;
    assert!(at_stop < total, "stopped mid-stream ({at_stop} of {total})");

    let mut second = world.spawn_worker("second", &[]);
    world.await_truth(&truth, WITHIN).await;
    // Each discrepancy once: none lost (migration 0006 keys them, so none doubled).
    // (A mismatch opens one row for its pair, not one per event; a chargeback one and
    // an over-refund one per payment: the truth lists each.)
    let opened = world
        .count("SELECT count(*) FROM recon_discrepancies")
        .await;
    let expected_opened = truth.discrepancies.len();
    assert_eq!(
        opened as usize, expected_opened,
        "each discrepancy opened exactly once"
    );
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(35)).success());
}

#[sqlx::test(migrations = false)]
async fn sigkill_mid_stream_and_restart_lose_nothing(pool: PgPool) {
    let world = World::new(pool, 2).await;
    let plan = world.plan(2_000, 13, Mix::default());
    let (records, truth) = generate(&plan);
    world.produce(&records).await;
    let mut worker = world.spawn_worker("first", &[("RECON_BATCH_MAX_MESSAGES", "20")]);
    let started = std::time::Instant::now();
    while world.count("SELECT count(*) FROM recon_outcomes").await < 300 {
        assert!(
            started.elapsed() < WITHIN,
            "no progress:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.signal("KILL");
    worker.wait(Duration::from_secs(5));
    assert!(
        (world.count("SELECT count(*) FROM recon_outcomes").await as usize) < truth.outcomes.len()
    );
    let _second = world.spawn_worker("second", &[]);
    world.await_truth(&truth, WITHIN).await;
}

/// A client of the worker's consumer group that never joins it: it only reads and
/// commits the group's offsets, as a lag tool or an operator would.
fn group_client(world: &World) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &world.group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// (topic, partition, high watermark) of every partition of both topics.
fn high_watermarks(world: &World, client: &BaseConsumer) -> Vec<(String, i32, i64)> {
    let mut highs = Vec::new();
    for topic in [&world.payments, &world.settlements] {
        for partition in 0..world.partitions {
            let (_, high) = client
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks");
            highs.push((topic.clone(), partition, high));
        }
    }
    highs
}

/// The group's partitions whose offset committed to Kafka is not yet their high
/// watermark: (topic, partition, committed, high).
fn kafka_offsets_behind(world: &World) -> Vec<(String, i32, Offset, i64)> {
    let client = group_client(world);
    let highs = high_watermarks(world, &client);
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, _) in &highs {
        tpl.add_partition(topic, *partition);
    }
    let committed = client
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    highs
        .into_iter()
        .filter_map(|(topic, partition, high)| {
            let offset = committed
                .find_partition(&topic, partition)
                .map_or(Offset::Invalid, |p| p.offset());
            (offset != Offset::Offset(high)).then_some((topic, partition, offset, high))
        })
        .collect()
}

/// Commits `offset_of(partition, high_watermark)` to Kafka for the group, as a lag tool
/// or an operator resetting offsets would.
fn set_kafka_offsets(world: &World, offset_of: impl Fn(i64) -> i64) {
    let client = group_client(world);
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, high) in high_watermarks(world, &client) {
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset_of(high)))
            .expect("tpl");
    }
    client
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
}

/// A read counter reaches `want` and stays there. Reads are counted once their batch
/// is committed, acknowledged on the loop's next turn, so just after the results show
/// in PostgreSQL the counter may still be behind.
async fn assert_counter_settles_at(addr: &str, metric: &str, want: f64) {
    let started = std::time::Instant::now();
    while scrape(addr, metric).await < want && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(scrape(addr, metric).await, want, "{metric}");
}

/// Messages accounted for by the offsets stored in PostgreSQL, over both topics.
async fn stored_offsets_total(world: &World) -> i64 {
    world
        .count(
            "SELECT COALESCE(SUM(COALESCE(payments_next_offset, 0) + COALESCE(settlements_next_offset, 0)), 0)::bigint
             FROM recon_partition_pairs",
        )
        .await
}

/// No redeliveries and no bad messages: what a run reads can be counted exactly.
fn exact_mix() -> Mix {
    Mix {
        redelivery: 0,
        poison_every: 0,
        ..Mix::default()
    }
}

#[sqlx::test(migrations = false)]
async fn postgres_offsets_win_over_kafka_offsets_ahead_or_behind(pool: PgPool) {
    let world = World::new(pool, 2).await;
    let no_redelivery = exact_mix();
    let (first, mut truth) = generate(&world.plan(200, 21, no_redelivery.clone()));
    world.produce(&first).await;
    let mut worker = world.spawn_worker("one", &[]);
    world.await_truth(&truth, WITHIN).await;
    worker.signal("TERM");
    assert!(worker.wait(Duration::from_secs(35)).success());

    // Ahead: Kafka claims everything produced since was already read.
    let (second, truth_2) = generate(&world.plan(200, 22, no_redelivery.clone()));
    world.produce(&second).await;
    set_kafka_offsets(&world, |high| high);
    truth.outcomes.extend(truth_2.outcomes);
    let mut worker = world.spawn_worker("two", &[]);
    world.await_truth(&truth, WITHIN).await;
    worker.signal("TERM");
    assert!(worker.wait(Duration::from_secs(35)).success());

    // Behind: Kafka claims nothing was read. Only the new messages may be consumed.
    set_kafka_offsets(&world, |_| 0);
    let (third, truth_3) = generate(&world.plan(100, 23, no_redelivery));
    world.produce(&third).await;
    truth.outcomes.extend(truth_3.outcomes);
    let worker = world.spawn_worker("three", &[]);
    let addr = worker.metrics_addr(Duration::from_secs(30));
    world.await_truth(&truth, WITHIN).await;
    // Resumed from PostgreSQL's offsets, not Kafka's.
    assert_counter_settles_at(&addr, "recon_events_consumed_total", third.len() as f64).await;
    assert_eq!(scrape(&addr, "recon_events_redelivered_total").await, 0.0);
}

#[sqlx::test(migrations = false)]
async fn topics_with_different_partition_counts_are_refused(pool: PgPool) {
    let world = World::with_partitions(pool, 2, 3).await;
    let mut worker = world.spawn_worker("refused", &[]);
    let status = worker.wait(Duration::from_secs(30));
    assert!(!status.success());
    let log = worker.log_text();
    assert!(
        log.contains("not co-partitioned") && log.contains("2 partitions") && log.contains("has 3"),
        "{log}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_quiet_partition_still_raises_missing_settlement(pool: PgPool) {
    let world = World::new(pool, 1).await;
    // One payment whose deadline passes while nothing else arrives: only idleness
    // (wall-clock watermark) can raise it.
    let deadline = 3;
    let now = chrono::Utc::now().timestamp_micros();
    let payment = serde_json::json!({
        "event_id": "quiet-p", "type": "payment_captured", "payment_id": "quiet",
        "merchant_id": "m", "amount_minor": 100, "currency": "EUR",
        "occurred_at": recon_worker::event::format_timestamp(now)
    });
    let record = recon_tools::loadgen::Record {
        topic: recon_worker::event::Topic::Payments,
        key: Some(b"quiet".to_vec()),
        value: Some(payment.to_string().into_bytes()),
    };
    let _worker = world.spawn_worker(
        "quiet",
        &[
            ("RECON_SETTLEMENT_DEADLINE", "3s"),
            ("RECON_IDLE_TIMEOUT", "2s"),
        ],
    );
    world.produce(&[record]).await;
    let within = Duration::from_secs(deadline + 2 + 8);
    await_outcome(&world, "quiet-p", "missing_settlement", within).await;
}

#[sqlx::test(migrations = false)]
async fn a_backlog_on_one_topic_raises_no_false_missing_settlement(pool: PgPool) {
    let world = World::new(pool, 1).await;
    // Payments span ten hours of event time; each settles ten minutes later. With a
    // one-hour deadline, a watermark taken from the payments alone would flag most of
    // them while the settlements are still backlogged.
    let base = chrono::Utc::now().timestamp_micros() - 11 * 3600 * SEC;
    let n = 4_000i64;
    let mut payments = Vec::new();
    let mut settlements = Vec::new();
    for i in 0..n {
        let at = base + i * (10 * 3600 * SEC / n);
        let id = format!("bk-{i:05}");
        payments.push(recon_tools::loadgen::Record {
            topic: recon_worker::event::Topic::Payments,
            key: Some(id.clone().into_bytes()),
            value: Some(
                serde_json::json!({
                    "event_id": format!("{id}-p"), "type": "payment_captured", "payment_id": id,
                    "merchant_id": "m", "amount_minor": 500, "currency": "EUR",
                    "occurred_at": recon_worker::event::format_timestamp(at)
                })
                .to_string()
                .into_bytes(),
            ),
        });
        settlements.push(recon_tools::loadgen::Record {
            topic: recon_worker::event::Topic::Settlements,
            key: Some(id.clone().into_bytes()),
            value: Some(serde_json::json!({
                "event_id": format!("{id}-s"), "type": "settlement_line", "settlement_id": "po",
                "payment_id": id, "gross_minor": 500, "fee_minor": 5, "net_minor": 495, "currency": "EUR",
                "settled_at": recon_worker::event::format_timestamp(at + 600 * SEC)
            }).to_string().into_bytes()),
        });
    }
    world.produce(&payments).await;
    let _worker = world.spawn_worker(
        "backlog",
        &[
            ("RECON_SETTLEMENT_DEADLINE", "1h"),
            ("RECON_IDLE_TIMEOUT", "30s"),
            ("RECON_BATCH_MAX_MESSAGES", "100"),
        ],
    );
    // Let the worker read every payment first, then pour in the settlement backlog.
    let started = std::time::Instant::now();
    while world.count("SELECT count(*) FROM recon_outcomes").await < n {
        assert!(started.elapsed() < WITHIN, "payments not consumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    world.produce(&settlements).await;
    while world
        .count("SELECT count(*) FROM recon_outcomes WHERE outcome = 'matched'")
        .await
        < 2 * n
    {
        assert!(started.elapsed() < 2 * WITHIN, "settlements not matched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flagged = world
        .count("SELECT count(*) FROM recon_discrepancies WHERE kind = 'missing_settlement'")
        .await;
    assert_eq!(flagged, 0, "no missing_settlement was ever raised");
}

#[sqlx::test(migrations = false)]
async fn topics_far_apart_in_kafka_time_are_read_in_step_without_a_stall(pool: PgPool) {
    let world = World::new(pool, 1).await;
    let (records, truth) = generate(&world.plan(6_000, 41, Mix::default()));
    let (payments, settlements): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|r| r.input() == Some(recon_worker::event::Input::Payments));
    // Settlements carrying Kafka timestamps a minute ahead of the payments', read
    // with a small prefetch: whenever both topics have a backlog, the settlements'
    // partition is paused until the payments catch up (which of the two the broker
    // serves first varies, so the pause itself is checked in the consumer's unit
    // tests). Pausing must never stall a pair nor change a result.
    let now = chrono::Utc::now().timestamp_millis();
    produce_at(&world, &settlements, now + 60_000).await;
    let _worker = world.spawn_worker(
        "in-step",
        &[
            ("RECON_BATCH_MAX_MESSAGES", "50"),
            ("RECON_KAFKA_PROP_QUEUED_MAX_MESSAGES_KBYTES", "64"),
        ],
    );
    let started = std::time::Instant::now();
    while world.count("SELECT count(*) FROM recon_outcomes").await == 0 {
        assert!(started.elapsed() < WITHIN, "no settlement consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    produce_at(&world, &payments, now).await;
    world.await_truth(&truth, WITHIN).await;
}

/// Produces records with a fixed Kafka timestamp.
async fn produce_at(world: &World, records: &[recon_tools::loadgen::Record], timestamp_ms: i64) {
    let producer = recon_tools::admin::producer(&brokers()).expect("producer");
    recon_tools::admin::produce_all_at(
        &producer,
        records,
        [&world.payments, &world.settlements],
        Some(timestamp_ms),
    )
    .await
    .expect("produce");
}

#[sqlx::test(migrations = false)]
async fn results_do_not_depend_on_the_window_size(pool: PgPool) {
    let world = World::new(pool, 2).await;
    let plan = world.plan(1_500, 31, full_mix());
    let (records, truth) = generate(&plan);
    world.produce(&records).await;
    // The same stream through a 100-item window and through a roomy one.
    let mut small = world.spawn_worker(
        "small",
        &[
            ("RECON_WINDOW_MAX_ITEMS", "100"),
            ("RECON_BATCH_MAX_MESSAGES", "50"),
        ],
    );
    world.await_truth(&truth, WITHIN).await;
    // The bound is the worker's, whatever number of pairs it owns. Keys a batch
    // loaded or changed stay pinned until its commit is acknowledged, so right after
    // the last commit the window may still exceed the bound; the next turn of the
    // loop (every 250 ms at the latest) evicts down to it.
    let addr = small.metrics_addr(Duration::from_secs(10));
    let settle_by = std::time::Instant::now() + Duration::from_secs(5);
    let resident = loop {
        let resident = scrape(&addr, "recon_window_items").await;
        if resident <= 100.0 || std::time::Instant::now() > settle_by {
            break resident;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        resident <= 100.0,
        "window at rest holds {resident} payment ids, over RECON_WINDOW_MAX_ITEMS=100"
    );
    small.signal("TERM");
    assert!(small.wait(Duration::from_secs(35)).success());
    let small_result = world.outcomes().await;

    let other_db = unique("recon_large").replace('-', "_");
    sqlx::query(&format!("CREATE DATABASE \"{other_db}\""))
        .execute(&world.pool)
        .await
        .expect("second database");
    let other_url = format!(
        "{}/{other_db}",
        world
            .database_url
            .rsplit_once('/')
            .map_or("", |(base, _)| base)
    );
    let other_pool = PgPool::connect(&other_url)
        .await
        .expect("connect second database");
    let other = World {
        pool: other_pool.clone(),
        database_url: other_url,
        payments: world.payments.clone(),
        settlements: world.settlements.clone(),
        payouts: None,
        group: unique("group-large"),
        partitions: world.partitions,
        log_dir: world.log_dir.clone(),
    };
    let mut large = other.spawn_worker("large", &[("RECON_WINDOW_MAX_ITEMS", "1000000")]);
    other.await_truth(&truth, WITHIN).await;
    large.signal("TERM");
    assert!(large.wait(Duration::from_secs(35)).success());
    assert_eq!(other.outcomes().await, small_result);
    other_pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{other_db}\" WITH (FORCE)"))
        .execute(&world.pool)
        .await
        .expect("drop");
}

#[sqlx::test(migrations = false)]
async fn an_event_id_reused_under_another_payment_id_mid_stream_is_a_redelivery(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 2).await;
    let exact = exact_mix();
    let (first, mut truth) = generate(&world.plan(150, 51, exact.clone()));
    world.produce(&first).await;
    // Small batches: the clash is found while later batches are already applied.
    let mut worker = world.spawn_worker("reuse", &[("RECON_BATCH_MAX_MESSAGES", "50")]);
    world.await_truth(&truth, WITHIN).await;

    // Event ids stored above come again under payment ids never seen, in the middle
    // of more traffic: the window has nothing of those payment ids, only the stored
    // event ids say these are redeliveries.
    let stored_ids = |kind: EventKind| -> Vec<String> {
        truth
            .outcomes
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, id)| id.clone())
            .take(3)
            .collect()
    };
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    let mut reused = Vec::new();
    for (i, event_id) in stored_ids(EventKind::Payment).into_iter().enumerate() {
        let payment_id = format!("reused-p-{i}");
        reused.push(record(
            Input::Payments,
            &payment_id,
            serde_json::json!({
            "event_id": event_id, "type": "payment_captured", "payment_id": payment_id,
            "merchant_id": "m", "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
        ));
    }
    for (i, event_id) in stored_ids(EventKind::Settlement).into_iter().enumerate() {
        let payment_id = format!("reused-s-{i}");
        reused.push(record(Input::Settlements, &payment_id, serde_json::json!({
            "event_id": event_id, "type": "settlement_line", "settlement_id": "po", "payment_id": payment_id,
            "gross_minor": 500, "fee_minor": 5, "net_minor": 495, "currency": "EUR", "settled_at": at})));
    }
    assert_eq!(reused.len(), 6);
    let (mut second, truth_2) = generate(&world.plan(150, 52, exact));
    let tail = second.split_off(second.len() / 2);
    let produced = first.len() + second.len() + reused.len() + tail.len();
    second.extend(reused);
    second.extend(tail);
    world.produce(&second).await;
    truth.outcomes.extend(truth_2.outcomes);
    world.await_truth(&truth, WITHIN).await;

    let addr = worker.metrics_addr(Duration::from_secs(10));
    assert!(
        scrape(&addr, "recon_pair_replays_total").await >= 1.0,
        "a clash with stored event ids replays the pair"
    );
    assert_counter_settles_at(&addr, "recon_events_redelivered_total", 6.0).await;
    let stored: i64 = stored_offsets_total(&world).await;
    assert_eq!(
        stored as usize, produced,
        "stored offsets cover every message"
    );
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn one_event_id_under_many_payment_ids_at_once_is_kept_exactly_once(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 4).await;
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    // Spread over the partitions: pairs of one batch, in one transaction or in
    // parallel ones, insert the same event id.
    let twins: Vec<_> = (0..8)
        .map(|i| {
            let payment_id = format!("twin-{i}");
            record(
                Input::Payments,
                &payment_id,
                serde_json::json!({
                "event_id": "twin-e", "type": "payment_captured", "payment_id": payment_id,
                "merchant_id": "m", "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
            )
        })
        .collect();
    world.produce(&twins).await;
    let mut worker = world.spawn_worker(
        "twins",
        &[("RUST_LOG", "info,recon_worker=debug,sqlx::query=debug")],
    );
    let started = std::time::Instant::now();
    while stored_offsets_total(&world).await < 8 {
        assert!(
            started.elapsed() < WITHIN,
            "the 8 messages were not all committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = world
        .count("SELECT count(*) FROM recon_outcomes WHERE event_id = 'twin-e'")
        .await;
    assert_eq!(rows, 1, "one row for the event id, the rest redeliveries");
    assert_eq!(world.count("SELECT count(*) FROM recon_outcomes").await, 1);
    // Messages re-read by a replay are not counted again.
    let addr = worker.metrics_addr(Duration::from_secs(10));
    assert_counter_settles_at(&addr, "recon_events_redelivered_total", 7.0).await;
    assert_counter_settles_at(&addr, "recon_events_consumed_total", 8.0).await;
    worker.stop_cleanly();
}

fn record(
    input: recon_worker::event::Input,
    key: &str,
    value: serde_json::Value,
) -> recon_tools::loadgen::Record {
    recon_tools::loadgen::Record {
        topic: input.into(),
        key: Some(key.as_bytes().to_vec()),
        value: Some(value.to_string().into_bytes()),
    }
}

async fn await_outcome(world: &World, event_id: &str, outcome: &str, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let current: Option<String> =
            sqlx::query_scalar("SELECT outcome FROM recon_outcomes WHERE event_id = $1")
                .persistent(false)
                .bind(event_id)
                .fetch_optional(&world.pool)
                .await
                .unwrap_or(None);
        if current.as_deref() == Some(outcome) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{event_id}: {current:?}, expected {outcome} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the series of `metric` with `labels` reports `want` (gauges refreshed
/// from PostgreSQL every 15 s).
async fn await_series(addr: &str, metric: &str, labels: &[&str], want: f64, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let got = scrape_series(addr, metric, labels).await;
        if got == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{metric}{labels:?} = {got:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Contract §6 and §5: a payment refunded and charged back shows as an open
/// over_refunded discrepancy (and an open chargeback) on the worker's gauges, every
/// other kind at 0; the chargeback's reversal brings both back to 0.
#[sqlx::test(migrations = false)]
async fn the_open_discrepancy_gauge_reports_an_over_refunded_payment(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 1).await;
    let mut worker = world.spawn_worker("over-refunded", &[]);
    let addr = worker.metrics_addr(Duration::from_secs(10));
    // Every kind has a series from the start, at 0.
    for kind in recon_worker::engine::DiscrepancyKind::of_pairs() {
        let label = format!("kind=\"{kind}\"");
        await_series(&addr, "recon_open_discrepancies", &[&label], 0.0, WITHIN).await;
    }
    let base = chrono::Utc::now().timestamp_micros() - 6 * 3600 * SEC;
    let at = |hours: i64| format_timestamp(base + hours * 3600 * SEC);
    let line = |event_id: &str, line_type: &str, gross: i64, id: (&str, &str), hours: i64| {
        let mut value = serde_json::json!({
            "event_id": event_id, "type": "settlement_line", "settlement_id": "po-1",
            "payment_id": "twice", "line_type": line_type, "gross_minor": gross,
            "fee_minor": 0, "net_minor": gross, "currency": "EUR", "settled_at": at(hours)
        });
        if !id.0.is_empty() {
            value[id.0] = serde_json::json!(id.1);
        }
        record(Input::Settlements, "twice", value)
    };
    world
        .produce(&[
            record(
                Input::Payments,
                "twice",
                serde_json::json!({
                    "event_id": "twice-p", "type": "payment_captured", "payment_id": "twice",
                    "merchant_id": "m", "amount_minor": 1000, "currency": "EUR",
                    "occurred_at": at(0)
                }),
            ),
            record(
                Input::Payments,
                "twice",
                serde_json::json!({
                    "event_id": "twice-r", "type": "refund_requested", "refund_id": "ref-1",
                    "payment_id": "twice", "amount_minor": 1000, "currency": "EUR",
                    "requested_at": at(1)
                }),
            ),
            line("twice-capture", "capture", 1000, ("", ""), 1),
            line("twice-refund", "refund", -1000, ("refund_id", "ref-1"), 2),
            line(
                "twice-chargeback",
                "chargeback",
                -1000,
                ("dispute_id", "dp-1"),
                3,
            ),
        ])
        .await;
    await_outcome(&world, "twice-refund", "matched", WITHIN).await;
    await_outcome(&world, "twice-chargeback", "chargeback_open", WITHIN).await;
    let over_refunded = ["kind=\"over_refunded\""];
    let chargeback = ["kind=\"chargeback\""];
    await_series(
        &addr,
        "recon_open_discrepancies",
        &over_refunded,
        1.0,
        WITHIN,
    )
    .await;
    await_series(&addr, "recon_open_discrepancies", &chargeback, 1.0, WITHIN).await;
    for kind in recon_worker::engine::DiscrepancyKind::of_pairs() {
        if !matches!(kind.as_str(), "over_refunded" | "chargeback") {
            let label = format!("kind=\"{kind}\"");
            let got = scrape_series(&addr, "recon_open_discrepancies", &[&label]).await;
            assert_eq!(got, Some(0.0), "{kind}");
        }
    }
    // The gauge counts what the table holds.
    let open = world
        .count(
            "SELECT count(*) FROM recon_discrepancies
             WHERE kind = 'over_refunded' AND resolved_at IS NULL
               AND settlement_event_id = 'twice-chargeback'",
        )
        .await;
    assert_eq!(
        open, 1,
        "one open over_refunded row, opened at the chargeback"
    );
    let chargeback_open = ["outcome=\"chargeback_open\""];
    await_series(&addr, "recon_outcomes_total", &chargeback_open, 1.0, WITHIN).await;

    // The dispute is won: the reversal brings the position back to 0.
    world
        .produce(&[line(
            "twice-reversal",
            "chargeback_reversal",
            1000,
            ("dispute_id", "dp-1"),
            4,
        )])
        .await;
    await_outcome(&world, "twice-chargeback", "chargeback_reversed", WITHIN).await;
    await_series(
        &addr,
        "recon_open_discrepancies",
        &over_refunded,
        0.0,
        WITHIN,
    )
    .await;
    await_series(&addr, "recon_open_discrepancies", &chargeback, 0.0, WITHIN).await;
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn a_late_counterpart_resolves_the_discrepancy(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 1).await;
    let _worker = world.spawn_worker(
        "lifecycle",
        &[
            ("RECON_SETTLEMENT_DEADLINE", "3s"),
            ("RECON_ORPHAN_TIMEOUT", "3s"),
        ],
    );
    let now = chrono::Utc::now().timestamp_micros();
    let ts = |offset_s: i64| format_timestamp(now + offset_s * SEC);
    world
        .produce(&[
            record(Input::Payments, "late", serde_json::json!({
                "event_id": "late-p", "type": "payment_captured", "payment_id": "late", "merchant_id": "m",
                "amount_minor": 700, "currency": "GBP", "occurred_at": ts(-10)})),
            record(Input::Settlements, "early", serde_json::json!({
                "event_id": "early-s", "type": "settlement_line", "settlement_id": "po", "payment_id": "early",
                "gross_minor": 900, "fee_minor": 9, "net_minor": 891, "currency": "GBP", "settled_at": ts(-10)})),
        ])
        .await;
    await_outcome(
        &world,
        "late-p",
        "missing_settlement",
        Duration::from_secs(20),
    )
    .await;
    await_outcome(
        &world,
        "early-s",
        "orphan_settlement",
        Duration::from_secs(20),
    )
    .await;
    let open = world
        .count("SELECT count(*) FROM recon_discrepancies WHERE resolved_at IS NULL")
        .await;
    assert_eq!(open, 2);

    // The counterparts arrive: the settlement is more than D after the payment.
    world
        .produce(&[
            record(Input::Settlements, "late", serde_json::json!({
                "event_id": "late-s", "type": "settlement_line", "settlement_id": "po", "payment_id": "late",
                "gross_minor": 700, "fee_minor": 7, "net_minor": 693, "currency": "GBP", "settled_at": ts(0)})),
            record(Input::Payments, "early", serde_json::json!({
                "event_id": "early-p", "type": "payment_captured", "payment_id": "early", "merchant_id": "m",
                "amount_minor": 900, "currency": "GBP", "occurred_at": ts(-11)})),
        ])
        .await;
    await_outcome(&world, "late-p", "matched_late", Duration::from_secs(20)).await;
    await_outcome(&world, "early-s", "matched", Duration::from_secs(20)).await;
    let rows = sqlx::query(
        "SELECT kind, resolution, resolved_at IS NOT NULL AS resolved, resolved_at >= opened_at AS ordered
         FROM recon_discrepancies ORDER BY kind",
    )
    .fetch_all(&world.pool)
    .await
    .expect("history");
    let history: Vec<(String, Option<String>, bool, Option<bool>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        history,
        vec![
            (
                "missing_settlement".into(),
                Some("matched_late".into()),
                true,
                Some(true)
            ),
            (
                "orphan_settlement".into(),
                Some("matched".into()),
                true,
                Some(true)
            ),
        ]
    );
    let counterpart: Option<String> = sqlx::query_scalar(
        "SELECT counterpart_event_id FROM recon_outcomes WHERE event_id = 'late-p'",
    )
    .fetch_one(&world.pool)
    .await
    .expect("row");
    assert_eq!(counterpart.as_deref(), Some("late-s"));
}

#[sqlx::test(migrations = false)]
async fn the_database_password_never_appears_in_logs(pool: PgPool) {
    let world = World::new(pool, 1).await;
    // Trust authentication ignores the password, so the worker runs normally with it.
    let secret = "hunter2-Sup3rSecret";
    let url = world
        .database_url
        .replacen("postgres@", &format!("postgres:{secret}@"), 1);
    for format in ["text", "json"] {
        let mut worker = world.spawn_worker(
            &format!("secret-{format}"),
            &[
                ("DATABASE_URL", &url),
                ("RECON_LOG_FORMAT", format),
                ("RUST_LOG", "debug"),
            ],
        );
        let started = std::time::Instant::now();
        while !worker.log_text().contains("took ownership") {
            assert!(
                started.elapsed() < WITHIN,
                "worker did not start:\n{}",
                worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worker.signal("TERM");
        assert!(worker.wait(Duration::from_secs(35)).success());
        let log = worker.log_text();
        assert!(
            log.contains("postgres:***@"),
            "the redacted URL is logged:\n{log}"
        );
        assert!(!log.contains(secret), "password leaked into {format} logs");
    }
    // A configuration error shows the variable, redacted.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("run")
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://app:{secret}@db:notaport/x"),
        )
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_URL") && !stderr.contains(secret),
        "{stderr}"
    );
}

#[test]
fn invalid_configuration_stops_the_worker_naming_the_variable() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("run")
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1/x")
        .env("RECON_SETTLEMENT_DEADLINE", "three days")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("RECON_SETTLEMENT_DEADLINE")
            && stderr.contains("three days")
            && stderr.contains("90s"),
        "{stderr}"
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("--help")
        .output()
        .expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("migrate") && text.contains("run"), "{text}");
}

#[sqlx::test(migrations = false)]
async fn a_permanent_database_error_fails_fast_with_a_clear_message(pool: PgPool) {
    let world = World::new(pool, 1).await;
    let url = world.database_url.replacen("postgres@", "no_such_role@", 1);
    let mut worker = world.spawn_worker("no-role", &[("DATABASE_URL", &url)]);
    let started = std::time::Instant::now();
    let status = worker.wait(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed fast, not retried"
    );
    let log = worker.log_text();
    assert!(
        log.contains("migrations") && log.contains("no_such_role"),
        "{log}"
    );
}

/// A permanent error in mid-stream (here a constraint an operator added that every new
/// event breaks) stops the worker with that error on stderr: the consumer's last
/// revoke must not panic on the way out and hide it.
#[sqlx::test(migrations = false)]
async fn a_permanent_error_mid_stream_stops_the_worker_naming_it(pool: PgPool) {
    let world = World::new(pool, 1).await;
    let plan = world.plan(50, 61, exact_mix());
    let (records, truth) = generate(&plan);
    world.produce(&records).await;
    let mut worker = world.spawn_worker("constrained", &[]);
    world.await_truth(&truth, WITHIN).await;
    sqlx::query("ALTER TABLE recon_events ADD CONSTRAINT no_new_events CHECK (false) NOT VALID")
        .execute(&world.pool)
        .await
        .expect("constraint");
    let mut more = world.plan(5, 62, exact_mix());
    more.id_prefix = "more-".into();
    world.produce(&generate(&more).0).await;
    let status = worker.wait(Duration::from_secs(40));
    let log = worker.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("no_new_events"), "the error is named: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A second database for `world`'s topics, created with `options` (dropped by the
/// caller through the returned pool's owner).
async fn other_database(world: &World, prefix: &str, options: &str) -> World {
    let name = unique(prefix).replace('-', "_");
    sqlx::query(&format!("CREATE DATABASE \"{name}\" {options}"))
        .execute(&world.pool)
        .await
        .expect("second database");
    let url = format!(
        "{}/{name}",
        world
            .database_url
            .rsplit_once('/')
            .map_or("", |(base, _)| base)
    );
    World {
        pool: PgPool::connect(&url)
            .await
            .expect("connect second database"),
        database_url: url,
        payments: world.payments.clone(),
        settlements: world.settlements.clone(),
        payouts: None,
        group: unique("group"),
        partitions: world.partitions,
        log_dir: world.log_dir.clone(),
    }
}

#[sqlx::test(migrations = false)]
async fn a_value_postgresql_refuses_rejects_its_message_and_the_partition_goes_on(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 2).await;
    // A database in LATIN1 (a legacy deployment) cannot hold '€', which the decoder
    // rightly accepts: the insert fails with a data error (SQLSTATE 22P05) caused by
    // one message's content.
    let latin1 = other_database(
        &world,
        "recon_latin1",
        "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await;
    let exact = exact_mix();
    let (mut records, mut truth) = generate(&latin1.plan(300, 61, exact));
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    let payment = |id: &str, merchant: &str| {
        record(
            Input::Payments,
            id,
            serde_json::json!({
            "event_id": format!("{id}-p"), "type": "payment_captured", "payment_id": id,
            "merchant_id": merchant, "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
        )
    };
    let settlement = |id: &str, settlement_id: &str| {
        record(
            Input::Settlements,
            id,
            serde_json::json!({
            "event_id": format!("{id}-s"), "type": "settlement_line", "settlement_id": settlement_id,
            "payment_id": id, "gross_minor": 500, "fee_minor": 5, "net_minor": 495, "currency": "EUR",
            "settled_at": at}),
        )
    };
    // In the middle of the stream: 'é' is LATIN1 and stored; '€' is refused.
    let tail = records.split_off(records.len() / 2);
    records.extend([
        payment("enc-1", "café"),
        settlement("enc-1", "po"),
        payment("enc-2", "caf€"),
        settlement("enc-2", "po"),
        payment("enc-3", "m"),
        settlement("enc-3", "po-€"),
    ]);
    records.extend(tail);
    let outcome = |payment_id: &str, outcome: Outcome, counterpart: Option<&str>| {
        (
            payment_id.to_owned(),
            outcome,
            counterpart.map(str::to_owned),
        )
    };
    let key = |kind: EventKind, id: &str| (kind, id.to_owned());
    truth.outcomes.extend([
        (
            key(EventKind::Payment, "enc-1-p"),
            outcome("enc-1", Outcome::Matched, Some("enc-1-s")),
        ),
        (
            key(EventKind::Settlement, "enc-1-s"),
            outcome("enc-1", Outcome::Matched, Some("enc-1-p")),
        ),
        (
            key(EventKind::Settlement, "enc-2-s"),
            outcome("enc-2", Outcome::Pending, None),
        ),
        (
            key(EventKind::Payment, "enc-3-p"),
            outcome("enc-3", Outcome::Pending, None),
        ),
    ]);
    truth.rejected.extend([
        (Input::Payments, "data_error"),
        (Input::Settlements, "data_error"),
    ]);
    latin1.produce(&records).await;
    let mut worker = latin1.spawn_worker("latin1", &[]);
    latin1.await_truth(&truth, WITHIN).await;
    assert!(
        worker.child.try_wait().expect("try_wait").is_none(),
        "the worker is still running:\n{}",
        worker.log_text()
    );
    let reasons: Vec<(i64, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT kafka_offset, reason, payload FROM rejected_events WHERE reason_class = 'data_error'",
    )
    .fetch_all(&latin1.pool)
    .await
    .expect("rejects");
    assert_eq!(reasons.len(), 2);
    for (_, reason, payload) in &reasons {
        assert!(
            reason.contains("has no equivalent in encoding") && reason.contains("22P05"),
            "PostgreSQL's message is the reason: {reason}"
        );
        let payload = String::from_utf8(payload.clone().expect("raw bytes kept")).expect("UTF-8");
        assert!(payload.contains('€'), "the raw message is kept: {payload}");
    }
    let stored = stored_offsets_total(&latin1).await;
    assert_eq!(
        stored as usize,
        records.len(),
        "stored offsets cover every message"
    );
    let addr = worker.metrics_addr(Duration::from_secs(10));
    assert_counter_settles_at(&addr, "recon_events_rejected_total", 2.0).await;
    assert!(
        scrape_series(
            &addr,
            "recon_events_rejected_total",
            &["reason=\"data_error\""]
        )
        .await
        .is_some_and(|n| n >= 1.0),
        "rejections are counted under their reason"
    );
    worker.stop_cleanly();
    let name = latin1
        .database_url
        .rsplit_once('/')
        .map_or("", |(_, name)| name)
        .to_owned();
    latin1.pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&world.pool)
        .await
        .expect("drop");
}

/// Produces records in one Kafka transaction: its commit marker takes an offset on
/// every partition written, after the last message.
async fn produce_transactionally(world: &World, records: &[recon_tools::loadgen::Record]) {
    let producer = transactional_producer(&unique("recon-test-tx")).await;
    produce_in_transaction(
        &producer,
        records,
        [&world.payments, &world.settlements],
        true,
    )
    .await
    .expect("commit transaction");
}

/// A payment that will miss its settlement and a matched pair, so both topics hold
/// data; consumed to the end by one worker that is then stopped.
async fn consume_all_then_stop(world: &World, transactional: bool) {
    use recon_worker::event::{format_timestamp, Input};
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    let records = vec![
        record(
            Input::Payments,
            "quiet",
            serde_json::json!({
            "event_id": "quiet-p", "type": "payment_captured", "payment_id": "quiet",
            "merchant_id": "m", "amount_minor": 100, "currency": "EUR", "occurred_at": at}),
        ),
        record(
            Input::Payments,
            "pair",
            serde_json::json!({
            "event_id": "pair-p", "type": "payment_captured", "payment_id": "pair",
            "merchant_id": "m", "amount_minor": 100, "currency": "EUR", "occurred_at": at}),
        ),
        record(
            Input::Settlements,
            "pair",
            serde_json::json!({
            "event_id": "pair-s", "type": "settlement_line", "settlement_id": "po", "payment_id": "pair",
            "gross_minor": 100, "fee_minor": 1, "net_minor": 99, "currency": "EUR", "settled_at": at}),
        ),
    ];
    if transactional {
        produce_transactionally(world, &records).await;
    } else {
        world.produce(&records).await;
    }
    let mut first = world.spawn_worker("first", &[]);
    let started = std::time::Instant::now();
    while stored_offsets_total(world).await < 3 {
        assert!(
            started.elapsed() < WITHIN,
            "not consumed:\n{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.stop_cleanly();
    assert_eq!(
        world
            .count("SELECT count(*) FROM recon_outcomes WHERE event_id = 'quiet-p' AND outcome = 'pending'")
            .await,
        1
    );
}

/// Nothing is left to read when a second worker is assigned the pair: only the idle
/// rule can move the watermark on, and the deadline must fire.
async fn a_quiet_stream_after_a_restart_raises_missing_settlement(
    pool: PgPool,
    transactional: bool,
) {
    let world = World::new(pool, 1).await;
    consume_all_then_stop(&world, transactional).await;
    let _second = world.spawn_worker(
        "second",
        &[
            ("RECON_SETTLEMENT_DEADLINE", "3s"),
            ("RECON_IDLE_TIMEOUT", "2s"),
        ],
    );
    await_outcome(
        &world,
        "quiet-p",
        "missing_settlement",
        Duration::from_secs(20),
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_quiet_stream_read_to_its_end_before_a_restart_still_raises_missing_settlement(
    pool: PgPool,
) {
    a_quiet_stream_after_a_restart_raises_missing_settlement(pool, false).await;
}

#[sqlx::test(migrations = false)]
async fn a_quiet_transactional_stream_still_raises_missing_settlement_after_a_restart(
    pool: PgPool,
) {
    // The commit markers sit after the last messages: the stored offsets stay one
    // below each partition's end, though nothing is left to read.
    a_quiet_stream_after_a_restart_raises_missing_settlement(pool, true).await;
}

#[sqlx::test(migrations = false)]
async fn an_event_id_clash_while_the_topics_are_read_in_step_does_not_stall_the_pair(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 1).await;
    let exact = exact_mix();
    let (first, mut truth) = generate(&world.plan(100, 71, exact.clone()));
    world.produce(&first).await;
    let mut worker = world.spawn_worker("first", &[]);
    world.await_truth(&truth, WITHIN).await;
    worker.stop_cleanly();

    // A backlog whose settlements carry Kafka timestamps a minute ahead of the
    // payments': read in step, the settlements' partition is paused while the
    // payments have a backlog. Amid the payments, stored event ids come again
    // under new payment ids: the insert clashes and the pair is replayed (a rewind),
    // which forgets the Kafka timestamps the pause would be lifted by.
    let (second, truth_2) = generate(&world.plan(3_000, 72, exact));
    let (mut payments, settlements): (Vec<_>, Vec<_>) = second
        .into_iter()
        .partition(|r| r.input() == Some(Input::Payments));
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    let reused: Vec<_> = truth
        .outcomes
        .keys()
        .filter(|(kind, _)| *kind == EventKind::Payment)
        .take(3)
        .enumerate()
        .map(|(i, (_, event_id))| {
            let payment_id = format!("reused-{i}");
            record(
                Input::Payments,
                &payment_id,
                serde_json::json!({
                "event_id": event_id, "type": "payment_captured", "payment_id": payment_id,
                "merchant_id": "m", "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
            )
        })
        .collect();
    // Late enough that the settlements' partition has been read and paused by then.
    let tail = payments.split_off(2_000);
    payments.extend(reused);
    payments.extend(tail);
    let now = chrono::Utc::now().timestamp_millis();
    produce_at(&world, &settlements, now + 60_000).await;
    produce_at(&world, &payments, now).await;
    truth.outcomes.extend(truth_2.outcomes);
    let worker = world.spawn_worker(
        "in-step",
        &[
            ("RECON_BATCH_MAX_MESSAGES", "50"),
            ("RECON_KAFKA_PROP_QUEUED_MAX_MESSAGES_KBYTES", "64"),
        ],
    );
    world.await_truth(&truth, WITHIN).await;
    let addr = worker.metrics_addr(Duration::from_secs(10));
    assert!(
        scrape(&addr, "recon_pair_replays_total").await >= 1.0,
        "the clash replayed the pair"
    );
}

#[sqlx::test(migrations = false)]
async fn a_recreated_topic_is_read_from_its_start_and_nothing_is_lost(pool: PgPool) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 1).await;
    let (first, mut truth) = generate(&world.plan(100, 81, exact_mix()));
    world.produce(&first).await;
    let mut worker = world.spawn_worker("first", &[]);
    world.await_truth(&truth, WITHIN).await;
    worker.stop_cleanly();

    // The payments topic is deleted and created again under its name: its offsets
    // start from 0, far below the offset stored for it.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin");
    admin
        .delete_topics(&[&world.payments], &AdminOptions::new())
        .await
        .expect("delete topic");
    let started = std::time::Instant::now();
    while recon_tools::admin::create_topics(&brokers(), &[&world.payments], 1)
        .await
        .is_err()
    {
        assert!(started.elapsed() < WITHIN, "topic not recreated");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // New payments, and payments read before (the same events again).
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    let mut again: Vec<_> = first
        .iter()
        .filter(|r| r.input() == Some(Input::Payments))
        .take(3)
        .cloned()
        .collect();
    for i in 0..5 {
        let id = format!("after-{i}");
        again.push(record(
            Input::Payments,
            &id,
            serde_json::json!({
            "event_id": format!("{id}-p"), "type": "payment_captured", "payment_id": id,
            "merchant_id": "m", "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
        ));
        truth.outcomes.insert(
            (EventKind::Payment, format!("{id}-p")),
            (id, Outcome::Pending, None),
        );
    }
    world.produce(&again).await;
    let worker = world.spawn_worker("second", &[]);
    let addr = worker.metrics_addr(Duration::from_secs(30));
    world.await_truth(&truth, WITHIN).await;
    assert_counter_settles_at(&addr, "recon_events_redelivered_total", 3.0).await;
    assert!(
        scrape(&addr, "recon_offset_resets_total").await >= 1.0,
        "the reset is counted"
    );
    assert!(
        worker.log_text().contains("offset reset"),
        "the reset is logged:\n{}",
        worker.log_text()
    );
}

/// Every message of the world is committed: the offsets stored in PostgreSQL cover
/// `messages`.
async fn await_committed(world: &World, worker: &Worker, messages: usize) {
    let started = std::time::Instant::now();
    // Before the worker's migrations have run the count fails (-1): nothing committed.
    while (stored_offsets_total(world).await.max(0) as usize) < messages {
        assert!(
            started.elapsed() < WITHIN,
            "{messages} messages not committed:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_running(worker: &mut Worker) {
    let exited = worker.child.try_wait().expect("try_wait");
    assert!(
        exited.is_none(),
        "the worker exited ({exited:?}):\n{}",
        worker.log_text()
    );
}

#[sqlx::test(migrations = false)]
async fn ids_with_control_characters_are_rejected_and_the_stream_goes_on(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 2).await;
    // About 4,000 valid events, with the bad ones in the middle.
    let (mut records, mut truth) = generate(&world.plan(2_000, 61, exact_mix()));
    let at = format_timestamp(chrono::Utc::now().timestamp_micros());
    let payment = |event_id: &str, payment_id: &str, merchant_id: &str| {
        record(
            Input::Payments,
            payment_id,
            serde_json::json!({
            "event_id": event_id, "type": "payment_captured", "payment_id": payment_id,
            "merchant_id": merchant_id, "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
        )
    };
    let settlement = |event_id: &str, payment_id: &str, settlement_id: &str| {
        record(
            Input::Settlements,
            payment_id,
            serde_json::json!({
            "event_id": event_id, "type": "settlement_line", "settlement_id": settlement_id,
            "payment_id": payment_id, "gross_minor": 500, "fee_minor": 5, "net_minor": 495,
            "currency": "EUR", "settled_at": at}),
        )
    };
    let bad = [
        // PostgreSQL cannot store U+0000 in text: this one made the worker exit.
        payment("ctl-1", "a\u{0}b", "m"),
        payment("ctl-2", "ctl-merchant", "m\u{1}"),
        settlement("ctl-3", "ctl-settlement", "po\u{7f}"),
        settlement("ctl-4\u{0}", "ctl-event", "po"),
    ];
    let middle = records.len() / 2;
    records.splice(middle..middle, bad.iter().cloned());
    truth.rejected.extend([
        (Input::Payments, "control_character"),
        (Input::Payments, "control_character"),
        (Input::Settlements, "control_character"),
        (Input::Settlements, "control_character"),
    ]);
    world.produce(&records).await;
    let mut worker = world.spawn_worker("controls", &[("RECON_BATCH_MAX_MESSAGES", "500")]);
    world.await_truth(&truth, WITHIN).await;
    assert_running(&mut worker);
    let reasons: Vec<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT reason, kafka_key FROM rejected_events ORDER BY reason")
            .fetch_all(&world.pool)
            .await
            .expect("reasons");
    assert_eq!(reasons.len(), 4);
    for (reason, _) in &reasons {
        assert!(reason.contains("control character U+00"), "{reason}");
    }
    // The key is kept byte for byte, NUL included.
    assert!(reasons
        .iter()
        .any(|(_, key)| key.as_deref() == Some(b"a\0b".as_slice())));
    assert_eq!(stored_offsets_total(&world).await as usize, records.len());
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn an_event_dated_2205_is_rejected_and_fires_no_deadline(pool: PgPool) {
    use recon_worker::event::{format_timestamp, Input};
    let world = World::new(pool, 1).await;
    let at = format_timestamp(chrono::Utc::now().timestamp_micros() - 3600 * SEC);
    let payment = |id: &str, at: &str| {
        record(
            Input::Payments,
            id,
            serde_json::json!({
            "event_id": format!("{id}-p"), "type": "payment_captured", "payment_id": id,
            "merchant_id": "m", "amount_minor": 500, "currency": "EUR", "occurred_at": at}),
        )
    };
    let settlement = |id: &str, at: &str| {
        record(
            Input::Settlements,
            id,
            serde_json::json!({
            "event_id": format!("{id}-s"), "type": "settlement_line", "settlement_id": "po",
            "payment_id": id, "gross_minor": 500, "fee_minor": 5, "net_minor": 495,
            "currency": "EUR", "settled_at": at}),
        )
    };
    // Both topics carry one event from the far future, so the pair's watermark would
    // follow them without waiting for idleness; and one from before 1970.
    let records = vec![
        payment("waiting-1", &at),
        payment("waiting-2", &at),
        settlement("unpaid", &at),
        payment("far-future", "2205-01-01T00:00:00Z"),
        settlement("far-future-line", "2205-01-01T00:00:00Z"),
        payment("waiting-3", &at),
        payment("before-1970", "1969-12-31T23:00:00Z"),
    ];
    world.produce(&records).await;
    let mut worker = world.spawn_worker("future", &[]);
    await_committed(&world, &worker, records.len()).await;
    // Several idle timeouts (2s) and sweeps: time enough for every deadline to fire.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for event_id in ["waiting-1-p", "waiting-2-p", "waiting-3-p", "unpaid-s"] {
        await_outcome(&world, event_id, "pending", Duration::from_secs(1)).await;
    }
    assert_eq!(world.count("SELECT count(*) FROM recon_outcomes").await, 4);
    assert_eq!(
        world
            .count("SELECT count(*) FROM recon_discrepancies")
            .await,
        0,
        "no deadline fired"
    );
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM rejected_events WHERE reason_class = 'event_time_out_of_range' ORDER BY kafka_offset, topic",
    )
    .fetch_all(&world.pool)
    .await
    .expect("rejects");
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("ahead of the message's Kafka timestamp"))
            .count(),
        2,
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("before 1970")),
        "{reasons:?}"
    );
    assert_running(&mut worker);
    worker.stop_cleanly();
}

#[test]
fn kafka_settings_the_worker_depends_on_cannot_be_overridden() {
    for (variable, value, property) in [
        (
            "RECON_KAFKA_PROP_ENABLE_AUTO_COMMIT",
            "true",
            "enable.auto.commit",
        ),
        (
            "RECON_KAFKA_PROP_ENABLE_AUTO_OFFSET_STORE",
            "true",
            "enable.auto.offset.store",
        ),
        (
            "RECON_KAFKA_PROP_ISOLATION_LEVEL",
            "read_uncommitted",
            "isolation.level",
        ),
        (
            "RECON_KAFKA_PROP_PARTITION_ASSIGNMENT_STRATEGY",
            "cooperative-sticky",
            "partition.assignment.strategy",
        ),
        (
            "RECON_KAFKA_PROP_GROUP_PROTOCOL",
            "consumer",
            "group.protocol",
        ),
        (
            "RECON_KAFKA_PROP_AUTO_OFFSET_RESET",
            "latest",
            "auto.offset.reset",
        ),
        ("RECON_KAFKA_PROP_GROUP_ID", "elsewhere", "RECON_GROUP_ID"),
        (
            "RECON_KAFKA_PROP_BOOTSTRAP_SERVERS",
            "127.0.0.1:9092",
            "RECON_KAFKA_BROKERS",
        ),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_recon-worker"))
            .arg("run")
            .env_clear()
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1/x")
            .env(variable, value)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{variable}: {stderr}");
        assert!(
            stderr.contains(variable) && stderr.contains(value) && stderr.contains(property),
            "{stderr}"
        );
    }
}

/// Pieces of a password holding every URL delimiter; none may be printed.
const URL_PASSWORD: &str = "Hx7q/Kz9w?Vy3m@Pj8n#Rt5b";
const URL_PASSWORD_PIECES: [&str; 5] = ["Hx7q", "Kz9w", "Vy3m", "Pj8n", "Rt5b"];
/// Kafka properties holding secrets; librdkafka ignores them over PLAINTEXT.
const KAFKA_SECRETS: [(&str, &str); 4] = [
    ("RECON_KAFKA_PROP_SASL_PASSWORD", "kafka-Qm4pass"),
    ("RECON_KAFKA_PROP_SSL_KEY_PASSWORD", "kafka-Wn8pass"),
    (
        "RECON_KAFKA_PROP_SASL_OAUTHBEARER_CONFIG",
        "principal=recon scope=Zr6token",
    ),
    ("RECON_KAFKA_PROP_SSL_KEYSTORE_PASSWORD", "kafka-Bd3secret"),
];
/// A secret librdkafka refuses (this build has no OIDC): its error quotes the value.
const REFUSED_SECRET: (&str, &str) = (
    "RECON_KAFKA_PROP_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
    "https://idp/Jt5token",
);

fn assert_no_secret(text: &str, context: &str) {
    for piece in URL_PASSWORD_PIECES {
        assert!(
            !text.contains(piece),
            "{piece} leaked into {context}:\n{text}"
        );
    }
    for (_, secret) in KAFKA_SECRETS.iter().chain([&REFUSED_SECRET]) {
        assert!(
            !text.contains(secret),
            "{secret} leaked into {context}:\n{text}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn passwords_with_url_delimiters_and_kafka_secrets_never_appear_in_logs(pool: PgPool) {
    let world = World::new(pool, 1).await;
    // Percent-encoded, the URL is valid and trust authentication ignores the password.
    let encoded: String = URL_PASSWORD
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let url = world
        .database_url
        .replacen("postgres@", &format!("postgres:{encoded}@"), 1);
    let mut extra: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", &url),
        ("RUST_LOG", "debug"),
        // librdkafka's own configuration dump, at debug level.
        ("RECON_KAFKA_PROP_DEBUG", "conf"),
    ];
    extra.extend(KAFKA_SECRETS);
    let mut worker = world.spawn_worker("kafka-secrets", &extra);
    let started = std::time::Instant::now();
    while !worker.log_text().contains("took ownership") {
        assert!(
            started.elapsed() < WITHIN,
            "worker did not start:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop_cleanly();
    let log = worker.log_text();
    assert!(
        log.contains("postgres:***@"),
        "the redacted URL is logged:\n{log}"
    );
    assert!(
        log.contains("sasl.oauthbearer.config"),
        "the property names are logged:\n{log}"
    );
    assert_no_secret(&log, "the logs");
    assert!(!log.contains(&encoded), "{log}");

    // Written raw, the password breaks the URL: the configuration error echoes it,
    // redacted. So does a malformed property name holding a secret.
    let raw_url = format!("postgres://app:{URL_PASSWORD}@db:5432/x");
    for (variable, value) in [
        ("DATABASE_URL", raw_url.as_str()),
        ("RECON_KAFKA_PROP_sasl.password", "kafka-Qm4pass"),
    ] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_recon-worker"));
        command
            .arg("run")
            .env_clear()
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1/x");
        for (k, v) in KAFKA_SECRETS {
            command.env(k, v);
        }
        let output = command.env(variable, value).output().expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(variable), "{stderr}");
        assert_no_secret(&stderr, variable);
    }

    // A property librdkafka refuses when the consumer is created, after migrations:
    // its error names the property and quotes the value.
    let mut extra: Vec<(&str, &str)> = vec![REFUSED_SECRET];
    extra.extend(KAFKA_SECRETS);
    let mut refused = world.spawn_worker("refused-secret", &extra);
    let status = refused.wait(WITHIN);
    assert!(!status.success());
    let log = refused.log_text();
    assert!(
        log.contains("sasl.oauthbearer.token.endpoint.url"),
        "the refused property is named:\n{log}"
    );
    assert_no_secret(&log, "the refusal");
}

/// `world.database_url` with an application name, to find the worker's sessions.
fn url_named(world: &World, application_name: &str) -> String {
    format!("{}?application_name={application_name}", world.database_url)
}

/// Ends every session of `application_name`, as an administrator or a failover would.
async fn terminate_sessions(admin: &mut sqlx::PgConnection, application_name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1) AS t",
    )
    .bind(application_name)
    .persistent(false)
    .fetch_one(admin)
    .await
    .expect("terminate")
}

/// Waits until the worker logs a retry of an error containing `text`.
async fn await_retry_of(worker: &mut Worker, text: &str) {
    let started = std::time::Instant::now();
    loop {
        let log = worker.log_text();
        if log
            .lines()
            .any(|l| l.contains("transient database error") && l.contains(text))
        {
            return;
        }
        assert_running(worker);
        assert!(
            started.elapsed() < WITHIN,
            "no retry of {text:?} logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_database_turned_read_only_and_back_is_waited_out(pool: PgPool) {
    use sqlx::Connection;
    let world = World::new(pool, 2).await;
    let exact = exact_mix();
    let (first, mut truth) = generate(&world.plan(300, 71, exact.clone()));
    world.produce(&first).await;
    let name = "recon-read-only";
    let url = url_named(&world, name);
    let mut worker = world.spawn_worker("read-only", &[("DATABASE_URL", &url)]);
    world.await_truth(&truth, WITHIN).await;

    // A failover to a server that does not take writes yet: the worker's sessions
    // end, and every new one is read-only. This connection, opened before, stays
    // read-write to undo it.
    let mut admin = sqlx::PgConnection::connect(&world.database_url)
        .await
        .expect("admin connection");
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut admin)
        .await
        .expect("name");
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" SET default_transaction_read_only = on"
    ))
    .execute(&mut admin)
    .await
    .expect("read-only");
    terminate_sessions(&mut admin, name).await;
    let (second, truth_2) = generate(&world.plan(300, 72, exact));
    world.produce(&second).await;
    truth.outcomes.extend(truth_2.outcomes);
    await_retry_of(&mut worker, "read-only transaction").await;
    // Some more retries, then the new primary takes writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_running(&mut worker);
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" RESET default_transaction_read_only"
    ))
    .execute(&mut admin)
    .await
    .expect("read-write again");
    // The sessions opened while it was read-only stay read-only: only new ones help.
    world.await_truth(&truth, WITHIN).await;
    assert_eq!(
        stored_offsets_total(&world).await as usize,
        first.len() + second.len()
    );
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn terminated_database_sessions_are_reconnected_mid_stream(pool: PgPool) {
    use sqlx::Connection;
    let world = World::new(pool, 2).await;
    let (records, truth) = generate(&world.plan(2_000, 73, exact_mix()));
    world.produce(&records).await;
    let name = "recon-terminated";
    let url = url_named(&world, name);
    let mut worker = world.spawn_worker(
        "terminated",
        &[("DATABASE_URL", &url), ("RECON_BATCH_MAX_MESSAGES", "50")],
    );
    let mut admin = sqlx::PgConnection::connect(&world.database_url)
        .await
        .expect("admin connection");
    // Sessions end over and over while the stream is read (pg_terminate_backend:
    // SQLSTATE 57P01 to a statement in flight, a closed socket to an idle one).
    let started = std::time::Instant::now();
    let mut terminated = 0;
    while started.elapsed() < Duration::from_secs(6) {
        terminated += terminate_sessions(&mut admin, name).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(terminated > 0, "no session was terminated");
    assert_running(&mut worker);
    world.await_truth(&truth, WITHIN).await;
    worker.stop_cleanly();
}

/// The worker's statements wait on a lock the test holds, with `option` (a
/// statement or lock timeout) set for its sessions: they fail with `sqlstate`, the
/// worker retries and catches up once the lock is released.
async fn a_held_lock_is_waited_out(pool: PgPool, option: &str, error_text: &str) {
    use sqlx::Connection;
    let world = World::new(pool, 1).await;
    let exact = exact_mix();
    let (first, mut truth) = generate(&world.plan(100, 81, exact.clone()));
    world.produce(&first).await;
    let url = format!(
        "{}?options=-c%20{}",
        world.database_url,
        option.replace('=', "%3D")
    );
    let mut worker = world.spawn_worker("locked", &[("DATABASE_URL", &url)]);
    world.await_truth(&truth, WITHIN).await;
    let mut admin = sqlx::PgConnection::connect(&world.database_url)
        .await
        .expect("admin connection");
    let mut lock = admin.begin().await.expect("begin");
    // Reads go on; every checkpoint's offset update waits for the lock.
    sqlx::query("LOCK TABLE recon_partition_pairs IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let (second, truth_2) = generate(&world.plan(100, 82, exact));
    world.produce(&second).await;
    truth.outcomes.extend(truth_2.outcomes);
    await_retry_of(&mut worker, error_text).await;
    assert_running(&mut worker);
    lock.rollback().await.expect("release");
    world.await_truth(&truth, WITHIN).await;
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn a_statement_timeout_is_retried(pool: PgPool) {
    a_held_lock_is_waited_out(pool, "statement_timeout=500", "statement timeout").await;
}

#[sqlx::test(migrations = false)]
async fn a_lock_timeout_is_retried(pool: PgPool) {
    a_held_lock_is_waited_out(pool, "lock_timeout=500", "lock timeout").await;
}

/// Issue 19, item 10: a producer that mints a fresh event id for every resend of one
/// payment. 20,000 duplicates of one payment id amid ordinary traffic, over a restart
/// (the new worker loads that key from PostgreSQL), some of them redelivered under
/// their own event id after they were committed (only storage can tell those apart
/// from new duplicates once the window no longer holds them). Exactly one payment of
/// that id is matched, every other one is `duplicate_payment`, everything reconciles,
/// and no key weighs more in the window than an ordinary one does.
#[sqlx::test(migrations = false)]
async fn a_storm_of_duplicates_of_one_payment_id_is_reconciled_in_bounded_memory(pool: PgPool) {
    let world = World::new(pool, 2).await;
    let plan = world.plan(1000, 61, exact_mix());
    let (mix, mut truth) = generate(&plan);
    let (storm, storm_truth) = recon_tools::loadgen::duplicate_storm(&plan, 20_000);
    let redelivered = storm.len() - storm_truth.outcomes.len();
    assert!(redelivered >= 10, "the storm redelivers some duplicates");
    truth.outcomes.extend(storm_truth.outcomes);
    // The storm's messages spread through the mix, so its key shares batches (and the
    // window) with ordinary keys: half of both before the restart, half after.
    let interleave = |mix: &[recon_tools::loadgen::Record],
                      storm: &[recon_tools::loadgen::Record]| {
        let per = storm.len().div_ceil(mix.len().max(1));
        let mut records = Vec::with_capacity(mix.len() + storm.len());
        let mut storm = storm.iter();
        for record in mix {
            records.push(record.clone());
            records.extend(storm.by_ref().take(per).cloned());
        }
        records.extend(storm.cloned());
        records
    };
    let first = interleave(&mix[..mix.len() / 2], &storm[..storm.len() / 2]);
    let second = interleave(&mix[mix.len() / 2..], &storm[storm.len() / 2..]);
    world.produce(&first).await;
    let small_batches = [("RECON_BATCH_MAX_MESSAGES", "500")];
    let mut worker = world.spawn_worker("storm-1", &small_batches);
    await_committed(&world, &worker, first.len()).await;
    worker.stop_cleanly();

    world.produce(&second).await;
    let mut worker = world.spawn_worker("storm-2", &small_batches);
    world.await_truth(&truth, WITHIN).await;
    await_committed(&world, &worker, first.len() + second.len()).await;
    let storm_id = format!("{}storm", plan.id_prefix);
    let count = |outcome: &str| {
        format!(
            "SELECT count(*) FROM recon_outcomes WHERE payment_id = '{storm_id}' \
             AND event_kind = 'payment' AND outcome = '{outcome}'"
        )
    };
    assert_eq!(world.count(&count("matched")).await, 1);
    assert_eq!(world.count(&count("duplicate_payment")).await, 20_000);

    // Before the fix the storm's key held every duplicate's event id: about 60 bytes
    // each, 1.2 MB for this one key, against about 180 bytes for a matched pair.
    let addr = worker.metrics_addr(Duration::from_secs(10));
    let items = scrape(&addr, "recon_window_items").await;
    let bytes = scrape(&addr, "recon_window_bytes").await;
    assert!(items > 0.0, "the window holds the keys just read");
    assert!(
        bytes <= 512.0 * items,
        "window: {bytes} bytes for {items} keys; a duplicate storm must not grow a key"
    );
    // The duplicates sent again after the restart are redeliveries, each counted once.
    let mut seen = std::collections::HashSet::new();
    let mut again = 0usize;
    for (i, record) in storm.iter().enumerate() {
        let value: serde_json::Value =
            serde_json::from_slice(record.value.as_deref().unwrap_or_default()).expect("json");
        let event_id = value["event_id"].as_str().unwrap_or_default().to_owned();
        if !seen.insert(event_id) && i >= storm.len() / 2 {
            again += 1;
        }
    }
    assert!(again > 0, "some duplicates come again after the restart");
    assert_counter_settles_at(&addr, "recon_events_redelivered_total", again as f64).await;
    worker.stop_cleanly();
}
