//! Re-drive of rejected messages (contract §8), end to end: the worker binary on real
//! Kafka and PostgreSQL, and `recon-worker rejects ...` run as an operator runs it.
//!
//! - A message rejected for its size is redriven once the limit is raised, and
//!   processed as a late event that matches its settlement; one still invalid stays
//!   rejected with its new reason; one whose payload was cut cannot be redriven and
//!   says so; a reject already redriven is refused; the row of each stays.
//! - Thousands of re-drives asked for twice over, while one worker is killed and
//!   another joins: each message is applied exactly once (every reject `accepted`,
//!   never a `redelivery`, which a second application would leave; every event once,
//!   every pair matched).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use recon_tools::loadgen::Record;
use recon_worker::event::{format_timestamp, Topic};
use sqlx::PgPool;

const WITHIN: Duration = Duration::from_secs(90);
const SEC: i64 = 1_000_000;

/// `recon-worker rejects <args>` against the world's database, DATABASE_URL only.
fn rejects(world: &World, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("rejects")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &world.database_url)
        .env("USER", "test-operator")
        .output()
        .expect("run recon-worker rejects")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: stdout {:?}, stderr {:?}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// A payment carrying `padding` bytes of memo (a field the contract does not name,
/// so ignored), to be rejected as too large under a small limit.
fn payment(id: &str, currency: &str, at: i64, padding: usize) -> Record {
    Record {
        topic: Topic::Payments,
        key: Some(id.as_bytes().to_vec()),
        value: Some(
            serde_json::json!({
                "event_id": format!("{id}-p"), "type": "payment_captured", "payment_id": id,
                "merchant_id": "m", "amount_minor": 1000, "currency": currency,
                "occurred_at": format_timestamp(at), "memo": "x".repeat(padding)
            })
            .to_string()
            .into_bytes(),
        ),
    }
}

fn settlement(id: &str, at: i64) -> Record {
    Record {
        topic: Topic::Settlements,
        key: Some(id.as_bytes().to_vec()),
        value: Some(
            serde_json::json!({
                "event_id": format!("{id}-s"), "type": "settlement_line", "settlement_id": "batch",
                "payment_id": id, "gross_minor": 1000, "fee_minor": 10, "net_minor": 990,
                "currency": "EUR", "settled_at": format_timestamp(at + 3600 * SEC)
            })
            .to_string()
            .into_bytes(),
        ),
    }
}

async fn await_count(world: &World, sql: &str, expected: i64, within: Duration) {
    let started = Instant::now();
    loop {
        let found = world.count(sql).await;
        if found == expected {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{sql}: {found}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn offset_of(world: &World, payment_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT kafka_offset FROM rejected_events
         WHERE convert_from(kafka_key, 'UTF8') = $1",
    )
    .bind(payment_id)
    .fetch_one(&world.pool)
    .await
    .expect("reject of the payment")
}

/// One reject's redrive columns: status as `rejects list` derives it, result,
/// reason class.
async fn reject_state(world: &World, payment_id: &str) -> (bool, bool, Option<String>, String) {
    sqlx::query_as(
        "SELECT redriven_at IS NOT NULL, redrive_requested_at IS NOT NULL, redrive_result, reason_class
         FROM rejected_events WHERE convert_from(kafka_key, 'UTF8') = $1",
    )
    .bind(payment_id)
    .fetch_one(&world.pool)
    .await
    .expect("reject state")
}

#[sqlx::test(migrations = false)]
async fn a_message_rejected_for_its_size_is_redriven_once_the_limit_is_raised(pool: PgPool) {
    let world = World::new(pool, 1).await;
    let now = chrono::Utc::now().timestamp_micros();
    let records = vec![
        // Valid but for its size under the first worker's limit.
        payment("big", "EUR", now, 800),
        settlement("big", now),
        // Too large, and with a currency that does not exist: still invalid later.
        payment("bad-currency", "ZZZ", now, 800),
        // Larger than what a reject keeps (65,536 bytes): cut, cannot be redriven.
        payment("huge", "EUR", now, 70_000),
        // A pair that was always valid.
        payment("small", "EUR", now, 0),
        settlement("small", now),
    ];
    world.produce(&records).await;
    let mut first = world.spawn_worker("small-limit", &[("RECON_MAX_MESSAGE_BYTES", "512")]);
    await_count(&world, "SELECT count(*) FROM rejected_events", 3, WITHIN).await;
    await_count(
        &world,
        "SELECT count(*) FROM recon_outcomes WHERE outcome = 'matched'",
        2,
        WITHIN,
    )
    .await;
    first.stop_cleanly();
    let huge_at = format!("{}:0:{}", world.payments, offset_of(&world, "huge").await);
    let big_at = format!("{}:0:{}", world.payments, offset_of(&world, "big").await);

    // The listing says what an operator needs to decide.
    let listed = rejects(
        &world,
        &["list", "--reason-class", "too_large", "--format", "json"],
    );
    assert_exit(&listed, 0, "list");
    let rows: Vec<serde_json::Value> = text(&listed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let truncated: Vec<bool> = rows.iter().map(|r| r["truncated"] == true).collect();
    assert_eq!(truncated.iter().filter(|t| **t).count(), 1, "{rows:?}");
    assert!(rows.iter().all(|r| r["status"] == "rejected"), "{rows:?}");

    // The limit raised (the default, 64 KiB).
    let second = world.spawn_worker("default-limit", &[]);
    let metrics = second.metrics_addr(WITHIN);

    // A cut payload cannot be redriven, and says so.
    let refused = rejects(&world, &["redrive", "--at", &huge_at]);
    assert_exit(&refused, 1, "redrive of a cut payload");
    assert!(
        text(&refused.stderr).contains("cut at 65536"),
        "{}",
        text(&refused.stderr)
    );
    let unknown = rejects(
        &world,
        &["redrive", "--at", &format!("{}:0:999", world.payments)],
    );
    assert_exit(&unknown, 1, "redrive of no reject");

    let redriven = rejects(
        &world,
        &["redrive", "--reason-class", "too_large", "--wait", "60s"],
    );
    assert_exit(&redriven, 0, "redrive of too_large");
    let out = text(&redriven.stdout);
    assert!(
        out.contains("redrive requested for 2 rejected message(s) by test-operator"),
        "{out}"
    );
    assert!(
        out.contains("accepted 1, redelivery 0, still rejected 1, truncated 0, waiting 0"),
        "{out}"
    );
    assert!(
        text(&redriven.stderr).contains("1 rejected message(s) skipped"),
        "{}",
        text(&redriven.stderr)
    );

    // Processed as a late event: it matched its settlement, which had waited.
    let outcomes: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, outcome FROM recon_outcomes WHERE payment_id = 'big' ORDER BY event_id",
    )
    .fetch_all(&world.pool)
    .await
    .expect("outcomes");
    assert_eq!(
        outcomes,
        vec![
            ("big-p".to_owned(), "matched".to_owned()),
            ("big-s".to_owned(), "matched".to_owned())
        ]
    );
    // Every row stays: one per rejected message.
    assert_eq!(world.count("SELECT count(*) FROM rejected_events").await, 3);
    assert_eq!(
        reject_state(&world, "big").await,
        (true, true, Some("accepted".into()), "too_large".into())
    );
    // Still invalid: rejected again with its new reason, the request cleared.
    assert_eq!(
        reject_state(&world, "bad-currency").await,
        (
            false,
            false,
            Some("rejected".into()),
            "unknown_currency".into()
        )
    );
    assert_eq!(
        reject_state(&world, "huge").await,
        (false, false, None, "too_large".into())
    );
    assert_eq!(
        scrape_series(&metrics, "recon_redrives_total", &["result=\"accepted\""]).await,
        Some(1.0)
    );
    assert_eq!(
        scrape_series(&metrics, "recon_redrives_total", &["result=\"rejected\""]).await,
        Some(1.0)
    );

    // Redriven already: refused; a further --all asks only for the still-invalid one.
    let again = rejects(&world, &["redrive", "--at", &big_at]);
    assert_exit(&again, 1, "redrive of a redriven reject");
    assert!(
        text(&again.stderr).contains("redriven already"),
        "{}",
        text(&again.stderr)
    );
    let all = rejects(&world, &["redrive", "--all", "--wait", "60s"]);
    assert_exit(&all, 0, "redrive --all");
    assert!(
        text(&all.stdout).contains("accepted 0, redelivery 0, still rejected 1"),
        "{}",
        text(&all.stdout)
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM recon_outcomes WHERE payment_id = 'big'")
            .await,
        2,
        "applied once"
    );
    let listed = rejects(&world, &["list", "--format", "csv"]);
    assert_exit(&listed, 0, "list csv");
    let csv = text(&listed.stdout);
    assert!(
        csv.starts_with("id,topic,kafka_partition,kafka_offset,reason_class,reason,payload_size,truncated,rejected_at,status,redrive_result,redriven_at,payload_preview\n"),
        "{csv}"
    );
    assert_eq!(
        csv.lines()
            .filter(|l| l.contains(",redriven,accepted,"))
            .count(),
        1,
        "{csv}"
    );
}

#[sqlx::test(migrations = false)]
async fn redrives_asked_twice_across_a_kill_and_a_rebalance_apply_each_message_once(pool: PgPool) {
    let world = World::new(pool, 4).await;
    let now = chrono::Utc::now().timestamp_micros();
    let n = 3_000;
    let ids: Vec<String> = (0..n).map(|i| format!("r{i:05}")).collect();
    let mut records = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        records.push(payment(id, "EUR", now + i as i64 * 1_000, 600));
        records.push(settlement(id, now + i as i64 * 1_000));
    }
    world.produce(&records).await;
    let mut first = world.spawn_worker("small-limit", &[("RECON_MAX_MESSAGE_BYTES", "512")]);
    await_count(
        &world,
        "SELECT count(*) FROM rejected_events",
        n as i64,
        WITHIN,
    )
    .await;
    await_count(
        &world,
        "SELECT count(*) FROM recon_outcomes",
        n as i64,
        WITHIN,
    )
    .await;
    first.stop_cleanly();

    // Small batches, so the re-drives spread over many checkpoints.
    let extra = [("RECON_BATCH_MAX_MESSAGES", "100")];
    let _a = world.spawn_worker("a", &extra);
    let mut b = world.spawn_worker("b", &extra);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = rejects(&world, &["redrive", "--all"]);
    assert_exit(&asked, 0, "redrive --all");
    // Asked again, whole and one by one, while the first requests are being settled.
    let twice = rejects(&world, &["redrive", "--all"]);
    assert_exit(&twice, 0, "redrive --all again");
    for id in ids.iter().step_by(500) {
        let at = format!("{}:{}", world.payments, {
            let (partition, offset): (i32, i64) = sqlx::query_as(
                "SELECT kafka_partition, kafka_offset FROM rejected_events
                 WHERE convert_from(kafka_key, 'UTF8') = $1",
            )
            .bind(id)
            .fetch_one(&world.pool)
            .await
            .expect("position");
            format!("{partition}:{offset}")
        });
        let one = rejects(&world, &["redrive", "--at", &at]);
        // Either still waiting (asked again: nothing changes) or redriven already.
        assert!(
            matches!(one.status.code(), Some(0 | 1)),
            "{}",
            text(&one.stderr)
        );
    }
    // A worker killed mid-way, and one joining: the pairs move twice.
    b.signal("KILL");
    let _ = b.wait(Duration::from_secs(5));
    let _c = world.spawn_worker("c", &extra);

    await_count(
        &world,
        "SELECT count(*) FROM rejected_events WHERE redriven_at IS NOT NULL",
        n as i64,
        Duration::from_secs(150),
    )
    .await;
    // Exactly once: a second application would find its event stored and leave
    // `redelivery`; a lost one would leave the settlement pending.
    let results: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT redrive_result, count(*) FROM rejected_events GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&world.pool)
    .await
    .expect("results");
    assert_eq!(results, vec![(Some("accepted".to_owned()), n as i64)]);
    await_count(
        &world,
        "SELECT count(*) FROM recon_outcomes WHERE outcome = 'matched'",
        2 * n as i64,
        WITHIN,
    )
    .await;
    assert_eq!(
        world.count("SELECT count(*) FROM recon_outcomes").await,
        2 * n as i64
    );
    assert_eq!(
        world.count("SELECT count(*) FROM rejected_events").await,
        n as i64
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM recon_discrepancies")
            .await,
        0
    );
}
