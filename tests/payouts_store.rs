//! The payout evaluator (contract §7, `Store::evaluate_payouts`) against a real
//! PostgreSQL: the global watermark, the status rules and their deadlines, the payout
//! discrepancies' history, the status counts, the lock, the cap, and the indexes the
//! reads need.
//!
//! The rows the pairs' checkpoints commit (each pair's `watermark` and `payout_seq`,
//! partial sums in `recon_payout_parts`, `recon_payout_announcements`) are written
//! here directly with SQL, the way a checkpoint writes them: a checkpoint bumps its
//! pair's `payout_seq` and stamps its parts and announcements with the new value.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recon_worker::operations::discrepancies::{self, Act};
use recon_worker::store::{Evaluation, PayoutRules, Store};
use sqlx::PgPool;

const GRACE: Duration = Duration::from_secs(3600);
const ORPHAN: Duration = Duration::from_secs(2 * 3600);
const TOPICS: (&str, &str) = ("payments", "settlements");

/// `minutes` after 2024-01-01T00:00:00Z.
fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .single()
        .expect("time")
        + chrono::Duration::minutes(minutes)
}

async fn store(pool: PgPool) -> Store {
    let store = Store::with_pool(pool, TOPICS.0, TOPICS.1);
    store.migrate().await.expect("migrate");
    store
}

fn rules(partitions: i32) -> PayoutRules {
    PayoutRules::new(partitions, GRACE, ORPHAN)
}

async fn evaluate(store: &Store, rules: &PayoutRules) -> Evaluation {
    store
        .evaluate_payouts(rules)
        .await
        .expect("evaluation")
        .expect("nobody else holds the evaluator's lock")
}

/// Pair `p`'s row as `acquire_pairs` makes it, with its watermark moved to `at` (never
/// back, as checkpoints move it).
async fn pair(pool: &PgPool, p: i32, at: Option<DateTime<Utc>>) {
    pair_of(pool, TOPICS, p, at).await;
}

async fn pair_of(pool: &PgPool, topics: (&str, &str), p: i32, at: Option<DateTime<Utc>>) {
    sqlx::query(
        "INSERT INTO recon_partition_pairs (payments_topic, settlements_topic, kafka_partition, epoch, watermark)
         VALUES ($1, $2, $3, 1, $4)
         ON CONFLICT (payments_topic, settlements_topic, kafka_partition)
         DO UPDATE SET watermark = GREATEST(recon_partition_pairs.watermark, EXCLUDED.watermark)",
    )
    .bind(topics.0)
    .bind(topics.1)
    .bind(p)
    .bind(at)
    .execute(pool)
    .await
    .expect("pair row");
}

/// Every pair `0..n` at watermark `at`.
async fn watermarks(pool: &PgPool, n: i32, at: DateTime<Utc>) {
    for p in 0..n {
        pair(pool, p, Some(at)).await;
    }
}

/// A checkpoint's bump of its pair's `payout_seq`: the seq its payout rows carry.
async fn bump(pool: &PgPool, p: i32) -> i64 {
    sqlx::query_scalar(
        "UPDATE recon_partition_pairs SET payout_seq = payout_seq + 1
         WHERE payments_topic = $1 AND settlements_topic = $2 AND kafka_partition = $3
         RETURNING payout_seq",
    )
    .bind(TOPICS.0)
    .bind(TOPICS.1)
    .bind(p)
    .fetch_one(pool)
    .await
    .expect("pair row exists")
}

/// One checkpoint of pair `p` adding `count` lines of `payout`, in `currency`, summing
/// to `net`, all settled at `settled_at`.
async fn lines(
    pool: &PgPool,
    p: i32,
    payout: &str,
    currency: &str,
    count: i64,
    net: i64,
    settled_at: DateTime<Utc>,
) {
    let seq = bump(pool, p).await;
    add_part(pool, p, seq, payout, currency, count, net, settled_at).await;
}

#[allow(clippy::too_many_arguments)]
async fn add_part(
    pool: &PgPool,
    p: i32,
    seq: i64,
    payout: &str,
    currency: &str,
    count: i64,
    net: i64,
    settled_at: DateTime<Utc>,
) {
    sqlx::query(
        "INSERT INTO recon_payout_parts AS r (payout_id, kafka_partition, currency, line_count, net_minor,
                                              first_settled_at, last_settled_at, seq)
         VALUES ($1, $2, $3, $4, $5::bigint, $6, $6, $7)
         ON CONFLICT (payout_id, kafka_partition, currency) DO UPDATE
         SET line_count = r.line_count + EXCLUDED.line_count,
             net_minor = r.net_minor + EXCLUDED.net_minor,
             first_settled_at = LEAST(r.first_settled_at, EXCLUDED.first_settled_at),
             last_settled_at = GREATEST(r.last_settled_at, EXCLUDED.last_settled_at),
             seq = EXCLUDED.seq",
    )
    .bind(payout)
    .bind(p)
    .bind(currency)
    .bind(count)
    .bind(net)
    .bind(settled_at)
    .bind(seq)
    .execute(pool)
    .await
    .expect("part");
}

/// One checkpoint of pair `p` storing an announcement.
#[allow(clippy::too_many_arguments)]
async fn announce(
    pool: &PgPool,
    p: i32,
    event_id: &str,
    payout: &str,
    currency: &str,
    net: i64,
    line_count: Option<i64>,
    paid_at: DateTime<Utc>,
) {
    let seq = bump(pool, p).await;
    sqlx::query(
        "INSERT INTO recon_payout_announcements (event_id, payout_id, currency, net_minor, line_count,
                                                paid_at, kafka_partition, kafka_offset, seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(payout)
    .bind(currency)
    .bind(net)
    .bind(line_count)
    .bind(paid_at)
    .bind(p)
    .bind(seq)
    .execute(pool)
    .await
    .expect("announcement");
}

/// What `recon_payouts` says of a payout (the sum as text: numeric).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Payout {
    status: String,
    currency: Option<String>,
    expected_net_minor: Option<i64>,
    lines_net_minor: Option<String>,
    expected_line_count: Option<i64>,
    line_count: i64,
    other_currency_lines: i64,
    due: bool,
    deadline_at: Option<DateTime<Utc>>,
    since: DateTime<Utc>,
    announcements: i32,
}

type PayoutRow = (
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    i64,
    i64,
    bool,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    i32,
);

async fn payout(pool: &PgPool, payout_id: &str) -> Payout {
    let row: PayoutRow = sqlx::query_as(
        "SELECT status, currency, expected_net_minor, lines_net_minor::text, expected_line_count,
                line_count, other_currency_lines, due, deadline_at, since, announcements
         FROM recon_payouts WHERE payout_id = $1",
    )
    .bind(payout_id)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("payout {payout_id}: {e}"));
    Payout {
        status: row.0,
        currency: row.1,
        expected_net_minor: row.2,
        lines_net_minor: row.3,
        expected_line_count: row.4,
        line_count: row.5,
        other_currency_lines: row.6,
        due: row.7,
        deadline_at: row.8,
        since: row.9,
        announcements: row.10,
    }
}

async fn status(pool: &PgPool, payout_id: &str) -> String {
    payout(pool, payout_id).await.status
}

/// A payout's discrepancies, oldest first: (kind, open, resolution).
async fn discrepancies(pool: &PgPool, payout_id: &str) -> Vec<(String, bool, Option<String>)> {
    sqlx::query_as(
        "SELECT kind, resolved_at IS NULL, resolution FROM recon_discrepancies
         WHERE payout_id = $1 ORDER BY id",
    )
    .bind(payout_id)
    .fetch_all(pool)
    .await
    .expect("discrepancies")
}

/// A payout's action log (contract §8), in order: (action, actor, note).
async fn actions(pool: &PgPool, payout_id: &str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT a.action, a.actor, a.note FROM recon_discrepancy_actions a
         JOIN recon_discrepancies d ON d.id = a.discrepancy_id
         WHERE d.payout_id = $1 ORDER BY a.id",
    )
    .bind(payout_id)
    .fetch_all(pool)
    .await
    .expect("actions")
}

fn by_worker(action: &str, note: Option<&str>) -> (String, String, Option<String>) {
    (
        action.to_owned(),
        "recon-worker".to_owned(),
        note.map(str::to_owned),
    )
}

fn open(kind: &str) -> (String, bool, Option<String>) {
    (kind.to_owned(), true, None)
}

fn resolved(kind: &str, resolution: &str) -> (String, bool, Option<String>) {
    (kind.to_owned(), false, Some(resolution.to_owned()))
}

async fn global_watermark(pool: &PgPool) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT global_watermark FROM recon_payout_clock")
        .fetch_optional(pool)
        .await
        .expect("clock")
        .flatten()
}

#[sqlx::test(migrations = false)]
async fn the_global_watermark_waits_for_every_pair_then_is_their_minimum(pool: PgPool) {
    let store = store(pool.clone()).await;
    let rules = rules(3);
    assert_eq!(evaluate(&store, &rules).await.global_watermark, None);
    pair(&pool, 0, Some(t(10))).await;
    pair(&pool, 1, Some(t(5))).await;
    assert_eq!(
        evaluate(&store, &rules).await.global_watermark,
        None,
        "pair 2 has no row"
    );
    pair(&pool, 2, None).await;
    assert_eq!(
        evaluate(&store, &rules).await.global_watermark,
        None,
        "pair 2 has no watermark"
    );
    assert_eq!(global_watermark(&pool).await, None);
    // Rows of other topics, and of partitions beyond N, are not this deployment's pairs.
    pair_of(&pool, ("other-p", "other-s"), 0, Some(t(1))).await;
    pair(&pool, 3, Some(t(2))).await;
    pair(&pool, 2, Some(t(20))).await;
    assert_eq!(evaluate(&store, &rules).await.global_watermark, Some(t(5)));
    assert_eq!(global_watermark(&pool).await, Some(t(5)));
    pair(&pool, 1, Some(t(30))).await;
    assert_eq!(evaluate(&store, &rules).await.global_watermark, Some(t(10)));
}

#[sqlx::test(migrations = false)]
async fn the_global_watermark_never_moves_back(pool: PgPool) {
    let store = store(pool.clone()).await;
    watermarks(&pool, 2, t(60)).await;
    assert_eq!(
        evaluate(&store, &rules(2)).await.global_watermark,
        Some(t(60))
    );
    // A pair's stored watermark lower than before (no checkpoint does that, but G must
    // not depend on it), and a third pair with no watermark yet.
    sqlx::query("UPDATE recon_partition_pairs SET watermark = $1 WHERE kafka_partition = 0")
        .bind(t(10))
        .execute(&pool)
        .await
        .expect("lower");
    assert_eq!(
        evaluate(&store, &rules(2)).await.global_watermark,
        Some(t(60))
    );
    assert_eq!(
        evaluate(&store, &rules(3)).await.global_watermark,
        Some(t(60))
    );
    assert_eq!(global_watermark(&pool).await, Some(t(60)));
    // A payout due at that G is due.
    announce(&pool, 0, "a1", "po", "EUR", 100, None, t(-1)).await;
    let evaluation = evaluate(&store, &rules(3)).await;
    assert_eq!(evaluation.touched, 1);
    assert_eq!(status(&pool, "po").await, "total_mismatch");
    watermarks(&pool, 2, t(100)).await;
    assert_eq!(
        evaluate(&store, &rules(2)).await.global_watermark,
        Some(t(100))
    );
}

#[sqlx::test(migrations = false)]
async fn statuses_follow_the_rules_before_and_after_the_deadline(pool: PgPool) {
    let store = store(pool.clone()).await;
    let rules = rules(2);
    watermarks(&pool, 2, t(0)).await;
    // Announced at t(0): due once G passes t(60).
    announce(&pool, 0, "a-bal", "bal", "EUR", 300, Some(3), t(0)).await;
    lines(&pool, 0, "bal", "EUR", 2, 200, t(1)).await;
    lines(&pool, 1, "bal", "EUR", 1, 100, t(2)).await;
    announce(&pool, 1, "a-short", "short", "EUR", 300, None, t(0)).await;
    lines(&pool, 0, "short", "EUR", 2, 200, t(1)).await;
    announce(&pool, 0, "a-count", "count", "EUR", 300, Some(4), t(0)).await;
    lines(&pool, 0, "count", "EUR", 2, 200, t(1)).await;
    lines(&pool, 1, "count", "EUR", 1, 100, t(1)).await;
    announce(&pool, 0, "a-ccy", "ccy", "EUR", 300, None, t(0)).await;
    lines(&pool, 0, "ccy", "EUR", 2, 300, t(1)).await;
    lines(&pool, 1, "ccy", "USD", 1, 100, t(1)).await;
    announce(&pool, 1, "a-both", "both", "EUR", 900, None, t(0)).await;
    lines(&pool, 0, "both", "EUR", 2, 200, t(1)).await;
    lines(&pool, 1, "both", "USD", 1, 100, t(1)).await;
    announce(&pool, 0, "a-nocount", "nocount", "EUR", 300, None, t(0)).await;
    lines(&pool, 0, "nocount", "EUR", 3, 150, t(1)).await;
    lines(&pool, 1, "nocount", "EUR", 2, 150, t(1)).await;
    // A negative payout (refunds exceed captures) balances like any other.
    announce(&pool, 1, "a-neg", "neg", "EUR", -50, Some(2), t(0)).await;
    lines(&pool, 0, "neg", "EUR", 1, 100, t(1)).await;
    lines(&pool, 1, "neg", "EUR", 1, -150, t(1)).await;
    // Unannounced: due once G passes the last line's settled_at + 2h.
    lines(&pool, 0, "orphan", "EUR", 2, 50, t(10)).await;
    lines(&pool, 1, "orphan", "EUR", 1, 25, t(30)).await;
    lines(&pool, 0, "mixed", "EUR", 1, 50, t(5)).await;
    lines(&pool, 1, "mixed", "USD", 1, 25, t(30)).await;

    let evaluation = evaluate(&store, &rules).await;
    assert_eq!(evaluation.touched, 9);
    assert_eq!(evaluation.changed, 9);
    assert_eq!(evaluation.global_watermark, Some(t(0)));
    for (id, expected) in [
        ("bal", "balanced"),
        ("nocount", "balanced"),
        ("neg", "balanced"),
        ("short", "pending"),
        ("count", "pending"),
        ("ccy", "pending"),
        ("both", "pending"),
        ("orphan", "unannounced"),
        ("mixed", "unannounced"),
    ] {
        assert_eq!(status(&pool, id).await, expected, "{id}");
    }
    assert_eq!(
        payout(&pool, "ccy").await,
        Payout {
            status: "pending".into(),
            currency: Some("EUR".into()),
            expected_net_minor: Some(300),
            lines_net_minor: Some("300".into()),
            expected_line_count: None,
            line_count: 3,
            other_currency_lines: 1,
            due: false,
            deadline_at: Some(t(60)),
            since: t(0),
            announcements: 1,
        }
    );
    assert_eq!(
        payout(&pool, "orphan").await,
        Payout {
            status: "unannounced".into(),
            currency: Some("EUR".into()),
            expected_net_minor: None,
            lines_net_minor: Some("75".into()),
            expected_line_count: None,
            line_count: 3,
            other_currency_lines: 0,
            due: false,
            deadline_at: Some(t(150)),
            since: t(10),
            announcements: 0,
        }
    );
    let mixed = payout(&pool, "mixed").await;
    assert_eq!(
        (mixed.currency, mixed.lines_net_minor, mixed.line_count),
        (None, None, 2),
        "lines in two currencies have no one currency or sum"
    );
    assert_eq!(mixed.deadline_at, Some(t(150)));

    // At the deadline exactly, nothing is due: the comparison is strict, both in
    // finding the payouts whose deadline passed (none is touched) and in judging a
    // payout touched anyway (a second announcement of "short", which changes only its
    // announcement count).
    watermarks(&pool, 2, t(60)).await;
    let evaluation = evaluate(&store, &rules).await;
    assert_eq!((evaluation.touched, evaluation.opened), (0, 0));
    announce(&pool, 0, "a-short-again", "short", "EUR", 1, None, t(0)).await;
    let evaluation = evaluate(&store, &rules).await;
    assert_eq!(
        (evaluation.touched, evaluation.changed, evaluation.opened),
        (1, 1, 0)
    );
    let short = payout(&pool, "short").await;
    assert_eq!(
        (short.status.as_str(), short.due, short.announcements),
        ("pending", false, 2)
    );
    // A microsecond later the announced ones are due; the unannounced ones are not yet.
    watermarks(&pool, 2, t(60) + chrono::Duration::microseconds(1)).await;
    let evaluation = evaluate(&store, &rules).await;
    assert_eq!(evaluation.touched, 4, "the payouts whose deadline G passed");
    assert_eq!(evaluation.opened, 4);
    for (id, expected) in [
        ("bal", "balanced"),
        ("short", "total_mismatch"),
        ("count", "total_mismatch"),
        ("ccy", "currency_mismatch"),
        ("both", "currency_mismatch"),
        ("orphan", "unannounced"),
        ("mixed", "unannounced"),
    ] {
        assert_eq!(status(&pool, id).await, expected, "{id}");
    }
    assert!(payout(&pool, "short").await.due);
    for id in ["short", "count", "ccy", "both"] {
        assert_eq!(
            discrepancies(&pool, id).await,
            vec![open("payout_mismatch")],
            "{id}"
        );
    }
    for id in ["bal", "nocount", "neg", "orphan", "mixed"] {
        assert_eq!(discrepancies(&pool, id).await, vec![], "{id}");
    }
    // The unannounced ones at their deadline exactly, then past it.
    watermarks(&pool, 2, t(150)).await;
    assert_eq!(evaluate(&store, &rules).await.opened, 0);
    watermarks(&pool, 2, t(151)).await;
    assert_eq!(evaluate(&store, &rules).await.opened, 2);
    for id in ["orphan", "mixed"] {
        let state = payout(&pool, id).await;
        assert_eq!((state.status.as_str(), state.due), ("unannounced", true));
        assert_eq!(
            discrepancies(&pool, id).await,
            vec![open("unannounced_payout")],
            "{id}"
        );
    }
    // Nothing more to do: a run with nothing new touches nothing.
    let idle = evaluate(&store, &rules).await;
    assert_eq!((idle.touched, idle.changed, idle.more), (0, 0, false));
}

#[sqlx::test(migrations = false)]
async fn a_mismatch_resolves_balanced_when_a_line_balances_it_and_reopens_when_it_breaks(
    pool: PgPool,
) {
    let store = store(pool.clone()).await;
    let rules = rules(2);
    watermarks(&pool, 2, t(61)).await;
    announce(&pool, 0, "a1", "po", "EUR", 300, None, t(0)).await;
    lines(&pool, 0, "po", "EUR", 2, 200, t(1)).await;
    let first = evaluate(&store, &rules).await;
    assert_eq!((first.opened, first.reopened, first.resolved), (1, 0, 0));
    assert_eq!(
        discrepancies(&pool, "po").await,
        vec![open("payout_mismatch")]
    );
    let opened_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT opened_at FROM recon_discrepancies WHERE payout_id = 'po'")
            .fetch_one(&pool)
            .await
            .expect("opened_at");
    // The missing line arrives on the other pair: balanced, resolved.
    lines(&pool, 1, "po", "EUR", 1, 100, t(70)).await;
    let balanced = evaluate(&store, &rules).await;
    assert_eq!(
        (balanced.opened, balanced.reopened, balanced.resolved),
        (0, 0, 1)
    );
    assert_eq!(status(&pool, "po").await, "balanced");
    assert_eq!(
        discrepancies(&pool, "po").await,
        vec![resolved("payout_mismatch", "balanced")]
    );
    // A later line breaks it again: the same row reopens.
    lines(&pool, 1, "po", "EUR", 1, 5, t(80)).await;
    let broken = evaluate(&store, &rules).await;
    assert_eq!((broken.opened, broken.reopened, broken.resolved), (0, 1, 0));
    assert_eq!(status(&pool, "po").await, "total_mismatch");
    assert_eq!(
        discrepancies(&pool, "po").await,
        vec![open("payout_mismatch")]
    );
    let (reopened_at, resolution): (DateTime<Utc>, Option<String>) = sqlx::query_as(
        "SELECT opened_at, resolution FROM recon_discrepancies WHERE payout_id = 'po'",
    )
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!((reopened_at, resolution), (opened_at, None));
    // Still broken: nothing changes, nothing opens twice.
    lines(&pool, 0, "po", "EUR", 1, 1, t(81)).await;
    let again = evaluate(&store, &rules).await;
    assert_eq!((again.opened, again.reopened, again.resolved), (0, 0, 0));
    assert_eq!(
        discrepancies(&pool, "po").await,
        vec![open("payout_mismatch")]
    );
    // Each change logged once, by the run that made it.
    assert_eq!(
        actions(&pool, "po").await,
        vec![
            by_worker("opened", None),
            by_worker("resolved", Some("balanced")),
            by_worker("reopened", None),
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn an_accepted_discrepancy_is_never_reopened(pool: PgPool) {
    let store = store(pool.clone()).await;
    let rules = rules(1);
    watermarks(&pool, 1, t(61)).await;
    announce(&pool, 0, "a1", "po", "EUR", 300, None, t(0)).await;
    lines(&pool, 0, "po", "EUR", 1, 200, t(1)).await;
    evaluate(&store, &rules).await;
    assert_eq!(
        discrepancies(&pool, "po").await,
        vec![open("payout_mismatch")]
    );
    // A person accepts the difference (contract §8), as `discrepancies accept` does.
    let id: i64 = sqlx::query_scalar("SELECT id FROM recon_discrepancies WHERE payout_id = 'po'")
        .fetch_one(&pool)
        .await
        .expect("id");
    let mut connection = pool.acquire().await.expect("connection");
    discrepancies::act(
        &mut connection,
        Act::Accept,
        id,
        "alice",
        "agreed with the PSP",
    )
    .await
    .expect("accept");
    drop(connection);
    // Balanced, then broken again: it stays as the person left it.
    lines(&pool, 0, "po", "EUR", 1, 100, t(62)).await;
    evaluate(&store, &rules).await;
    assert_eq!(status(&pool, "po").await, "balanced");
    lines(&pool, 0, "po", "EUR", 1, 1, t(63)).await;
    let evaluation = evaluate(&store, &rules).await;
    assert_eq!(
        (evaluation.opened, evaluation.reopened, evaluation.resolved),
        (0, 0, 0)
    );
    assert_eq!(status(&pool, "po").await, "total_mismatch");
    assert_eq!(
        discrepancies(&pool, "po").await,
        vec![resolved("payout_mismatch", "accepted")]
    );
    assert_eq!(
        actions(&pool, "po").await,
        vec![
            by_worker("opened", None),
            (
                "accepted".to_owned(),
                "alice".to_owned(),
                Some("agreed with the PSP".to_owned())
            ),
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn an_announcement_resolves_the_unannounced_payout_and_opens_a_mismatch_in_one_run(
    pool: PgPool,
) {
    let store = store(pool.clone()).await;
    let rules = rules(2);
    // Before G is known nothing is due, however old the lines.
    pair(&pool, 0, None).await;
    pair(&pool, 1, None).await;
    lines(&pool, 0, "late", "EUR", 1, 100, t(0)).await;
    lines(&pool, 1, "fine", "EUR", 2, 300, t(0)).await;
    evaluate(&store, &rules).await;
    assert_eq!(status(&pool, "late").await, "unannounced");
    assert_eq!(discrepancies(&pool, "late").await, vec![]);
    watermarks(&pool, 2, t(121)).await;
    assert_eq!(evaluate(&store, &rules).await.opened, 2);
    for id in ["late", "fine"] {
        assert_eq!(
            discrepancies(&pool, id).await,
            vec![open("unannounced_payout")]
        );
    }
    // Both announced, paid long enough ago to be due at once: "late" is short, "fine"
    // balances.
    announce(&pool, 1, "a-late", "late", "EUR", 250, None, t(0)).await;
    announce(&pool, 0, "a-fine", "fine", "EUR", 300, Some(2), t(0)).await;
    let evaluation = evaluate(&store, &rules).await;
    assert_eq!(
        (evaluation.resolved, evaluation.opened, evaluation.reopened),
        (2, 1, 0)
    );
    assert_eq!(status(&pool, "late").await, "total_mismatch");
    assert_eq!(
        discrepancies(&pool, "late").await,
        vec![
            resolved("unannounced_payout", "announced"),
            open("payout_mismatch")
        ]
    );
    assert_eq!(status(&pool, "fine").await, "balanced");
    assert_eq!(
        discrepancies(&pool, "fine").await,
        vec![resolved("unannounced_payout", "announced")]
    );
    let since = payout(&pool, "late").await.since;
    assert_eq!(since, t(0), "since is paid_at once announced");
}

#[sqlx::test(migrations = false)]
async fn the_first_announcement_wins_and_updated_at_moves_only_with_what_matters(pool: PgPool) {
    let store = store(pool.clone()).await;
    let rules = rules(1);
    watermarks(&pool, 1, t(0)).await;
    announce(&pool, 0, "first", "po", "EUR", 100, Some(1), t(0)).await;
    lines(&pool, 0, "po", "EUR", 1, 100, t(1)).await;
    evaluate(&store, &rules).await;
    let updated_at = |pool: PgPool| async move {
        sqlx::query_scalar::<_, DateTime<Utc>>(
            "SELECT updated_at FROM recon_payouts WHERE payout_id = 'po'",
        )
        .fetch_one(&pool)
        .await
        .expect("updated_at")
    };
    let before = updated_at(pool.clone()).await;
    // A second announcement with another event id: stored, counted, ignored. A
    // redelivery of the first (same event id) adds nothing.
    announce(&pool, 0, "second", "po", "USD", 999, None, t(30)).await;
    announce(&pool, 0, "first", "po", "GBP", 5, None, t(40)).await;
    let evaluation = evaluate(&store, &rules).await;
    assert_eq!(evaluation.changed, 1, "the announcement count changed");
    let state = payout(&pool, "po").await;
    assert_eq!(
        (
            state.status.as_str(),
            state.currency.as_deref(),
            state.expected_net_minor,
            state.announcements,
            state.since
        ),
        ("balanced", Some("EUR"), Some(100), 2, t(0))
    );
    let event_id: Option<String> = sqlx::query_scalar(
        "SELECT announcement_event_id FROM recon_payout_state WHERE payout_id = 'po'",
    )
    .fetch_one(&pool)
    .await
    .expect("event id");
    assert_eq!(event_id.as_deref(), Some("first"));
    assert_eq!(
        updated_at(pool.clone()).await,
        before,
        "status, sum and count unchanged: updated_at stays"
    );
    // A line changes the sum: updated_at moves.
    tokio::time::sleep(Duration::from_millis(5)).await;
    lines(&pool, 0, "po", "EUR", 1, 7, t(2)).await;
    evaluate(&store, &rules).await;
    assert!(updated_at(pool.clone()).await > before);
}

/// What the contract says a payout ends as, computed here from the inputs alone.
#[derive(Default, Debug)]
struct Truth {
    /// The first announcement: (currency, net, line_count).
    announced: Option<(String, i64, Option<i64>)>,
    /// Lines per currency: (count, sum).
    lines: BTreeMap<String, (i64, i64)>,
}

impl Truth {
    /// The status once every deadline has passed.
    fn final_status(&self) -> &'static str {
        let Some((currency, net, count)) = &self.announced else {
            return "unannounced";
        };
        let (in_currency, sum) = self.lines.get(currency).copied().unwrap_or((0, 0));
        let all: i64 = self.lines.values().map(|(n, _)| n).sum();
        let other = all - in_currency;
        if other == 0 && sum == *net && count.is_none_or(|c| c == all) {
            "balanced"
        } else if other > 0 {
            "currency_mismatch"
        } else {
            "total_mismatch"
        }
    }
}

async fn assert_counts_match_the_states(pool: &PgPool) {
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, payouts FROM recon_payout_status_counts WHERE payouts <> 0 ORDER BY status",
    )
    .fetch_all(pool)
    .await
    .expect("counts");
    let grouped: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM recon_payout_state GROUP BY status ORDER BY status",
    )
    .fetch_all(pool)
    .await
    .expect("group by");
    assert_eq!(counted, grouped);
    let doubly_open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT payout_id FROM recon_discrepancies
         WHERE payout_id IS NOT NULL AND resolved_at IS NULL GROUP BY payout_id HAVING count(*) > 1) x",
    )
    .fetch_one(pool)
    .await
    .expect("open");
    assert_eq!(doubly_open, 0);
}

#[sqlx::test(migrations = false)]
async fn status_counts_stay_exact_through_random_runs_and_the_end_matches_the_rules(pool: PgPool) {
    let store = store(pool.clone()).await;
    let partitions = 4;
    let mut rng = StdRng::seed_from_u64(0x9a70_u64);
    let mut truth: BTreeMap<String, Truth> = BTreeMap::new();
    let mut g = 0;
    watermarks(&pool, partitions, t(g)).await;
    let mut events = 0;
    for step in 0..400 {
        let payout_id = format!("po-{}", rng.random_range(0..40));
        match rng.random_range(0..10) {
            0..=4 => {
                let currency = if rng.random_bool(0.9) { "EUR" } else { "USD" };
                let count = rng.random_range(1..4);
                let net = rng.random_range(-50..200);
                let p = rng.random_range(0..partitions);
                lines(&pool, p, &payout_id, currency, count, net, t(g)).await;
                let entry = truth.entry(payout_id).or_default();
                let sums = entry.lines.entry(currency.to_owned()).or_default();
                sums.0 += count;
                sums.1 += net;
            }
            5 | 6 => {
                // Announce with the sum so far (often balanced), or a wrong one.
                let entry = truth.entry(payout_id.clone()).or_default();
                let (count, sum) = entry.lines.get("EUR").copied().unwrap_or((0, 0));
                let net = if rng.random_bool(0.7) { sum } else { sum + 1 };
                let line_count = rng.random_bool(0.5).then_some(count);
                events += 1;
                let p = rng.random_range(0..partitions);
                announce(
                    &pool,
                    p,
                    &format!("ev-{events}"),
                    &payout_id,
                    "EUR",
                    net,
                    line_count,
                    t(g),
                )
                .await;
                entry
                    .announced
                    .get_or_insert(("EUR".to_owned(), net, line_count));
            }
            7 => {
                g += rng.random_range(0..90);
                watermarks(&pool, partitions, t(g)).await;
            }
            _ => {
                let mut rules = rules(partitions);
                rules.max_touched = rng.random_range(1..8);
                if step % 50 == 0 {
                    // A grace change recomputes every unbalanced payout (in capped runs).
                    rules.grace = Duration::from_secs(rng.random_range(1..3) * 1800);
                }
                evaluate(&store, &rules).await;
                assert_counts_match_the_states(&pool).await;
            }
        }
    }
    // Every deadline passed, runs until nothing is left.
    watermarks(&pool, partitions, t(g + 100_000)).await;
    let rules = rules(partitions);
    for _ in 0..10 {
        if !evaluate(&store, &rules).await.more {
            break;
        }
    }
    assert!(!evaluate(&store, &rules).await.more);
    assert_counts_match_the_states(&pool).await;
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT payout_id, status FROM recon_payouts ORDER BY payout_id")
            .fetch_all(&pool)
            .await
            .expect("states");
    let expected: Vec<(String, String)> = truth
        .iter()
        .map(|(id, truth)| (id.clone(), truth.final_status().to_owned()))
        .collect();
    assert_eq!(states, expected);
    let statuses: Vec<&str> = expected.iter().map(|(_, s)| s.as_str()).collect();
    for status in ["balanced", "total_mismatch", "unannounced"] {
        assert!(statuses.contains(&status), "the random runs reach {status}");
    }
    // Each payout's open discrepancy is the one its final status calls for.
    let open: BTreeMap<String, String> = sqlx::query_as(
        "SELECT payout_id, kind FROM recon_discrepancies
         WHERE payout_id IS NOT NULL AND resolved_at IS NULL",
    )
    .fetch_all(&pool)
    .await
    .expect("open")
    .into_iter()
    .collect();
    for (id, status) in &expected {
        let wanted = match status.as_str() {
            "balanced" => None,
            "unannounced" => Some("unannounced_payout"),
            _ => Some("payout_mismatch"),
        };
        assert_eq!(open.get(id).map(String::as_str), wanted, "{id} ({status})");
    }
}

/// Waits until some session holds the evaluator's advisory lock.
async fn await_evaluator_lock(pool: &PgPool) {
    for _ in 0..500 {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::oid
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(0x7265_636f_i64)
        .fetch_one(pool)
        .await
        .expect("pg_locks");
        if held > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the evaluation never took its lock");
}

#[sqlx::test(migrations = false)]
async fn of_two_evaluations_at_once_exactly_one_acquires(pool: PgPool) {
    let store = store(pool.clone()).await;
    watermarks(&pool, 1, t(61)).await;
    announce(&pool, 0, "a1", "po", "EUR", 300, None, t(0)).await;
    evaluate(&store, &rules(1)).await;
    // Hold the clock row, so the first evaluation stops right after taking the lock.
    let mut blocker = pool.begin().await.expect("begin");
    sqlx::query("SELECT * FROM recon_payout_clock FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .expect("lock the clock row");
    lines(&pool, 0, "po", "EUR", 1, 300, t(1)).await;
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.evaluate_payouts(&rules(1)).await }
    });
    await_evaluator_lock(&pool).await;
    let second = tokio::spawn({
        let store = store.clone();
        async move { store.evaluate_payouts(&rules(1)).await }
    });
    let second = second.await.expect("task").expect("no error");
    assert_eq!(second, None, "the lock is taken: skipped");
    assert!(!first.is_finished());
    blocker.commit().await.expect("release");
    let first = first.await.expect("task").expect("no error");
    let first = first.expect("the first one acquired");
    assert_eq!(first.resolved, 1);
    assert_eq!(status(&pool, "po").await, "balanced");

    // Held by another session outright: skipped, and nothing is written.
    let evaluated_at = |pool: PgPool| async move {
        sqlx::query_scalar::<_, DateTime<Utc>>("SELECT evaluated_at FROM recon_payout_clock")
            .fetch_one(&pool)
            .await
            .expect("clock")
    };
    let before = evaluated_at(pool.clone()).await;
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(0x7265_636f_i32)
        .execute(&mut *holder)
        .await
        .expect("take the lock");
    assert_eq!(
        store.evaluate_payouts(&rules(1)).await.expect("no error"),
        None
    );
    holder.rollback().await.expect("release");
    assert_eq!(evaluated_at(pool.clone()).await, before);
    assert!(store
        .evaluate_payouts(&rules(1))
        .await
        .expect("no error")
        .is_some());
}

/// The SQLSTATE of a failed statement.
fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    match result {
        Err(sqlx::Error::Database(db)) => db.code().unwrap_or_default().into_owned(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[sqlx::test(migrations = false)]
async fn the_database_refuses_a_second_open_discrepancy_for_a_payout(pool: PgPool) {
    store(pool.clone()).await;
    let insert = |kind: &'static str, resolved: bool| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO recon_discrepancies (kind, payout_id, resolved_at, resolution)
                 VALUES ($1, 'x', CASE WHEN $2 THEN now() END, CASE WHEN $2 THEN 'balanced' END)",
            )
            .bind(kind)
            .bind(resolved)
            .execute(&pool)
            .await
        }
    };
    insert("payout_mismatch", false)
        .await
        .expect("the first open one");
    assert_eq!(sqlstate(insert("unannounced_payout", false).await), "23505");
    assert_eq!(
        sqlstate(insert("payout_mismatch", true).await),
        "23505",
        "one row per payout and kind, open or not"
    );
    insert("unannounced_payout", true)
        .await
        .expect("another kind, resolved");
    // A discrepancy is about a payment or a payout, never both or neither.
    for (payment, payout) in [(Some("p"), Some("y")), (None, None)] {
        let result = sqlx::query(
            "INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, payout_id)
             VALUES ('payout_mismatch', $1, 0, $2)",
        )
        .bind(payment)
        .bind(payout)
        .execute(&pool)
        .await;
        assert_eq!(sqlstate(result), "23514", "{payment:?} {payout:?}");
    }
    // The pairs' discrepancies keep their own key, unaffected by payout rows.
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, payment_event_id)
             VALUES ('missing_settlement', 'p', 0, 'e') ON CONFLICT DO NOTHING",
        )
        .execute(&pool)
        .await
        .expect("a pair's discrepancy");
    }
    let pairs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recon_discrepancies WHERE payout_id IS NULL")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(pairs, 1);
}

#[sqlx::test(migrations = false)]
async fn the_unbalanced_oldest_first_query_reads_its_partial_index(pool: PgPool) {
    store(pool.clone()).await;
    // Mostly balanced payouts, as in production, and some not.
    sqlx::query(
        "INSERT INTO recon_payout_state (payout_id, announcements, line_count, other_currency_lines,
                                         since, due, status)
         SELECT 'po-' || i, 1, 1, 0, timestamptz '2024-01-01' + i * interval '1 minute', i % 50 = 0,
                CASE WHEN i % 50 = 0 THEN 'total_mismatch' WHEN i % 50 = 1 THEN 'pending'
                     ELSE 'balanced' END
         FROM generate_series(1, 20000) AS i",
    )
    .execute(&pool)
    .await
    .expect("rows");
    sqlx::query("ANALYZE recon_payout_state")
        .execute(&pool)
        .await
        .expect("analyze");
    let mut connection = pool.acquire().await.expect("connection");
    // A generic plan, as a prepared statement with a bound limit gets after five runs:
    // the planner cannot see the value.
    for statement in [
        "SET plan_cache_mode = force_generic_plan",
        "PREPARE unbalanced(bigint) AS
             SELECT payout_id, status, since FROM recon_payouts
             WHERE status <> 'balanced' ORDER BY since, payout_id LIMIT $1",
    ] {
        sqlx::query(statement)
            .execute(&mut *connection)
            .await
            .expect(statement);
    }
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE unbalanced(50)")
        .fetch_all(&mut *connection)
        .await
        .expect("explain");
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using recon_payout_state_unbalanced"),
        "{plan}"
    );
    assert!(!plan.contains("Sort"), "read in index order: {plan}");
}

#[sqlx::test(migrations = false)]
async fn the_cap_leaves_the_rest_for_the_next_run(pool: PgPool) {
    let store = store(pool.clone()).await;
    let mut rules = rules(2);
    rules.max_touched = 2;
    watermarks(&pool, 2, t(0)).await;
    // Pair 0: five checkpoints of one payout each (seq 1..=5). Pair 1: one checkpoint
    // of three payouts (seq 1).
    for i in 0..5 {
        lines(&pool, 0, &format!("a{i}"), "EUR", 1, 10, t(1)).await;
    }
    let seq = bump(&pool, 1).await;
    for i in 0..3 {
        add_part(&pool, 1, seq, &format!("b{i}"), "EUR", 1, 10, t(1)).await;
    }
    let states = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM recon_payout_state")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    // Seq order over both pairs: (1, pair 0) and (1, pair 1) — a checkpoint is taken
    // whole, so 4 payouts — then the cap.
    let first = evaluate(&store, &rules).await;
    assert_eq!((first.touched, first.more), (4, true));
    assert_eq!(states(pool.clone()).await, 4);
    let second = evaluate(&store, &rules).await;
    assert_eq!((second.touched, second.more), (2, true));
    let third = evaluate(&store, &rules).await;
    assert_eq!((third.touched, third.more), (2, false));
    assert_eq!(states(pool.clone()).await, 8);
    let cursors: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, seq FROM recon_payout_cursor ORDER BY 1")
            .fetch_all(&pool)
            .await
            .expect("cursors");
    assert_eq!(cursors, vec![(0, 5), (1, 1)]);
    assert_eq!(evaluate(&store, &rules).await.touched, 0);
    assert_counts_match_the_states(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn a_change_of_grace_recomputes_every_unbalanced_payout(pool: PgPool) {
    let store = store(pool.clone()).await;
    watermarks(&pool, 1, t(30)).await;
    for id in ["a", "b"] {
        announce(&pool, 0, &format!("ev-{id}"), id, "EUR", 100, None, t(0)).await;
    }
    evaluate(&store, &rules(1)).await;
    assert_eq!(status(&pool, "a").await, "pending");
    // A grace of 10 minutes: both are overdue at G = t(30). One per run (the cap), and
    // the clock keeps the old settings until the second is done.
    let mut shorter = rules(1);
    shorter.grace = Duration::from_secs(600);
    shorter.max_touched = 1;
    let grace = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT grace::text FROM recon_payout_clock")
            .fetch_one(&pool)
            .await
            .expect("grace")
    };
    let first = evaluate(&store, &shorter).await;
    assert_eq!((first.touched, first.opened, first.more), (1, 1, true));
    assert_eq!(grace(pool.clone()).await, "01:00:00");
    let second = evaluate(&store, &shorter).await;
    assert_eq!((second.touched, second.opened, second.more), (1, 1, false));
    assert_eq!(grace(pool.clone()).await, "00:10:00");
    for id in ["a", "b"] {
        assert_eq!(status(&pool, id).await, "total_mismatch");
        assert_eq!(payout(&pool, id).await.deadline_at, Some(t(10)));
    }
    assert_eq!(evaluate(&store, &shorter).await.touched, 0);
}

#[sqlx::test(migrations = false)]
async fn new_pair_rows_of_renamed_topics_are_read_from_their_first_seq(pool: PgPool) {
    let store = store(pool.clone()).await;
    watermarks(&pool, 1, t(0)).await;
    for _ in 0..3 {
        lines(&pool, 0, "old", "EUR", 1, 10, t(1)).await;
    }
    evaluate(&store, &rules(1)).await;
    // The payments and settlements topics renamed: new pair rows, counting from 0.
    let renamed = Store::with_pool(pool.clone(), "payments-v2", "settlements-v2");
    pair_of(&pool, ("payments-v2", "settlements-v2"), 0, Some(t(0))).await;
    let seq: i64 = sqlx::query_scalar(
        "UPDATE recon_partition_pairs SET payout_seq = payout_seq + 1
         WHERE payments_topic = 'payments-v2' AND kafka_partition = 0 RETURNING payout_seq",
    )
    .fetch_one(&pool)
    .await
    .expect("bump");
    assert_eq!(seq, 1, "below the old rows' cursor (3)");
    add_part(&pool, 0, seq, "new", "EUR", 1, 10, t(2)).await;
    let evaluation = evaluate(&renamed, &rules(1)).await;
    assert_eq!(evaluation.touched, 1, "only the new row's seqs are read");
    assert_eq!(status(&pool, "new").await, "unannounced");
    let cursor: (String, i64) = sqlx::query_as(
        "SELECT payments_topic, seq FROM recon_payout_cursor WHERE kafka_partition = 0",
    )
    .fetch_one(&pool)
    .await
    .expect("cursor");
    assert_eq!(cursor, ("payments-v2".to_owned(), 1));
}

#[sqlx::test(migrations = false)]
async fn the_evaluator_task_evaluates_until_shutdown(pool: PgPool) {
    let store = store(pool.clone()).await;
    watermarks(&pool, 1, t(61)).await;
    announce(&pool, 0, "a1", "po", "EUR", 300, None, t(0)).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(recon_worker::payouts::run_evaluator(
        store.clone(),
        rules(1),
        Duration::from_millis(50),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut opened = false;
    for _ in 0..200 {
        if discrepancies(&pool, "po").await == vec![open("payout_mismatch")] {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(opened, "the task evaluated");
    // It keeps evaluating: a line that balances the payout is picked up.
    lines(&pool, 0, "po", "EUR", 1, 300, t(62)).await;
    let mut balanced = false;
    for _ in 0..200 {
        if status(&pool, "po").await == "balanced" {
            balanced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(balanced, "the task kept evaluating");
    stop.send(()).expect("running");
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .expect("no panic");
}
