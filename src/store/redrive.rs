//! Re-drive of rejected messages (contract §8, migration 0011): the pending requests a
//! worker reads for the partition pairs it owns, and what its checkpoint writes of
//! their results.
//!
//! Exactly once rests on three things. The results are written in the checkpoint that
//! holds the event's rows, which the pair's epoch fences (a zombie writes nothing); a
//! request is read only while `redriven_at IS NULL`, and the pipeline never reads again
//! one that an uncommitted checkpoint holds; and the results' `UPDATE`s repeat that
//! condition, so a checkpoint retried after a COMMIT of unknown outcome changes nothing
//! the second time (its event rows clash with themselves first, as any batch's do).

use chrono::{DateTime, Utc};

use crate::event::Topic;
use crate::rejection::RejectedMessage;

use super::lookups::without_refused_keys;
use super::{Store, StoreError};

/// Most requests one poll takes, over all the pairs asked for; the rest wait for the
/// next poll, so a re-drive of a million rejects flows through in bounded batches.
pub const REDRIVE_REQUESTS_PER_POLL: i64 = 1_000;

/// A pending request: the rejected message as stored.
#[derive(Debug, Clone)]
pub struct RedriveRequest {
    /// `rejected_events.id`.
    pub id: i64,
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    /// The original payload's length: more than `payload` holds when it was cut.
    pub payload_size: i32,
    pub key: Option<Vec<u8>>,
    /// The message's Kafka timestamp (`None`: it had none), or when it was rejected
    /// for a message rejected before migration 0011 recorded timestamps.
    pub timestamp_ms: Option<i64>,
}

impl RedriveRequest {
    /// The payload was cut at `REJECTED_PAYLOAD_CAP` bytes: it cannot be decoded again.
    pub fn is_truncated(&self) -> bool {
        self.payload
            .as_ref()
            .is_some_and(|p| (self.payload_size as usize) > p.len())
    }
}

/// What became of a request, written with the pair's checkpoint.
#[derive(Debug, Clone)]
pub struct Redriven {
    pub id: i64,
    pub result: RedriveResult,
}

#[derive(Debug, Clone)]
pub enum RedriveResult {
    /// Valid now, and processed as a late event (or stored announcement).
    Accepted,
    /// Valid now, but its event id was accepted meanwhile: nothing changes.
    Redelivery,
    /// Still invalid: rejected again, with this record's reason and class.
    Rejected(RejectedMessage),
    /// Its payload was cut: not decoded.
    Truncated,
}

impl RedriveResult {
    /// `rejected_events.redrive_result`, and the metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            RedriveResult::Accepted => "accepted",
            RedriveResult::Redelivery => "redelivery",
            RedriveResult::Rejected(_) => "rejected",
            RedriveResult::Truncated => "truncated",
        }
    }
}

#[derive(sqlx::FromRow)]
struct RequestRow {
    id: i64,
    topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    payload: Option<Vec<u8>>,
    payload_size: i32,
    kafka_key: Option<Vec<u8>>,
    at: Option<DateTime<Utc>>,
}

impl Store {
    /// The pending re-drive requests of these pairs, of the topics this worker reads,
    /// but those in `held` (in a checkpoint not yet acknowledged), oldest first, at
    /// most [`REDRIVE_REQUESTS_PER_POLL`]. The partial index of migration 0011 holds
    /// only pending requests, so this costs next to nothing when there are none.
    pub async fn redrive_requests(
        &self,
        pairs: &[i32],
        held: &[i64],
    ) -> Result<Vec<RedriveRequest>, StoreError> {
        let topics: Vec<(Topic, &str)> = Topic::ALL
            .into_iter()
            .filter(|&topic| topic != Topic::Payouts || self.payouts_topic.is_some())
            .map(|topic| (topic, self.topic(topic)))
            .collect();
        let names: Vec<&str> = topics.iter().map(|(_, name)| *name).collect();
        let rows: Vec<RequestRow> = sqlx::query_as(
            "SELECT id, topic, kafka_partition, kafka_offset, payload, payload_size, kafka_key,
                    CASE WHEN kafka_timestamp_known THEN kafka_timestamp ELSE rejected_at END AS at
             FROM rejected_events
             WHERE redrive_requested_at IS NOT NULL AND redriven_at IS NULL
               AND kafka_partition = ANY($1) AND topic = ANY($2) AND id <> ALL($3)
             ORDER BY kafka_partition, id
             LIMIT $4",
        )
        .bind(pairs)
        .bind(&names)
        .bind(held)
        .bind(REDRIVE_REQUESTS_PER_POLL)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let topic = topics
                    .iter()
                    .find(|(_, name)| *name == row.topic)
                    .map(|(topic, _)| *topic)?;
                Some(RedriveRequest {
                    id: row.id,
                    topic,
                    partition: row.kafka_partition,
                    offset: row.kafka_offset,
                    payload: row.payload,
                    payload_size: row.payload_size,
                    key: row.kafka_key,
                    timestamp_ms: row.at.map(|at| at.timestamp_millis()),
                })
            })
            .collect())
    }
}

impl Store {
    /// Which of these payout announcement event ids are stored already: a re-driven
    /// announcement whose event id is is a redelivery (contract §1).
    pub async fn stored_announcement_ids(
        &self,
        event_ids: &[&str],
    ) -> Result<Vec<String>, StoreError> {
        // An id PostgreSQL cannot hold finds nothing; its insert is refused later.
        without_refused_keys(event_ids.len(), |keys| async move {
            Ok(sqlx::query_scalar(
                "SELECT event_id FROM recon_payout_announcements WHERE event_id = ANY($1)",
            )
            .bind(&event_ids[keys])
            .fetch_all(&self.pool)
            .await?)
        })
        .await
    }
}

/// Writes what became of the requests a checkpoint settles (see the module doc for
/// why each `UPDATE` repeats `redriven_at IS NULL`).
pub(super) async fn write_redriven(
    tx: &mut sqlx::PgConnection,
    redriven: &[&Redriven],
) -> Result<(), StoreError> {
    if redriven.is_empty() {
        return Ok(());
    }
    let (mut done_ids, mut done_results) = (Vec::new(), Vec::new());
    let (mut again_ids, mut again_results, mut reasons, mut classes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for redriven in redriven {
        match &redriven.result {
            RedriveResult::Accepted | RedriveResult::Redelivery => {
                done_ids.push(redriven.id);
                done_results.push(redriven.result.as_str());
            }
            RedriveResult::Rejected(rejection) => {
                again_ids.push(redriven.id);
                again_results.push(redriven.result.as_str());
                reasons.push(Some(rejection.reason.as_str()));
                classes.push(Some(rejection.class));
            }
            RedriveResult::Truncated => {
                again_ids.push(redriven.id);
                again_results.push(redriven.result.as_str());
                reasons.push(None);
                classes.push(None);
            }
        }
    }
    if !done_ids.is_empty() {
        sqlx::query(
            "UPDATE rejected_events AS r
             SET redriven_at = now(), redrive_attempted_at = now(), redrive_result = u.result
             FROM UNNEST($1::bigint[], $2::text[]) AS u(id, result)
             WHERE r.id = u.id AND r.redriven_at IS NULL",
        )
        .bind(&done_ids)
        .bind(&done_results)
        .execute(&mut *tx)
        .await?;
    }
    if !again_ids.is_empty() {
        // Still rejected: the new reason (a truncated payload keeps its old one), and
        // the request cleared so that it is not read again until asked for again.
        sqlx::query(
            "UPDATE rejected_events AS r
             SET reason = COALESCE(u.reason, r.reason),
                 reason_class = COALESCE(u.class, r.reason_class),
                 redrive_requested_at = NULL, redrive_attempted_at = now(),
                 redrive_result = u.result
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[])
                  AS u(id, result, reason, class)
             WHERE r.id = u.id AND r.redriven_at IS NULL",
        )
        .bind(&again_ids)
        .bind(&again_results)
        .bind(&reasons)
        .bind(&classes)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
