//! The statements a checkpoint is made of, each writing one kind of change for a
//! whole batch with array binds: new events, changed outcomes, opened and resolved
//! discrepancies, rejected messages.
//!
//! Each statement that changes discrepancies also appends the worker's own actions
//! (actor [`WORKER_ACTOR`]) to `recon_discrepancy_actions` (contract §8, migration
//! 0010) in the same statement, from what it actually changed (`RETURNING` in a CTE):
//! a checkpoint retried after a COMMIT of unknown outcome changes nothing the second
//! time, so it logs nothing twice, and the log costs no round trip of its own.
//!
//! Apart from the transaction that runs them (`checkpoint`) because two callers need
//! them: the checkpoint itself, and the search for values PostgreSQL refuses
//! (`refusals`), which runs the inserts again into probe copies of the tables. The
//! inserts therefore take the table to write as an argument.

use sqlx::postgres::PgArguments;
use sqlx::Arguments;

use crate::engine::{DiscrepancyChange, DiscrepancyKind, Outcome, RowWrite, RECOVERED};
use crate::event::{EventKind, Input, Line};
use crate::money::Currency;
use crate::rejection::RejectedMessage;

use super::checkpoint::PairCheckpoint;
use super::payouts::ACCEPTED;
use super::rows::to_time;
use super::{Store, StoreError};

/// The actor of the actions the worker records itself (contract §8).
pub const WORKER_ACTOR: &str = "recon-worker";

/// The start of the note the worker logs when the counterpart of a discrepancy a
/// person accepted arrives: the rest is the resolution it would have had.
pub const COUNTERPART_ARRIVED: &str =
    "counterpart arrived; left as accepted; its events' outcome resolves it as ";

impl Store {
    /// Inserts rejected messages into `table` (`rejected_events`, or its probe copy).
    pub(super) async fn insert_rejected(
        &self,
        tx: &mut sqlx::PgConnection,
        table: &str,
        rejected: &[&RejectedMessage],
    ) -> Result<(), StoreError> {
        if rejected.is_empty() {
            return Ok(());
        }
        // The probe copy has no unique key to conflict on; `DO NOTHING` without a
        // target means the same for the real table, whose only other key is its id.
        let sql = format!(
            "INSERT INTO {table} (topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size, kafka_key, kafka_timestamp)
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::int[], $8::bytea[], $9::timestamptz[])
             ON CONFLICT DO NOTHING"
        );
        sqlx::query(&sql)
            .bind(
                rejected
                    .iter()
                    .map(|r| self.topic(r.topic))
                    .collect::<Vec<_>>(),
            )
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
            .bind(
                rejected
                    .iter()
                    .map(|r| r.timestamp_ms.map(|ms| to_time(ms.saturating_mul(1000))))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// Column arrays of the event rows a batch inserts, in the order of the insert's
/// parameters.
#[derive(Default)]
struct EventColumns<'a> {
    /// The stored `event_kind`: the topic's (see `rows::stored_kind`).
    kinds: Vec<Input>,
    event_ids: Vec<&'a str>,
    payment_ids: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    outcomes: Vec<Outcome>,
    counterparts: Vec<Option<&'a str>>,
    times: Vec<chrono::DateTime<chrono::Utc>>,
    amounts: Vec<i64>,
    fees: Vec<Option<i64>>,
    nets: Vec<Option<i64>>,
    currencies: Vec<Currency>,
    merchants: Vec<Option<&'a str>>,
    settlements: Vec<Option<&'a str>>,
    line_types: Vec<Option<&'static str>>,
    refund_ids: Vec<Option<&'a str>>,
    dispute_ids: Vec<Option<&'a str>>,
    payout_ids: Vec<Option<&'a str>>,
}

impl<'a> EventColumns<'a> {
    /// The columns of the rows that are new (the others exist and are updated).
    fn of(rows: &[(i32, &'a RowWrite)]) -> Self {
        let mut columns = Self::default();
        for &(pair, row) in rows {
            let Some(new) = &row.new else { continue };
            columns.kinds.push(row.kind.input());
            columns.event_ids.push(&row.event_id);
            columns.payment_ids.push(&row.payment_id);
            columns.partitions.push(pair);
            columns.offsets.push(new.kafka_offset);
            columns.outcomes.push(row.outcome);
            columns.counterparts.push(row.counterpart.as_deref());
            columns.times.push(to_time(new.event_time));
            columns.amounts.push(new.amount);
            columns.fees.push(new.fee);
            columns.nets.push(new.net);
            columns.currencies.push(new.currency);
            let reference = new.reference.as_deref();
            let (merchant, settlement) = match row.kind {
                EventKind::Payment => (reference, None),
                EventKind::Settlement => (None, reference),
                EventKind::Refund => (None, None),
            };
            columns.merchants.push(merchant);
            columns.settlements.push(settlement);
            columns
                .line_types
                .push(stored_line_type(row.kind, &new.line));
            columns.refund_ids.push(new.line.refund_id());
            columns.dispute_ids.push(new.line.dispute_id());
            columns.payout_ids.push(new.payout_id.as_deref());
        }
        columns
    }

    /// The encoded parameters, reserved once: grown by doubling, the buffer was copied
    /// and faulted in again at every step. Pages reserved but not written cost nothing.
    fn into_arguments(self) -> Result<PgArguments, StoreError> {
        let mut arguments = PgArguments::default();
        arguments.reserve(18, self.kinds.len() * ENCODED_EVENT_ROW_BYTES);
        add(&mut arguments, self.kinds)?;
        add(&mut arguments, self.event_ids)?;
        add(&mut arguments, self.payment_ids)?;
        add(&mut arguments, self.partitions)?;
        add(&mut arguments, self.offsets)?;
        add(&mut arguments, self.outcomes)?;
        add(&mut arguments, self.counterparts)?;
        add(&mut arguments, self.times)?;
        add(&mut arguments, self.amounts)?;
        add(&mut arguments, self.fees)?;
        add(&mut arguments, self.nets)?;
        add(&mut arguments, self.currencies)?;
        add(&mut arguments, self.merchants)?;
        add(&mut arguments, self.settlements)?;
        add(&mut arguments, self.line_types)?;
        add(&mut arguments, self.refund_ids)?;
        add(&mut arguments, self.dispute_ids)?;
        add(&mut arguments, self.payout_ids)?;
        Ok(arguments)
    }
}

/// The `line_type` column of a new row: that of a settlement line other than a
/// capture. Captures are stored without one, as version 1 stored them (one value
/// fewer per row); `recon_outcomes` shows them as `capture`.
fn stored_line_type(kind: EventKind, line: &Line) -> Option<&'static str> {
    match (kind, line) {
        (EventKind::Settlement, Line::Capture) => None,
        (EventKind::Settlement, line) => Some(line.line_type()),
        (EventKind::Payment | EventKind::Refund, _) => None,
    }
}

/// An upper estimate of one event row's encoded parameters: 18 length words, the
/// fixed-size values and ids of ordinary length.
const ENCODED_EVENT_ROW_BYTES: usize = 256;

fn add<'q, T>(arguments: &mut PgArguments, value: T) -> Result<(), StoreError>
where
    T: sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + 'q,
{
    Ok(arguments.add(value).map_err(sqlx::Error::Encode)?)
}

/// Inserts new events into `table` (`recon_events`, or its probe copy). No `ON
/// CONFLICT`: the engine inserts only event ids it believes new, so a clash is an
/// exception that fails the transaction (a guarded insert is about 40% slower per row).
pub(super) async fn insert_events(
    tx: &mut sqlx::PgConnection,
    table: &str,
    rows: &[(i32, &RowWrite)],
) -> Result<(), StoreError> {
    let columns = EventColumns::of(rows);
    if columns.kinds.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO {table} (event_kind, event_id, payment_id, kafka_partition, kafka_offset, outcome,
                              counterpart_event_id, event_time, amount_minor, fee_minor, net_minor,
                              currency, merchant_id, settlement_id, line_type, refund_id, dispute_id,
                              payout_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::text[], $7::text[],
                              $8::timestamptz[], $9::bigint[], $10::bigint[], $11::bigint[], $12::text[],
                              $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[])"
    );
    sqlx::query_with(&sql, columns.into_arguments()?)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Sets the new outcome (and counterpart) of rows that already exist.
pub(super) async fn update_events(
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
    .bind(updates.iter().map(|r| r.kind.input()).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| &*r.event_id).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| &*r.payment_id).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| r.outcome).collect::<Vec<_>>())
    .bind(updates.iter().map(|r| r.counterpart.as_deref()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Column arrays of the discrepancy rows a batch opens.
#[derive(Default)]
struct OpenedColumns<'a> {
    kinds: Vec<&'static str>,
    payment_ids: Vec<&'a str>,
    partitions: Vec<i32>,
    payment_events: Vec<Option<&'a str>>,
    settlement_events: Vec<Option<&'a str>>,
}

/// Column arrays of the discrepancies a batch resolves.
#[derive(Default)]
struct ResolvedColumns<'a> {
    kinds: Vec<&'static str>,
    subjects: Vec<&'a str>,
    resolutions: Vec<&'static str>,
}

/// Column arrays of the payments whose `over_refunded` discrepancy a batch sets.
#[derive(Default)]
struct OverRefundColumns<'a> {
    /// Payments that must have one: their pair, first line below zero, and whether open.
    payment_ids: Vec<&'a str>,
    partitions: Vec<i32>,
    first_below: Vec<&'a str>,
    open: Vec<bool>,
    /// Payments that must have none.
    absent: Vec<&'a str>,
}

/// The discrepancy changes of a batch, by statement.
#[derive(Default)]
struct DiscrepancyColumns<'a> {
    opened: OpenedColumns<'a>,
    resolved: ResolvedColumns<'a>,
    over_refunds: OverRefundColumns<'a>,
}

impl<'a> DiscrepancyColumns<'a> {
    fn of(batch: &'a [PairCheckpoint]) -> Self {
        let mut columns = Self::default();
        for pair in batch {
            for change in &pair.changes.discrepancies {
                columns.add(pair.pair, change);
            }
        }
        columns
    }

    fn add(&mut self, pair: i32, change: &'a DiscrepancyChange) {
        match change {
            DiscrepancyChange::Opened {
                kind,
                payment_id,
                payment_event_id,
                settlement_event_id,
            } => {
                let opened = &mut self.opened;
                opened.kinds.push(kind.as_str());
                opened.payment_ids.push(payment_id);
                opened.partitions.push(pair);
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
                self.resolved.kinds.push(kind.as_str());
                self.resolved.subjects.push(subject_event_id);
                self.resolved.resolutions.push(resolution);
            }
            DiscrepancyChange::OverRefund { payment_id, state } => {
                let over = &mut self.over_refunds;
                match state {
                    Some(state) => {
                        over.payment_ids.push(payment_id);
                        over.partitions.push(pair);
                        over.first_below.push(&state.first_below);
                        over.open.push(state.open);
                    }
                    None => over.absent.push(payment_id),
                }
            }
        }
    }
}

/// The kinds a batch resolves, one statement each, with the column naming their
/// subject. Each statement is shaped for its kind's partial index (migrations 0001 and
/// 0008): the kind is a literal there, so it is one here.
const RESOLVED_BY: [(DiscrepancyKind, &str); 3] = [
    (
        DiscrepancyKind::Outcome(Outcome::MissingSettlement),
        "payment_event_id",
    ),
    (
        DiscrepancyKind::Outcome(Outcome::OrphanSettlement),
        "settlement_event_id",
    ),
    (DiscrepancyKind::Chargeback, "settlement_event_id"),
];

/// Opens, resolves and sets the discrepancies of a batch. Opened ones first: a
/// chargeback whose reversal was read before it is opened and resolved in one batch.
pub(super) async fn write_discrepancies(
    tx: &mut sqlx::PgConnection,
    batch: &[PairCheckpoint],
) -> Result<(), StoreError> {
    let DiscrepancyColumns {
        opened,
        resolved,
        over_refunds,
    } = DiscrepancyColumns::of(batch);
    if !opened.kinds.is_empty() {
        sqlx::query(&format!(
            // A checkpoint retried after a COMMIT of unknown outcome may have opened
            // these already (migration 0006 keys them): only the rows inserted now are
            // logged.
            "WITH opened AS (
                 INSERT INTO recon_discrepancies (kind, payment_id, kafka_partition, payment_event_id, settlement_event_id)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[], $5::text[])
                 ON CONFLICT DO NOTHING
                 RETURNING id)
             INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor)
             SELECT id, 'opened', '{WORKER_ACTOR}' FROM opened ORDER BY id"
        ))
        .bind(opened.kinds)
        .bind(opened.payment_ids)
        .bind(opened.partitions)
        .bind(opened.payment_events)
        .bind(opened.settlement_events)
        .execute(&mut *tx)
        .await?;
    }
    for (kind, subject_column) in RESOLVED_BY {
        if !resolved.kinds.contains(&kind.as_str()) {
            continue;
        }
        // Open ones only: one a person resolved (`accepted`, contract §8) stays as
        // they left it when its counterpart arrives; the events' outcomes still change
        // (`update_events`), and the log says the counterpart came (`kept`: once, even
        // when a checkpoint is retried, hence the NOT EXISTS; the two CTEs touch
        // disjoint rows, open and accepted).
        sqlx::query(&format!(
            "WITH u AS (
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(kind, subject, resolution)
                 WHERE u.kind = '{kind}'),
             resolved AS (
                 UPDATE recon_discrepancies AS d SET resolved_at = now(), resolution = u.resolution
                 FROM u
                 WHERE d.kind = '{kind}' AND d.resolved_at IS NULL AND d.{subject_column} = u.subject
                 RETURNING d.id, d.resolution),
             kept AS (
                 SELECT d.id, $4 || u.resolution AS note
                 FROM u JOIN recon_discrepancies d
                   ON d.kind = '{kind}' AND d.{subject_column} = u.subject
                 WHERE d.resolution = '{ACCEPTED}')
             INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
             SELECT id, action, '{WORKER_ACTOR}', note FROM (
                 SELECT id, 'resolved' AS action, resolution AS note FROM resolved
                 UNION ALL
                 SELECT id, 'annotated', note FROM kept k
                 WHERE NOT EXISTS (SELECT FROM recon_discrepancy_actions a
                                   WHERE a.discrepancy_id = k.id AND a.actor = '{WORKER_ACTOR}'
                                     AND a.action = 'annotated' AND a.note = k.note)) logged
             ORDER BY id"
        ))
        .bind(&resolved.kinds)
        .bind(&resolved.subjects)
        .bind(&resolved.resolutions)
        .bind(COUNTERPART_ARRIVED)
        .execute(&mut *tx)
        .await?;
    }
    write_over_refunds(tx, over_refunds).await
}

/// Makes each payment's one `over_refunded` row (migration 0008 keys it by payment id)
/// say what the engine says: present, about its first line below zero, open or
/// resolved (`recovered`, keeping the time it was first resolved); or absent (removed
/// through `recon_withdraw_over_refunds`, migration 0008, which since 0010 logs the
/// withdrawal: contract §6 says such a row never existed, the log keeps its history).
///
/// A row a person accepted (contract §8) is never reopened or re-resolved; it is still
/// removed if the lines say it never existed. A row already in the state wanted is not
/// rewritten, so a retried checkpoint logs nothing. The actions logged compare each row with its state before
/// the change: inserted, `opened` (and `resolved` when it is inserted resolved); open
/// again, `reopened`; newly resolved or resolved differently, `resolved` with the
/// resolution as note.
///
/// That earlier state is read by `old` with `FOR UPDATE`, which in READ COMMITTED
/// waits for a person's command holding the row and returns the row as it committed,
/// not as the statement's snapshot saw it; the insert starts only once `old` has
/// locked every row (the `count(*)` init plan). Without that, a reopen committed
/// between the snapshot and the upsert would make the worker's resolution that follows
/// look like no change, and go unlogged.
async fn write_over_refunds(
    tx: &mut sqlx::PgConnection,
    over: OverRefundColumns<'_>,
) -> Result<(), StoreError> {
    let kind = DiscrepancyKind::OverRefunded;
    if !over.payment_ids.is_empty() {
        sqlx::query(&format!(
            "WITH old AS (
                 SELECT id, resolved_at IS NULL AS was_open, resolution
                 FROM recon_discrepancies
                 WHERE kind = '{kind}' AND payment_id = ANY($1)
                 FOR UPDATE),
             written AS (
                 INSERT INTO recon_discrepancies AS d
                        (kind, payment_id, kafka_partition, settlement_event_id, resolved_at, resolution)
                 SELECT '{kind}', u.payment_id, u.pair, u.first_below,
                        CASE WHEN u.open THEN NULL ELSE now() END,
                        CASE WHEN u.open THEN NULL ELSE '{RECOVERED}' END
                 FROM UNNEST($1::text[], $2::int[], $3::text[], $4::bool[]) AS u(payment_id, pair, first_below, open)
                 WHERE (SELECT count(*) FROM old) >= 0
                 ON CONFLICT (payment_id) WHERE kind = '{kind}' DO UPDATE
                 SET settlement_event_id = EXCLUDED.settlement_event_id,
                     resolved_at = CASE WHEN EXCLUDED.resolved_at IS NULL THEN NULL
                                        ELSE COALESCE(d.resolved_at, EXCLUDED.resolved_at) END,
                     resolution = EXCLUDED.resolution
                 WHERE d.resolution IS DISTINCT FROM '{ACCEPTED}'
                   AND (d.settlement_event_id, d.resolved_at IS NULL, d.resolution)
                       IS DISTINCT FROM
                       (EXCLUDED.settlement_event_id, EXCLUDED.resolved_at IS NULL, EXCLUDED.resolution)
                 RETURNING d.id, d.resolved_at IS NULL AS is_open, d.resolution)
             INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
             SELECT w.id, a.action, '{WORKER_ACTOR}', a.note
             FROM written w
             LEFT JOIN old o ON o.id = w.id
             CROSS JOIN LATERAL (VALUES
                 (1, CASE WHEN o.id IS NULL THEN 'opened'
                          WHEN w.is_open AND NOT o.was_open THEN 'reopened' END, NULL::text),
                 (2, CASE WHEN NOT w.is_open
                               AND (o.id IS NULL OR o.was_open OR o.resolution IS DISTINCT FROM w.resolution)
                          THEN 'resolved' END, w.resolution)) AS a(step, action, note)
             WHERE a.action IS NOT NULL
             ORDER BY w.id, a.step"
        ))
        .bind(over.payment_ids)
        .bind(over.partitions)
        .bind(over.first_below)
        .bind(over.open)
        .execute(&mut *tx)
        .await?;
    }
    if !over.absent.is_empty() {
        // The runtime role has no DELETE: the function removes exactly these rows with
        // its owner's rights, and logs each removal (migration 0010).
        sqlx::query("SELECT recon_withdraw_over_refunds($1)")
            .bind(over.absent)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}
