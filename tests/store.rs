//! The store against a real PostgreSQL: ownership epochs and fencing, the checkpoint
//! transaction, lookups and deadline sweeps.

use recon_worker::engine::{
    DiscrepancyChange, DiscrepancyKind, NewEvent, Outcome, OverRefund, PairChanges, RowWrite,
    SweepRequest,
};
use recon_worker::event::{EventKind, Input, Line, Topic};
use recon_worker::money::Currency;
use recon_worker::rejection::RejectedMessage;
use recon_worker::store::{PairCheckpoint, Store, StoreError};
use sqlx::PgPool;

async fn store(pool: PgPool) -> Store {
    let store = Store::with_pool(pool, "payments", "settlements");
    store.migrate().await.expect("migrate");
    store
}

fn pending_payment(event_id: &str, payment_id: &str, at: i64) -> RowWrite {
    RowWrite {
        kind: EventKind::Payment,
        event_id: event_id.into(),
        payment_id: payment_id.into(),
        outcome: Outcome::Pending,
        counterpart: None,
        new: Some(NewEvent {
            kafka_offset: 0,
            event_time: at,
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

fn checkpoint(
    pair: i32,
    epoch: i64,
    offsets: [Option<i64>; 2],
    rows: Vec<RowWrite>,
) -> PairCheckpoint {
    PairCheckpoint {
        pair,
        epoch,
        next_offsets: offsets.into(),
        changes: PairChanges {
            rows,
            discrepancies: vec![DiscrepancyChange::Opened {
                kind: DiscrepancyKind::Outcome(Outcome::DuplicatePayment),
                payment_id: "x".into(),
                payment_event_id: None,
                settlement_event_id: None,
            }],
            high_marks: [Some(5), None].into(),
            generation: 1,
        },
        rejected: vec![RejectedMessage {
            topic: Input::Payments.into(),
            partition: pair,
            offset: 9,
            reason: "bad".into(),
            class: "not_json",
            payload: Some(Box::from(&b"{"[..])),
            payload_size: 1,
            key: None,
            timestamp_ms: Some(1_700_000_000_000),
        }],
        announcements: Vec::new(),
        watermark: None,
        redriven: Vec::new(),
    }
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
}

#[sqlx::test(migrations = false)]
async fn a_zombie_checkpoint_is_fenced_and_writes_nothing(pool: PgPool) {
    let store = store(pool.clone()).await;
    let old = store.acquire_pairs(&[0, 1]).await.expect("first owner");
    assert!(old
        .iter()
        .all(|p| p.epoch == 1 && p.next_offsets == [None, None]));
    // Another worker takes pair 1 over.
    let new = store.acquire_pairs(&[1]).await.expect("second owner");
    assert_eq!(new[0].epoch, 2);

    // The old owner's batch covers both pairs: all of it is refused.
    let batch = vec![
        checkpoint(
            0,
            1,
            [Some(10), Some(4)],
            vec![pending_payment("e0", "k0", 1)],
        ),
        checkpoint(1, 1, [Some(7), None], vec![pending_payment("e1", "k1", 1)]),
    ];
    match store.checkpoint(&batch).await {
        Err(StoreError::Fenced(pairs)) => assert_eq!(pairs, vec![1]),
        other => panic!("expected fencing, got {other:?}"),
    }
    for table in ["recon_events", "rejected_events", "recon_discrepancies"] {
        assert_eq!(
            count(&pool, table).await,
            0,
            "{table} untouched by a fenced checkpoint"
        );
    }
    let offsets = store.stored_offsets().await.expect("offsets");
    assert!(
        offsets.iter().all(|(_, o)| *o == [None, None]),
        "{offsets:?}"
    );

    // Without the fenced pair, the rest commits.
    store
        .checkpoint(&batch[..1])
        .await
        .expect("pair 0 still owned");
    assert_eq!(count(&pool, "recon_events").await, 1);
    let resumed = store.acquire_pairs(&[0]).await.expect("reacquire");
    assert_eq!(resumed[0].next_offsets, [Some(10), Some(4)]);
    assert_eq!(resumed[0].high_marks, [Some(5), None]);
    assert_eq!(resumed[0].epoch, 2);
}

#[sqlx::test(migrations = false)]
async fn lookups_and_sweeps_see_committed_state(pool: PgPool) {
    let store = store(pool.clone()).await;
    store.acquire_pairs(&[3]).await.expect("own");
    let rows = (0..5)
        .map(|i| pending_payment(&format!("e{i}"), &format!("k{i}"), i64::from(i) * 1_000_000))
        .collect();
    store
        .checkpoint(&[checkpoint(3, 1, [Some(5), None], rows)])
        .await
        .expect("commit");

    let found = store
        .lookup(&[3, 3, 4], &["k1".into(), "k9".into(), "k2".into()])
        .await
        .expect("lookup");
    let ids: Vec<&str> = found.iter().map(|(_, e)| e.event_id.as_str()).collect();
    assert_eq!(ids, vec!["e1"], "scoped by pair and payment id");
    let stored = store
        .stored_event_ids(&[Input::Payments, Input::Settlements], &["e4", "e4"])
        .await
        .expect("ids");
    assert_eq!(stored, vec![(Input::Payments, "e4".to_owned())]);

    let request = SweepRequest {
        payments_before: 3_000_000,
        settlements_before: i64::MAX / 2,
    };
    let due = store.due_keys(3, request, 2).await.expect("sweep");
    assert_eq!(due.payment_ids, vec!["k0".to_owned(), "k1".to_owned()]);
    assert!(!due.complete, "limit reached: more may be due");
    let due = store.due_keys(3, request, 10).await.expect("sweep");
    assert_eq!(due.payment_ids.len(), 3);
    assert!(due.complete);
    assert!(
        store
            .due_keys(4, request, 10)
            .await
            .expect("sweep")
            .payment_ids
            .is_empty(),
        "other pairs are not swept"
    );
}

#[sqlx::test(migrations = false)]
async fn an_unbounded_sweep_finds_every_pending_item(pool: PgPool) {
    let store = store(pool).await;
    store.acquire_pairs(&[0]).await.expect("own");
    let rows = vec![
        pending_payment("e0", "k0", 0),
        pending_payment("e1", "k1", 1),
    ];
    store
        .checkpoint(&[checkpoint(0, 1, [Some(2), None], rows)])
        .await
        .expect("commit");
    let everything = SweepRequest {
        payments_before: i64::MAX,
        settlements_before: i64::MAX,
    };
    let due = store.due_keys(0, everything, 10).await.expect("sweep");
    assert_eq!(due.payment_ids, vec!["k0".to_owned(), "k1".to_owned()]);
}

#[sqlx::test(migrations = false)]
async fn sweep_bounds_far_in_the_past_are_valid(pool: PgPool) {
    let store = store(pool).await;
    let nothing = SweepRequest {
        payments_before: i64::MIN,
        settlements_before: i64::MIN / 2,
    };
    let due = store.due_keys(0, nothing, 10).await.expect("a valid query");
    assert!(due.payment_ids.is_empty() && due.complete);
}

#[sqlx::test(migrations = false)]
async fn a_batch_inserting_a_stored_event_id_names_the_pair_and_writes_nothing(pool: PgPool) {
    let store = store(pool.clone()).await;
    store.acquire_pairs(&[0, 1]).await.expect("own");
    // Pair 1 stored event "e" first (a producer reused the id under another key).
    store
        .checkpoint(&[checkpoint(
            1,
            1,
            [Some(1), None],
            vec![pending_payment("e", "k1", 1)],
        )])
        .await
        .expect("first");
    // Pair 0 carries the same event id beside a new one; pair 1 only new ones.
    let result = store
        .checkpoint(&[
            checkpoint(
                0,
                1,
                [Some(2), None],
                vec![pending_payment("e", "k0", 1), pending_payment("f", "k0", 2)],
            ),
            checkpoint(1, 1, [Some(3), None], vec![pending_payment("g", "k2", 3)]),
        ])
        .await;
    match result {
        Err(StoreError::EventIdsClash(pairs)) => assert_eq!(pairs, vec![0]),
        other => panic!("expected a clash of pair 0, got {other:?}"),
    }
    assert!(!StoreError::EventIdsClash(vec![0]).is_transient());
    // Nothing of the batch was written: no rows, offsets unchanged.
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, payment_id FROM recon_events ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(rows, [("e".into(), "k1".into())]);
    assert_eq!(count(&pool, "rejected_events").await, 1);
    let position = store.owned_position(1, 1).await.expect("position");
    assert_eq!(
        position.map(|p| p.next_offsets),
        Some([Some(1), None].into()),
        "pair 1 as stored before the batch"
    );
    assert_eq!(store.owned_position(1, 2).await.expect("query"), None);
}

#[sqlx::test(migrations = false)]
async fn two_pairs_inserting_one_event_id_in_a_batch_keep_it_with_the_first(pool: PgPool) {
    let store = store(pool.clone()).await;
    store.acquire_pairs(&[0, 1]).await.expect("own");
    let result = store
        .checkpoint(&[
            checkpoint(0, 1, [Some(1), None], vec![pending_payment("e", "k0", 1)]),
            checkpoint(1, 1, [Some(1), None], vec![pending_payment("e", "k1", 1)]),
        ])
        .await;
    match result {
        Err(StoreError::EventIdsClash(pairs)) => assert_eq!(pairs, vec![1]),
        other => panic!("expected a clash of pair 1, got {other:?}"),
    }
    assert_eq!(count(&pool, "recon_events").await, 0);
}

#[sqlx::test(migrations = false)]
async fn values_postgresql_refuses_are_traced_to_their_messages(pool: PgPool) {
    let store = store(pool.clone()).await;
    store.acquire_pairs(&[0, 1]).await.expect("own");
    // PostgreSQL cannot store U+0000 in text (22021): whichever column it sits in,
    // the insert of the whole batch fails. The store must name the messages.
    let mut bad_event = pending_payment("bad\0id", "k0", 1);
    if let Some(new) = bad_event.new.as_mut() {
        new.kafka_offset = 5;
    }
    let mut bad_merchant = pending_payment("e2", "k2", 1);
    if let Some(new) = bad_merchant.new.as_mut() {
        new.kafka_offset = 7;
        new.reference = Some("m\0".into());
    }
    let mut rows = (0..20)
        .map(|i| pending_payment(&format!("ok{i}"), &format!("k{i}"), 1))
        .collect::<Vec<_>>();
    rows.insert(3, bad_event);
    rows.insert(15, bad_merchant);
    let batch = vec![
        checkpoint(0, 1, [Some(30), None], rows),
        checkpoint(1, 1, [Some(3), None], vec![pending_payment("f", "kf", 1)]),
    ];
    let refused = match store.checkpoint(&batch).await {
        Err(StoreError::DataErrors(refused)) => refused,
        other => panic!("expected the refused messages, got {other:?}"),
    };
    let found: Vec<(i32, Topic, i64)> = refused
        .iter()
        .map(|r| (r.pair, r.topic, r.offset))
        .collect();
    assert_eq!(
        found,
        vec![(0, Topic::Payments, 5), (0, Topic::Payments, 7)]
    );
    for r in &refused {
        assert!(
            r.reason.contains("0x00") && r.reason.contains("22021"),
            "PostgreSQL's own message is the reason: {}",
            r.reason
        );
    }
    assert!(!StoreError::DataErrors(refused).is_transient());
    // Nothing of the batch was written.
    assert_eq!(count(&pool, "recon_events").await, 0);
    assert_eq!(count(&pool, "rejected_events").await, 0);
    // Without pair 0, the rest commits.
    store.checkpoint(&batch[1..]).await.expect("pair 1 commits");
    assert_eq!(count(&pool, "recon_events").await, 1);
}

#[sqlx::test(migrations = false)]
async fn a_checkpoint_retried_after_a_commit_of_unknown_outcome_writes_nothing_twice(pool: PgPool) {
    let store = store(pool.clone()).await;
    store.acquire_pairs(&[0]).await.expect("own");
    let first = checkpoint(0, 1, [Some(1), None], vec![pending_payment("e", "k", 1)]);
    store
        .checkpoint(std::slice::from_ref(&first))
        .await
        .expect("first");
    // A batch of only deadline firings: an outcome update and an opened discrepancy,
    // nothing inserted into recon_events, no offset moved.
    let fired = PairCheckpoint {
        pair: 0,
        epoch: 1,
        next_offsets: [None, None].into(),
        changes: PairChanges {
            rows: vec![RowWrite {
                new: None,
                outcome: Outcome::MissingSettlement,
                ..pending_payment("e", "k", 1)
            }],
            discrepancies: vec![DiscrepancyChange::Opened {
                kind: DiscrepancyKind::Outcome(Outcome::MissingSettlement),
                payment_id: "k".into(),
                payment_event_id: Some("e".into()),
                settlement_event_id: None,
            }],
            high_marks: [Some(5), None].into(),
            generation: 2,
        },
        rejected: Vec::new(),
        announcements: Vec::new(),
        watermark: None,
        redriven: Vec::new(),
    };
    store
        .checkpoint(std::slice::from_ref(&fired))
        .await
        .expect("fired");
    // The connection dropped during COMMIT after the server committed: the worker
    // cannot tell, and runs the same checkpoint again.
    store.checkpoint(&[fired]).await.expect("retried");
    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recon_discrepancies WHERE kind = 'missing_settlement'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(missing, 1, "the retry opened no second discrepancy");
    // A retried batch with new events meets its own rows: the pair is re-read from
    // the stored offsets (which the first attempt moved), and nothing is doubled.
    match store.checkpoint(&[first]).await {
        Err(StoreError::EventIdsClash(pairs)) => assert_eq!(pairs, vec![0]),
        other => panic!("expected the pair to be re-read, got {other:?}"),
    }
    assert_eq!(count(&pool, "recon_events").await, 1);
    assert_eq!(count(&pool, "rejected_events").await, 1);
    assert_eq!(count(&pool, "recon_discrepancies").await, 2);
    // Each opening logged once (contract §8): the retries inserted nothing, so they
    // logged nothing.
    let logged: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.kind, a.action FROM recon_discrepancy_actions a
         JOIN recon_discrepancies d ON d.id = a.discrepancy_id ORDER BY a.id",
    )
    .fetch_all(&pool)
    .await
    .expect("actions");
    assert_eq!(
        logged,
        vec![
            ("duplicate_payment".to_owned(), "opened".to_owned()),
            ("missing_settlement".to_owned(), "opened".to_owned()),
        ]
    );
    let position = store.owned_position(0, 1).await.expect("position");
    assert_eq!(
        position.map(|p| p.next_offsets),
        Some([Some(1), None].into())
    );
}

/// The SQLSTATE of a database error.
fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

/// Each condition that ends by itself, provoked on the real server: the store calls it
/// transient, so the pipeline backs off and retries instead of exiting (which would
/// hand the partitions to a worker meeting the same condition).
#[sqlx::test(migrations = false)]
async fn conditions_that_end_by_themselves_are_transient(pool: PgPool) {
    let mut conn = pool.acquire().await.expect("connection");
    let mut other = pool.acquire().await.expect("second connection");
    sqlx::query("CREATE TABLE plan_probe (a int)")
        .execute(&mut *conn)
        .await
        .expect("create");

    // statement_timeout.
    sqlx::query("SET statement_timeout = 50")
        .execute(&mut *conn)
        .await
        .expect("set");
    let error = sqlx::query("SELECT pg_sleep(2)")
        .execute(&mut *conn)
        .await
        .expect_err("statement timeout");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error}");
    assert!(StoreError::from(error).is_transient());
    sqlx::query("RESET statement_timeout")
        .execute(&mut *conn)
        .await
        .expect("reset");

    // lock_timeout, the lock held by another session.
    sqlx::query("BEGIN")
        .execute(&mut *other)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE plan_probe IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *other)
        .await
        .expect("lock");
    sqlx::query("SET lock_timeout = 50")
        .execute(&mut *conn)
        .await
        .expect("set");
    let error = sqlx::query("SELECT * FROM plan_probe")
        .execute(&mut *conn)
        .await
        .expect_err("lock timeout");
    assert_eq!(sqlstate(&error).as_deref(), Some("55P03"), "{error}");
    assert!(StoreError::from(error).is_transient());
    sqlx::query("ROLLBACK")
        .execute(&mut *other)
        .await
        .expect("rollback");
    sqlx::query("RESET lock_timeout")
        .execute(&mut *conn)
        .await
        .expect("reset");

    // A write in a read-only transaction: what a primary turned standby answers.
    sqlx::query("BEGIN READ ONLY")
        .execute(&mut *conn)
        .await
        .expect("begin");
    let error = sqlx::query("INSERT INTO plan_probe VALUES (1)")
        .execute(&mut *conn)
        .await
        .expect_err("read-only");
    assert_eq!(sqlstate(&error).as_deref(), Some("25006"), "{error}");
    assert!(StoreError::from(error).is_transient());
    sqlx::query("ROLLBACK")
        .execute(&mut *conn)
        .await
        .expect("rollback");

    // A statement prepared before a migration changed the columns it returns.
    sqlx::query("SELECT * FROM plan_probe")
        .execute(&mut *conn)
        .await
        .expect("prepared");
    sqlx::query("ALTER TABLE plan_probe ADD COLUMN b int")
        .execute(&mut *other)
        .await
        .expect("alter");
    let error = sqlx::query("SELECT * FROM plan_probe")
        .execute(&mut *conn)
        .await
        .expect_err("stale plan");
    assert_eq!(sqlstate(&error).as_deref(), Some("0A000"), "{error}");
    assert!(StoreError::from(error).is_transient());
    // Any other feature_not_supported is a mistake in a statement: permanent.
    let error = sqlx::query("SELECT count(*) FROM plan_probe FOR UPDATE")
        .persistent(false)
        .execute(&mut *other)
        .await
        .expect_err("not supported");
    assert_eq!(sqlstate(&error).as_deref(), Some("0A000"), "{error}");
    assert!(!StoreError::from(error).is_transient());

    // An administrator (or a failover) ends the session.
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&mut *other)
        .await
        .expect("terminate");
    let error = sqlx::query("SELECT 1")
        .execute(&mut *conn)
        .await
        .expect_err("terminated");
    assert!(StoreError::from(error).is_transient());
}

/// The values of `candidates` that satisfy a predicate PostgreSQL stores (an index
/// predicate or a CHECK), evaluated by PostgreSQL on a column named `column`.
async fn satisfying(
    pool: &PgPool,
    predicate: &str,
    column: &str,
    candidates: &[&str],
) -> Vec<String> {
    let mut held: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT {column} FROM UNNEST($1::text[]) AS c({column}) WHERE {predicate}"
    ))
    .bind(candidates)
    .fetch_all(pool)
    .await
    .expect("evaluate the predicate");
    held.sort();
    held
}

/// The open outcomes are defined once, in Rust ([`Outcome::OPEN`]); the store's
/// queries generate their SQL from it. The partial index they read is fixed in a
/// shipped migration, so this checks that index's predicate against the definition:
/// a query's condition must imply it, or the planner cannot use the index.
#[sqlx::test(migrations = false)]
async fn the_open_items_index_holds_exactly_the_open_outcomes(pool: PgPool) {
    let _store = store(pool.clone()).await;
    let predicate: String = sqlx::query_scalar(
        "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'recon_events_open_items'",
    )
    .fetch_one(&pool)
    .await
    .expect("the open-items index and its predicate");
    let mut candidates: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    candidates.push("refunded");
    let mut open: Vec<String> = Outcome::ALL
        .iter()
        .filter(|o| o.is_open())
        .map(|o| o.as_str().to_owned())
        .collect();
    open.sort();
    assert_eq!(
        satisfying(&pool, &predicate, "outcome", &candidates).await,
        open,
        "{predicate}"
    );
}

/// The duplicate outcomes are defined once, in Rust ([`Outcome::DUPLICATES`]); the
/// window lookup generates its condition from it. The partial index it reads is fixed
/// in a shipped migration (0007), so this checks that index's predicate against the
/// definition: it holds every outcome but the duplicates.
#[sqlx::test(migrations = false)]
async fn the_payment_id_index_holds_every_outcome_but_the_duplicates(pool: PgPool) {
    let _store = store(pool.clone()).await;
    let predicate: String = sqlx::query_scalar(
        "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'recon_events_payment_id_live'",
    )
    .fetch_one(&pool)
    .await
    .expect("the payment_id index and its predicate");
    let candidates: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    let mut kept: Vec<String> = Outcome::ALL
        .iter()
        .filter(|o| !o.is_duplicate())
        .map(|o| o.as_str().to_owned())
        .collect();
    kept.sort();
    assert_eq!(
        satisfying(&pool, &predicate, "outcome", &candidates).await,
        kept,
        "{predicate}"
    );
}

/// The schema's CHECKs accept exactly the event kinds and outcomes the crate reads
/// back, so no stored row can fail to decode without the schema having been changed.
#[sqlx::test(migrations = false)]
async fn the_schema_accepts_exactly_the_kinds_and_outcomes_the_crate_knows(pool: PgPool) {
    let _store = store(pool.clone()).await;
    let check = |column: &'static str| {
        let pool = pool.clone();
        async move {
            let definition: String = sqlx::query_scalar(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = 'recon_events'::regclass AND contype = 'c'
                   AND pg_get_constraintdef(oid) LIKE '%' || $1 || '%'",
            )
            .bind(column)
            .fetch_one(&pool)
            .await
            .expect("the column's CHECK");
            let predicate = definition
                .strip_prefix("CHECK ")
                .expect("a CHECK definition")
                .to_owned();
            predicate
        }
    };
    // The table stores the topic's kind: a refund request is a `payment` row with a
    // refund id (migration 0008), which recon_outcomes shows as `refund`.
    let kinds = vec!["payment", "settlement"];
    let mut candidates = kinds.clone();
    candidates.push("refund");
    assert_eq!(
        satisfying(&pool, &check("event_kind").await, "event_kind", &candidates).await,
        kinds
    );
    let mut outcomes: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    outcomes.sort();
    let mut candidates = outcomes.clone();
    candidates.push("refunded");
    assert_eq!(
        satisfying(&pool, &check("outcome").await, "outcome", &candidates).await,
        outcomes
    );
}

/// A kind, outcome or currency read back that the crate does not know is an error,
/// never a default (an unknown kind used to be taken for a settlement).
#[sqlx::test(migrations = false)]
async fn an_unknown_kind_outcome_or_currency_read_back_is_a_permanent_error(pool: PgPool) {
    let store = store(pool.clone()).await;
    // Only a schema change could store these: a later version's rows, say.
    sqlx::query(
        "ALTER TABLE recon_events DROP CONSTRAINT recon_events_event_kind_check,
                                  DROP CONSTRAINT recon_events_outcome_check",
    )
    .execute(&pool)
    .await
    .expect("drop the CHECKs");
    for (key, kind, outcome, currency, unknown) in [
        ("k1", "refund", "pending", "EUR", "refund"),
        ("k2", "payment", "refunded", "EUR", "refunded"),
        ("k3", "payment", "pending", "ABC", "ABC"),
    ] {
        sqlx::query(
            "INSERT INTO recon_events (event_kind, event_id, payment_id, kafka_partition, kafka_offset,
                                       outcome, event_time, amount_minor, currency)
             VALUES ($1, $2, $2, 0, 0, $3, now(), 1, $4)",
        )
        .bind(kind)
        .bind(key)
        .bind(outcome)
        .bind(currency)
        .execute(&pool)
        .await
        .expect("insert");
        match store.lookup(&[0], &[key.to_owned()]).await {
            Err(error @ StoreError::Permanent(_)) => {
                assert!(error.to_string().contains(unknown), "{error}");
            }
            other => panic!("expected a permanent error for {unknown:?}, got {other:?}"),
        }
    }
}

#[sqlx::test(migrations = false)]
async fn open_items_are_counted_by_kind_and_outcome(pool: PgPool) {
    let store = store(pool).await;
    store.acquire_pairs(&[0, 1]).await.expect("own");
    let rows = vec![
        pending_payment("e0", "k0", 2_000_000),
        pending_payment("e1", "k1", 1_000_000),
    ];
    store
        .checkpoint(&[checkpoint(0, 1, [Some(2), None], rows)])
        .await
        .expect("commit");
    let items = store.open_items(&[0]).await.expect("open items");
    assert_eq!(
        items,
        vec![("payment".to_owned(), "pending".to_owned(), 2, 1_000_000)]
    );
    assert!(store.open_items(&[1]).await.expect("open items").is_empty());
}

/// event_id, event_kind, line_type, refund_id, dispute_id, payout_id of recon_outcomes.
type ViewRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// A settlement line of a version-2 type, new in its batch.
fn line(event_id: &str, payment_id: &str, line: Line, gross: i64, outcome: Outcome) -> RowWrite {
    let mut row = pending_payment(event_id, payment_id, 1);
    row.kind = EventKind::Settlement;
    row.outcome = outcome;
    if let Some(new) = row.new.as_mut() {
        new.amount = gross;
        new.fee = Some(0);
        new.net = Some(gross);
        new.reference = Some("batch-1".into());
        new.line = line;
        new.payout_id = Some("po-1".into());
    }
    row
}

/// The over_refunded and chargeback rows of a payment: (kind, settlement event, resolution).
async fn money_discrepancies(
    pool: &PgPool,
    payment_id: &str,
) -> Vec<(String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT kind, settlement_event_id, resolution FROM recon_discrepancies
         WHERE payment_id = $1 AND kind IN ('over_refunded', 'chargeback') ORDER BY kind",
    )
    .bind(payment_id)
    .fetch_all(pool)
    .await
    .expect("discrepancies")
}

#[sqlx::test(migrations = false)]
async fn refunds_and_chargebacks_round_trip_and_their_discrepancies_are_set(pool: PgPool) {
    let store = store(pool.clone()).await;
    store.acquire_pairs(&[0]).await.expect("own");
    let refund = Line::Refund {
        refund_id: "r1".into(),
    };
    let chargeback = Line::Chargeback {
        dispute_id: "d1".into(),
    };
    let reversal = Line::ChargebackReversal {
        dispute_id: "d1".into(),
    };
    let mut request = pending_payment("req", "k", 1);
    request.kind = EventKind::Refund;
    if let Some(new) = request.new.as_mut() {
        new.reference = None;
        new.line = refund.clone();
    }
    let rows = vec![
        line("cap", "k", Line::Capture, 100, Outcome::Pending),
        request,
        line("ref", "k", refund.clone(), -100, Outcome::Pending),
        line("cb", "k", chargeback.clone(), -100, Outcome::ChargebackOpen),
    ];
    let mut batch = checkpoint(0, 1, [Some(1), Some(3)], rows);
    batch.changes.discrepancies = vec![
        DiscrepancyChange::Opened {
            kind: DiscrepancyKind::Chargeback,
            payment_id: "k".into(),
            payment_event_id: None,
            settlement_event_id: Some("cb".into()),
        },
        DiscrepancyChange::OverRefund {
            payment_id: "k".into(),
            state: Some(OverRefund {
                first_below: "cb".into(),
                open: true,
            }),
        },
    ];
    store.checkpoint(&[batch]).await.expect("first batch");
    assert_eq!(
        money_discrepancies(&pool, "k").await,
        vec![
            ("chargeback".into(), Some("cb".into()), None),
            ("over_refunded".into(), Some("cb".into()), None),
        ]
    );
    // The view shows the kinds and columns of contract §6; captures as `capture`.
    let view: Vec<ViewRow> = sqlx::query_as(
        "SELECT event_id, event_kind, line_type, refund_id, dispute_id, payout_id
             FROM recon_outcomes ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .expect("view");
    let po = || Some("po-1".to_owned());
    assert_eq!(
        view,
        vec![
            (
                "cap".into(),
                "settlement".into(),
                Some("capture".into()),
                None,
                None,
                po()
            ),
            (
                "cb".into(),
                "settlement".into(),
                Some("chargeback".into()),
                None,
                Some("d1".into()),
                po()
            ),
            (
                "ref".into(),
                "settlement".into(),
                Some("refund".into()),
                Some("r1".into()),
                None,
                po()
            ),
            (
                "req".into(),
                "refund".into(),
                None,
                Some("r1".into()),
                None,
                None
            ),
        ]
    );
    // The window is loaded back with every line's type and id.
    let mut loaded: Vec<(EventKind, String, Line)> = store
        .lookup(&[0], &["k".to_owned()])
        .await
        .expect("lookup")
        .into_iter()
        .map(|(_, e)| (e.kind, e.event_id, e.line))
        .collect();
    loaded.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        loaded,
        vec![
            (EventKind::Settlement, "cap".into(), Line::Capture),
            (EventKind::Settlement, "cb".into(), chargeback),
            (EventKind::Settlement, "ref".into(), refund),
            (
                EventKind::Refund,
                "req".into(),
                Line::Refund {
                    refund_id: "r1".into()
                }
            ),
        ]
    );
    // A refund request under a stored payment id of its topic is stored already.
    let stored = store
        .stored_event_ids(&[Input::Payments, Input::Settlements], &["req", "req"])
        .await
        .expect("probe");
    assert_eq!(stored, vec![(Input::Payments, "req".to_owned())]);

    // The reversal: the chargeback resolved, the position recovered. Applied twice
    // (a checkpoint retried after a COMMIT of unknown outcome): the same result.
    let mut second = checkpoint(
        0,
        1,
        [Some(1), Some(4)],
        vec![line("rev", "k", reversal, 100, Outcome::ChargebackReversed)],
    );
    second.rejected.clear();
    second.changes.discrepancies = vec![
        DiscrepancyChange::Resolved {
            kind: DiscrepancyKind::Chargeback,
            subject_event_id: "cb".into(),
            resolution: "reversed",
        },
        DiscrepancyChange::OverRefund {
            payment_id: "k".into(),
            state: Some(OverRefund {
                first_below: "cb".into(),
                open: false,
            }),
        },
    ];
    store
        .checkpoint(&[second.clone()])
        .await
        .expect("second batch");
    let resolved_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT resolved_at FROM recon_discrepancies WHERE kind = 'over_refunded'",
    )
    .fetch_one(&pool)
    .await
    .expect("resolved_at");
    for row in &mut second.changes.rows {
        row.new = None;
    }
    store.checkpoint(&[second]).await.expect("retried");
    let expected = vec![
        (
            "chargeback".into(),
            Some("cb".into()),
            Some("reversed".into()),
        ),
        (
            "over_refunded".into(),
            Some("cb".into()),
            Some("recovered".into()),
        ),
    ];
    assert_eq!(money_discrepancies(&pool, "k").await, expected);
    let again: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT resolved_at FROM recon_discrepancies WHERE kind = 'over_refunded'",
    )
    .fetch_one(&pool)
    .await
    .expect("resolved_at");
    assert_eq!(again, resolved_at, "a resolution keeps its first time");

    // A line settled earlier lifts every prefix: the discrepancy must not exist. Its
    // row goes; its history stays in the action log, ending in a withdrawal.
    let over_id: i64 =
        sqlx::query_scalar("SELECT id FROM recon_discrepancies WHERE kind = 'over_refunded'")
            .fetch_one(&pool)
            .await
            .expect("over_refunded id");
    let mut third = checkpoint(0, 1, [Some(1), Some(5)], Vec::new());
    third.rejected.clear();
    third.changes.discrepancies = vec![DiscrepancyChange::OverRefund {
        payment_id: "k".into(),
        state: None,
    }];
    store.checkpoint(&[third]).await.expect("third batch");
    assert_eq!(
        money_discrepancies(&pool, "k").await,
        vec![(
            "chargeback".into(),
            Some("cb".into()),
            Some("reversed".into())
        )]
    );
    let history: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT action, note FROM recon_discrepancy_actions WHERE discrepancy_id = $1 ORDER BY id",
    )
    .bind(over_id)
    .fetch_all(&pool)
    .await
    .expect("history");
    let actions: Vec<&str> = history.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actions, ["opened", "resolved", "resolved"], "{history:?}");
    assert!(
        history[2]
            .1
            .as_deref()
            .is_some_and(|n| n.starts_with("withdrawn")),
        "{history:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn open_discrepancies_are_counted_by_kind_for_the_pairs_asked(pool: PgPool) {
    let store = store(pool.clone()).await;
    // Rows as the checkpoint writes them; resolved ones and other pairs' do not count.
    sqlx::query(
        "INSERT INTO recon_discrepancies
           (kind, payment_id, kafka_partition, payment_event_id, settlement_event_id,
            resolved_at, resolution)
         VALUES ('over_refunded', 'p1', 0, NULL, 's1', NULL, NULL),
                ('chargeback', 'p1', 0, NULL, 's2', NULL, NULL),
                ('chargeback', 'p2', 0, NULL, 's3', now(), 'reversed'),
                ('chargeback', 'p3', 1, NULL, 's4', NULL, NULL),
                ('over_refunded', 'p4', 1, NULL, 's5', NULL, NULL),
                ('over_refunded', 'p5', 1, NULL, 's6', now(), 'recovered'),
                ('missing_settlement', 'p6', 2, 'e7', NULL, NULL, NULL)",
    )
    .execute(&pool)
    .await
    .expect("insert discrepancies");
    let mut open = store
        .open_discrepancies(&[0, 1])
        .await
        .expect("open discrepancies");
    open.sort();
    assert_eq!(
        open,
        vec![
            ("chargeback".to_owned(), 2),
            ("over_refunded".to_owned(), 2)
        ]
    );
    assert_eq!(
        store.open_discrepancies(&[2]).await.expect("open"),
        vec![("missing_settlement".to_owned(), 1)]
    );
    assert!(store
        .open_discrepancies(&[3])
        .await
        .expect("open")
        .is_empty());
}

/// The open-item gauges' labels: a refund request is counted as `refund`, every line,
/// a refund line included (it carries a refund id too), as `settlement`, and every
/// (kind, outcome) read back has its series.
#[sqlx::test(migrations = false)]
async fn open_refund_requests_and_refund_lines_are_counted_under_their_own_kinds(pool: PgPool) {
    let store = store(pool).await;
    store.acquire_pairs(&[0]).await.expect("own");
    let refund = Line::Refund {
        refund_id: "r1".into(),
    };
    let mut request = pending_payment("req", "k", 1);
    request.kind = EventKind::Refund;
    if let Some(new) = request.new.as_mut() {
        new.reference = None;
        new.line = refund.clone();
    }
    let orphan = Line::Refund {
        refund_id: "r2".into(),
    };
    let rows = vec![
        pending_payment("pay", "k", 1),
        request,
        line("ref", "k2", refund, -100, Outcome::Pending),
        line("orphan", "k3", orphan, -100, Outcome::OrphanSettlement),
    ];
    store
        .checkpoint(&[checkpoint(0, 1, [Some(2), Some(2)], rows)])
        .await
        .expect("commit");
    let mut items: Vec<(String, String, i64)> = store
        .open_items(&[0])
        .await
        .expect("open items")
        .into_iter()
        .map(|(kind, outcome, count, _)| (kind, outcome, count))
        .collect();
    items.sort();
    let expected = [
        ("payment", "pending"),
        ("refund", "pending"),
        ("settlement", "orphan_settlement"),
        ("settlement", "pending"),
    ];
    assert_eq!(
        items,
        expected.map(|(kind, outcome)| (kind.to_owned(), outcome.to_owned(), 1))
    );
    for (kind, outcome) in expected {
        assert!(
            recon_worker::telemetry::metrics::OPEN_KINDS.contains(&(kind, outcome)),
            "({kind}, {outcome}) has a series"
        );
    }
}
