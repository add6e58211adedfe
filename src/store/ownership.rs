//! Ownership of partition pairs: taking pairs over, reading where they stand, and the
//! fencing every checkpoint starts with.
//!
//! One row of `recon_partition_pairs` per pair holds its owner's epoch, its stored
//! offsets (the source of truth for where to resume) and its high marks (where the
//! watermark resumes). Taking a pair over bumps the epoch; a checkpoint moves the
//! offsets only where the epoch it holds still matches. These statements are together
//! because they are one protocol: an epoch bump here is what makes the conditional
//! update in [`Store::advance_pairs`] refuse a zombie.

use chrono::{DateTime, Utc};

use crate::event::Input;
use crate::pair::{PairPosition, PerInput};

use super::checkpoint::PairCheckpoint;
use super::rows::{to_time, PairRow, StoredOffsetsRow};
use super::{Store, StoreError};

impl Store {
    /// Takes ownership of partition pairs: bumps each epoch (creating the row on first
    /// sight) and returns the stored offsets and high marks to resume from.
    pub async fn acquire_pairs(&self, pairs: &[i32]) -> Result<Vec<PairPosition>, StoreError> {
        let rows: Vec<PairRow> = sqlx::query_as(
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
                    payments_high_mark, settlements_high_mark
             FROM recon_partition_pairs
             WHERE payments_topic = $1 AND settlements_topic = $2 AND kafka_partition = $3 AND epoch = $4",
        )
        .bind(&self.payments_topic)
        .bind(&self.settlements_topic)
        .bind(pair)
        .bind(epoch)
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

    /// The first statement of a checkpoint: moves each pair's offsets and high marks,
    /// only where the epoch the batch holds is still the stored one. Fails with
    /// [`StoreError::Fenced`] naming the pairs whose epoch moved on; the caller's
    /// transaction then rolls back, so a zombie writes nothing.
    pub(super) async fn advance_pairs(
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
}
