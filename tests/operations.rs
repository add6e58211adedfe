//! The discrepancy workflow (contract §8) against a real PostgreSQL: the action log
//! and its append-only rule, the worker's own actions (exactly once per change, also
//! when a checkpoint is retried), a manual resolution that stays, and the
//! `recon-worker discrepancies` commands run as the binary (formats, filters, state
//! rules, exit codes, and a million rows listed in little memory).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use recon_worker::engine::{
    DiscrepancyChange, DiscrepancyKind, NewEvent, Outcome, OverRefund, PairChanges, RowWrite,
};
use recon_worker::event::{EventKind, Line};
use recon_worker::money::Currency;
use recon_worker::operations::discrepancies::{self, Act};
use recon_worker::operations::OperationError;
use recon_worker::store::{PairCheckpoint, Store, COUNTERPART_ARRIVED};
use sqlx::PgPool;

async fn store(pool: PgPool) -> Store {
    let store = Store::with_pool(pool, "payments", "settlements");
    store.migrate().await.expect("migrate");
    store.acquire_pairs(&[0]).await.expect("own pair 0");
    store
}

/// The test database's URL, for the binary.
fn database_url(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options
            .get_database()
            .expect("sqlx::test names its database")
    )
}

/// `recon-worker discrepancies <args>` with DATABASE_URL as its only variable (and
/// PATH), plus `extra`.
fn cli(pool: &PgPool, args: &[&str], extra: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("discrepancies")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url(pool))
        .envs(extra.iter().copied())
        .output()
        .expect("run recon-worker")
}

fn argv(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: stdout {:?}, stderr {:?}",
        stdout(output),
        stderr(output)
    );
}

/// RFC 4180: fields split on commas outside quotes, `""` inside quotes is a quote,
/// records end at a line break outside quotes.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        !quoted && field.is_empty() && record.is_empty(),
        "ends with a line break"
    );
    records
}

fn parse_json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// Inserts a discrepancy as the worker's checkpoint writes one, opened `hours_ago`;
/// returns its id.
async fn discrepancy(
    pool: &PgPool,
    kind: &str,
    payment_id: &str,
    subject: &str,
    hours_ago: i64,
    resolution: Option<&str>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO recon_discrepancies
             (kind, payment_id, kafka_partition, payment_event_id, opened_at, resolved_at, resolution)
         VALUES ($1, $2, 0, $3, now() - $4 * interval '1 hour',
                 CASE WHEN $5::text IS NULL THEN NULL ELSE now() END, $5)
         RETURNING id",
    )
    .bind(kind)
    .bind(payment_id)
    .bind(subject)
    .bind(hours_ago)
    .bind(resolution)
    .fetch_one(pool)
    .await
    .expect("insert discrepancy")
}

/// A discrepancy's action log, in order: (action, actor, note).
async fn actions(pool: &PgPool, id: i64) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT action, actor, note FROM recon_discrepancy_actions
         WHERE discrepancy_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .expect("actions")
}

fn action(action: &str, actor: &str, note: Option<&str>) -> (String, String, Option<String>) {
    (action.to_owned(), actor.to_owned(), note.map(str::to_owned))
}

fn worker(name: &str, note: Option<&str>) -> (String, String, Option<String>) {
    action(name, "recon-worker", note)
}

async fn state(pool: &PgPool, id: i64) -> (bool, Option<String>) {
    sqlx::query_as("SELECT resolved_at IS NULL, resolution FROM recon_discrepancies WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("state")
}

async fn exists(pool: &PgPool, id: i64) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT FROM recon_discrepancies WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("exists")
}

/// The note of the worker's last action on an over_refunded row the lines say never
/// existed (migration 0010), which removes the row.
const WITHDRAWN: &str = "withdrawn: in settled_at order its lines never take the position below zero; the row is removed (contract §6)";

async fn id_of(pool: &PgPool, kind: &str, payment_id: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM recon_discrepancies WHERE kind = $1 AND payment_id = $2")
        .bind(kind)
        .bind(payment_id)
        .fetch_one(pool)
        .await
        .expect("discrepancy id")
}

#[sqlx::test(migrations = false)]
async fn list_filters_orders_oldest_first_and_writes_every_format(pool: PgPool) {
    store(pool.clone()).await;
    let old = discrepancy(&pool, "missing_settlement", "p-old", "e-old", 50, None).await;
    let quoted = discrepancy(&pool, "chargeback", "p,\"q\"", "e-q", 30, None).await;
    let young = discrepancy(&pool, "missing_settlement", "p-young", "e-young", 1, None).await;
    let done = discrepancy(
        &pool,
        "orphan_settlement",
        "p-done",
        "e-done",
        40,
        Some("matched"),
    )
    .await;
    let payout: i64 = sqlx::query_scalar(
        "INSERT INTO recon_discrepancies (kind, payout_id, opened_at)
         VALUES ('payout_mismatch', 'po-1', now() - interval '20 hours') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .expect("payout discrepancy");

    // Default: open ones, oldest first; CSV with its header.
    let output = cli(&pool, &["list", "--format", "csv"], &[]);
    assert_exit(&output, 0, "list csv");
    let records = parse_csv(&stdout(&output));
    assert_eq!(
        records[0],
        [
            "id",
            "kind",
            "payment_id",
            "payout_id",
            "payment_event_id",
            "settlement_event_id",
            "opened_at",
            "resolved_at",
            "resolution",
            "age_seconds"
        ]
    );
    let ids: Vec<i64> = records[1..]
        .iter()
        .map(|r| r[0].parse().expect("id"))
        .collect();
    assert_eq!(ids, vec![old, quoted, payout, young]);
    let row = &records[2];
    assert_eq!(row[1], "chargeback");
    assert_eq!(row[2], "p,\"q\"", "quoted and unquoted back");
    assert_eq!((row[3].as_str(), row[7].as_str()), ("", ""));
    let age: i64 = row[9].parse().expect("age");
    assert!((30 * 3600..31 * 3600).contains(&age), "age {age}");
    assert!(row[6].ends_with('Z'), "RFC 3339 in UTC: {}", row[6]);

    // --all as NDJSON: resolved ones too, nulls as null.
    let output = cli(&pool, &["list", "--all", "--format", "json"], &[]);
    assert_exit(&output, 0, "list json");
    let rows = parse_json_lines(&stdout(&output));
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().expect("id")).collect();
    assert_eq!(ids, vec![old, done, quoted, payout, young]);
    assert_eq!(rows[1]["resolution"], "matched");
    assert!(rows[1]["resolved_at"].is_string());
    assert!(rows[3]["payment_id"].is_null());
    assert_eq!(rows[3]["payout_id"], "po-1");
    assert_eq!(rows[0]["payment_event_id"], "e-old");

    // Filters, alone and together.
    let ids_of = |args: &[&str]| -> Vec<i64> {
        let mut args = args.to_vec();
        args.extend(["--format", "json"]);
        let output = cli(&pool, &args, &[]);
        assert_exit(&output, 0, &format!("{args:?}"));
        parse_json_lines(&stdout(&output))
            .iter()
            .map(|r| r["id"].as_i64().expect("id"))
            .collect()
    };
    assert_eq!(
        ids_of(&["list", "--kind", "missing_settlement"]),
        vec![old, young]
    );
    assert_eq!(ids_of(&["list", "--older-than", "25h"]), vec![old, quoted]);
    assert_eq!(
        ids_of(&["list", "--all", "--older-than", "35h"]),
        vec![old, done]
    );
    assert_eq!(ids_of(&["list", "--payment-id", "p,\"q\""]), vec![quoted]);
    assert_eq!(
        ids_of(&["list", "--open", "--kind", "orphan_settlement"]),
        Vec::<i64>::new()
    );

    // The table: a header and one line per row.
    let output = cli(&pool, &["list"], &[]);
    assert_exit(&output, 0, "list table");
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID "), "{text}");
    assert!(lines[0].ends_with("AGE"), "{text}");
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[1].starts_with(&format!("{old} ")) && lines[1].contains("2d 2h"),
        "{text}"
    );
    assert!(lines[3].contains("po-1"), "{text}");

    // Invalid arguments: exit code 2, from clap.
    for args in [
        &["list", "--kind", "no_such_kind"][..],
        &["list", "--open", "--all"],
        &["list", "--older-than", "soon"],
        &["list", "--format", "xml"],
    ] {
        assert_exit(&cli(&pool, args, &[]), 2, &format!("{args:?}"));
    }
}

#[sqlx::test(migrations = false)]
async fn the_commands_need_only_database_url(pool: PgPool) {
    store(pool.clone()).await;
    // Variables the worker would refuse do not concern them.
    let output = cli(
        &pool,
        &["list"],
        &[
            ("RECON_IDLE_TIMEOUT", "0s"),
            ("RECON_KAFKA_BROKERS", ""),
            ("RECON_PAYMENTS_TOPIC", "same"),
            ("RECON_SETTLEMENTS_TOPIC", "same"),
        ],
    );
    assert_exit(&output, 0, "list with the worker's variables invalid");
    // Without DATABASE_URL: a configuration error, exit code 2, naming it.
    let output = Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .args(["discrepancies", "list"])
        .env_clear()
        .output()
        .expect("run recon-worker");
    assert_exit(&output, 2, "without DATABASE_URL");
    assert!(
        stderr(&output).contains("DATABASE_URL"),
        "{}",
        stderr(&output)
    );
    // Each command documents itself.
    for command in ["list", "accept", "reopen", "annotate"] {
        let output = cli(&pool, &[command, "--help"], &[]);
        assert_exit(&output, 0, command);
        assert!(stdout(&output).contains("Usage: recon-worker discrepancies"));
    }
    assert!(stdout(&cli(&pool, &["list", "--help"], &[])).contains("NDJSON"));
}

#[sqlx::test(migrations = false)]
async fn accept_reopen_and_annotate_follow_the_state_rules(pool: PgPool) {
    store(pool.clone()).await;
    let id = discrepancy(&pool, "missing_settlement", "p1", "e1", 80, None).await;
    let id_text = id.to_string();
    let id = id_text.as_str();
    let run = |args: &[&str]| cli(&pool, args, &[]);
    let by = |verb: &str, note: &str| -> Vec<String> {
        vec![
            verb.to_owned(),
            id.to_owned(),
            "--actor".into(),
            "alice".into(),
            "--note".into(),
            note.into(),
        ]
    };

    let output = run(&argv(&by("annotate", "looking at it")));
    assert_exit(&output, 0, "annotate an open one");
    assert!(stdout(&output).contains("annotated by alice"));
    // Reopening an open one is refused and changes nothing.
    let output = run(&argv(&by("reopen", "why not")));
    assert_exit(&output, 1, "reopen an open one");
    assert!(stderr(&output).contains("is open"), "{}", stderr(&output));

    let output = run(&argv(&by("accept", "PSP confirmed the fee")));
    assert_exit(&output, 0, "accept");
    let numeric: i64 = id.parse().expect("id");
    assert_eq!(
        state(&pool, numeric).await,
        (false, Some("accepted".into()))
    );
    let output = run(&argv(&by("accept", "again")));
    assert_exit(&output, 1, "accept a resolved one");
    assert!(
        stderr(&output).contains("already resolved (accepted)"),
        "{}",
        stderr(&output)
    );
    let output = run(&argv(&by("annotate", "for the audit")));
    assert_exit(&output, 0, "annotate a resolved one");

    let output = run(&argv(&by("reopen", "the PSP withdrew it")));
    assert_exit(&output, 0, "reopen");
    assert_eq!(state(&pool, numeric).await, (true, None));

    // An unknown id: refused, exit code 1, named.
    for verb in ["accept", "reopen", "annotate"] {
        let output = run(&[verb, "999999", "--actor", "alice", "--note", "x"]);
        assert_exit(&output, 1, &format!("{verb} an unknown id"));
        assert!(
            stderr(&output).contains("no discrepancy has id 999999"),
            "{}",
            stderr(&output)
        );
    }
    // Invalid arguments: exit code 2.
    for args in [
        &["accept", id][..],
        &["accept", id, "--actor", "alice"],
        &["accept", id, "--actor", "alice", "--note", " "],
        &["accept", id, "--actor", "recon-worker", "--note", "x"],
        &["accept", "0", "--actor", "alice", "--note", "x"],
        &["accept", "abc", "--actor", "alice", "--note", "x"],
    ] {
        assert_exit(&run(args), 2, &format!("{args:?}"));
    }

    assert_eq!(
        actions(&pool, numeric).await,
        vec![
            action("annotated", "alice", Some("looking at it")),
            action("accepted", "alice", Some("PSP confirmed the fee")),
            action("annotated", "alice", Some("for the audit")),
            action("reopened", "alice", Some("the PSP withdrew it")),
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn reopening_a_payout_discrepancy_while_another_is_open_is_refused(pool: PgPool) {
    store(pool.clone()).await;
    let resolved: i64 = sqlx::query_scalar(
        "INSERT INTO recon_discrepancies (kind, payout_id, resolved_at, resolution)
         VALUES ('unannounced_payout', 'po', now(), 'announced') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .expect("resolved");
    sqlx::query(
        "INSERT INTO recon_discrepancies (kind, payout_id) VALUES ('payout_mismatch', 'po')",
    )
    .execute(&pool)
    .await
    .expect("open");
    let mut connection = pool.acquire().await.expect("connection");
    match discrepancies::act(&mut connection, Act::Reopen, resolved, "bob", "check").await {
        Err(OperationError::Refused(message)) => {
            assert!(message.contains("another discrepancy open"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(connection);
    assert_eq!(
        state(&pool, resolved).await,
        (false, Some("announced".into()))
    );
    assert!(actions(&pool, resolved).await.is_empty());
}

#[sqlx::test(migrations = false)]
async fn the_action_log_refuses_update_delete_and_truncate_even_to_its_owner(pool: PgPool) {
    store(pool.clone()).await;
    let id = discrepancy(&pool, "missing_settlement", "p1", "e1", 1, None).await;
    let mut connection = pool.acquire().await.expect("connection");
    discrepancies::act(&mut connection, Act::Annotate, id, "alice", "kept for ever")
        .await
        .expect("annotate");
    drop(connection);
    let owner: bool = sqlx::query_scalar(
        "SELECT pg_get_userbyid(relowner) = current_user FROM pg_class
         WHERE oid = 'recon_discrepancy_actions'::regclass",
    )
    .fetch_one(&pool)
    .await
    .expect("owner");
    assert!(owner, "this connection is the table's owner");
    common::assert_action_log_refuses_changes(&pool).await;
    // The log outlives the discrepancies it is about (a withdrawn over_refunded row
    // is deleted, contract §6): even the owner's TRUNCATE of them leaves it whole.
    sqlx::query("TRUNCATE recon_discrepancies")
        .execute(&pool)
        .await
        .expect("the owner truncates the discrepancies");
    assert_eq!(
        actions(&pool, id).await,
        vec![action("annotated", "alice", Some("kept for ever"))]
    );
}

fn payment(event_id: &str, payment_id: &str, outcome: Outcome, new: bool) -> RowWrite {
    RowWrite {
        kind: EventKind::Payment,
        event_id: event_id.into(),
        payment_id: payment_id.into(),
        outcome,
        counterpart: None,
        new: new.then(|| NewEvent {
            kafka_offset: 0,
            event_time: 1,
            amount: 100,
            fee: None,
            net: None,
            currency: Currency::from_code("EUR").expect("EUR"),
            reference: Some("m".into()),
            line: Line::Capture,
            payout_id: None,
        }),
    }
}

fn settlement(event_id: &str, payment_id: &str, outcome: Outcome) -> RowWrite {
    let mut row = payment(event_id, payment_id, outcome, true);
    row.kind = EventKind::Settlement;
    if let Some(new) = row.new.as_mut() {
        new.fee = Some(0);
        new.net = Some(100);
        new.reference = Some("batch-1".into());
    }
    row
}

/// A checkpoint of pair 0 (epoch 1) that moves no offset.
fn batch(rows: Vec<RowWrite>, discrepancies: Vec<DiscrepancyChange>) -> PairCheckpoint {
    PairCheckpoint {
        pair: 0,
        epoch: 1,
        next_offsets: [None, None].into(),
        changes: PairChanges {
            rows,
            discrepancies,
            high_marks: [Some(5), None].into(),
            generation: 1,
        },
        rejected: Vec::new(),
        announcements: Vec::new(),
        watermark: None,
        redriven: Vec::new(),
    }
}

fn missing_opened(payment_id: &str, event_id: &str) -> DiscrepancyChange {
    DiscrepancyChange::Opened {
        kind: DiscrepancyKind::Outcome(Outcome::MissingSettlement),
        payment_id: payment_id.into(),
        payment_event_id: Some(event_id.into()),
        settlement_event_id: None,
    }
}

fn missing_resolved(event_id: &str, resolution: &'static str) -> DiscrepancyChange {
    DiscrepancyChange::Resolved {
        kind: DiscrepancyKind::Outcome(Outcome::MissingSettlement),
        subject_event_id: event_id.into(),
        resolution,
    }
}

fn over_refund(payment_id: &str, state: Option<bool>) -> DiscrepancyChange {
    DiscrepancyChange::OverRefund {
        payment_id: payment_id.into(),
        state: state.map(|open| OverRefund {
            first_below: format!("cb-{payment_id}").into(),
            open,
        }),
    }
}

/// Contract §8: a discrepancy resolved by hand stays resolved when its counterpart
/// arrives later; the outcome of the events still changes as §2 says, and the action
/// log shows both: the person's acceptance, and the counterpart's arrival (annotated by
/// the worker, once, with the resolution it would have had; no automatic resolution).
#[sqlx::test(migrations = false)]
async fn a_discrepancy_accepted_by_hand_stays_resolved_when_its_counterpart_arrives(pool: PgPool) {
    let store = store(pool.clone()).await;
    let pending = batch(
        vec![payment("p-e", "p", Outcome::Pending, true)],
        Vec::new(),
    );
    store.checkpoint(&[pending]).await.expect("payment");
    // The deadline passes: missing_settlement.
    let fired = batch(
        vec![payment("p-e", "p", Outcome::MissingSettlement, false)],
        vec![missing_opened("p", "p-e")],
    );
    store.checkpoint(&[fired]).await.expect("deadline");
    let id = id_of(&pool, "missing_settlement", "p").await;

    // Finance accepts it, through the command's own function.
    let mut connection = pool.acquire().await.expect("connection");
    let recorded = discrepancies::act(&mut connection, Act::Accept, id, "alice", "known gap")
        .await
        .expect("accept");
    assert_eq!(recorded.action, "accepted");
    drop(connection);

    // The settlement arrives late: rules 1-5 give matched_late to both events, and the
    // engine resolves the missing_settlement with that outcome.
    let mut payment_row = payment("p-e", "p", Outcome::MatchedLate, false);
    payment_row.counterpart = Some("s-e".into());
    let mut settlement_row = settlement("s-e", "p", Outcome::MatchedLate);
    settlement_row.counterpart = Some("p-e".into());
    let late = batch(
        vec![payment_row, settlement_row],
        vec![missing_resolved("p-e", "matched_late")],
    );
    store.checkpoint(&[late]).await.expect("late settlement");

    let outcomes: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, outcome, counterpart_event_id FROM recon_outcomes ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .expect("outcomes");
    assert_eq!(
        outcomes,
        vec![
            ("p-e".into(), "matched_late".into(), Some("s-e".into())),
            ("s-e".into(), "matched_late".into(), Some("p-e".into())),
        ]
    );
    // The same resolution again (a later batch naming it): nothing more to say.
    store
        .checkpoint(&[batch(
            Vec::new(),
            vec![missing_resolved("p-e", "matched_late")],
        )])
        .await
        .expect("resolution again");
    assert_eq!(state(&pool, id).await, (false, Some("accepted".into())));
    let arrived = format!("{COUNTERPART_ARRIVED}matched_late");
    assert_eq!(
        actions(&pool, id).await,
        vec![
            worker("opened", None),
            action("accepted", "alice", Some("known gap")),
            worker("annotated", Some(&arrived)),
        ]
    );

    // An accepted over_refunded discrepancy is not recovered or reopened; if the lines
    // say it never existed, it goes (contract §6) and the log says so.
    let open = batch(Vec::new(), vec![over_refund("k", Some(true))]);
    store.checkpoint(&[open]).await.expect("over-refund");
    let over = id_of(&pool, "over_refunded", "k").await;
    let mut connection = pool.acquire().await.expect("connection");
    discrepancies::act(
        &mut connection,
        Act::Accept,
        over,
        "bob",
        "refunded twice on purpose",
    )
    .await
    .expect("accept");
    drop(connection);
    for state_wanted in [Some(false), Some(true)] {
        let change = batch(Vec::new(), vec![over_refund("k", state_wanted)]);
        store
            .checkpoint(&[change])
            .await
            .expect("over-refund change");
        assert_eq!(state(&pool, over).await, (false, Some("accepted".into())));
    }
    assert_eq!(
        actions(&pool, over).await,
        vec![
            worker("opened", None),
            action("accepted", "bob", Some("refunded twice on purpose")),
        ]
    );
    let withdraw = batch(Vec::new(), vec![over_refund("k", None)]);
    store.checkpoint(&[withdraw]).await.expect("withdrawal");
    assert!(!exists(&pool, over).await);
    assert_eq!(
        actions(&pool, over).await,
        vec![
            worker("opened", None),
            action("accepted", "bob", Some("refunded twice on purpose")),
            worker("resolved", Some(WITHDRAWN)),
        ]
    );
}

/// The worker logs each change it makes exactly once: a checkpoint retried after a
/// COMMIT of unknown outcome (the same batch written again, see tests/store.rs) changes
/// nothing the second time, and logs nothing.
#[sqlx::test(migrations = false)]
async fn the_workers_own_actions_are_logged_once_per_change_even_when_retried(pool: PgPool) {
    let store = store(pool.clone()).await;
    let write_twice = |batch: PairCheckpoint| {
        let store = store.clone();
        async move {
            store
                .checkpoint(std::slice::from_ref(&batch))
                .await
                .expect("checkpoint");
            store
                .checkpoint(&[batch])
                .await
                .expect("retried checkpoint");
        }
    };
    store
        .checkpoint(&[batch(
            vec![payment("p-e", "p", Outcome::Pending, true)],
            Vec::new(),
        )])
        .await
        .expect("payment");
    write_twice(batch(
        vec![payment("p-e", "p", Outcome::MissingSettlement, false)],
        vec![missing_opened("p", "p-e")],
    ))
    .await;
    let id = id_of(&pool, "missing_settlement", "p").await;
    assert_eq!(actions(&pool, id).await, vec![worker("opened", None)]);
    write_twice(batch(
        vec![payment("p-e", "p", Outcome::Matched, false)],
        vec![missing_resolved("p-e", "matched")],
    ))
    .await;
    assert_eq!(
        actions(&pool, id).await,
        vec![worker("opened", None), worker("resolved", Some("matched"))]
    );

    // An over_refunded discrepancy through every state, each change written twice.
    for wanted in [Some(true), Some(false), Some(true)] {
        write_twice(batch(Vec::new(), vec![over_refund("k", wanted)])).await;
    }
    let over = id_of(&pool, "over_refunded", "k").await;
    write_twice(batch(Vec::new(), vec![over_refund("k", None)])).await;
    assert!(!exists(&pool, over).await, "withdrawn: removed");
    assert_eq!(
        actions(&pool, over).await,
        vec![
            worker("opened", None),
            worker("resolved", Some("recovered")),
            worker("reopened", None),
            worker("resolved", Some(WITHDRAWN)),
        ]
    );
    // Below zero again later: a new discrepancy, with a history of its own.
    for wanted in [Some(true), Some(true)] {
        write_twice(batch(Vec::new(), vec![over_refund("k", wanted)])).await;
    }
    let again = id_of(&pool, "over_refunded", "k").await;
    assert_ne!(again, over);
    assert_eq!(actions(&pool, again).await, vec![worker("opened", None)]);
    assert_eq!(state(&pool, again).await, (true, None));
    assert_eq!(
        actions(&pool, over).await.len(),
        4,
        "the old history unchanged"
    );
    // Opened already recovered (one batch took it below zero and back): opened, then
    // resolved, in that order.
    write_twice(batch(Vec::new(), vec![over_refund("k2", Some(false))])).await;
    let recovered = id_of(&pool, "over_refunded", "k2").await;
    assert_eq!(
        actions(&pool, recovered).await,
        vec![
            worker("opened", None),
            worker("resolved", Some("recovered"))
        ]
    );
    // Withdrawn again after being withdrawn: nothing more to say.
    write_twice(batch(Vec::new(), vec![over_refund("k2", None)])).await;
    write_twice(batch(Vec::new(), vec![over_refund("k2", None)])).await;
    assert_eq!(actions(&pool, recovered).await.len(), 3);
    assert!(!exists(&pool, recovered).await);
}

/// A person reopens an over_refunded discrepancy while a checkpoint that resolves it
/// again waits for their lock: the worker's resolution is a change from the state the
/// person committed, and is logged (not compared with the checkpoint's older snapshot).
#[sqlx::test(migrations = false)]
async fn a_resolution_racing_a_persons_reopen_is_logged(pool: PgPool) {
    let store = store(pool.clone()).await;
    for wanted in [Some(true), Some(false)] {
        store
            .checkpoint(&[batch(Vec::new(), vec![over_refund("k", wanted)])])
            .await
            .expect("over-refund");
    }
    let id = id_of(&pool, "over_refunded", "k").await;
    // The person's reopen, as `discrepancies reopen` runs it, held open.
    let mut person = pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM recon_discrepancies WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *person)
        .await
        .expect("lock");
    sqlx::query(
        "UPDATE recon_discrepancies SET resolved_at = NULL, resolution = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *person)
    .await
    .expect("reopen");
    sqlx::query(
        "INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
         VALUES ($1, 'reopened', 'alice', 'not recovered')",
    )
    .bind(id)
    .execute(&mut *person)
    .await
    .expect("log");
    // The lines say recovered: the checkpoint starts, and waits for the row.
    let racing = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .checkpoint(&[batch(Vec::new(), vec![over_refund("k", Some(false))])])
                .await
        }
    });
    let started = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .expect("activity");
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the checkpoint never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    person.commit().await.expect("the person commits");
    racing.await.expect("task").expect("checkpoint");
    assert_eq!(state(&pool, id).await, (false, Some("recovered".into())));
    assert_eq!(
        actions(&pool, id).await,
        vec![
            worker("opened", None),
            worker("resolved", Some("recovered")),
            action("reopened", "alice", Some("not recovered")),
            worker("resolved", Some("recovered")),
        ]
    );
}

/// VmHWM (peak resident set) of a running process, in kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Contract §8: the listing streams, so a million rows need no more memory than ten.
#[sqlx::test(migrations = false)]
async fn a_million_rows_are_listed_in_little_memory(pool: PgPool) {
    const ROWS: u64 = 1_000_000;
    const LIMIT_KB: u64 = 60 * 1024;
    store(pool.clone()).await;
    sqlx::query(
        "INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, payment_event_id, opened_at)
         SELECT 'missing_settlement', 'payment-' || g, g % 8, 'event-' || g,
                now() - interval '1 day' + g * interval '1 millisecond'
         FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(ROWS as i64)
    .execute(&pool)
    .await
    .expect("a million discrepancies");

    let mut child = Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .args(["discrepancies", "list", "--format", "csv"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url(&pool))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recon-worker");
    let pid = child.id();
    let out = child.stdout.take().expect("stdout");
    // The reader counts lines and checks the order as they come.
    let reader = std::thread::spawn(move || {
        let (mut lines, mut last, mut ordered) = (0u64, 0u64, true);
        for line in BufReader::new(out).lines() {
            let line = line.expect("line");
            if lines > 0 {
                let n: u64 = line
                    .split(',')
                    .nth(4)
                    .and_then(|e| e.strip_prefix("event-"))
                    .and_then(|n| n.parse().ok())
                    .expect("payment_event_id");
                ordered &= n == last + 1;
                last = n;
            }
            lines += 1;
        }
        (lines, ordered)
    });
    let started = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak = peak.max(kb);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the listing did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (lines, ordered) = reader.join().expect("reader");
    let mut error = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        std::io::Read::read_to_string(&mut stderr, &mut error).expect("stderr");
    }
    assert!(status.success(), "{error}");
    assert_eq!(lines, ROWS + 1, "a header and every row");
    assert!(ordered, "oldest first");
    eprintln!(
        "listed {ROWS} rows in {:?}, peak RSS {peak} kB",
        started.elapsed()
    );
    assert!(peak > 0, "the peak RSS was read");
    assert!(
        peak < LIMIT_KB,
        "peak RSS {peak} kB for {ROWS} rows: the listing does not stream"
    );
}

fn orphan_opened(payment_id: &str, event_id: &str) -> DiscrepancyChange {
    DiscrepancyChange::Opened {
        kind: DiscrepancyKind::Outcome(Outcome::OrphanSettlement),
        payment_id: payment_id.into(),
        payment_event_id: None,
        settlement_event_id: Some(event_id.into()),
    }
}

fn orphan_resolved(event_id: &str) -> DiscrepancyChange {
    DiscrepancyChange::Resolved {
        kind: DiscrepancyKind::Outcome(Outcome::OrphanSettlement),
        subject_event_id: event_id.into(),
        resolution: "matched_late",
    }
}

/// Rows of `recon_discrepancies` read so far, by sequential and index scans, once no
/// other session is connected to the database (a session's counts reach the
/// statistics when it ends).
async fn discrepancy_rows_read(reader: &PgPool) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(reader)
        .await
        .expect("sessions");
        if others == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{others} sessions stayed connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query_scalar(
        "SELECT (COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0))::bigint
         FROM pg_stat_user_tables WHERE relname = 'recon_discrepancies'",
    )
    .fetch_one(reader)
    .await
    .expect("statistics")
}

/// A checkpoint that resolves discrepancies, two of them accepted by a person
/// (contract §8), reads about the rows it changes, not the table: the rows read
/// (sequential and index scans) stay within a few per resolved subject among 20,000
/// open discrepancies. Before migration 0012 the lookup of accepted rows (to log that
/// their counterpart arrived) had no index and read every row of the kind once per
/// resolved subject: a drain slowed down as discrepancies accumulated, from 8k to
/// 250-400 messages a second after 1.5M messages.
#[sqlx::test(migrations = false)]
async fn resolving_discrepancies_reads_the_rows_it_changes_not_the_table(pool: PgPool) {
    const OPEN: usize = 10_000;
    const RESOLVED: usize = 50;
    let url = database_url(&pool);
    let store = store(pool.clone()).await;
    let opened: Vec<DiscrepancyChange> = (0..OPEN)
        .flat_map(|i| {
            [
                missing_opened(&format!("p{i}"), &format!("p{i}-e")),
                orphan_opened(&format!("o{i}"), &format!("o{i}-s")),
            ]
        })
        .collect();
    store
        .checkpoint(&[batch(Vec::new(), opened)])
        .await
        .expect("open");
    for (kind, payment_id) in [("missing_settlement", "p7"), ("orphan_settlement", "o7")] {
        let id = id_of(&pool, kind, payment_id).await;
        let mut connection = pool.acquire().await.expect("connection");
        discrepancies::act(&mut connection, Act::Accept, id, "alice", "known gap")
            .await
            .expect("accept");
    }
    sqlx::query("ANALYZE recon_discrepancies")
        .execute(&pool)
        .await
        .expect("analyze");
    drop(store);
    pool.close().await;

    let reader = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("reader");
    let before = discrepancy_rows_read(&reader).await;
    let checkpointing = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("pool");
    let store = Store::with_pool(checkpointing.clone(), "payments", "settlements");
    let resolved: Vec<DiscrepancyChange> = (0..RESOLVED)
        .flat_map(|i| {
            [
                missing_resolved(&format!("p{i}-e"), "matched_late"),
                orphan_resolved(&format!("o{i}-s")),
            ]
        })
        .collect();
    store
        .checkpoint(&[batch(Vec::new(), resolved)])
        .await
        .expect("resolve");
    drop(store);
    checkpointing.close().await;
    let read = discrepancy_rows_read(&reader).await - before;
    eprintln!(
        "rows of recon_discrepancies read to resolve {} subjects: {read}",
        2 * RESOLVED
    );
    assert!(
        read <= (10 * 2 * RESOLVED) as i64,
        "{read} rows read to resolve {} subjects among {} discrepancies",
        2 * RESOLVED,
        2 * OPEN
    );

    // And the checkpoint did what it should: the accepted ones stay accepted and are
    // annotated, the others are resolved.
    let states: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT resolution, count(*) FROM recon_discrepancies GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&reader)
    .await
    .expect("states");
    assert_eq!(
        states,
        vec![
            (Some("accepted".into()), 2),
            (Some("matched_late".into()), (2 * RESOLVED - 2) as i64),
            (None, (2 * OPEN - 2 * RESOLVED) as i64),
        ]
    );
    let annotated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recon_discrepancy_actions WHERE action = 'annotated'",
    )
    .fetch_one(&reader)
    .await
    .expect("annotations");
    assert_eq!(annotated, 2);
}
