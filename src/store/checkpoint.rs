//! The checkpoint: the one transaction every batch ends in.
//!
//! In order: the pairs' offsets advance (fenced by epoch, see `ownership`), new events
//! are inserted, changed outcomes updated, discrepancies opened and resolved, payout
//! partial sums and announcements written (`payout_rows`), rejected messages kept, and
//! re-drive requests settled (`redrive`; the other statements are in `writes`). All of a batch or none of it is
//! written, so the stored offsets never run ahead of the rows they cover. This file
//! owns that transaction and the failures specific to it: an event id already stored
//! ([`StoreError::EventIdsClash`], traced to the pairs here) and values PostgreSQL
//! refuses ([`StoreError::DataErrors`], traced to the messages by `refusals`).

use std::collections::{BTreeSet, HashMap};

use crate::engine::PairChanges;
use crate::event::{Announcement, Input, Micros};
use crate::pair::PerTopic;
use crate::rejection::RejectedMessage;

use super::error::is_data_error;
use super::payout_rows::{insert_announcements, payout_lines, write_payout_parts};
use super::redrive::{write_redriven, Redriven};
use super::writes::{insert_events, update_events, write_discrepancies};
use super::{Store, StoreError};

/// What one partition pair's part of a checkpoint writes.
#[derive(Debug, Clone)]
pub struct PairCheckpoint {
    pub pair: i32,
    pub epoch: i64,
    /// Next offset per topic after this batch; `None` when the batch read nothing there.
    pub next_offsets: PerTopic<Option<i64>>,
    pub changes: PairChanges,
    pub rejected: Vec<RejectedMessage>,
    /// Payout announcements read from the pair's payouts partition, in order.
    pub announcements: Vec<AnnouncementAt>,
    /// The pair's watermark (contract §2) after this batch; stored only forward.
    pub watermark: Option<Micros>,
    /// Re-drive requests of the pair's rejected messages settled in this batch
    /// (contract §8); an accepted one's rows are in `changes` or `announcements`.
    pub redriven: Vec<Redriven>,
}

/// An accepted payout announcement and the offset it was read at.
#[derive(Debug, Clone)]
pub struct AnnouncementAt {
    pub offset: i64,
    pub announcement: Announcement,
}

impl PairCheckpoint {
    /// Whether this checkpoint writes payout rows (announcements, or lines that name
    /// a payout), which bumps the pair's payout sequence.
    pub fn writes_payout_rows(&self) -> bool {
        !self.announcements.is_empty() || payout_lines(&self.changes.rows).next().is_some()
    }
}

impl Store {
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

    async fn checkpoint_once(&self, batch: &[PairCheckpoint]) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        // First, so a zombie is fenced before it writes anything else.
        let seqs = self.advance_pairs(&mut tx, batch).await?;
        let mut new_rows = Vec::new();
        for pair in batch {
            for row in pair.changes.rows.iter().filter(|row| row.new.is_some()) {
                new_rows.push((pair.pair, row));
            }
        }
        insert_events(&mut tx, "recon_events", &new_rows).await?;
        update_events(&mut tx, batch).await?;
        write_discrepancies(&mut tx, batch).await?;
        write_payout_parts(&mut tx, batch, &seqs).await?;
        let announcements: Vec<(i32, &AnnouncementAt)> = batch
            .iter()
            .flat_map(|p| p.announcements.iter().map(move |a| (p.pair, a)))
            .collect();
        insert_announcements(&mut tx, "recon_payout_announcements", &announcements, &seqs).await?;
        let rejected: Vec<&RejectedMessage> = batch.iter().flat_map(|p| &p.rejected).collect();
        self.insert_rejected(&mut tx, "rejected_events", &rejected)
            .await?;
        let redriven: Vec<&Redriven> = batch.iter().flat_map(|p| &p.redriven).collect();
        write_redriven(&mut tx, &redriven).await?;
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
                    .entry((row.kind.input(), &*row.event_id))
                    .or_insert(pair.pair);
                if first != pair.pair {
                    clashing.insert(pair.pair);
                }
                inputs.push(row.kind.input());
                ids.push(&*row.event_id);
            }
        }
        for (input, event_id) in self.stored_event_ids(&inputs, &ids).await? {
            if let Some(&pair) = first_pair.get(&(input, event_id.as_str())) {
                clashing.insert(pair);
            }
        }
        Ok(clashing.into_iter().collect())
    }
}
