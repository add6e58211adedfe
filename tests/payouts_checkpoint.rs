//! What a checkpoint writes for payouts (contract §7), against a real PostgreSQL: each
//! pair's partial sums counted exactly once, announcements stored once and in order,
//! the pair's watermark only ever moving forward, the payouts offset kept for its own
//! topic, and a value PostgreSQL refuses traced to its announcement.

use recon_worker::engine::{NewEvent, Outcome, PairChanges, RowWrite};
use recon_worker::event::{Announcement, EventKind, Line, Micros, Topic};
use recon_worker::money::Currency;
use recon_worker::pair::PerTopic;
use recon_worker::store::{AnnouncementAt, PairCheckpoint, Store, StoreError};
use sqlx::PgPool;

async fn store(pool: PgPool, payouts_topic: Option<&str>) -> Store {
    let store = Store::with_pool(pool, "payments", "settlements").with_payouts_topic(payouts_topic);
    store.migrate().await.expect("migrate");
    store
}

fn currency(code: &str) -> Currency {
    Currency::from_code(code).expect("currency")
}

/// A new capture line of `payout` with this net, settled at `at`.
fn line(event_id: &str, payout: Option<&str>, code: &str, net: i64, at: Micros) -> RowWrite {
    RowWrite {
        kind: EventKind::Settlement,
        event_id: event_id.into(),
        payment_id: format!("pay-{event_id}").into(),
        outcome: Outcome::Pending,
        counterpart: None,
        new: Some(NewEvent {
            kafka_offset: 0,
            event_time: at,
            amount: net.saturating_add(1),
            fee: Some(1),
            net: Some(net),
            currency: currency(code),
            reference: Some("s".into()),
            line: Line::Capture,
            payout_id: payout.map(str::to_owned),
        }),
    }
}

fn announcement(event_id: &str, payout: &str, net: i64, offset: i64) -> AnnouncementAt {
    AnnouncementAt {
        offset,
        announcement: Announcement {
            event_id: event_id.into(),
            payout_id: payout.into(),
            currency: currency("EUR"),
            net,
            line_count: Some(2),
            paid_at: 1_000,
        },
    }
}

fn checkpoint(
    pair: i32,
    rows: Vec<RowWrite>,
    announcements: Vec<AnnouncementAt>,
    watermark: Option<Micros>,
) -> PairCheckpoint {
    PairCheckpoint {
        pair,
        epoch: 1,
        next_offsets: PerTopic {
            payments: None,
            settlements: Some(rows.len() as i64),
            payouts: announcements.last().map(|a| a.offset + 1),
        },
        changes: PairChanges {
            rows,
            ..Default::default()
        },
        rejected: Vec::new(),
        announcements,
        watermark,
        redriven: Vec::new(),
    }
}

/// (payout, pair, currency, lines, net as text, seq), ordered.
async fn parts(pool: &PgPool) -> Vec<(String, i32, String, i64, String, i64)> {
    sqlx::query_as(
        "SELECT payout_id, kafka_partition, currency, line_count, net_minor::text, seq
         FROM recon_payout_parts ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .expect("parts")
}

/// (event_id, payout, partition, offset, seq) in insertion order.
async fn announcements(pool: &PgPool) -> Vec<(String, String, i32, i64, i64)> {
    sqlx::query_as(
        "SELECT event_id, payout_id, kafka_partition, kafka_offset, seq
         FROM recon_payout_announcements ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("announcements")
}

/// (pair, watermark in micros, payout_seq, payouts topic, payouts offset).
async fn pair_rows(pool: &PgPool) -> Vec<(i32, Option<i64>, i64, Option<String>, Option<i64>)> {
    sqlx::query_as(
        "SELECT kafka_partition, (extract(epoch FROM watermark) * 1000000)::bigint, payout_seq,
                payouts_topic, payouts_next_offset
         FROM recon_partition_pairs ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("pairs")
}

#[sqlx::test(migrations = false)]
async fn each_pair_sums_its_new_lines_per_payout_and_currency_exactly_once(pool: PgPool) {
    let store = store(pool.clone(), Some("payouts")).await;
    store.acquire_pairs(&[0, 1]).await.expect("acquire");
    let first = vec![
        checkpoint(
            0,
            vec![
                line("a1", Some("po-1"), "EUR", 100, 10),
                line("a2", Some("po-1"), "EUR", -30, 20),
                line("a3", Some("po-1"), "USD", 7, 15),
                line("a4", None, "EUR", 1_000, 15),
            ],
            Vec::new(),
            Some(20),
        ),
        checkpoint(
            1,
            vec![line("b1", Some("po-1"), "EUR", i64::MAX, 5)],
            Vec::new(),
            Some(5),
        ),
    ];
    store.checkpoint(&first).await.expect("first");
    // A later batch adds to the sums (one row per payout, pair and currency).
    let second = vec![checkpoint(
        1,
        vec![line("b2", Some("po-1"), "EUR", i64::MAX, 6)],
        Vec::new(),
        Some(6),
    )];
    store.checkpoint(&second).await.expect("second");
    let expected = vec![
        (
            "po-1".to_owned(),
            0,
            "EUR".to_owned(),
            2,
            "70".to_owned(),
            1,
        ),
        ("po-1".to_owned(), 0, "USD".to_owned(), 1, "7".to_owned(), 1),
        // Beyond any bigint: numeric sums cannot overflow into a data error.
        (
            "po-1".to_owned(),
            1,
            "EUR".to_owned(),
            2,
            (2 * i128::from(i64::MAX)).to_string(),
            2,
        ),
    ];
    assert_eq!(parts(&pool).await, expected);
    // The same batch again (a COMMIT whose outcome was unknown, retried): its lines
    // clash with their stored rows, and nothing of it is written, sums included.
    match store.checkpoint(&second).await {
        Err(StoreError::EventIdsClash(pairs)) => assert_eq!(pairs, vec![1]),
        other => panic!("expected a clash, got {other:?}"),
    }
    assert_eq!(parts(&pool).await, expected);
    let seqs: Vec<i64> = pair_rows(&pool).await.iter().map(|r| r.2).collect();
    assert_eq!(
        seqs,
        vec![1, 2],
        "bumped once per checkpoint writing payout rows"
    );
}

#[sqlx::test(migrations = false)]
async fn a_line_without_a_payout_writes_no_part_and_bumps_no_sequence(pool: PgPool) {
    let store = store(pool.clone(), None).await;
    store.acquire_pairs(&[0]).await.expect("acquire");
    let batch = [checkpoint(
        0,
        vec![line("a", None, "EUR", 5, 1)],
        Vec::new(),
        Some(1),
    )];
    store.checkpoint(&batch).await.expect("checkpoint");
    assert!(parts(&pool).await.is_empty());
    assert_eq!(pair_rows(&pool).await[0].2, 0);
}

#[sqlx::test(migrations = false)]
async fn announcements_are_stored_once_in_partition_order(pool: PgPool) {
    let store = store(pool.clone(), Some("payouts")).await;
    store.acquire_pairs(&[2]).await.expect("acquire");
    let batch = [checkpoint(
        2,
        Vec::new(),
        vec![
            announcement("an-2", "po-9", 50, 3),
            announcement("an-1", "po-9", 60, 4),
            // Redelivered within the batch: nothing more.
            announcement("an-2", "po-9", 50, 5),
        ],
        None,
    )];
    store.checkpoint(&batch).await.expect("first");
    // Redelivered in a later batch: nothing more either, and no clash.
    let again = [checkpoint(
        2,
        Vec::new(),
        vec![announcement("an-1", "po-9", 60, 6)],
        None,
    )];
    store.checkpoint(&again).await.expect("redelivery");
    assert_eq!(
        announcements(&pool).await,
        vec![
            ("an-2".to_owned(), "po-9".to_owned(), 2, 3, 1),
            ("an-1".to_owned(), "po-9".to_owned(), 2, 4, 1),
        ]
    );
    let pair = &pair_rows(&pool).await[0];
    assert_eq!((pair.3.as_deref(), pair.4), (Some("payouts"), Some(7)));
}

#[sqlx::test(migrations = false)]
async fn the_pair_watermark_only_moves_forward_across_owners(pool: PgPool) {
    let store = store(pool.clone(), None).await;
    store.acquire_pairs(&[0]).await.expect("acquire");
    let at = |watermark| [checkpoint(0, Vec::new(), Vec::new(), watermark)];
    store.checkpoint(&at(Some(50))).await.expect("50");
    assert_eq!(pair_rows(&pool).await[0].1, Some(50));
    // A new owner restarts its watermark from the high marks, lower.
    let mut behind = at(Some(20));
    behind[0].epoch = store.acquire_pairs(&[0]).await.expect("takeover")[0].epoch;
    store.checkpoint(&behind).await.expect("20");
    assert_eq!(pair_rows(&pool).await[0].1, Some(50));
    let mut none = at(None);
    none[0].epoch = behind[0].epoch;
    store.checkpoint(&none).await.expect("none");
    assert_eq!(pair_rows(&pool).await[0].1, Some(50));
    let mut ahead = at(Some(70));
    ahead[0].epoch = behind[0].epoch;
    store.checkpoint(&ahead).await.expect("70");
    assert_eq!(pair_rows(&pool).await[0].1, Some(70));
}

#[sqlx::test(migrations = false)]
async fn the_payouts_offset_is_resumed_only_for_the_topic_it_was_stored_for(pool: PgPool) {
    let first = store(pool.clone(), Some("payouts-a")).await;
    first.acquire_pairs(&[0]).await.expect("acquire");
    let batch = [checkpoint(
        0,
        Vec::new(),
        vec![announcement("x", "po", 1, 41)],
        None,
    )];
    first.checkpoint(&batch).await.expect("checkpoint");
    let same = first.acquire_pairs(&[0]).await.expect("same topic");
    assert_eq!(same[0].next_offsets[Topic::Payouts], Some(42));
    assert_eq!(
        first.owned_position(0, same[0].epoch).await.expect("owned"),
        Some(same[0].clone())
    );
    // Another payouts topic starts from its beginning, and so does the first one
    // when it comes back after the feature was off: its announcements are then
    // redeliveries, recognised by their event ids.
    let other = Store::with_pool(pool.clone(), "payments", "settlements")
        .with_payouts_topic(Some("payouts-b"));
    let moved = other.acquire_pairs(&[0]).await.expect("other topic");
    assert_eq!(moved[0].next_offsets[Topic::Payouts], None);
    let off = Store::with_pool(pool.clone(), "payments", "settlements");
    off.acquire_pairs(&[0]).await.expect("off");
    let back = first.acquire_pairs(&[0]).await.expect("back");
    assert_eq!(back[0].next_offsets[Topic::Payouts], None);
}

/// A database whose encoding cannot hold every character the decoder accepts.
#[sqlx::test(migrations = false)]
async fn an_announcement_postgresql_refuses_is_traced_to_its_offset(pool: PgPool) {
    let name = format!("recon_latin1_{}", std::process::id());
    let admin = pool.clone();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&admin)
        .await
        .expect("drop");
    sqlx::query(&format!(
        "CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    ))
    .execute(&admin)
    .await
    .expect("create latin1 database");
    let options = pool.connect_options().as_ref().clone().database(&name);
    let latin1 = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .expect("connect");
    let store = store(latin1.clone(), Some("payouts")).await;
    store.acquire_pairs(&[3]).await.expect("acquire");
    let batch = [checkpoint(
        3,
        Vec::new(),
        vec![
            announcement("fine", "po-1", 1, 10),
            announcement("not-latin1-\u{4e2d}", "po-2", 1, 11),
        ],
        None,
    )];
    match store.checkpoint(&batch).await {
        Err(StoreError::DataErrors(refused)) => {
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert_eq!(
                (refused[0].pair, refused[0].topic, refused[0].offset),
                (3, Topic::Payouts, 11)
            );
        }
        other => panic!("expected a data error traced to the announcement, got {other:?}"),
    }
    latin1.close().await;
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("drop");
}
