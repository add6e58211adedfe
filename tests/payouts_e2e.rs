//! Payouts end to end (contract §7): the worker binary against real Apache Kafka and
//! PostgreSQL, with the payouts topic configured.
//!
//! - Two workers over four partition pairs, each killed (SIGKILL) mid-stream and
//!   restarted: every payout's final status, sums and counts, and its discrepancy
//!   history, equal the load generator's ground truth, written from §7 alone.
//! - A quiet stream: payout deadlines fire on the global watermark with no traffic at
//!   all (idle pairs store their watermark as it follows the clock), a discrepancy
//!   resolves by itself when a later line balances its payout, and a bad announcement
//!   is rejected like any other message.
//! - A payouts topic with another partition count than the other two: the worker
//!   refuses to start, naming the counts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use recon_tools::loadgen::{GroundTruth, Mix, Record};
use recon_worker::event::{format_timestamp, Micros, Topic};
use sqlx::PgPool;

const WITHIN: Duration = Duration::from_secs(120);

/// No payout discrepancy can fire mid-stream (every event is from 2024 and the grace
/// is an hour, while the global watermark waits for every pair), so the history is
/// exactly the open discrepancies at the end.
fn expected_discrepancies(truth: &GroundTruth) -> Vec<(String, String, bool, Option<String>)> {
    let mut rows: Vec<_> = truth
        .payouts
        .iter()
        .filter_map(|(id, payout)| {
            let kind = payout.discrepancy?;
            Some((id.clone(), kind.as_str().to_owned(), true, None))
        })
        .collect();
    rows.sort();
    rows
}

async fn await_payouts(world: &World, truth: &GroundTruth, within: Duration) {
    let (view, discrepancies) = (expected_view(truth), expected_discrepancies(truth));
    let started = Instant::now();
    loop {
        let (got_view, got_discrepancies) =
            (payouts_view(world).await, payout_discrepancies(world).await);
        if got_view == view && got_discrepancies == discrepancies {
            return;
        }
        if started.elapsed() > within {
            let wrong: Vec<_> = view
                .iter()
                .filter(|(id, v)| got_view.get(*id) != Some(v))
                .map(|(id, v)| (id, v, got_view.get(id)))
                .take(10)
                .collect();
            panic!(
                "payouts did not reach the ground truth within {within:?}: {} of {} right, \
                 first wrong: {wrong:#?}; discrepancies {got_discrepancies:#?}, expected \
                 {discrepancies:#?}",
                view.iter()
                    .filter(|(id, v)| got_view.get(*id) == Some(v))
                    .count(),
                view.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// 2024-06-01T00:00:00Z.
const IN_2024: Micros = 1_717_200_000_000_000;

#[sqlx::test(migrations = false)]
async fn payouts_across_two_workers_killed_mid_stream_equal_the_truth(pool: PgPool) {
    let world = World::with_payouts(pool, 4).await;
    let mut plan = world.plan(120, 22, Mix::payouts_only(1));
    plan.base_time = IN_2024;
    let (records, truth) = generate(&plan);
    // Every way a payout can end is in the stream.
    let statuses: std::collections::BTreeSet<&str> =
        truth.payouts.values().map(|p| p.status.as_str()).collect();
    assert_eq!(statuses.len(), 4, "{statuses:?}");
    world.produce(&records).await;
    let settings = [
        ("RECON_BATCH_MAX_MESSAGES", "25"),
        ("RECON_PAYOUT_GRACE", "1h"),
    ];
    let mut first = world.spawn_worker("first", &settings);
    let mut second = world.spawn_worker("second", &settings);
    let total = truth.outcomes.len() as i64;
    let progress = |at_least: i64| {
        let world = &world;
        async move {
            let started = Instant::now();
            while world.count("SELECT count(*) FROM recon_outcomes").await < at_least {
                assert!(started.elapsed() < WITHIN, "no progress");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    progress(total / 5).await;
    first.signal("KILL");
    first.wait(Duration::from_secs(5));
    let _first_again = world.spawn_worker("first-again", &settings);
    progress(total / 2).await;
    second.signal("KILL");
    second.wait(Duration::from_secs(5));
    assert!(world.count("SELECT count(*) FROM recon_outcomes").await < total);
    let _second_again = world.spawn_worker("second-again", &settings);
    world.await_truth(&truth, WITHIN).await;
    await_payouts(&world, &truth, WITHIN).await;
    // Every announcement stored once, whatever was read twice.
    let announced: usize = truth.payouts.values().map(|p| p.announcements).sum();
    assert_eq!(
        world
            .count("SELECT count(*) FROM recon_payout_announcements")
            .await as usize,
        announced
    );
}

fn record(topic: Topic, key: &str, value: serde_json::Value) -> Record {
    Record {
        topic,
        key: Some(key.as_bytes().to_vec()),
        value: Some(value.to_string().into_bytes()),
    }
}

/// A captured payment and its capture line in `payout`, settled at `at`.
fn paid_line(id: &str, payout: &str, gross: i64, at: Micros) -> [Record; 2] {
    let at = format_timestamp(at);
    [
        record(
            Topic::Payments,
            id,
            serde_json::json!({"type": "payment_captured", "event_id": format!("{id}-p"),
                "payment_id": id, "merchant_id": "m", "amount_minor": gross,
                "currency": "EUR", "occurred_at": at}),
        ),
        record(
            Topic::Settlements,
            id,
            serde_json::json!({"type": "settlement_line", "event_id": format!("{id}-s"),
                "settlement_id": "batch", "payment_id": id, "gross_minor": gross,
                "fee_minor": 10, "net_minor": gross - 10, "currency": "EUR",
                "settled_at": at, "payout_id": payout}),
        ),
    ]
}

async fn await_discrepancies(
    world: &World,
    expected: &[(String, String, bool, Option<String>)],
    within: Duration,
) {
    let started = Instant::now();
    loop {
        let rows = payout_discrepancies(world).await;
        if rows == expected {
            return;
        }
        assert!(
            started.elapsed() < within,
            "payout discrepancies {rows:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn on_a_quiet_stream_payout_deadlines_fire_and_later_lines_resolve_them(pool: PgPool) {
    let world = World::with_payouts(pool, 2).await;
    let now = chrono::Utc::now().timestamp_micros();
    let payout = unique("po");
    // Two lines of 990 net each, announced as three: short by one line.
    let mut records: Vec<Record> = Vec::new();
    records.extend(paid_line(&unique("pay"), &payout, 1_000, now));
    records.extend(paid_line(&unique("pay"), &payout, 1_000, now));
    records.push(record(
        Topic::Payouts,
        &payout,
        serde_json::json!({"type": "payout_announced", "event_id": unique("an"),
            "payout_id": payout, "currency": "EUR", "net_minor": 2_970, "line_count": 3,
            "paid_at": format_timestamp(now)}),
    ));
    // A bad announcement (its key is not its payout): rejected, nothing stops.
    records.push(record(
        Topic::Payouts,
        "another",
        serde_json::json!({"type": "payout_announced", "event_id": unique("an"),
            "payout_id": payout, "currency": "EUR", "net_minor": 1, "paid_at": format_timestamp(now)}),
    ));
    world.produce(&records).await;
    let _worker = world.spawn_worker(
        "quiet",
        &[("RECON_IDLE_TIMEOUT", "1s"), ("RECON_PAYOUT_GRACE", "20s")],
    );
    let started = Instant::now();
    // Before the grace has passed: pending, nothing open.
    loop {
        let view = payouts_view(&world).await;
        if let Some(row) = view.get(&payout) {
            assert_eq!(row.0, "pending", "{row:?}");
            assert_eq!((row.3, row.5), (Some(1_980), 2));
            break;
        }
        assert!(started.elapsed() < WITHIN, "the payout never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(payout_discrepancies(&world).await.is_empty());
    // Nothing more arrives: the watermark follows the clock past the deadline.
    let open = vec![(payout.clone(), "payout_mismatch".to_owned(), true, None)];
    await_discrepancies(&world, &open, Duration::from_secs(60)).await;
    assert_eq!(
        payouts_view(&world).await.get(&payout).map(|v| v.0.clone()),
        Some("total_mismatch".to_owned())
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM rejected_events WHERE reason_class = 'key_mismatch'")
            .await,
        1
    );
    // The missing line arrives: the payout balances and its discrepancy resolves.
    let late = chrono::Utc::now().timestamp_micros();
    world
        .produce(&paid_line(&unique("pay"), &payout, 1_000, late))
        .await;
    let resolved = vec![(
        payout.clone(),
        "payout_mismatch".to_owned(),
        false,
        Some("balanced".to_owned()),
    )];
    await_discrepancies(&world, &resolved, Duration::from_secs(60)).await;
    assert_eq!(
        payouts_view(&world)
            .await
            .get(&payout)
            .map(|v| (v.0.clone(), v.3, v.5)),
        Some(("balanced".to_owned(), Some(2_970), 3))
    );
}

#[sqlx::test(migrations = false)]
async fn a_payouts_topic_with_another_partition_count_is_refused_at_start(pool: PgPool) {
    let mut world = World::new(pool, 2).await;
    let payouts = unique("payouts");
    recon_tools::admin::create_topics(&brokers(), &[&payouts], 3)
        .await
        .expect("create payouts topic");
    world.payouts = Some(payouts.clone());
    let exited = world.run_to_exit("refused", &[], Duration::from_secs(30));
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains("not co-partitioned")
            && exited
                .stderr
                .contains(&format!("{payouts:?} has 3 partitions"))
            && exited.stderr.contains("has 2 partitions"),
        "{}",
        exited.stderr
    );
}
