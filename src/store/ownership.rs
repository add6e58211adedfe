//! Ownership of partition pairs: taking pairs over, reading where they stand, and the
//! fencing every checkpoint starts with.
//!
//! One row of `recon_partition_pairs` per pair holds its owner's epoch, its stored
//! offsets (the source of truth for where to resume; the payouts partition's only for
//! the payouts topic named beside it), its high marks (where the watermark resumes),
//! its committed watermark (what the global watermark of contract §7 is made of) and
//! its payout sequence (the evaluator's cursor). Taking a pair over bumps the epoch; a checkpoint moves the
//! offsets only where the epoch it holds still matches. These statements are together
//! because they are one protocol: an epoch bump here is what makes the conditional
//! update in [`Store::advance_pairs`] refuse a zombie.

use chrono::{DateTime, Utc};

use std::collections::HashMap;

use crate::event::{Input, Topic};
use crate::pair::{PairPosition, PerInput, PerTopic};

use super::checkpoint::PairCheckpoint;
use super::rows::{to_time, PairRow, StoredOffsetsRow};
use super::{Store, StoreError};

impl Store {
    /// Takes ownership of partition pairs: bumps each epoch (creating the row on first
    /// sight) and returns the stored offsets and high marks to resume from.
    pub async fn acquire_pairs(&self, pairs: &[i32]) -> Result<Vec<PairPosition>, StoreError> {
        // The payouts offset belongs to the payouts topic named beside it: a worker
        // reading another payouts topic (or none) starts that one from the beginning,
        // where redelivered announcements are recognised by their event ids.
        let rows: Vec<PairRow> = sqlx::query_as(
            "INSERT INTO recon_partition_pairs (payments_topic, settlements_topic, kafka_partition, epoch, payouts_topic)
             SELECT $1, $2, p, 1, $4 FROM UNNEST($3::int[]) AS p
             ON CONFLICT (payments_topic, settlements_topic, kafka_partition)
             DO UPDATE SET epoch = recon_partition_pairs.epoch + 1, updated_at = now(),
                 payouts_next_offset = CASE WHEN recon_partition_pairs.payouts_topic IS NOT DISTINCT FROM $4
                                            THEN recon_partition_pairs.payouts_next_offset END,
                 payouts_topic = $4
             RETURNING kafka_partition, epoch, payments_next_offset, settlements_next_offset,
                       payouts_next_offset, payments_high_mark, settlements_high_mark",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(pairs)
        .bind(&self.payouts_topic)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(PairPosition::from).collect())
    }

    /// Where a pair this worker owns stands in storage: its stored offsets and high
    /// marks, or `None` when its epoch moved on (another worker owns it now).
    pub async fn owned_position(
        &self,
        pair: i32,
        epoch: i64,
    ) -> Result<Option<PairPosition>, StoreError> {
        let row: Option<PairRow> = sqlx::query_as(
            "SELECT kafka_partition, epoch, payments_next_offset, settlements_next_offset,
                    CASE WHEN payouts_topic IS NOT DISTINCT FROM $5 THEN payouts_next_offset END
                        AS payouts_next_offset,
                    payments_high_mark, settlements_high_mark
             FROM recon_partition_pairs
             WHERE payments_topic = $1 AND settlements_topic = $2 AND kafka_partition = $3 AND epoch = $4",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(pair)
        .bind(epoch)
        .bind(&self.payouts_topic)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(PairPosition::from))
    }

    /// Stored offsets of all pairs of these topics, without taking ownership (for lag).
    pub async fn stored_offsets(&self) -> Result<Vec<(i32, [Option<i64>; 2])>, StoreError> {
        let rows: Vec<StoredOffsetsRow> = sqlx::query_as(
            "SELECT kafka_partition, payments_next_offset, settlements_next_offset
             FROM recon_partition_pairs WHERE payments_topic = $1 AND settlements_topic = $2",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let offsets = [row.payments_next_offset, row.settlements_next_offset];
                (row.kafka_partition, offsets)
            })
            .collect())
    }

    /// The first statement of a checkpoint: moves each pair's offsets, high marks and
    /// watermark, and bumps the payout sequence of pairs that write payout rows, only
    /// where the epoch the batch holds is still the stored one. Returns each pair's
    /// payout sequence, the `seq` its payout rows carry. Fails with
    /// [`StoreError::Fenced`] naming the pairs whose epoch moved on; the caller's
    /// transaction then rolls back, so a zombie writes nothing.
    ///
    /// The watermark only moves forward (`GREATEST`): a new owner starts from the high
    /// marks, below the watermark its predecessor committed, and the global watermark
    /// must never move back (a payout discrepancy opened on it would then be early).
    pub(super) async fn advance_pairs(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[PairCheckpoint],
    ) -> Result<HashMap<i32, i64>, StoreError> {
        let mut pairs = Vec::with_capacity(batch.len());
        let mut epochs = Vec::with_capacity(batch.len());
        let mut offsets: PerTopic<Vec<Option<i64>>> = PerTopic::default();
        let mut marks: PerInput<Vec<Option<DateTime<Utc>>>> = PerInput::default();
        let mut watermarks = Vec::with_capacity(batch.len());
        let mut bumps = Vec::with_capacity(batch.len());
        for pair in batch {
            pairs.push(pair.pair);
            epochs.push(pair.epoch);
            for topic in Topic::ALL {
                offsets[topic].push(pair.next_offsets[topic]);
            }
            for input in Input::ALL {
                marks[input].push(pair.changes.high_marks[input].map(to_time));
            }
            watermarks.push(pair.watermark.map(to_time));
            bumps.push(pair.writes_payout_rows());
        }
        let updated: Vec<(i32, i64)> = sqlx::query_as(
            "UPDATE recon_partition_pairs AS p
             SET payments_next_offset = COALESCE(u.pay_offset, p.payments_next_offset),
                 settlements_next_offset = COALESCE(u.set_offset, p.settlements_next_offset),
                 payouts_next_offset = COALESCE(u.po_offset, p.payouts_next_offset),
                 payments_high_mark = COALESCE(u.pay_mark, p.payments_high_mark),
                 settlements_high_mark = COALESCE(u.set_mark, p.settlements_high_mark),
                 watermark = GREATEST(p.watermark, u.watermark),
                 payout_seq = p.payout_seq + u.bump::int,
                 updated_at = now()
             FROM UNNEST($3::int[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[],
                         $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::bool[])
                  AS u(kafka_partition, epoch, pay_offset, set_offset, po_offset, pay_mark, set_mark,
                       watermark, bump)
             WHERE p.payments_topic = $1 AND p.settlements_topic = $2
               AND p.kafka_partition = u.kafka_partition AND p.epoch = u.epoch
             RETURNING p.kafka_partition, p.payout_seq",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(&pairs)
        .bind(&epochs)
        .bind(&offsets.payments)
        .bind(&offsets.settlements)
        .bind(&offsets.payouts)
        .bind(&marks.payments)
        .bind(&marks.settlements)
        .bind(&watermarks)
        .bind(&bumps)
        .fetch_all(&mut *tx)
        .await?;
        let seqs: HashMap<i32, i64> = updated.into_iter().collect();
        let fenced: Vec<i32> = pairs
            .into_iter()
            .filter(|p| !seqs.contains_key(p))
            .collect();
        if fenced.is_empty() {
            Ok(seqs)
        } else {
            Err(StoreError::Fenced(fenced))
        }
    }
}
