//! `recon-worker run` and `migrate`: wiring and the shutdown protocol.
//!
//! Start: metrics server, the schema (migrated by a role with DDL rights, only checked
//! by one without: [`prepare_schema`]; retried while the database is unreachable),
//! consumer (co-partitioning checked before joining the group), pipeline, and with
//! payouts configured the payout evaluator (stopped with the pipeline). Shutdown
//! when the future [`run`] is given resolves — SIGTERM/SIGINT in the binary
//! ([`shutdown_signal`]), a test's trigger in process: the poll thread stops polling
//! and hands the pipeline a `Stop`; the pipeline finishes and commits the batch in
//! hand; then the consumer closes, leaving the group so it rebalances at once. The
//! whole sequence is bounded by `RECON_SHUTDOWN_TIMEOUT`. Nothing here touches the
//! process itself (signals are the caller's), so a test can run the worker in its own
//! process, stop it, and run another.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;

use crate::config::{Config, MigrateMode};
use crate::consumer::{ConsumerHandle, Delivery, PollThread};
use crate::pipeline::Pipeline;
use crate::retry::{Backoff, Operation};
use crate::store::{MigrationStatus, PayoutRules, Store, StoreError};
use crate::telemetry::{self, Health};

/// Applies migrations, retrying for up to `patience` while the database is unreachable.
pub async fn migrate(store: &Store, health: &Health, patience: Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut backoff = Backoff::new(Operation::Migrate, health);
    loop {
        match store.migrate().await {
            Ok(()) => {
                backoff.recovered();
                return Ok(());
            }
            // A migration cut short (its transaction rolled back) is applied again.
            Err(StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)))
            | Err(StoreError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(e, _)))
            | Err(StoreError::Transient(e))
                if is_unreachable(&e) && started.elapsed() < patience =>
            {
                backoff.wait(&e).await;
            }
            Err(error) if lacks_privilege(&error) => {
                return Err(error).context(
                    "applying database migrations (they need DDL rights: \
                     run `recon-worker migrate` as the owner role)",
                );
            }
            Err(error) => return Err(error).context("applying database migrations"),
        }
    }
}

/// A migration refused for want of a privilege (SQLSTATE 42501): run as the runtime role.
fn lacks_privilege(error: &StoreError) -> bool {
    let (StoreError::Migrate(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db)))
    | StoreError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(
        sqlx::Error::Database(db),
        _,
    ))) = error
    else {
        return false;
    };
    db.code().is_some_and(|code| code == "42501")
}

/// Down, starting, read-only during a failover, locked by another worker's
/// migration: the store's transient errors. Anything else (a role without rights, a
/// broken migration, a certificate refused) fails at once.
fn is_unreachable(error: &sqlx::Error) -> bool {
    crate::store::is_transient(error)
}

/// Runs `attempt` until it succeeds, fails with a permanent error, or has failed
/// transiently for `patience`.
async fn retry_for<T, Fut>(
    patience: Duration,
    health: &Health,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, StoreError>
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = std::time::Instant::now();
    let mut backoff = Backoff::new(Operation::Migrate, health);
    loop {
        match attempt().await {
            Ok(value) => {
                backoff.recovered();
                return Ok(value);
            }
            Err(error) if error.is_transient() && started.elapsed() < patience => {
                backoff.wait(&error).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// What [`prepare_schema`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// The pending migrations were applied (a role with DDL rights).
    Migrated,
    /// Nothing was applied: the schema was checked to be current.
    Checked,
}

/// The schema before `run` starts (contract §4): a role that may create objects in its
/// schema (the owner role) applies the pending migrations, unless `RECON_MIGRATE=never`;
/// any other role (the runtime role: rows only, no DDL) checks that none is pending and
/// refuses to start otherwise, naming them. `database` is the redacted URL, for
/// errors.
pub async fn prepare_schema(
    store: &Store,
    mode: MigrateMode,
    database: &str,
    health: &Health,
    patience: Duration,
) -> anyhow::Result<Schema> {
    let may_migrate = retry_for(patience, health, || store.may_migrate())
        .await
        .with_context(|| {
            format!("connecting to PostgreSQL ({database}) to apply or check the migrations")
        })?;
    if may_migrate && mode == MigrateMode::Auto {
        migrate(store, health, patience).await?;
        return Ok(Schema::Migrated);
    }
    let status = retry_for(patience, health, || store.migration_status())
        .await
        .context("checking for pending migrations")?;
    if status.is_current() {
        return Ok(Schema::Checked);
    }
    let (role, schema) = store
        .role_and_schema()
        .await
        .context("reading the role's name")?;
    let mut message = format!("refusing to start: {}", describe(&status));
    if !status.pending.is_empty() || !status.failed.is_empty() {
        let why = match (mode, schema) {
            (MigrateMode::Never, _) => "RECON_MIGRATE=never".to_owned(),
            (MigrateMode::Auto, Some(schema)) => {
                format!("role {role} has no CREATE privilege on schema {schema}")
            }
            (MigrateMode::Auto, None) => {
                format!("role {role} has no schema to create in: none of its search_path exists")
            }
        };
        message.push_str(&format!(
            "; this worker does not migrate ({why}): run `recon-worker migrate` as the owner role first"
        ));
    }
    bail!(message);
}

/// The differences of a schema from the one this binary expects, for the refusal.
fn describe(status: &MigrationStatus) -> String {
    let names = |names: &[crate::store::MigrationName]| {
        names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let versions = |versions: &[i64]| {
        versions
            .iter()
            .map(|v| format!("{v:04}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Vec::new();
    if !status.pending.is_empty() {
        parts.push(format!("pending migrations {}", names(&status.pending)));
    }
    if !status.failed.is_empty() {
        parts.push(format!(
            "migrations recorded as failed {}",
            versions(&status.failed)
        ));
    }
    if !status.modified.is_empty() {
        parts.push(format!(
            "migrations applied from files other than this binary's {}",
            names(&status.modified)
        ));
    }
    if !status.unknown.is_empty() {
        parts.push(format!(
            "migrations applied that this binary does not know {} (a newer recon-worker migrated this database)",
            versions(&status.unknown)
        ));
    }
    parts.join("; ")
}

fn log_schema(schema: Schema, config: &Config) {
    match schema {
        Schema::Migrated => {
            tracing::info!(database = %config.database_display, "migrations applied");
        }
        Schema::Checked => tracing::info!(
            database = %config.database_display,
            "no migration pending (not migrating: the role has no DDL rights or RECON_MIGRATE=never)"
        ),
    }
}

/// Starts the poll thread (co-partitioning checked, group joined); returns it, the
/// pipeline's handle on it and the channel it delivers on.
async fn start_consumer(
    config: &Config,
    health: &Arc<Health>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(PollThread, ConsumerHandle, mpsc::Receiver<Delivery>)> {
    // A fifth of a batch between the poll thread and the pipeline: enough to hand
    // messages over while the pipeline turns; librdkafka's bounded prefetch is the
    // read-ahead, as raw bytes, which take less memory than decoded events. With a
    // whole batch here a 5M-message drain peaked at 50-51 MB, with a fifth at 47 MB,
    // in the same time.
    let (deliveries, receiver) = mpsc::channel((config.batch_max_messages / 5).max(256));
    let (config, stop, health) = (config.clone(), Arc::clone(stop), Arc::clone(health));
    let (poll_thread, consumer) = tokio::task::spawn_blocking(move || {
        crate::consumer::start(&config, deliveries, stop, health)
    })
    .await
    .context("consumer start task")?
    .context("starting the Kafka consumer")?;
    Ok((poll_thread, consumer, receiver))
}

/// Runs the worker until `shutdown` resolves (or the pipeline fails), then shuts down
/// gracefully: returns Ok once everything consumed is committed and the consumer has
/// left its group.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "starting recon-worker");
    let prometheus = telemetry::init_metrics().context("installing the metrics recorder")?;
    telemetry::metrics::init_series();
    crate::retry::init_series();
    let health = Arc::new(Health::default());
    // Dropped on return, which stops the server: a worker run in process frees its port.
    let _server = telemetry::serve(config.metrics_addr, prometheus, health.clone())
        .await
        .with_context(|| format!("binding RECON_METRICS_ADDR={}", config.metrics_addr))?;

    let store = Store::connect_lazy(
        config.database.clone(),
        &config.payments_topic,
        &config.settlements_topic,
    )
    .with_payouts_topic(config.payouts.as_ref().map(|p| p.topic.as_str()));
    let mut signal = std::pin::pin!(shutdown);
    let schema = prepare_schema(
        &store,
        config.migrate,
        &config.database_display,
        &health,
        Duration::from_secs(u64::MAX / 4),
    );
    let schema = tokio::select! {
        result = schema => result?,
        _ = &mut signal => { tracing::info!("shutdown before start; exiting"); return Ok(()); }
    };
    health.set_database_ok(true);
    log_schema(schema, &config);

    let stop = Arc::new(AtomicBool::new(false));
    let (poll_thread, consumer, receiver) = start_consumer(&config, &health, &stop).await?;
    let failed = poll_thread.failed.clone();

    // Dropped (or sent on) when the worker stops, which ends the evaluator.
    let (stop_evaluator, evaluator_stopped) = tokio::sync::oneshot::channel::<()>();
    let evaluator = config.payouts.as_ref().map(|payouts| {
        let rules = PayoutRules::new(
            i32::try_from(poll_thread.partitions).unwrap_or(i32::MAX),
            payouts.grace,
            config.matching.orphan_timeout,
        );
        tokio::spawn(crate::payouts::run_evaluator(
            store.clone(),
            rules,
            crate::payouts::EVALUATE_EVERY,
            async move {
                let _ = evaluator_stopped.await;
            },
        ))
    });

    let pipeline = Pipeline::new(&config, store, Some(consumer), health);
    let mut pipeline_task = tokio::spawn(pipeline.run(receiver));
    let outcome = tokio::select! {
        result = &mut pipeline_task => Some(result),
        _ = &mut signal => None,
    };
    let result = match outcome {
        Some(result) => {
            stop.store(true, Ordering::SeqCst);
            result
        }
        None => {
            tracing::info!(bound = ?config.shutdown_timeout, "shutting down: finishing the batch in hand");
            stop.store(true, Ordering::SeqCst);
            match tokio::time::timeout(config.shutdown_timeout, &mut pipeline_task).await {
                Ok(result) => result,
                Err(_) => {
                    pipeline_task.abort();
                    bail!(
                        "shutdown did not finish within RECON_SHUTDOWN_TIMEOUT={:?}; \
                         uncommitted work will be redone from the stored offsets",
                        config.shutdown_timeout
                    );
                }
            }
        }
    };
    drop(stop_evaluator);
    if let Some(evaluator) = evaluator {
        let _ = evaluator.await;
    }
    let joined = tokio::task::spawn_blocking(move || poll_thread.join());
    if tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        tracing::warn!("consumer did not close within 10s");
    }
    result.context("pipeline task")?.context("pipeline")?;
    if failed.load(Ordering::SeqCst) {
        bail!("the consumer could not take its partition assignment");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM: what the binary hands [`run`].
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
