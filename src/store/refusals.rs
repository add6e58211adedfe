//! Tracing a data error to the messages that caused it.
//!
//! When PostgreSQL refuses a value of a batch (SQLSTATE class 22: a character the
//! database encoding cannot hold, a time out of its range...) the whole checkpoint
//! fails without saying which row. Every value a batch writes comes from its
//! messages' rows (updates, discrepancies and payout partial sums only repeat values
//! of those rows or of rows stored before), so the culprits are found by inserting the
//! new event rows, payout announcements and rejected rows again, into temporary copies
//! of the tables without their keys,
//! inside a transaction that is rolled back. Kept apart from the checkpoint because it
//! runs only after one failed, and writes nothing that stays.

use crate::engine::RowWrite;
use crate::event::Topic;
use crate::rejection::RejectedMessage;

use super::checkpoint::{AnnouncementAt, PairCheckpoint};
use super::error::{is_data_error, RefusedMessage};
use super::payout_rows::insert_announcements;
use super::redrive::RedriveResult;
use super::writes::insert_events;
use super::{Store, StoreError};

/// One message's part of a batch, for [`Store::refused_messages`].
enum Unit<'a> {
    /// A new event row: its pair, the row and the offset of its message.
    Event(i32, &'a RowWrite, i64),
    /// A payout announcement and its pair.
    Announcement(i32, &'a AnnouncementAt),
    /// A rejected message, or a re-driven one rejected again (contract §8), whose
    /// new reason is written too.
    Rejected(&'a RejectedMessage),
}

impl Unit<'_> {
    fn refused(&self, reason: String) -> RefusedMessage {
        match self {
            Unit::Event(pair, row, offset) => RefusedMessage {
                pair: *pair,
                topic: row.kind.input().into(),
                offset: *offset,
                reason,
            },
            Unit::Announcement(pair, at) => RefusedMessage {
                pair: *pair,
                topic: Topic::Payouts,
                offset: at.offset,
                reason,
            },
            Unit::Rejected(rejected) => RefusedMessage {
                pair: rejected.partition,
                topic: rejected.topic,
                offset: rejected.offset,
                reason,
            },
        }
    }
}

impl Store {
    /// The messages of a batch whose values PostgreSQL refuses: halves that fail with
    /// a data error are split until single rows remain (a few statements per culprit,
    /// whatever the value and whichever column).
    pub(super) async fn refused_messages(
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
            units.extend((pair.announcements.iter()).map(|at| Unit::Announcement(pair.pair, at)));
            units.extend(pair.rejected.iter().map(Unit::Rejected));
            units.extend(pair.redriven.iter().filter_map(|r| match &r.result {
                RedriveResult::Rejected(rejection) => Some(Unit::Rejected(rejection)),
                _ => None,
            }));
        }
        let mut connection = self.connection().await?;
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        for statement in [
            "CREATE TEMPORARY TABLE recon_probe_events (LIKE recon_events INCLUDING DEFAULTS) ON COMMIT DROP",
            "CREATE TEMPORARY TABLE recon_probe_rejected (LIKE rejected_events INCLUDING DEFAULTS) ON COMMIT DROP",
            "CREATE TEMPORARY TABLE recon_probe_announcements (LIKE recon_payout_announcements INCLUDING DEFAULTS) ON COMMIT DROP",
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
        refused.sort_by_key(|r| (r.pair, r.topic, r.offset));
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
                _ => None,
            })
            .collect();
        let announcements: Vec<(i32, &AnnouncementAt)> = units
            .iter()
            .filter_map(|unit| match unit {
                Unit::Announcement(pair, at) => Some((*pair, *at)),
                _ => None,
            })
            .collect();
        let rejected: Vec<&RejectedMessage> = units
            .iter()
            .filter_map(|unit| match unit {
                Unit::Rejected(rejected) => Some(*rejected),
                _ => None,
            })
            .collect();
        let mut result = insert_events(&mut *tx, "recon_probe_events", &events).await;
        if result.is_ok() {
            let no_seqs = Default::default();
            result = insert_announcements(
                &mut *tx,
                "recon_probe_announcements",
                &announcements,
                &no_seqs,
            )
            .await;
        }
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
}
