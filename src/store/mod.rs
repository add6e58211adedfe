//! PostgreSQL: the durable state. Migrations, partition-pair ownership (epochs and
//! stored offsets), window lookups, deadline sweeps and the checkpoint transaction.
//!
//! Every statement that touches many rows binds arrays (`UNNEST`, `= ANY`): one round
//! trip per kind of change per batch, never one per event. The checkpoint updates the
//! partition-pair rows first and only where the epoch still matches, so a worker that
//! lost its partitions (a zombie) is fenced before it writes anything else, and the
//! row locks it takes serialise it against the new owner's epoch bump.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::Arguments;
use sqlx::{PgPool, Row};

use crate::engine::{DiscrepancyChange, Outcome, PairChanges, RowWrite, StoredEvent, SweepRequest};
use crate::event::{Input, Micros};
use crate::money::Currency;
use crate::pair::{PairPosition, PerInput};
use crate::rejection::RejectedMessage;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A store failure, saying whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connection lost, server restarting or read-only after a failover, pool
    /// exhausted, serialisation conflict, statement or lock timeout: retry with backoff.
    #[error("transient database error: {0}")]
    Transient(#[source] sqlx::Error),
    /// Schema missing, authentication, constraint violations: retrying will not help.
    #[error("database error: {0}")]
    Permanent(#[source] sqlx::Error),
    /// Another worker owns these partition pairs now (their epoch moved on).
    #[error("fenced: partition pairs {0:?} now belong to another worker")]
    Fenced(Vec<i32>),
    /// These partition pairs would insert event ids that are already stored (under
    /// another payment id, or by another pair of the same batch): their state must be
    /// rebuilt from their stored offsets with every event id checked against storage.
    #[error("partition pairs {0:?} insert event ids that are already stored")]
    EventIdsClash(Vec<i32>),
    /// PostgreSQL refused values of these messages (a data error, SQLSTATE class 22:
    /// a character the database encoding cannot hold, a time out of its range...).
    /// Nothing of their pairs was written: those pairs must be re-read from their
    /// stored offsets with these messages rejected. Not retryable as it stands.
    #[error("PostgreSQL refused values of messages {0:?}")]
    DataErrors(Vec<RefusedMessage>),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if needs_new_connections(&error) {
            replace_connections();
        }
        if is_transient(&error) {
            StoreError::Transient(error)
        } else {
            StoreError::Permanent(error)
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        if let sqlx::migrate::MigrateError::Execute(inner)
        | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) = &error
        {
            if needs_new_connections(inner) {
                replace_connections();
            }
        }
        StoreError::Migrate(error)
    }
}

impl crate::retry::Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

/// Whether the same operation may succeed if tried again later.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| is_transient_sqlstate(&code, db.message())),
        _ => false,
    }
}

/// The SQLSTATEs after which the same statement can succeed later: none says anything
/// about the data, and each ends by itself (a failover completes, a lock is released,
/// a migration finishes), so exiting would only hand the partitions to a worker that
/// meets the same condition.
pub fn is_transient_sqlstate(code: &str, message: &str) -> bool {
    // 08: connection exception; 53: out of resources.
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            // Serialisation failure, deadlock.
            "40001" | "40P01"
            // Admin shutdown (pg_terminate_backend, a failover), crash shutdown,
            // cannot connect now (starting up).
            | "57P01" | "57P02" | "57P03"
            // statement_timeout (or a cancel), lock_timeout.
            | "57014" | "55P03"
            // A write on a server that became a standby, or a database set
            // read-only for maintenance.
            | "25006"
        )
        // feature_not_supported is a programming error, except this one: a statement
        // prepared before a migration changed the table's columns. Only a new
        // connection (a fresh statement cache) gets past it.
        || (code == "0A000" && message.contains("cached plan must not change result type"))
}

/// Errors after which the pool's connections must not be reused: they are attached to
/// a server that no longer accepts writes (after a failover every pooled connection
/// points at the old primary, and retrying on them would fail for ever), or hold
/// prepared statements the server refuses.
fn needs_new_connections(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code().is_some_and(|code| {
        code == "25006"
            || (code == "0A000"
                && db
                    .message()
                    .contains("cached plan must not change result type"))
    })
}

/// Time base of [`REPLACE_BEFORE_NANOS`].
static CLOCK: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Pooled connections opened before this many nanoseconds after [`CLOCK`] are closed
/// instead of handed out (0: none). Process-wide because errors become [`StoreError`]
/// where no pool is at hand (`?`); a pool that did not see the error only reconnects
/// once, which costs a connection set-up.
static REPLACE_BEFORE_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn clock_nanos() -> u64 {
    let elapsed = CLOCK.get_or_init(std::time::Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

fn replace_connections() {
    tracing::warn!("closing pooled database connections: they reach a read-only server or hold stale prepared statements");
    REPLACE_BEFORE_NANOS.fetch_max(clock_nanos().max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Whether a pooled connection of this age may be reused.
fn connection_is_current(age: Duration) -> bool {
    let replace_before = REPLACE_BEFORE_NANOS.load(std::sync::atomic::Ordering::Relaxed);
    if replace_before == 0 {
        return true;
    }
    let age = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
    clock_nanos().saturating_sub(age) > replace_before
}

/// A message whose values PostgreSQL refused, with PostgreSQL's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedMessage {
    pub pair: i32,
    pub input: Input,
    pub offset: i64,
    pub reason: String,
}

/// What one partition pair's part of a checkpoint writes.
#[derive(Debug, Clone)]
pub struct PairCheckpoint {
    pub pair: i32,
    pub epoch: i64,
    /// Next offset per input after this batch; `None` when the batch read nothing there.
    pub next_offsets: PerInput<Option<i64>>,
    pub changes: PairChanges,
    pub rejected: Vec<RejectedMessage>,
}

/// A stored pending item found due by a sweep.
#[derive(Debug, Clone)]
pub struct DueKeys {
    pub payment_ids: Vec<String>,
    /// Fewer than the limit came back: the sweep saw everything due.
    pub complete: bool,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    payments_topic: String,
    settlements_topic: String,
}

/// Microseconds to a timestamp, clamped to years 1..=9999: every event time the
/// decoder accepts is inside, and sweep bounds far outside stay valid for PostgreSQL.
fn to_time(micros: Micros) -> DateTime<Utc> {
    const YEAR_1: Micros = -62_135_596_800_000_000;
    const YEAR_9999_END: Micros = crate::event::MAX_EVENT_TIME;
    DateTime::from_timestamp_micros(micros.clamp(YEAR_1, YEAR_9999_END))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

impl Store {
    /// Connects lazily: the pool opens connections on first use, so a database that is
    /// down at start is retried like any other outage.
    pub fn connect_lazy(
        options: PgConnectOptions,
        payments_topic: &str,
        settlements_topic: &str,
    ) -> Self {
        // Every statement here is a keyed batch (thousands of index probes). JIT
        // compilation costs more than such a statement runs, and with the default
        // random_page_cost the planner prefers a full merge join over a few thousand
        // probes once the table reaches a few hundred thousand rows, so each batch
        // costs O(table) (measured: 245 ms instead of 12 ms at 300k rows). Session
        // settings only; the server's configuration is left alone.
        let options = options.options([("jit", "off"), ("random_page_cost", "1.1")]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .before_acquire(|_, meta| {
                let current = connection_is_current(meta.age);
                Box::pin(async move { Ok(current) })
            })
            .connect_lazy_with(options);
        Self::with_pool(pool, payments_topic, settlements_topic)
    }

    pub fn with_pool(pool: PgPool, payments_topic: &str, settlements_topic: &str) -> Self {
        Self {
            pool,
            payments_topic: payments_topic.to_owned(),
            settlements_topic: settlements_topic.to_owned(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A pooled connection that gives back its buffers when it returns to the pool.
    /// sqlx keeps a connection's buffers at the size of the largest message it ever
    /// carried; a batch's statements are up to a few MB, so over a long drain each of
    /// the pool's connections ratcheted up to the largest batch seen (measured: peak
    /// RSS rising from 47 to 82 MB over 1M messages).
    async fn connection(&self) -> Result<ShrinkOnReturn, StoreError> {
        Ok(ShrinkOnReturn(self.pool.acquire().await?))
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Takes ownership of partition pairs: bumps each epoch (creating the row on first
    /// sight) and returns the stored offsets and high marks to resume from.
    pub async fn acquire_pairs(&self, pairs: &[i32]) -> Result<Vec<PairPosition>, StoreError> {
        let rows = sqlx::query(
            "INSERT INTO recon_partition_pairs (payments_topic, settlements_topic, kafka_partition, epoch)
             SELECT $1, $2, p, 1 FROM UNNEST($3::int[]) AS p
             ON CONFLICT (payments_topic, settlements_topic, kafka_partition)
             DO UPDATE SET epoch = recon_partition_pairs.epoch + 1, updated_at = now()
             RETURNING kafka_partition, epoch, payments_next_offset, settlements_next_offset,
                       payments_high_mark, settlements_high_mark",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(pairs)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let marks: [Option<DateTime<Utc>>; 2] = [row.try_get(4)?, row.try_get(5)?];
                Ok(PairPosition {
                    pair: row.try_get(0)?,
                    epoch: row.try_get(1)?,
                    next_offsets: PerInput::from([row.try_get(2)?, row.try_get(3)?]),
                    high_marks: PerInput::from(marks.map(|m| m.map(|t| t.timestamp_micros()))),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Where a pair this worker owns stands in storage: its stored offsets and high
    /// marks, or `None` when its epoch moved on (another worker owns it now).
    pub async fn owned_position(
        &self,
        pair: i32,
        epoch: i64,
    ) -> Result<Option<PairPosition>, StoreError> {
        let row = sqlx::query(
            "SELECT payments_next_offset, settlements_next_offset, payments_high_mark, settlements_high_mark
             FROM recon_partition_pairs
             WHERE payments_topic = $1 AND settlements_topic = $2 AND kafka_partition = $3 AND epoch = $4",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(pair)
        .bind(epoch)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let marks: [Option<DateTime<Utc>>; 2] = [row.try_get(2)?, row.try_get(3)?];
        Ok(Some(PairPosition {
            pair,
            epoch,
            next_offsets: PerInput::from([row.try_get(0)?, row.try_get(1)?]),
            high_marks: PerInput::from(marks.map(|m| m.map(|t| t.timestamp_micros()))),
        }))
    }

    /// Stored offsets of all pairs of these topics, without taking ownership (for lag).
    pub async fn stored_offsets(&self) -> Result<Vec<(i32, [Option<i64>; 2])>, StoreError> {
        let rows = sqlx::query(
            "SELECT kafka_partition, payments_next_offset, settlements_next_offset
             FROM recon_partition_pairs WHERE payments_topic = $1 AND settlements_topic = $2",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| Ok((row.try_get(0)?, [row.try_get(1)?, row.try_get(2)?])))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Every stored event of the given (pair, payment_id) keys but their duplicates,
    /// in one query. Duplicates are not window state (see [`crate::engine`]): reading
    /// them made every lookup of a key cost as many rows as duplicates were ever sent
    /// for it. The condition is the predicate of the partial index it reads (migration
    /// 0007), written the same way so the planner can use it. A key PostgreSQL cannot
    /// take as a value finds nothing (see [`without_refused_keys`]).
    pub async fn lookup(
        &self,
        pairs: &[i32],
        payment_ids: &[String],
    ) -> Result<Vec<(i32, StoredEvent)>, StoreError> {
        without_refused_keys(payment_ids.len(), |keys| {
            self.lookup_once(&pairs[keys.clone()], &payment_ids[keys])
        })
        .await
    }

    async fn lookup_once(
        &self,
        pairs: &[i32],
        payment_ids: &[String],
    ) -> Result<Vec<(i32, StoredEvent)>, StoreError> {
        if payment_ids.is_empty() {
            return Ok(Vec::new());
        }
        use futures_util::TryStreamExt;
        let mut connection = self.connection().await?;
        let mut rows = sqlx::query(
            "SELECT e.kafka_partition, e.event_kind, e.event_id, e.payment_id, e.outcome, e.event_time,
                    e.amount_minor, e.fee_minor, e.net_minor, e.currency
             FROM UNNEST($1::int[], $2::text[]) AS k(kafka_partition, payment_id)
             -- OFFSET 0 keeps this a per-key index probe whatever the statistics say.
             CROSS JOIN LATERAL (SELECT * FROM recon_events e
                                 WHERE e.payment_id = k.payment_id AND e.kafka_partition = k.kafka_partition
                                   AND e.outcome NOT IN ('duplicate_payment', 'duplicate_settlement')
                                 OFFSET 0) e",
        )
        .bind(pairs)
        .bind(payment_ids)
        .fetch(&mut *connection);
        // Decoded row by row: a batch's lookup can return a row per key (a stream of
        // settlements whose payments were stored earlier), and holding every raw row
        // beside its decoded copy cost a few MB at the peak.
        let mut found = Vec::new();
        while let Some(row) = rows.try_next().await? {
            found.push((row.try_get::<i32, _>(0)?, stored_event(&row, 1)?));
        }
        Ok(found)
    }

    /// Open items of these pairs: (event_kind, outcome, count, oldest event time).
    pub async fn open_items(
        &self,
        pairs: &[i32],
    ) -> Result<Vec<(String, String, i64, Micros)>, StoreError> {
        let rows = sqlx::query(
            "SELECT event_kind, outcome, count(*), min(event_time) FROM recon_events
             WHERE kafka_partition = ANY($1) AND outcome IN ('pending', 'missing_settlement', 'orphan_settlement')
             GROUP BY event_kind, outcome",
        )
        .bind(pairs)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let oldest: DateTime<Utc> = row.try_get(3)?;
                Ok((
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                    oldest.timestamp_micros(),
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Which of these (event_kind, event_id) are already stored, under any payment id.
    /// An id PostgreSQL cannot take as a value is not stored (see
    /// [`without_refused_keys`]).
    pub async fn stored_event_ids(
        &self,
        inputs: &[Input],
        event_ids: &[&str],
    ) -> Result<Vec<(Input, String)>, StoreError> {
        without_refused_keys(event_ids.len(), |keys| {
            self.stored_event_ids_once(&inputs[keys.clone()], &event_ids[keys])
        })
        .await
    }

    async fn stored_event_ids_once(
        &self,
        inputs: &[Input],
        event_ids: &[&str],
    ) -> Result<Vec<(Input, String)>, StoreError> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_input: PerInput<Vec<&str>> = PerInput::default();
        for (input, id) in inputs.iter().zip(event_ids) {
            by_input[*input].push(id);
        }
        // One primary-key scan per kind with `= ANY`: the key is unique, so the plan is
        // an index(-only) scan at any table size, and it costs about a third less than
        // a per-key LATERAL probe (5,000 ids on 300k rows: 7 ms against 10.5 ms).
        let rows = sqlx::query(
            "SELECT event_kind, event_id FROM recon_events WHERE event_kind = 'payment' AND event_id = ANY($1)
             UNION ALL
             SELECT event_kind, event_id FROM recon_events WHERE event_kind = 'settlement' AND event_id = ANY($2)",
        )
        .bind(&by_input.payments)
        .bind(&by_input.settlements)
        .fetch_all(&mut *self.connection().await?)
        .await?;
        rows.into_iter()
            .map(|row| {
                let kind: &str = row.try_get(0)?;
                let input = if kind == "payment" {
                    Input::Payments
                } else {
                    Input::Settlements
                };
                Ok((input, row.try_get(1)?))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Payment ids of one pair with pending items whose deadline the watermark passed,
    /// oldest first, at most `limit` of each kind.
    pub async fn due_keys(
        &self,
        pair: i32,
        request: SweepRequest,
        limit: i64,
    ) -> Result<DueKeys, StoreError> {
        let rows = sqlx::query(
            "(SELECT 'payment' AS kind, payment_id FROM recon_events
               WHERE kafka_partition = $1 AND event_kind = 'payment' AND outcome = 'pending' AND event_time < $2
               ORDER BY event_time LIMIT $4)
             UNION ALL
             (SELECT 'settlement', payment_id FROM recon_events
               WHERE kafka_partition = $1 AND event_kind = 'settlement' AND outcome = 'pending' AND event_time < $3
               ORDER BY event_time LIMIT $4)",
        )
        .bind(pair)
        .bind(to_time(request.payments_before))
        .bind(to_time(request.settlements_before))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = [0i64; 2];
        let mut payment_ids = Vec::with_capacity(rows.len());
        for row in rows {
            let kind: &str = row.try_get(0)?;
            counts[usize::from(kind == "settlement")] += 1;
            payment_ids.push(row.try_get(1)?);
        }
        payment_ids.sort_unstable();
        payment_ids.dedup();
        Ok(DueKeys {
            payment_ids,
            complete: counts.iter().all(|&c| c < limit),
        })
    }

    /// Writes one batch atomically. Fails with [`StoreError::Fenced`] (and writes
    /// nothing) if any pair's epoch moved on, and with [`StoreError::EventIdsClash`]
    /// (writing nothing) if a pair inserts an event id that is already stored.
    /// Fails with [`StoreError::DataErrors`] (writing nothing) when PostgreSQL refuses
    /// values of some messages: those are found and named, so the caller can reject
    /// them and write the rest.
    pub async fn checkpoint(&self, batch: &[PairCheckpoint]) -> Result<(), StoreError> {
        match self.checkpoint_once(batch).await {
            Err(StoreError::Permanent(sqlx::Error::Database(db)))
                if db.constraint() == Some("recon_events_pkey") =>
            {
                Err(match self.clashing_pairs(batch).await? {
                    pairs if pairs.is_empty() => {
                        // The row it met was another transaction's, rolled back since.
                        StoreError::Transient(sqlx::Error::Database(db))
                    }
                    pairs => StoreError::EventIdsClash(pairs),
                })
            }
            Err(StoreError::Permanent(sqlx::Error::Database(db))) if is_data_error(&*db) => {
                let refused = self.refused_messages(batch).await?;
                if refused.is_empty() {
                    // Not traced to a message: as permanent as before.
                    Err(StoreError::Permanent(sqlx::Error::Database(db)))
                } else {
                    Err(StoreError::DataErrors(refused))
                }
            }
            other => other,
        }
    }

    /// The messages of a batch whose values PostgreSQL refuses. Every value a batch
    /// writes comes from its messages' rows (updates and discrepancies only repeat ids
    /// of those rows or of rows stored before), so each new event row and each
    /// rejected row is inserted again, into temporary copies of the tables without
    /// their keys, inside a transaction that is rolled back: halves that fail with a
    /// data error are split until single rows remain (a few statements per culprit,
    /// whatever the value and whichever column).
    async fn refused_messages(
        &self,
        batch: &[PairCheckpoint],
    ) -> Result<Vec<RefusedMessage>, StoreError> {
        let mut units = Vec::new();
        for pair in batch {
            for row in &pair.changes.rows {
                if let Some(new) = &row.new {
                    units.push(Unit::Event(pair.pair, row, new.kafka_offset));
                }
            }
            units.extend(pair.rejected.iter().map(Unit::Rejected));
        }
        let mut connection = self.connection().await?;
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        for statement in [
            "CREATE TEMPORARY TABLE recon_probe_events (LIKE recon_events INCLUDING DEFAULTS) ON COMMIT DROP",
            "CREATE TEMPORARY TABLE recon_probe_rejected (LIKE rejected_events INCLUDING DEFAULTS) ON COMMIT DROP",
        ] {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        let mut refused = Vec::new();
        let mut pending = vec![&units[..]];
        while let Some(part) = pending.pop() {
            let Some(error) = self.probe(&mut tx, part).await? else {
                continue;
            };
            match part {
                [unit] => refused.push(unit.refused(format!(
                    "PostgreSQL refused a value: {} (SQLSTATE {})",
                    error.message(),
                    error.code().unwrap_or_default()
                ))),
                _ => {
                    let (first, second) = part.split_at(part.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
            }
        }
        tx.rollback().await?;
        refused.sort_by_key(|r| (r.pair, r.input, r.offset));
        Ok(refused)
    }

    /// Inserts these rows into the probe tables under a savepoint, rolled back; returns
    /// the data error they raise, if any.
    async fn probe(
        &self,
        tx: &mut sqlx::PgConnection,
        units: &[Unit<'_>],
    ) -> Result<Option<Box<dyn sqlx::error::DatabaseError>>, StoreError> {
        sqlx::query("SAVEPOINT probe").execute(&mut *tx).await?;
        let events: Vec<(i32, &RowWrite)> = units
            .iter()
            .filter_map(|unit| match unit {
                Unit::Event(pair, row, _) => Some((*pair, *row)),
                Unit::Rejected(_) => None,
            })
            .collect();
        let rejected: Vec<&RejectedMessage> = units
            .iter()
            .filter_map(|unit| match unit {
                Unit::Rejected(rejected) => Some(*rejected),
                Unit::Event(..) => None,
            })
            .collect();
        let mut result = insert_events(&mut *tx, "recon_probe_events", &events).await;
        if result.is_ok() {
            result = self
                .insert_rejected(&mut *tx, "recon_probe_rejected", &rejected)
                .await;
        }
        sqlx::query("ROLLBACK TO SAVEPOINT probe")
            .execute(&mut *tx)
            .await?;
        match result {
            Ok(()) => Ok(None),
            Err(StoreError::Permanent(sqlx::Error::Database(db))) if is_data_error(&*db) => {
                Ok(Some(db))
            }
            // Anything else is not this search's to judge: no culprit in this part.
            Err(error) if error.is_transient() => Err(error),
            Err(_) => Ok(None),
        }
    }

    async fn checkpoint_once(&self, batch: &[PairCheckpoint]) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        self.advance_pairs(&mut tx, batch).await?;
        let mut new_rows = Vec::new();
        for pair in batch {
            for row in pair.changes.rows.iter().filter(|row| row.new.is_some()) {
                new_rows.push((pair.pair, row));
            }
        }
        insert_events(&mut tx, "recon_events", &new_rows).await?;
        update_events(&mut tx, batch).await?;
        write_discrepancies(&mut tx, batch).await?;
        let rejected: Vec<&RejectedMessage> = batch.iter().flat_map(|p| &p.rejected).collect();
        self.insert_rejected(&mut tx, "rejected_events", &rejected)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The pairs of a batch whose event inserts clash: with a stored event, or with
    /// an earlier pair's insert in the same batch (the first keeps it).
    async fn clashing_pairs(&self, batch: &[PairCheckpoint]) -> Result<Vec<i32>, StoreError> {
        let mut first_pair: HashMap<(Input, &str), i32> = HashMap::new();
        let mut clashing = BTreeSet::new();
        let (mut inputs, mut ids) = (Vec::new(), Vec::new());
        for pair in batch {
            for row in pair.changes.rows.iter().filter(|row| row.new.is_some()) {
                let first = *first_pair
                    .entry((row.input, &*row.event_id))
                    .or_insert(pair.pair);
                if first != pair.pair {
                    clashing.insert(pair.pair);
                }
                inputs.push(row.input);
                ids.push(&*row.event_id);
            }
        }
        for stored in self.stored_event_ids(&inputs, &ids).await? {
            if let Some(&pair) = first_pair.get(&(stored.0, stored.1.as_str())) {
                clashing.insert(pair);
            }
        }
        Ok(clashing.into_iter().collect())
    }

    async fn advance_pairs(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[PairCheckpoint],
    ) -> Result<(), StoreError> {
        let mut pairs = Vec::with_capacity(batch.len());
        let mut epochs = Vec::with_capacity(batch.len());
        let mut offsets: PerInput<Vec<Option<i64>>> = PerInput::default();
        let mut marks: PerInput<Vec<Option<DateTime<Utc>>>> = PerInput::default();
        for pair in batch {
            pairs.push(pair.pair);
            epochs.push(pair.epoch);
            for input in Input::ALL {
                offsets[input].push(pair.next_offsets[input]);
                marks[input].push(pair.changes.high_marks[input].map(to_time));
            }
        }
        let updated: Vec<i32> = sqlx::query_scalar(
            "UPDATE recon_partition_pairs AS p
             SET payments_next_offset = COALESCE(u.pay_offset, p.payments_next_offset),
                 settlements_next_offset = COALESCE(u.set_offset, p.settlements_next_offset),
                 payments_high_mark = COALESCE(u.pay_mark, p.payments_high_mark),
                 settlements_high_mark = COALESCE(u.set_mark, p.settlements_high_mark),
                 updated_at = now()
             FROM UNNEST($3::int[], $4::bigint[], $5::bigint[], $6::bigint[], $7::timestamptz[], $8::timestamptz[])
                  AS u(kafka_partition, epoch, pay_offset, set_offset, pay_mark, set_mark)
             WHERE p.payments_topic = $1 AND p.settlements_topic = $2
               AND p.kafka_partition = u.kafka_partition AND p.epoch = u.epoch
             RETURNING p.kafka_partition",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(&pairs)
        .bind(&epochs)
        .bind(&offsets.payments)
        .bind(&offsets.settlements)
        .bind(&marks.payments)
        .bind(&marks.settlements)
        .fetch_all(&mut *tx)
        .await?;
        let fenced: Vec<i32> = pairs.into_iter().filter(|p| !updated.contains(p)).collect();
        if fenced.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Fenced(fenced))
        }
    }

    /// Inserts rejected messages into `table` (`rejected_events`, or its probe copy).
    async fn insert_rejected(
        &self,
        tx: &mut sqlx::PgConnection,
        table: &str,
        rejected: &[&RejectedMessage],
    ) -> Result<(), StoreError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let topic = |input: Input| match input {
            Input::Payments => self.payments_topic.as_str(),
            Input::Settlements => self.settlements_topic.as_str(),
        };
        // The probe copy has no unique key to conflict on; `DO NOTHING` without a
        // target means the same for the real table, whose only other key is its id.
        let sql = format!(
            "INSERT INTO {table} (topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size, kafka_key)
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::int[], $8::bytea[])
             ON CONFLICT DO NOTHING"
        );
        sqlx::query(&sql)
            .bind(rejected.iter().map(|r| topic(r.input)).collect::<Vec<_>>())
            .bind(rejected.iter().map(|r| r.partition).collect::<Vec<_>>())
            .bind(rejected.iter().map(|r| r.offset).collect::<Vec<_>>())
            .bind(
                rejected
                    .iter()
                    .map(|r| r.reason.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rejected.iter().map(|r| r.class).collect::<Vec<_>>())
            .bind(
                rejected
                    .iter()
                    .map(|r| r.payload.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(rejected.iter().map(|r| r.payload_size).collect::<Vec<_>>())
            .bind(
                rejected
                    .iter()
                    .map(|r| r.key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

fn stored_event(row: &sqlx::postgres::PgRow, first: usize) -> Result<StoredEvent, StoreError> {
    let kind: &str = row.try_get(first)?;
    let outcome: &str = row.try_get(first + 3)?;
    let currency: &str = row.try_get(first + 8)?;
    let corrupt = |what: String| StoreError::Permanent(sqlx::Error::Decode(what.into()));
    Ok(StoredEvent {
        input: match kind {
            "payment" => Input::Payments,
            "settlement" => Input::Settlements,
            other => return Err(corrupt(format!("unknown event_kind {other:?}"))),
        },
        event_id: row.try_get(first + 1)?,
        payment_id: row.try_get(first + 2)?,
        outcome: outcome
            .parse::<Outcome>()
            .map_err(|e| corrupt(e.to_string()))?,
        event_time: row
            .try_get::<DateTime<Utc>, _>(first + 4)?
            .timestamp_micros(),
        amount: row.try_get(first + 5)?,
        fee: row.try_get::<Option<i64>, _>(first + 6)?.unwrap_or(0),
        net: row.try_get::<Option<i64>, _>(first + 7)?.unwrap_or(0),
        currency: Currency::from_code(currency)
            .ok_or_else(|| corrupt(format!("unknown currency {currency:?}")))?,
    })
}

/// See [`Store::connection`].
struct ShrinkOnReturn(sqlx::pool::PoolConnection<sqlx::Postgres>);

impl std::ops::Deref for ShrinkOnReturn {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ShrinkOnReturn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ShrinkOnReturn {
    fn drop(&mut self) {
        sqlx::Connection::shrink_buffers(&mut *self.0);
    }
}

/// One message's part of a batch, for [`Store::refused_messages`].
enum Unit<'a> {
    /// A new event row: its pair, the row and the offset of its message.
    Event(i32, &'a RowWrite, i64),
    Rejected(&'a RejectedMessage),
}

impl Unit<'_> {
    fn refused(&self, reason: String) -> RefusedMessage {
        match self {
            Unit::Event(pair, row, offset) => RefusedMessage {
                pair: *pair,
                input: row.input,
                offset: *offset,
                reason,
            },
            Unit::Rejected(rejected) => RefusedMessage {
                pair: rejected.partition,
                input: rejected.input,
                offset: rejected.offset,
                reason,
            },
        }
    }
}

/// Runs a read keyed by ids over the keys `0..len`, leaving out the keys PostgreSQL
/// refuses as values (a data error: a character the database encoding cannot hold).
/// No stored row can carry such a value, so it finds nothing — and the event
/// carrying it is refused, and rejected, when its checkpoint inserts it. Before, the
/// window lookup of a batch with one such payment id failed for good and stopped the
/// worker (found by the whole-path fuzz test on a LATIN1 database). On a data error
/// the keys are halved until each refusing key is alone; the usual read is one query.
async fn without_refused_keys<T, F, Fut>(len: usize, mut read: F) -> Result<Vec<T>, StoreError>
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, StoreError>>,
{
    let mut found = Vec::new();
    // A stack of key ranges still to read, the whole range first.
    let mut pending = Vec::new();
    pending.push(0..len);
    while let Some(keys) = pending.pop() {
        match read(keys.clone()).await {
            Ok(rows) => found.extend(rows),
            Err(StoreError::Permanent(sqlx::Error::Database(db))) if is_data_error(&*db) => {
                if keys.len() > 1 {
                    let middle = keys.start + keys.len() / 2;
                    pending.push(middle..keys.end);
                    pending.push(keys.start..middle);
                } else {
                    tracing::warn!(error = %db, "a key PostgreSQL cannot hold as a value; nothing stored matches it");
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(found)
}

/// SQLSTATE class 22, data exception: a value the statement's types cannot hold.
/// Caused by content, so by a message, not by the database's state.
fn is_data_error(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.code().is_some_and(|code| code.starts_with("22"))
}

/// Inserts new events into `table` (`recon_events`, or its probe copy). No `ON CONFLICT`: the engine inserts only event
/// ids it believes new, so a clash is an exception that fails the transaction (a
/// guarded insert is about 40% slower per row).
async fn insert_events(
    tx: &mut sqlx::PgConnection,
    table: &str,
    rows: &[(i32, &RowWrite)],
) -> Result<(), StoreError> {
    let mut kinds = Vec::new();
    let mut event_ids = Vec::new();
    let mut payment_ids = Vec::new();
    let mut partitions = Vec::new();
    let mut offsets = Vec::new();
    let mut outcomes = Vec::new();
    let mut counterparts = Vec::new();
    let mut times = Vec::new();
    let mut amounts = Vec::new();
    let mut fees = Vec::new();
    let mut nets = Vec::new();
    let mut currencies = Vec::new();
    let mut merchants = Vec::new();
    let mut settlements = Vec::new();
    for &(pair, row) in rows {
        let Some(new) = &row.new else { continue };
        kinds.push(row.input.event_kind());
        event_ids.push(&*row.event_id);
        payment_ids.push(&*row.payment_id);
        partitions.push(pair);
        offsets.push(new.kafka_offset);
        outcomes.push(row.outcome.as_str());
        counterparts.push(row.counterpart.as_deref());
        times.push(to_time(new.event_time));
        amounts.push(new.amount);
        fees.push(new.fee);
        nets.push(new.net);
        currencies.push(new.currency.code());
        let (merchant, settlement) = match row.input {
            Input::Payments => (Some(new.reference.as_str()), None),
            Input::Settlements => (None, Some(new.reference.as_str())),
        };
        merchants.push(merchant);
        settlements.push(settlement);
    }
    if kinds.is_empty() {
        return Ok(());
    }
    // The encoded parameters, reserved once: grown by doubling, the buffer was copied
    // and faulted in again at every step. Pages reserved but not written cost nothing.
    let mut arguments = PgArguments::default();
    arguments.reserve(14, kinds.len() * ENCODED_EVENT_ROW_BYTES);
    add(&mut arguments, kinds)?;
    add(&mut arguments, event_ids)?;
    add(&mut arguments, payment_ids)?;
    add(&mut arguments, partitions)?;
    add(&mut arguments, offsets)?;
    add(&mut arguments, outcomes)?;
    add(&mut arguments, counterparts)?;
    add(&mut arguments, times)?;
    add(&mut arguments, amounts)?;
    add(&mut arguments, fees)?;
    add(&mut arguments, nets)?;
    add(&mut arguments, currencies)?;
    add(&mut arguments, merchants)?;
    add(&mut arguments, settlements)?;
    let sql = format!(
        "INSERT INTO {table} (event_kind, event_id, payment_id, kafka_partition, kafka_offset, outcome,
                              counterpart_event_id, event_time, amount_minor, fee_minor, net_minor,
                              currency, merchant_id, settlement_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::text[], $7::text[],
                              $8::timestamptz[], $9::bigint[], $10::bigint[], $11::bigint[], $12::text[],
                              $13::text[], $14::text[])"
    );
    sqlx::query_with(&sql, arguments).execute(&mut *tx).await?;
    Ok(())
}

/// An upper estimate of one event row's encoded parameters: 14 length words, the
/// fixed-size values and ids of ordinary length.
const ENCODED_EVENT_ROW_BYTES: usize = 256;

fn add<'q, T>(arguments: &mut PgArguments, value: T) -> Result<(), StoreError>
where
    T: sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + 'q,
{
    Ok(arguments.add(value).map_err(sqlx::Error::Encode)?)
}

async fn update_events(
    tx: &mut sqlx::PgConnection,
    batch: &[PairCheckpoint],
) -> Result<(), StoreError> {
    let updates: Vec<_> = batch
        .iter()
        .flat_map(|p| &p.changes.rows)
        .filter(|row| row.new.is_none())
        .collect();
    if updates.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE recon_events AS e
         SET outcome = u.outcome, counterpart_event_id = u.counterpart, updated_at = now()
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
              AS u(event_kind, event_id, payment_id, outcome, counterpart)
         WHERE e.event_kind = u.event_kind AND e.event_id = u.event_id AND e.payment_id = u.payment_id",
    )
    .bind(updates.iter().map(|r| r.input.event_kind()).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| &*r.event_id).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| &*r.payment_id).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| r.counterpart.as_deref()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Column arrays of the discrepancy rows a batch opens.
#[derive(Default)]
struct OpenedColumns<'a> {
    kinds: Vec<&'a str>,
    payment_ids: Vec<&'a str>,
    partitions: Vec<i32>,
    payment_events: Vec<Option<&'a str>>,
    settlement_events: Vec<Option<&'a str>>,
}

/// Column arrays of the discrepancies a batch resolves.
#[derive(Default)]
struct ResolvedColumns<'a> {
    kinds: Vec<&'a str>,
    subjects: Vec<&'a str>,
    resolutions: Vec<&'a str>,
}

async fn write_discrepancies(
    tx: &mut sqlx::PgConnection,
    batch: &[PairCheckpoint],
) -> Result<(), StoreError> {
    let mut opened = OpenedColumns::default();
    let mut resolved = ResolvedColumns::default();
    for pair in batch {
        for change in &pair.changes.discrepancies {
            match change {
                DiscrepancyChange::Opened {
                    kind,
                    payment_id,
                    payment_event_id,
                    settlement_event_id,
                } => {
                    opened.kinds.push(kind.as_str());
                    opened.payment_ids.push(payment_id);
                    opened.partitions.push(pair.pair);
                    opened.payment_events.push(payment_event_id.as_deref());
                    opened
                        .settlement_events
                        .push(settlement_event_id.as_deref());
                }
                DiscrepancyChange::Resolved {
                    kind,
                    subject_event_id,
                    resolution,
                } => {
                    resolved.kinds.push(kind.as_str());
                    resolved.subjects.push(subject_event_id);
                    resolved.resolutions.push(resolution.as_str());
                }
            }
        }
    }
    if !opened.kinds.is_empty() {
        sqlx::query(
            // A checkpoint retried after a COMMIT of unknown outcome may have opened
            // these already (migration 0006 keys them).
            "INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, payment_event_id, settlement_event_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[], $5::text[])
             ON CONFLICT DO NOTHING",
        )
        .bind(opened.kinds)
        .bind(opened.payment_ids)
        .bind(opened.partitions)
        .bind(opened.payment_events)
        .bind(opened.settlement_events)
        .execute(&mut *tx)
        .await?;
    }
    if !resolved.kinds.is_empty() {
        // One statement per kind present, each shaped for that kind's partial index.
        for (kind, subject_column) in [
            ("missing_settlement", "payment_event_id"),
            ("orphan_settlement", "settlement_event_id"),
        ] {
            if !resolved.kinds.contains(&kind) {
                continue;
            }
            sqlx::query(&format!(
                "UPDATE recon_discrepancies AS d SET resolved_at = now(), resolution = u.resolution
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(kind, subject, resolution)
                 WHERE u.kind = '{kind}' AND d.kind = '{kind}'
                   AND d.resolved_at IS NULL AND d.{subject_column} = u.subject"
            ))
            .bind(&resolved.kinds)
            .bind(&resolved.subjects)
            .bind(&resolved.resolutions)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_that_end_by_themselves_are_transient() {
        for code in [
            "08006", "08001", "53300", "40001", "40P01", "57P01", "57P02", "57P03", "57014",
            "55P03", "25006",
        ] {
            assert!(is_transient_sqlstate(code, "whatever"), "{code}");
        }
        assert!(is_transient_sqlstate(
            "0A000",
            "cached plan must not change result type"
        ));
        for code in [
            "0A000", "23505", "22021", "42P01", "28000", "3D000", "25001",
        ] {
            assert!(!is_transient_sqlstate(code, "some other failure"), "{code}");
        }
    }

    #[test]
    fn connections_opened_before_a_replacement_are_not_reused() {
        replace_connections();
        // Opened before the mark: closed. Opened after it: kept.
        assert!(!connection_is_current(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(connection_is_current(Duration::ZERO));
    }
}
