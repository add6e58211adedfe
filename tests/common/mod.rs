//! Helpers for the end-to-end tests: real broker (127.0.0.1:9092 unless
//! RECON_TEST_BROKERS says otherwise; its secure listeners in [`secure_kafka`]), real
//! PostgreSQL (a fresh database per test from `#[sqlx::test]`), random topic and group
//! names, and the worker as a real process (or its configuration, for a worker run in
//! the test's own process).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use recon_tools::loadgen::{self, DiscrepancyKey, GroundTruth, Mix, Plan, Record};
use recon_worker::engine::{DiscrepancyKind, Outcome};
use recon_worker::event::{EventKind, Input};
use sqlx::{PgPool, Row};

pub const SEC: i64 = 1_000_000;

/// Whether the suite runs under the next-generation group protocol
/// (`RECON_TEST_GROUP_PROTOCOL=consumer`), whose sessions are the broker's.
pub fn consumer_protocol() -> bool {
    std::env::var("RECON_TEST_GROUP_PROTOCOL").is_ok_and(|p| p == "consumer")
}

pub fn brokers() -> String {
    std::env::var("RECON_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The broker's secure listeners, as `scripts/dev-services.sh up` starts them, and the
/// CA and SCRAM password it generated for them.
pub struct SecureKafka {
    /// SASL_SSL, SCRAM-SHA-512 (`RECON_TEST_SASL_SSL_BROKERS`, default 127.0.0.1:9094);
    /// its certificate names `localhost` and `127.0.0.1`.
    pub sasl_ssl_brokers: String,
    /// SSL without SASL (`RECON_TEST_SSL_BROKERS`, default 127.0.0.1:9095); its
    /// certificate names the address 127.0.0.1 only, not `localhost`.
    pub ssl_brokers: String,
    /// The CA that signed both certificates.
    pub ca_file: PathBuf,
    pub username: String,
    pub password: String,
}

/// The secure listeners. Their files are in `RECON_TEST_KAFKA_SECURITY_DIR`, by default
/// where the script writes them: `$RECON_SERVICES_DIR/kafka/security` (the services
/// directory defaulting as in the script). Missing files fail the test, as a missing
/// broker does: a suite that skipped them would pass without testing TLS at all.
pub fn secure_kafka() -> SecureKafka {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let dir = var("RECON_TEST_KAFKA_SECURITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let services = var("RECON_SERVICES_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    var("XDG_STATE_HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| {
                            PathBuf::from(var("HOME").unwrap_or_default()).join(".local/state")
                        })
                        .join("recon-worker")
                });
            services.join("kafka/security")
        });
    let read = |path: &Path| {
        std::fs::read_to_string(path).unwrap_or_else(|error| {
            panic!(
                "{}: {error}; the broker's secure listeners and their files come from \
                 `scripts/dev-services.sh up` (RECON_TEST_KAFKA_SECURITY_DIR names another \
                 services set's)",
                path.display()
            )
        })
    };
    let ca_file = dir.join("ca.pem");
    read(&ca_file);
    let username = "recon".to_owned();
    let password = read(&dir.join(format!("{username}.password")))
        .trim()
        .to_owned();
    assert!(
        !password.is_empty(),
        "empty password file in {}",
        dir.display()
    );
    SecureKafka {
        sasl_ssl_brokers: var("RECON_TEST_SASL_SSL_BROKERS")
            .unwrap_or_else(|| "127.0.0.1:9094".into()),
        ssl_brokers: var("RECON_TEST_SSL_BROKERS").unwrap_or_else(|| "127.0.0.1:9095".into()),
        ca_file,
        username,
        password,
    }
}

pub fn unique(prefix: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!("{prefix}-{suffix:016x}")
}

/// One test's world: its topics, group and database.
pub struct World {
    pub pool: PgPool,
    pub database_url: String,
    pub payments: String,
    pub settlements: String,
    /// The payouts topic (contract §7), when the test reads one.
    pub payouts: Option<String>,
    pub group: String,
    pub partitions: i32,
    pub log_dir: PathBuf,
}

impl World {
    pub async fn new(pool: PgPool, partitions: i32) -> Self {
        Self::with_partitions(pool, partitions, partitions).await
    }

    pub async fn with_partitions(pool: PgPool, payments: i32, settlements: i32) -> Self {
        let options = pool.connect_options();
        let database_url = format!(
            "postgres://{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options
                .get_database()
                .expect("sqlx::test names its database")
        );
        let world = Self {
            pool,
            database_url,
            payments: unique("payments"),
            settlements: unique("settlements"),
            payouts: None,
            group: unique("group"),
            partitions: payments,
            log_dir: std::env::temp_dir().join(unique("recon-test")),
        };
        std::fs::create_dir_all(&world.log_dir).expect("log dir");
        recon_tools::admin::create_topics(&brokers(), &[&world.payments], payments)
            .await
            .expect("create payments topic");
        recon_tools::admin::create_topics(&brokers(), &[&world.settlements], settlements)
            .await
            .expect("create settlements topic");
        world
    }

    /// A world with a payouts topic too, co-partitioned with the other two.
    pub async fn with_payouts(pool: PgPool, partitions: i32) -> Self {
        let mut world = Self::new(pool, partitions).await;
        let payouts = unique("payouts");
        recon_tools::admin::create_topics(&brokers(), &[&payouts], partitions)
            .await
            .expect("create payouts topic");
        world.payouts = Some(payouts);
        world
    }

    pub fn plan(&self, scenarios: usize, seed: u64, mix: Mix) -> Plan {
        Plan {
            seed,
            scenarios,
            mix,
            base_time: chrono::Utc::now().timestamp_micros(),
            deadline: 72 * 3600 * SEC,
            orphan_timeout: 72 * 3600 * SEC,
            max_message_bytes: 64 * 1024,
            id_prefix: format!("s{seed}-"),
            payout_every_line: 0,
        }
    }

    pub async fn produce(&self, records: &[Record]) {
        let producer = recon_tools::admin::producer(&brokers()).expect("producer");
        match &self.payouts {
            None => recon_tools::admin::produce_all(
                &producer,
                records,
                [&self.payments, &self.settlements],
            )
            .await
            .expect("produce"),
            Some(payouts) => recon_tools::admin::produce_all(
                &producer,
                records,
                [&self.payments, &self.settlements, payouts],
            )
            .await
            .expect("produce"),
        }
    }

    /// The configuration a worker gets against this world: test-friendly settings
    /// that `extra` may override (a later variable wins).
    pub fn worker_env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("RECON_KAFKA_BROKERS", brokers()),
            ("RECON_GROUP_ID", self.group.clone()),
            ("RECON_PAYMENTS_TOPIC", self.payments.clone()),
            ("RECON_SETTLEMENTS_TOPIC", self.settlements.clone()),
            ("RECON_IDLE_TIMEOUT", "2s".into()),
            ("RECON_METRICS_ADDR", "127.0.0.1:0".into()),
        ];
        if let Some(payouts) = &self.payouts {
            env.push(("RECON_PAYOUTS_TOPIC", payouts.clone()));
        }
        if consumer_protocol() {
            // The whole suite can run under the next-generation group protocol, whose
            // sessions are the broker's (10 s in scripts/dev-services.sh).
            env.push(("RECON_GROUP_PROTOCOL", "consumer".into()));
        } else {
            // Short sessions: a killed worker's pairs move to the others within the
            // tests' patience (the broker allows sessions down to 1 s).
            env.push(("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "6000".into()));
            env.push(("RECON_KAFKA_PROP_HEARTBEAT_INTERVAL_MS", "1000".into()));
        }
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Starts `recon-worker run` against this world, with [`World::worker_env`].
    pub fn spawn_worker(&self, name: &str, extra: &[(&str, &str)]) -> Worker {
        self.spawn_worker_to(name, extra, Stdio::null())
    }

    fn spawn_worker_to(&self, name: &str, extra: &[(&str, &str)], stdout: Stdio) -> Worker {
        let log = self.log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_recon-worker"));
        command
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(self.worker_env(extra));
        let child = command
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .expect("spawn recon-worker");
        Worker { child, log }
    }

    /// Runs `recon-worker run` against this world until it exits by itself (failing the
    /// test after `within`). Both streams go to files, so no flood of log lines can
    /// block the worker on a full pipe.
    pub fn run_to_exit(&self, name: &str, extra: &[(&str, &str)], within: Duration) -> Exited {
        let stdout_path = self.log_dir.join(format!("{name}.stdout"));
        let stdout = std::fs::File::create(&stdout_path).expect("stdout file");
        let mut worker = self.spawn_worker_to(name, extra, stdout.into());
        let status = worker.wait(within);
        Exited {
            status,
            at: chrono::Utc::now(),
            stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
            stderr: worker.log_text(),
        }
    }

    pub async fn outcomes(
        &self,
    ) -> BTreeMap<(EventKind, String), (String, Outcome, Option<String>)> {
        // Polling queries are not prepared once and cached: they start while the
        // worker migrates, and a statement prepared against an earlier migration's
        // tables fails on that connection ever after ("cached plan must not change
        // result type"), which a poll reads as "not there yet".
        sqlx::query("SELECT event_kind, event_id, payment_id, outcome, counterpart_event_id FROM recon_outcomes")
            .persistent(false)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|row| {
                let kind: String = row.get(0);
                let outcome: String = row.get(3);
                (
                    (
                        EventKind::parse(&kind).expect("known event kind"),
                        row.get(1),
                    ),
                    (row.get(2), outcome.parse().expect("known outcome"), row.get(4)),
                )
            })
            .collect()
    }

    /// Every row of `recon_discrepancies` about payments (payout discrepancies, of
    /// contract §7, are compared with the truth's payouts: [`payout_discrepancies`]).
    pub async fn discrepancies(&self) -> Vec<DiscrepancyRow> {
        sqlx::query(
            "SELECT kind, payment_id, payment_event_id, settlement_event_id, resolved_at IS NOT NULL, resolution
             FROM recon_discrepancies WHERE payout_id IS NULL ORDER BY id",
        )
        .persistent(false)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|row| DiscrepancyRow {
            kind: row.get(0),
            payment_id: row.get(1),
            payment_event_id: row.get(2),
            settlement_event_id: row.get(3),
            resolved: row.get(4),
            resolution: row.get(5),
        })
        .collect()
    }

    /// Waits until `recon_discrepancies` holds exactly the truth's discrepancies (see
    /// [`discrepancy_differences`]), or fails with the differences.
    pub async fn await_discrepancies(&self, truth: &GroundTruth, within: Duration) {
        let started = Instant::now();
        loop {
            let rows = self.discrepancies().await;
            let differences = discrepancy_differences(truth, &rows);
            if differences.is_empty() {
                return;
            }
            if started.elapsed() > within {
                panic!(
                    "recon_discrepancies did not reach the ground truth within {within:?}: \
                     {} rows, {} expected; {} differences, the first: {:#?}",
                    rows.len(),
                    truth.discrepancies.len(),
                    differences.len(),
                    &differences[..differences.len().min(20)]
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// (topic, reason_class) of every rejected row, sorted.
    pub async fn rejected(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> =
            sqlx::query("SELECT topic, reason_class FROM rejected_events")
                .persistent(false)
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
        rows.sort();
        rows
    }

    pub fn expected_rejected(&self, truth: &GroundTruth) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = truth
            .rejected
            .iter()
            .map(|(input, class)| {
                let topic = match input {
                    Input::Payments => self.payments.clone(),
                    Input::Settlements => self.settlements.clone(),
                };
                (topic, class.to_string())
            })
            .collect();
        rows.sort();
        rows
    }

    /// Waits until the tables hold exactly the ground truth (or fails with a diff).
    pub async fn await_truth(&self, truth: &GroundTruth, within: Duration) {
        let expected_rejected = self.expected_rejected(truth);
        let started = Instant::now();
        loop {
            let outcomes = self.outcomes().await;
            let rejected = self.rejected().await;
            if outcomes == truth.outcomes && rejected == expected_rejected {
                return;
            }
            if started.elapsed() > within {
                let missing: Vec<_> = truth
                    .outcomes
                    .iter()
                    .filter(|(k, v)| outcomes.get(*k) != Some(v))
                    .take(10)
                    .collect();
                let extra: Vec<_> = outcomes
                    .iter()
                    .filter(|(k, _)| !truth.outcomes.contains_key(*k))
                    .take(10)
                    .collect();
                panic!(
                    "tables did not reach the ground truth within {within:?}: {} of {} outcomes right; \
                     first wrong or missing: {missing:#?}; unexpected: {extra:#?}; rejected {} of {} (got {:?})",
                    truth.outcomes.iter().filter(|(k, v)| outcomes.get(*k) == Some(v)).count(),
                    truth.outcomes.len(),
                    rejected.len(),
                    expected_rejected.len(),
                    rejected
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .persistent(false)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }
}

pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

/// A worker that exited: how, when (seen by the test), and what it printed.
pub struct Exited {
    pub status: ExitStatus,
    pub at: chrono::DateTime<chrono::Utc>,
    pub stdout: String,
    pub stderr: String,
}

impl Worker {
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, and the worker exits 0 in time.
    pub fn stop_cleanly(&mut self) {
        self.signal("TERM");
        let status = self.wait(Duration::from_secs(35));
        assert!(
            status.success(),
            "SIGTERM exits 0: {status:?}\n{}",
            self.log_text()
        );
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > within {
                let _ = self.child.kill();
                panic!(
                    "worker did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The metrics port the worker bound (it logs the address it serves on).
    pub fn metrics_addr(&self, within: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(addr) = self.log_text().lines().find_map(|line| {
                line.split("serving /metrics").nth(1)?;
                line.split("addr=")
                    .nth(1)
                    .map(|a| a.split_whitespace().next().unwrap_or("").to_owned())
            }) {
                return addr;
            }
            assert!(
                started.elapsed() < within,
                "worker never served metrics:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every scenario and every poison class, small.
pub fn full_mix() -> Mix {
    Mix {
        matched: 10,
        poison_every: 3,
        ..Mix::uniform(3)
    }
}

/// A row of `recon_discrepancies`, as the contract's columns say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscrepancyRow {
    pub kind: String,
    pub payment_id: Option<String>,
    pub payment_event_id: Option<String>,
    pub settlement_event_id: Option<String>,
    pub resolved: bool,
    pub resolution: Option<String>,
}

/// What differs between `rows` (of `recon_discrepancies`) and the truth's
/// discrepancies: each expected one must be there once, open or resolved as the truth
/// says (with its resolution), and nothing else may be — except a `missing_settlement`
/// or `orphan_settlement` that fired because of the order events were read in (its
/// counterpart came after the watermark passed the deadline) and was resolved by it:
/// contract §2 keeps it as history, resolved with the final outcome of its subject.
pub fn discrepancy_differences(truth: &GroundTruth, rows: &[DiscrepancyRow]) -> Vec<String> {
    let kinds: BTreeMap<&str, DiscrepancyKind> =
        DiscrepancyKind::all().map(|k| (k.as_str(), k)).collect();
    let mut differences = Vec::new();
    let mut seen: BTreeMap<DiscrepancyKey, usize> = BTreeMap::new();
    for row in rows {
        let Some(&kind) = kinds.get(row.kind.as_str()) else {
            differences.push(format!("unknown kind: {row:?}"));
            continue;
        };
        if row.resolved != row.resolution.is_some() {
            differences.push(format!("resolved_at and resolution disagree: {row:?}"));
        }
        let key: DiscrepancyKey = (
            kind,
            row.payment_event_id.clone(),
            row.settlement_event_id.clone(),
        );
        *seen.entry(key.clone()).or_default() += 1;
        match truth.discrepancies.get(&key) {
            Some((payment_id, resolution)) => {
                if row.payment_id.as_deref() != Some(payment_id.as_str())
                    || row.resolution != *resolution
                {
                    differences.push(format!(
                        "{row:?}: expected payment {payment_id}, {}",
                        resolution
                            .as_deref()
                            .map_or("open".to_owned(), |r| format!("resolved {r}"))
                    ));
                }
            }
            None if resolved_in_passing(truth, kind, row) => {}
            None => differences.push(format!("unexpected: {row:?}")),
        }
    }
    for (key, (payment_id, resolution)) in &truth.discrepancies {
        match seen.get(key) {
            None => differences.push(format!(
                "missing: {key:?} of payment {payment_id} ({})",
                resolution
                    .as_deref()
                    .map_or("open".to_owned(), |r| format!("resolved {r}"))
            )),
            Some(1) => {}
            Some(n) => differences.push(format!("{n} rows for {key:?}")),
        }
    }
    differences
}

/// A deadline discrepancy on an event whose final outcome is its resolution.
fn resolved_in_passing(truth: &GroundTruth, kind: DiscrepancyKind, row: &DiscrepancyRow) -> bool {
    let subject = match kind {
        DiscrepancyKind::Outcome(Outcome::MissingSettlement) => row
            .payment_event_id
            .as_ref()
            .filter(|_| row.settlement_event_id.is_none())
            .and_then(|id| {
                [EventKind::Payment, EventKind::Refund]
                    .into_iter()
                    .find_map(|k| truth.outcomes.get(&(k, id.clone())))
            }),
        DiscrepancyKind::Outcome(Outcome::OrphanSettlement) => row
            .settlement_event_id
            .as_ref()
            .filter(|_| row.payment_event_id.is_none())
            .and_then(|id| truth.outcomes.get(&(EventKind::Settlement, id.clone()))),
        _ => None,
    };
    subject.is_some_and(|(payment_id, outcome, _)| {
        row.payment_id.as_deref() == Some(payment_id.as_str())
            && row.resolution.as_deref() == Some(outcome.as_str())
    })
}

pub fn generate(plan: &Plan) -> (Vec<Record>, GroundTruth) {
    loadgen::generate(plan)
}

/// Scrapes a metric's value (sum over all label sets) from /metrics.
pub async fn scrape(addr: &str, metric: &str) -> f64 {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    body.lines()
        .filter(|l| {
            l.starts_with(metric)
                && (l[metric.len()..].starts_with('{') || l[metric.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes the value of the series of `metric` whose labels include all of `labels`.
pub async fn scrape_series(addr: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .filter(|l| {
            l.starts_with(&format!("{metric}{{")) && labels.iter().all(|label| l.contains(label))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// An upstream transactional producer (`transactional.id` set, hence idempotent with
/// `acks=all`), as a payments service that writes its events atomically would be.
pub async fn transactional_producer(transactional_id: &str) -> rdkafka::producer::FutureProducer {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "60000")
        .set("message.timeout.ms", "60000")
        .set("linger.ms", "5")
        .create()
        .expect("transactional producer");
    // Blocks until the transaction coordinator answers (it also fences an earlier
    // producer with this id and aborts what that one left open).
    let init = producer.clone();
    tokio::task::spawn_blocking(move || {
        rdkafka::producer::Producer::init_transactions(&init, Duration::from_secs(60))
    })
    .await
    .expect("init task")
    .expect("init_transactions");
    producer
}

/// Writes `records` in one transaction and commits it (`commit`) or aborts it. An
/// abortable failure (a broker restart mid-transaction) aborts and writes the whole
/// transaction again, so a committed one is in the log exactly once; a retriable
/// failure of the commit or abort itself is retried. Err: a fatal error, after which
/// the producer must be replaced (a new one with the same id fences this one).
pub async fn produce_in_transaction(
    producer: &rdkafka::producer::FutureProducer,
    records: &[Record],
    topics: [&str; 2],
    commit: bool,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::error::KafkaError;
    use rdkafka::producer::FutureRecord;
    let requires_abort =
        |e: &KafkaError| matches!(e, KafkaError::Transaction(t) if t.txn_requires_abort());
    let retriable = |e: &KafkaError| matches!(e, KafkaError::Transaction(t) if t.is_retriable());
    'transaction: loop {
        rdkafka::producer::Producer::begin_transaction(producer)?;
        let mut deliveries = Vec::with_capacity(records.len());
        let mut failed = false;
        for record in records {
            let mut message: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topics[record.input().expect("a two-topic stream").index()]);
            if let Some(key) = &record.key {
                message = message.key(key.as_slice());
            }
            if let Some(value) = &record.value {
                message = message.payload(value.as_slice());
            }
            match producer.send_result(message) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) if requires_abort(&e) => {
                    failed = true;
                    break;
                }
                Err((e, _)) => return Err(e),
            }
        }
        for delivery in deliveries {
            failed |= !matches!(delivery.await, Ok(Ok(_)));
        }
        let finish = commit && !failed;
        loop {
            match end_transaction(producer, finish).await {
                Ok(()) if commit && !finish => continue 'transaction,
                Ok(()) => return Ok(()),
                Err(e) if retriable(&e) => tokio::time::sleep(Duration::from_millis(500)).await,
                Err(e) if requires_abort(&e) => {
                    end_transaction(producer, false).await?;
                    if commit {
                        continue 'transaction;
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Commits (or aborts) the open transaction off the async threads: both calls block
/// until the broker answers, which takes seconds while it restarts.
async fn end_transaction(
    producer: &rdkafka::producer::FutureProducer,
    commit: bool,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::producer::Producer;
    let producer = producer.clone();
    let timeout = Duration::from_secs(60);
    tokio::task::spawn_blocking(move || {
        if commit {
            producer.commit_transaction(timeout)
        } else {
            producer.abort_transaction(timeout)
        }
    })
    .await
    .expect("transaction task")
}

// ---------------------------------------------------------------------------------
// Payouts (contract §7)

/// What `recon_payouts` says of one payout: (status, currency, expected net, lines
/// net, expected line count, line count).
pub type PayoutView = (
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
);

pub async fn payouts_view(world: &World) -> BTreeMap<String, PayoutView> {
    sqlx::query(
        "SELECT payout_id, status, currency, expected_net_minor, lines_net_minor::bigint,
                expected_line_count, line_count
         FROM recon_payouts",
    )
    .persistent(false)
    .fetch_all(&world.pool)
    .await
    .unwrap_or_default()
    .into_iter()
    .map(|row| {
        (
            row.get(0),
            (
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
                row.get(6),
            ),
        )
    })
    .collect()
}

/// The view the truth says, once every deadline has passed.
pub fn expected_view(truth: &GroundTruth) -> BTreeMap<String, PayoutView> {
    truth
        .payouts
        .iter()
        .map(|(id, payout)| {
            (
                id.clone(),
                (
                    payout.status.as_str().to_owned(),
                    payout.currency.clone(),
                    payout.expected_net_minor,
                    payout.lines_net_minor,
                    payout.expected_line_count,
                    payout.line_count,
                ),
            )
        })
        .collect()
}

/// The view the truth says while no announced payout's deadline has passed: balanced
/// payouts as such, announced unbalanced ones `pending`, the others `unannounced` (an
/// unannounced payout's status says so whether it is due or not).
pub fn expected_view_before_deadlines(truth: &GroundTruth) -> BTreeMap<String, PayoutView> {
    let mut view = expected_view(truth);
    for (id, row) in view.iter_mut() {
        if row.0 != "balanced" && truth.payouts[id].expected_net_minor.is_some() {
            row.0 = "pending".to_owned();
        }
    }
    view
}

/// Every payout discrepancy ever written: (payout, kind, open, resolution), sorted.
pub async fn payout_discrepancies(world: &World) -> Vec<(String, String, bool, Option<String>)> {
    let mut rows: Vec<(String, String, bool, Option<String>)> = sqlx::query(
        "SELECT payout_id, kind, resolved_at IS NULL, resolution
         FROM recon_discrepancies WHERE payout_id IS NOT NULL",
    )
    .persistent(false)
    .fetch_all(&world.pool)
    .await
    .unwrap_or_default()
    .into_iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect();
    rows.sort();
    rows
}

/// Contract §8: the action log refuses UPDATE, DELETE and TRUNCATE to whoever `pool`
/// connects as, its owner included (triggers, not privileges), saying why.
pub async fn assert_action_log_refuses_changes(pool: &PgPool) {
    for statement in [
        "UPDATE recon_discrepancy_actions SET note = 'rewritten'",
        "DELETE FROM recon_discrepancy_actions",
        "TRUNCATE recon_discrepancy_actions",
    ] {
        match sqlx::query(statement).execute(pool).await {
            Err(sqlx::Error::Database(db)) => {
                assert_eq!(db.code().as_deref(), Some("42501"), "{statement}: {db}");
                assert!(db.message().contains("append-only"), "{statement}: {db}");
            }
            other => panic!("{statement} was not refused: {other:?}"),
        }
    }
}
