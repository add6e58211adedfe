//! `recon-tools bench pg-same-rows` (tools/src/same_rows.rs), the pipeline benchmark's
//! PostgreSQL reference, against a real database: it must insert exactly the rows the
//! pipeline stored (events, discrepancies and their actions, rejects, pairs) with plain
//! inserts, in several batches. The tool compares the two databases itself and fails
//! on any difference; this test runs it on a stream small enough for CI and checks
//! its counts against the scratch database independently.

use recon_tools::loadgen;
use recon_tools::same_rows::same_rows;
use recon_worker::config::Config;
use recon_worker::store::Store;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn config(batch_max_messages: usize) -> Config {
    let vars = [
        // Not used: the stores are given.
        (
            "DATABASE_URL",
            "postgres://unused@127.0.0.1/unused".to_owned(),
        ),
        ("RECON_PAYMENTS_TOPIC", "payments".to_owned()),
        ("RECON_SETTLEMENTS_TOPIC", "settlements".to_owned()),
        ("RECON_BATCH_MAX_MESSAGES", batch_max_messages.to_string()),
    ];
    Config::from_vars(vars.map(|(k, v)| (k.to_owned(), v))).expect("valid configuration")
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("count")
}

#[sqlx::test(migrations = false)]
async fn the_reference_inserts_the_rows_the_pipeline_stored(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let target_pool = pool.clone().connect_with(connect.clone()).await.unwrap();
    // The test database's name is at PostgreSQL's length limit already: a name of its own.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let scratch_name = format!("same_rows_scratch_{}_{nanos}", std::process::id());
    sqlx::query(&format!("CREATE DATABASE \"{scratch_name}\""))
        .execute(&target_pool)
        .await
        .unwrap();
    let scratch_pool = pool
        .connect_with(connect.database(&scratch_name))
        .await
        .unwrap();
    let target = Store::with_pool(target_pool.clone(), "payments", "settlements");
    let scratch = Store::with_pool(scratch_pool.clone(), "payments", "settlements");
    let mix = loadgen::parse_mix("v1").unwrap();
    // 400 scenarios in batches of 150 messages: several batches, every pair in most.
    let run = same_rows(&config(150), target.clone(), scratch.clone(), 400, 4, mix)
        .await
        .expect("the reference writes what the pipeline stored");

    let events = count(&scratch, "SELECT count(*) FROM recon_events").await;
    let discrepancies = count(&scratch, "SELECT count(*) FROM recon_discrepancies").await;
    let rejected = count(&scratch, "SELECT count(*) FROM rejected_events").await;
    assert!(events > 700 && discrepancies > 0 && rejected > 0);
    assert_eq!(run.event_rows as i64, events);
    assert_eq!(run.discrepancies as i64, discrepancies);
    assert_eq!(run.rejected as i64, rejected);
    assert_eq!(run.messages, run.source.messages);
    assert_eq!(run.batches, run.messages.div_ceil(150));
    for store in [&target, &scratch] {
        assert_eq!(
            count(store, "SELECT count(*) FROM recon_events").await,
            events
        );
    }
    // Some rows are open items: not only the `matched` rows of `bench pg-write`.
    assert!(
        count(
            &target,
            "SELECT count(*) FROM recon_events WHERE outcome IN ('missing_settlement', 'orphan_settlement')"
        )
        .await
            > 0
    );

    scratch_pool.close().await;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{scratch_name}\" WITH (FORCE)"
    ))
    .execute(&target_pool)
    .await
    .unwrap();
}
