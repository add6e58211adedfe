//! Reads the engine's window falls back on: stored events by payment id (window
//! misses and swept keys) and which event ids are already stored (telling a
//! redelivery from a new duplicate, and finding the pairs of a clashing batch).
//!
//! Both are keyed by values taken from messages, so both share
//! [`without_refused_keys`]: a key PostgreSQL cannot hold as a value (a character the
//! database encoding cannot represent) must find nothing rather than fail the read,
//! because the message carrying it is rejected when its checkpoint inserts it.

use std::sync::LazyLock;

use futures_util::TryStreamExt;

use crate::engine::{Outcome, StoredEvent};
use crate::event::Input;
use crate::pair::PerInput;

use super::error::is_data_error;
use super::rows::{LookupRow, StoredEventId};
use super::sweeps::outcome_not_in;
use super::{Store, StoreError};

/// The stored events of (pair, payment_id) keys but their duplicates. The condition on
/// the outcome is generated from [`Outcome::DUPLICATES`] as literal SQL, written as the
/// predicate of the partial index `recon_events_payment_id_live` (migrations 0007 and 0008) is,
/// so the planner can prove it implies that predicate and use the index (a bound
/// array would not let it; see `sweeps`).
static LOOKUP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT e.kafka_partition, e.event_kind, e.event_id, e.payment_id, e.outcome, e.event_time,
                e.amount_minor, e.fee_minor, e.net_minor, e.currency, e.line_type, e.refund_id,
                e.dispute_id
         FROM UNNEST($1::int[], $2::text[]) AS k(kafka_partition, payment_id)
         -- OFFSET 0 keeps this a per-key index probe whatever the statistics say.
         CROSS JOIN LATERAL (SELECT * FROM recon_events e
                             WHERE e.payment_id = k.payment_id AND e.kafka_partition = k.kafka_partition
                               AND e.{}
                             OFFSET 0) e",
        outcome_not_in(&Outcome::DUPLICATES)
    )
});

impl Store {
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
        let mut connection = self.connection().await?;
        let mut rows = sqlx::query_as::<_, LookupRow>(&LOOKUP)
            .bind(pairs)
            .bind(payment_ids)
            .fetch(&mut *connection);
        // Decoded row by row: a batch's lookup can return a row per key (a stream of
        // settlements whose payments were stored earlier), and holding every raw row
        // beside its decoded copy cost a few MB at the peak.
        let mut found = Vec::new();
        while let Some(row) = rows.try_next().await? {
            let event =
                StoredEvent::try_from(row.event).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            found.push((row.kafka_partition, event));
        }
        Ok(found)
    }

    /// Which of these (input, event_id) are already stored, under any payment id: an
    /// event id is unique per topic, whatever the event's type.
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
        // The stored `event_kind` is the topic's (see `rows::stored_kind`).
        let rows: Vec<StoredEventId> = sqlx::query_as(
            "SELECT event_kind, event_id FROM recon_events WHERE event_kind = $1 AND event_id = ANY($2)
             UNION ALL
             SELECT event_kind, event_id FROM recon_events WHERE event_kind = $3 AND event_id = ANY($4)",
        )
        .bind(Input::Payments)
        .bind(&by_input.payments)
        .bind(Input::Settlements)
        .bind(&by_input.settlements)
        .fetch_all(&mut *self.connection().await?)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.event_kind, row.event_id))
            .collect())
    }
}

/// Runs a read keyed by ids over the keys `0..len`, leaving out the keys PostgreSQL
/// refuses as values (a data error: a character the database encoding cannot hold).
/// No stored row can carry such a value, so it finds nothing — and the event
/// carrying it is refused, and rejected, when its checkpoint inserts it. Before, the
/// window lookup of a batch with one such payment id failed for good and stopped the
/// worker (found by the whole-path fuzz test on a LATIN1 database). On a data error
/// the keys are halved until each refusing key is alone; the usual read is one query.
pub(super) async fn without_refused_keys<T, F, Fut>(
    len: usize,
    mut read: F,
) -> Result<Vec<T>, StoreError>
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lookup_leaves_out_exactly_the_duplicate_outcomes() {
        let duplicates = Outcome::ALL.into_iter().filter(|o| o.is_duplicate());
        let names: Vec<String> = duplicates.map(|o| format!("'{o}'")).collect();
        let condition = format!("e.outcome NOT IN ({})", names.join(", "));
        assert!(LOOKUP.contains(&condition), "{}", *LOOKUP);
    }
}
