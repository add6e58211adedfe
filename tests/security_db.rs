//! The database side of security (issue 24), against the real PostgreSQL and broker:
//! TLS with `sslmode=verify-full` against the server certificate that
//! `scripts/dev-services.sh up` generates (and a CA that did not sign it), and the two
//! roles: migrations as the owner role, `run` as the runtime role created by
//! `deploy/sql/runtime-role.sql` (rows only, no DDL), which refuses to start while a
//! migration is pending. The runtime role's URL comes from `DATABASE_URL_FILE`.
//!
//! The TLS files are read from `$RECON_TEST_PG_TLS_DIR`, or from where
//! `scripts/dev-services.sh` writes them (`$RECON_SERVICES_DIR/pg-tls`, by default
//! `~/.local/state/recon-worker/pg-tls`); without them the tests fail, naming the
//! script. Roles are cluster-wide: each test makes its own (random names) and drops
//! them at its end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use recon_worker::engine::{NewEvent, Outcome, PairChanges, RowWrite};
use recon_worker::event::{EventKind, Line};
use recon_worker::money::Currency;
use recon_worker::store::{
    MigrationName, PairCheckpoint, PayoutRules, Store, StoreError, MIGRATOR,
};
use sqlx::PgPool;

const WITHIN: Duration = Duration::from_secs(90);

/// Where the services script put PostgreSQL's CA files.
fn pg_tls_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("RECON_TEST_PG_TLS_DIR") {
        return dir.into();
    }
    let services = std::env::var("RECON_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("XDG_STATE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".local/state")
                })
                .join("recon-worker")
        });
    services.join("pg-tls")
}

/// One of the CA files; a missing one fails the test (TLS is part of the suite).
fn tls_file(name: &str) -> PathBuf {
    let path = pg_tls_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: PostgreSQL's TLS files are made by `scripts/dev-services.sh up` \
         (run with the same RECON_SERVICES_DIR as the tests), or name their directory \
         with RECON_TEST_PG_TLS_DIR",
        path.display()
    );
    path
}

/// `url` with query parameters added.
fn with_params(url: &str, params: &[(&str, &str)]) -> String {
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{url}?{}", query.join("&"))
}

/// `recon-worker run` with exactly `env` (plus PATH and RUST_LOG).
fn spawn_with_env(world: &World, name: &str, env: Vec<(String, String)>) -> Worker {
    let log = world.log_dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,librdkafka=warn")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn recon-worker");
    Worker { child, log }
}

/// `recon-worker migrate` against `database_url`, to its end.
fn migrate_command(database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .output()
        .expect("run recon-worker migrate")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits for a log line containing `text`.
async fn await_log(worker: &Worker, text: &str, within: Duration) {
    let started = Instant::now();
    while !worker.log_text().contains(text) {
        assert!(
            started.elapsed() < within,
            "no {text:?} in the log within {within:?}:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn verify_full_with_the_servers_ca_reconciles_over_tls(pool: PgPool) {
    let ca = tls_file("ca.crt");
    let world = World::new(pool, 2).await;
    let (records, truth) = generate(&world.plan(30, 71, full_mix()));
    world.produce(&records).await;
    let url = with_params(
        &world.database_url,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &ca.to_string_lossy()),
            ("application_name", "recon-tls-test"),
        ],
    );
    let migrated = migrate_command(&url);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let mut worker = world.spawn_worker("tls", &[("DATABASE_URL", &url)]);
    world.await_truth(&truth, WITHIN).await;
    // The worker's own connections (its application_name) are TLS, every one.
    let (connections, all_tls): (i64, Option<bool>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.application_name = 'recon-tls-test' AND a.datname = current_database()",
    )
    .fetch_one(&world.pool)
    .await
    .expect("pg_stat_ssl");
    assert!(connections > 0, "the worker holds connections");
    assert_eq!(all_tls, Some(true), "every worker connection uses TLS");
    worker.stop_cleanly();
}

#[sqlx::test(migrations = false)]
async fn a_ca_that_did_not_sign_the_server_certificate_fails_fast_naming_the_cause(pool: PgPool) {
    let untrusted = tls_file("untrusted-ca.crt");
    let world = World::new(pool, 1).await;
    let secret = "hunter2-TlsSecret";
    let url = with_params(
        &world
            .database_url
            .replacen("postgres@", &format!("postgres:{secret}@"), 1),
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &untrusted.to_string_lossy()),
        ],
    );
    // `run` retries an unreachable database for ever; a refused certificate is not
    // one, so it stops at once.
    let mut worker = world.spawn_worker("untrusted", &[("DATABASE_URL", &url)]);
    let started = Instant::now();
    let status = worker.wait(Duration::from_secs(30));
    let log = worker.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed fast, not retried: {log}"
    );
    assert!(
        log.contains("connecting to PostgreSQL") && log.contains("certificate verify failed"),
        "the cause is named: {log}"
    );
    assert!(!log.contains("retrying"), "not retried: {log}");
    assert!(!log.contains(secret), "no secret in the log: {log}");
    // `migrate` too (it retries an unreachable database for 30 s).
    let started = Instant::now();
    let output = migrate_command(&url);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(started.elapsed() < Duration::from_secs(15), "{text}");
    assert!(
        text.contains("certificate verify failed") && !text.contains(secret),
        "{text}"
    );
    // A CA file that is not there is a configuration error (exit 2), not an outage.
    let missing = untrusted.with_file_name("no-such-ca.crt");
    let url = with_params(
        &world.database_url,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &missing.to_string_lossy()),
        ],
    );
    let output = migrate_command(&url);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("DATABASE_URL (sslrootcert)") && text.contains(&*missing.to_string_lossy()),
        "{text}"
    );
}

/// An owner role (DDL: creates the schema) and a runtime role (rows only), made for
/// one test; [`Roles::drop_all`] removes them.
struct Roles {
    owner: String,
    runtime: String,
}

impl Roles {
    async fn create(world: &World) -> Self {
        let roles = Self {
            owner: unique("recon_owner").replace('-', "_"),
            runtime: unique("recon_runtime").replace('-', "_"),
        };
        for statement in [
            format!("CREATE ROLE {} LOGIN", roles.owner),
            format!("GRANT CREATE, USAGE ON SCHEMA public TO {}", roles.owner),
        ] {
            sqlx::query(&statement)
                .execute(&world.pool)
                .await
                .expect("owner role");
        }
        roles
    }

    /// The runtime role, created and granted by the deployment's own script.
    fn grant_runtime(&self, world: &World) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/runtime-role.sql");
        let output = Command::new("psql")
            .arg(&world.database_url)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-v")
            .arg(format!("owner_role={}", self.owner))
            .arg("-v")
            .arg(format!("runtime_role={}", self.runtime))
            .arg("-f")
            .arg(&script)
            .output()
            .expect("psql (PostgreSQL's client) runs deploy/sql/runtime-role.sql");
        assert!(
            output.status.success(),
            "deploy/sql/runtime-role.sql failed: {}",
            stderr(&output)
        );
    }

    async fn drop_all(self, world: &World) {
        for statement in [
            // One role at a time: both at once trips over the owner's default
            // privileges for the runtime role, which both depend on ("could not find
            // tuple for default ACL", PostgreSQL 15).
            format!("DROP OWNED BY {}", self.runtime),
            format!("DROP OWNED BY {} CASCADE", self.owner),
            format!("DROP ROLE {}", self.runtime),
            format!("DROP ROLE {}", self.owner),
        ] {
            sqlx::query(&statement)
                .execute(&world.pool)
                .await
                .expect("drop roles");
        }
    }
}

/// `world`'s database URL as `role` (trust authentication: any password passes).
fn url_as(world: &World, role: &str, password: Option<&str>) -> String {
    let login = match password {
        Some(password) => format!("{role}:{password}"),
        None => role.to_owned(),
    };
    world
        .database_url
        .replacen("postgres@", &format!("{login}@"), 1)
}

/// A file holding `content`, in the test's log directory.
fn secret_file(world: &World, name: &str, content: &str) -> PathBuf {
    let path = world.log_dir.join(name);
    std::fs::write(&path, content).expect("secret file");
    path
}

/// A pending payment row for the store's checkpoint.
fn payment_row(event_id: &str, payment_id: &str, offset: i64) -> RowWrite {
    RowWrite {
        kind: EventKind::Payment,
        event_id: event_id.into(),
        payment_id: payment_id.into(),
        outcome: Outcome::Pending,
        counterpart: None,
        new: Some(NewEvent {
            kafka_offset: offset,
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

fn one_pair_batch(rows: Vec<RowWrite>, next_offset: i64) -> Vec<PairCheckpoint> {
    vec![PairCheckpoint {
        pair: 0,
        epoch: 1,
        next_offsets: [Some(next_offset), None].into(),
        changes: PairChanges {
            rows,
            discrepancies: Vec::new(),
            high_marks: [Some(1), None].into(),
            generation: 1,
        },
        rejected: Vec::new(),
        announcements: Vec::new(),
        watermark: None,
        redriven: Vec::new(),
    }]
}

/// The SQLSTATE of a failed statement.
fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    match result {
        Err(sqlx::Error::Database(db)) => db.code().unwrap_or_default().into_owned(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[sqlx::test(migrations = false)]
async fn the_runtime_role_reconciles_with_rows_only_after_the_owner_migrated(pool: PgPool) {
    let world = World::new(pool, 2).await;
    let roles = Roles::create(&world).await;
    let migrated = migrate_command(&url_as(&world, &roles.owner, None));
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    roles.grant_runtime(&world);

    // What the runtime role may and may not do, statement by statement.
    let runtime_pool = PgPool::connect(&url_as(&world, &roles.runtime, None))
        .await
        .expect("connect as the runtime role");
    for (statement, code) in [
        ("DELETE FROM recon_events", "42501"),
        ("DELETE FROM rejected_events", "42501"),
        ("TRUNCATE recon_discrepancies", "42501"),
        ("CREATE TABLE intruder (x int)", "42501"),
        ("ALTER TABLE recon_events ADD COLUMN intruder int", "42501"),
        ("DROP TABLE recon_partition_pairs", "42501"),
        ("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99, 'x', true, '', 0)", "42501"),
        ("UPDATE recon_outcomes SET outcome = 'matched'", "42501"),
        ("DELETE FROM recon_discrepancies", "42501"),
        // The action log (contract §8): no privilege to change or remove an entry.
        ("UPDATE recon_discrepancy_actions SET note = 'x'", "42501"),
        ("DELETE FROM recon_discrepancy_actions", "42501"),
        ("TRUNCATE recon_discrepancy_actions", "42501"),
    ] {
        let result = sqlx::query(statement).execute(&runtime_pool).await;
        assert_eq!(sqlstate(result), code, "{statement}");
    }
    // The one removal it may make, through migration 0008's function (0010 logs it):
    // over_refunded rows of the payments named, and nothing else.
    sqlx::query(
        "INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, settlement_event_id)
         VALUES ('over_refunded', 'p1', 0, 'l1'), ('chargeback', 'p1', 0, 'l1'),
                ('over_refunded', 'p2', 0, 'l2')",
    )
    .execute(&runtime_pool)
    .await
    .expect("the runtime role inserts discrepancies");
    sqlx::query("SELECT recon_withdraw_over_refunds($1)")
        .bind(vec!["p1"])
        .execute(&runtime_pool)
        .await
        .expect("the runtime role withdraws an over_refunded discrepancy");
    let left: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, payment_id FROM recon_discrepancies ORDER BY kind, payment_id",
    )
    .fetch_all(&runtime_pool)
    .await
    .expect("read back");
    assert_eq!(
        left,
        vec![
            ("chargeback".to_owned(), "p1".to_owned()),
            ("over_refunded".to_owned(), "p2".to_owned()),
        ]
    );
    // It appends to the action log and reads it (the withdrawal above logged itself).
    sqlx::query(
        "INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
         SELECT id, 'annotated', 'someone', 'seen' FROM recon_discrepancies WHERE payment_id = 'p2'",
    )
    .execute(&runtime_pool)
    .await
    .expect("the runtime role appends an action");
    // (The log outlives the removed row: no join, the note says what happened.)
    let logged: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.action, left(coalesce(a.note, ''), 9) FROM recon_discrepancy_actions a ORDER BY a.id",
    )
    .fetch_all(&runtime_pool)
    .await
    .expect("the runtime role reads the action log");
    assert_eq!(
        logged,
        vec![
            ("resolved".to_owned(), "withdrawn".to_owned()),
            ("annotated".to_owned(), "seen".to_owned()),
        ]
    );
    runtime_pool.close().await;
    let (update, delete, truncate): (bool, bool, bool) = sqlx::query_as(
        "SELECT has_table_privilege($1, 'recon_discrepancy_actions', 'UPDATE'),
                has_table_privilege($1, 'recon_discrepancy_actions', 'DELETE'),
                has_table_privilege($1, 'recon_discrepancy_actions', 'TRUNCATE')",
    )
    .bind(&roles.runtime)
    .fetch_one(&world.pool)
    .await
    .expect("privileges");
    assert!(
        !update && !delete && !truncate,
        "the action log: INSERT and SELECT only"
    );

    // A table a later migration creates (as the owner) is covered by the defaults.
    let owner_pool = PgPool::connect(&url_as(&world, &roles.owner, None))
        .await
        .expect("connect as the owner role");
    sqlx::query("CREATE TABLE later_migration (id bigserial PRIMARY KEY, x int)")
        .execute(&owner_pool)
        .await
        .expect("owner creates a table");
    // The owner holds every privilege on the action log; its triggers refuse anyway.
    assert_action_log_refuses_changes(&owner_pool).await;
    owner_pool.close().await;
    let (rows_only, delete): (bool, bool) = sqlx::query_as(
        "SELECT has_table_privilege($1, 'later_migration', 'SELECT, INSERT, UPDATE')
                AND has_sequence_privilege($1, 'later_migration_id_seq', 'USAGE'),
                has_table_privilege($1, 'later_migration', 'DELETE')",
    )
    .bind(&roles.runtime)
    .fetch_one(&world.pool)
    .await
    .expect("privileges");
    assert!(rows_only && !delete, "default privileges: rows only");

    // The worker as the runtime role, its URL (with a password, which trust
    // authentication ignores) read from DATABASE_URL_FILE with a trailing newline.
    let password = "rt-Pa55word";
    let url_file = secret_file(
        &world,
        "database-url",
        &format!("{}\n", url_as(&world, &roles.runtime, Some(password))),
    );
    let (records, truth) = generate(&world.plan(30, 73, full_mix()));
    world.produce(&records).await;
    let mut env: Vec<(String, String)> = world
        .worker_env(&[])
        .into_iter()
        .filter(|(name, _)| name != "DATABASE_URL")
        .collect();
    env.push((
        "DATABASE_URL_FILE".into(),
        url_file.to_string_lossy().into_owned(),
    ));
    let mut worker = spawn_with_env(&world, "runtime", env);
    world.await_truth(&truth, WITHIN).await;
    worker.stop_cleanly();
    let log = worker.log_text();
    assert!(log.contains("no migration pending"), "{log}");
    assert!(
        log.contains(&format!("{}:***@", roles.runtime)) && !log.contains(password),
        "the URL is logged redacted: {log}"
    );

    // The store's statements as the runtime role, the data-error path included:
    // tracing a refused value to its message uses temporary tables. (After the
    // worker's run: these rows are not in its ground truth.)
    let runtime_pool = PgPool::connect(&url_as(&world, &roles.runtime, None))
        .await
        .expect("connect as the runtime role");
    let store = Store::with_pool(runtime_pool.clone(), "store-payments", "store-settlements");
    store.acquire_pairs(&[0]).await.expect("take a pair over");
    let refused = store
        .checkpoint(&one_pair_batch(
            vec![
                payment_row("store-ok", "k1", 0),
                payment_row("bad\0id", "k2", 1),
            ],
            2,
        ))
        .await;
    match refused {
        Err(StoreError::DataErrors(refused)) => {
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert_eq!(refused[0].offset, 1);
        }
        other => panic!("expected the refused message traced, got {other:?}"),
    }
    store
        .checkpoint(&one_pair_batch(vec![payment_row("store-ok", "k1", 0)], 1))
        .await
        .expect("checkpoint as the runtime role");

    // The payout evaluator as the runtime role (contract §7): a run that opens a
    // payout discrepancy, one that resolves it. The rows a checkpoint writes for it are
    // written here as the same role.
    for statement in [
        "UPDATE recon_partition_pairs SET watermark = '2024-01-02T00:00:00Z',
                payout_seq = payout_seq + 1
         WHERE payments_topic = 'store-payments' AND kafka_partition = 0",
        "INSERT INTO recon_payout_announcements (event_id, payout_id, currency, net_minor,
                paid_at, kafka_partition, kafka_offset, seq)
         VALUES ('po-a', 'po-1', 'EUR', 300, '2024-01-01T00:00:00Z', 0, 0, 1)",
        "INSERT INTO recon_payout_parts VALUES
                ('po-1', 0, 'EUR', 1, 200, '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z', 1)",
    ] {
        sqlx::query(statement)
            .execute(&runtime_pool)
            .await
            .expect(statement);
    }
    let rules = PayoutRules::new(1, Duration::from_secs(3600), Duration::from_secs(3600));
    let opened = store
        .evaluate_payouts(&rules)
        .await
        .expect("the runtime role evaluates payouts")
        .expect("nobody else evaluates");
    assert_eq!(opened.opened, 1, "{opened:?}");
    for statement in [
        "UPDATE recon_partition_pairs SET payout_seq = payout_seq + 1
         WHERE payments_topic = 'store-payments' AND kafka_partition = 0",
        "UPDATE recon_payout_parts SET line_count = 2, net_minor = 300, seq = 2
         WHERE payout_id = 'po-1'",
    ] {
        sqlx::query(statement)
            .execute(&runtime_pool)
            .await
            .expect(statement);
    }
    let resolved = store
        .evaluate_payouts(&rules)
        .await
        .expect("the runtime role evaluates payouts")
        .expect("nobody else evaluates");
    assert_eq!(resolved.resolved, 1, "{resolved:?}");
    let status: String =
        sqlx::query_scalar("SELECT status FROM recon_payouts WHERE payout_id = 'po-1'")
            .fetch_one(&runtime_pool)
            .await
            .expect("the runtime role reads recon_payouts");
    assert_eq!(status, "balanced");
    store.payout_gauges().await.expect("the gauges' reads");
    let result = sqlx::query("UPDATE recon_payouts SET status = 'balanced'")
        .execute(&runtime_pool)
        .await;
    assert_eq!(sqlstate(result), "42501", "the payouts view is read only");

    runtime_pool.close().await;
    roles.drop_all(&world).await;
}

#[sqlx::test(migrations = false)]
async fn the_runtime_role_refuses_to_start_while_a_migration_is_pending(pool: PgPool) {
    let world = World::new(pool, 1).await;
    let roles = Roles::create(&world).await;
    // The owner migrates to all but the last migration: the migrations directory
    // without its newest file, which is what the database of an older release holds.
    let older = world.log_dir.join("older-migrations");
    std::fs::create_dir_all(&older).expect("dir");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
            .expect("migrations")
            .map(|entry| entry.expect("entry").path())
            .collect();
    files.sort();
    files.pop();
    for file in &files {
        std::fs::copy(file, older.join(file.file_name().expect("name"))).expect("copy");
    }
    let owner_url = url_as(&world, &roles.owner, None);
    let owner_pool = PgPool::connect(&owner_url).await.expect("owner");
    sqlx::migrate::Migrator::new(older.as_path())
        .await
        .expect("older migrations")
        .run(&owner_pool)
        .await
        .expect("migrate all but the last");
    owner_pool.close().await;
    roles.grant_runtime(&world);
    let last = MIGRATOR.iter().last().expect("a migration");
    let pending = MigrationName {
        version: last.version,
        description: last.description.to_string(),
    }
    .to_string();

    let runtime_url = url_as(&world, &roles.runtime, None);
    for (name, url, migrate, why) in [
        (
            "runtime",
            runtime_url.as_str(),
            "auto",
            "has no CREATE privilege on schema public".to_owned(),
        ),
        // The owner may migrate, but a worker told not to does not.
        (
            "never",
            owner_url.as_str(),
            "never",
            "RECON_MIGRATE=never".to_owned(),
        ),
    ] {
        let mut worker = world.spawn_worker(
            &format!("pending-{name}"),
            &[("DATABASE_URL", url), ("RECON_MIGRATE", migrate)],
        );
        let status = worker.wait(Duration::from_secs(30));
        let log = worker.log_text();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(
            log.contains(&format!("refusing to start: pending migrations {pending};"))
                && log.contains(&why)
                && log.contains("run `recon-worker migrate` as the owner role first"),
            "{log}"
        );
    }
    // `migrate` as the runtime role says which role it needs.
    let output = migrate_command(&runtime_url);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("permission denied") && text.contains("as the owner role"),
        "{text}"
    );
    // Nothing was applied by any of them.
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&world.pool)
        .await
        .expect("count");
    assert_eq!(applied as usize, files.len());

    // Once the owner migrated, the runtime role starts.
    let migrated = migrate_command(&owner_url);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let mut worker = world.spawn_worker("after-migrate", &[("DATABASE_URL", &runtime_url)]);
    await_log(&worker, "no migration pending", WITHIN).await;
    await_log(&worker, "took ownership", WITHIN).await;
    worker.stop_cleanly();
    roles.drop_all(&world).await;
}

/// `recon-worker <args>` as `role` (DATABASE_URL only).
fn operator_command(world: &World, role: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recon-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url_as(world, role, None))
        .output()
        .expect("run recon-worker")
}

/// `deploy/sql/operator-role.sql`: a person who is a member of the operator role runs
/// every operators' command (contract §8) and can change nothing else: no event, no
/// outcome, no reason, no offset, no discrepancy's kind, no row removed.
#[sqlx::test(migrations = false)]
async fn the_operator_role_runs_the_commands_and_changes_nothing_else(pool: PgPool) {
    let world = World::new(pool, 1).await;
    let roles = Roles::create(&world).await;
    let migrated = migrate_command(&url_as(&world, &roles.owner, None));
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    roles.grant_runtime(&world);
    let operators = unique("recon_operator").replace('-', "_");
    let alice = unique("alice").replace('-', "_");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/operator-role.sql");
    for _ in 0..2 {
        // Twice: idempotent.
        let output = Command::new("psql")
            .arg(&world.database_url)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-v")
            .arg(format!("operator_role={operators}"))
            .arg("-f")
            .arg(&script)
            .output()
            .expect("psql runs deploy/sql/operator-role.sql");
        assert!(output.status.success(), "{}", stderr(&output));
    }
    for statement in [
        format!("CREATE ROLE {alice} LOGIN"),
        format!("GRANT {operators} TO {alice}"),
        // What the worker would have written: a discrepancy and a reject.
        "INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, payment_event_id)
         VALUES ('missing_settlement', 'p1', 0, 'e1'), ('missing_settlement', 'p2', 0, 'e2')"
            .to_owned(),
        "INSERT INTO rejected_events (topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size)
         VALUES ('payments', 0, 7, 'too big', 'too_large', '{}', 2)"
            .to_owned(),
    ] {
        sqlx::query(&statement)
            .execute(&world.pool)
            .await
            .expect("setup");
    }
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM recon_discrepancies ORDER BY id")
        .fetch_all(&world.pool)
        .await
        .expect("ids");
    let (first, second) = (ids[0].to_string(), ids[1].to_string());

    for args in [
        vec!["discrepancies", "list", "--all", "--format", "csv"],
        vec![
            "discrepancies",
            "accept",
            &first,
            "--actor",
            "alice",
            "--note",
            "known",
        ],
        vec![
            "discrepancies",
            "reopen",
            &first,
            "--actor",
            "alice",
            "--note",
            "oops",
        ],
        vec![
            "discrepancies",
            "annotate",
            &second,
            "--actor",
            "alice",
            "--note",
            "seen",
        ],
        vec!["rejects", "list"],
        vec!["rejects", "redrive", "--all", "--actor", "alice"],
    ] {
        let output = operator_command(&world, &alice, &args);
        assert!(
            output.status.success(),
            "{args:?} as an operator: {}",
            stderr(&output)
        );
    }
    let requested: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rejected_events WHERE redrive_requested_by = 'alice'",
    )
    .fetch_one(&world.pool)
    .await
    .expect("requested");
    assert_eq!(requested, 1);

    let operator_pool = PgPool::connect(&url_as(&world, &alice, None))
        .await
        .expect("connect as an operator");
    for statement in [
        "INSERT INTO recon_events (event_kind, event_id, payment_id, kafka_partition, kafka_offset, outcome, event_time, amount_minor, currency)
         VALUES ('payment', 'x', 'x', 0, 0, 'pending', now(), 1, 'EUR')",
        "UPDATE recon_events SET outcome = 'matched'",
        "UPDATE recon_discrepancies SET kind = 'fee_mismatch'",
        "UPDATE rejected_events SET reason = 'fine'",
        "UPDATE rejected_events SET redriven_at = now()",
        "UPDATE recon_partition_pairs SET epoch = epoch + 1",
        "DELETE FROM recon_discrepancies",
        "DELETE FROM rejected_events",
        "UPDATE recon_discrepancy_actions SET note = 'x'",
        "CREATE TABLE intruder (x int)",
    ] {
        let result = sqlx::query(statement).execute(&operator_pool).await;
        assert_eq!(sqlstate(result), "42501", "{statement}");
    }
    operator_pool.close().await;
    for statement in [
        format!("DROP OWNED BY {operators}"),
        format!("DROP ROLE {alice}"),
        format!("DROP ROLE {operators}"),
    ] {
        sqlx::query(&statement)
            .execute(&world.pool)
            .await
            .expect("drop operator roles");
    }
    roles.drop_all(&world).await;
}
