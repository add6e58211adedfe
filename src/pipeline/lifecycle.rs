//! The life of a partition pair in this worker: taken over (epoch bumped, stored
//! offsets read), warmed with its nearest deadlines, revoked, fenced, or dropped and
//! replayed from its stored offsets after a clash or a data error.

use super::{Pipeline, PipelineError};
use crate::consumer::{Command, Rewind, StoredOffset};
use crate::engine::SweepRequest;
use crate::pair::PairPosition;
use crate::retry::{retry, Operation};
use crate::store::StoreError;
use crate::telemetry::metrics as m;

/// Most payment ids loaded into the window per pair when it is assigned.
const WARM_LIMIT: usize = 50_000;

impl Pipeline {
    pub(super) async fn assign(&mut self, pairs: &[i32]) -> Result<Vec<PairPosition>, StoreError> {
        let store = &self.store;
        let positions = retry(Operation::AcquirePairs, &self.health, || {
            store.acquire_pairs(pairs)
        })
        .await?;
        for position in &positions {
            tracing::info!(pair = position.pair, epoch = position.epoch, offsets = ?position.next_offsets, "took ownership");
            self.pairs.take(position);
        }
        self.publish_assignment();
        Ok(positions)
    }

    /// Drops the revoked pairs' state; returns their committed offsets, for the
    /// consumer to commit to Kafka before it lets them go.
    pub(super) fn revoke(&mut self, pairs: &[i32]) -> Vec<StoredOffset> {
        let offsets = self.pairs.committed_offsets(|pair| pairs.contains(&pair));
        for &pair in pairs {
            self.pairs.drop_pair(pair);
        }
        self.publish_assignment();
        offsets
    }

    /// Rebuilds the pairs dropped after an event id clash from storage and asks the
    /// poll thread to re-read them from their stored offsets. A pair whose epoch moved
    /// on meanwhile belongs to another worker now and is left to it.
    pub(super) async fn start_replays(&mut self) -> Result<(), PipelineError> {
        let replays = self.pairs.take_replays();
        if replays.is_empty() {
            return Ok(());
        }
        for replay in replays {
            let store = &self.store;
            let position = retry(Operation::OwnedPosition, &self.health, || {
                store.owned_position(replay.pair, replay.epoch)
            })
            .await?;
            let Some(position) = position else {
                metrics::counter!(m::FENCED_CHECKPOINTS).increment(1);
                tracing::warn!(
                    pair = replay.pair,
                    "fenced: another worker owns this partition pair now"
                );
                continue;
            };
            let Some(consumer) = &self.consumer else {
                return Err(PipelineError::CannotReplay(replay.pair));
            };
            let rewind = Rewind {
                pair: replay.pair,
                next_offsets: position.next_offsets,
                refused: replay.refused.clone(),
            };
            // Only fails when the poll thread is gone, and then the worker is stopping.
            if !consumer.send(Command::Rewind(rewind)) {
                tracing::warn!(pair = replay.pair, "poll thread gone; pair not replayed");
                continue;
            }
            tracing::info!(pair = replay.pair, offsets = ?position.next_offsets, until = ?replay.read, "replaying the partition pair");
            self.pairs.take_for_replay(&position, replay);
        }
        self.publish_assignment();
        Ok(())
    }

    /// Loads the pending items with the nearest deadlines of newly assigned pairs, up
    /// to half the window's share of each pair; the rest stays cold in PostgreSQL.
    pub(super) async fn warm(&mut self, pairs: &[i32]) -> Result<(), StoreError> {
        let window = self.pairs.engine_config().window;
        let share = (window.max_items / pairs.len().max(1) / 2).min(WARM_LIMIT);
        if share == 0 {
            return Ok(());
        }
        let store = &self.store;
        let everything = SweepRequest {
            payments_before: i64::MAX,
            settlements_before: i64::MAX,
        };
        for &pair in pairs {
            let due = retry(Operation::Warm, &self.health, || {
                store.due_keys(pair, everything, share as i64 / 2)
            })
            .await?;
            if due.payment_ids.is_empty() {
                continue;
            }
            let pair_of_each = vec![pair; due.payment_ids.len()];
            let rows = retry(Operation::WarmLookup, &self.health, || {
                store.lookup(&pair_of_each, &due.payment_ids)
            })
            .await?;
            if let Some(owned) = self.pairs.get_mut(pair) {
                let keys = due.payment_ids.len();
                owned.engine.load(
                    due.payment_ids,
                    rows.into_iter().map(|(_, row)| row).collect(),
                );
                tracing::info!(pair, keys, "window warmed with the nearest deadlines");
            }
        }
        self.publish_gauges();
        Ok(())
    }

    pub(super) fn publish_assignment(&mut self) {
        self.pairs.share_window();
        self.health.set_assigned(self.pairs.len());
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(self.pairs.len() as f64);
    }
}
