//! The loop tying consumer → engine → store. One task owns all partition-pair state;
//! the poll thread talks to it only through [`Delivery`] values, in order, and it
//! answers through the consumer's command channel.
//!
//! Per batch, while the previous batch is still committing: evict, load window misses
//! (one query), apply events in partition order, advance watermarks and fire deadlines
//! (sweeping due stored items). Then wait for the previous commit and start this
//! batch's: a few transactions at once, each holding whole partition pairs, so a
//! pair's transactions commit in batch order. Only after a pair commits are its keys
//! made evictable and its offsets committed to Kafka (advisory, coalesced). Transient
//! database errors are retried with capped exponential backoff (no further batch
//! starts committing meanwhile); a fenced pair's state is dropped, with what the next
//! batch applied to it, and the other pairs are unaffected.
//!
//! Event ids are unique for all time (contract §1), but a redelivery may come under
//! another payment id, whose stored events a lookup does not bring. Checking every
//! event id against storage cost 15-20% of the pipeline's throughput, so the insert
//! itself is the check: a pair whose insert clashes with a stored event id is
//! replayed (its state dropped, its partitions re-read from the stored offsets) with
//! every event id checked, until it is past the point where it clashed.
//!
//! Who holds what:
//! - `batch`: collecting a batch from the deliveries ([`Data`] until a [`Control`]).
//! - `pairs`: the partition pairs owned ([`pairs::Pairs`]: engine, offsets read /
//!   sent / committed, replay state) and applying a batch's messages to them.
//! - `lifecycle`: taking, warming, revoking and replaying pairs; answering control.
//! - `lookups`: what the window lacks for a batch, loaded in one round trip, and the
//!   deadline sweeps.
//! - `commit`: the commit in flight ([`commit::Committer`]), a few transactions at once.
//! - `settle`: acting on what a commit did, acknowledging what committed, the next
//!   checkpoints, and the advisory Kafka commits.
//! - `gauges`: window, lag, watermark and open-item gauges.
//! - `redrive`: re-driving rejected messages an operator asked for (contract §8), as
//!   late events of the pairs this worker owns.

mod batch;
mod commit;
mod gauges;
mod lifecycle;
mod lookups;
mod pairs;
mod redrive;
mod settle;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::clock::now_micros;
use crate::config::Config;
use crate::consumer::{ConsumerHandle, Control, Delivery};
use crate::engine::EngineConfig;
use crate::store::{Store, StoreError};
use crate::telemetry::Health;
use batch::{Batch, Batching};
use commit::{CommitTiming, Committer};
use gauges::OpenItemsGauges;
use pairs::Pairs;
use redrive::Redrives;
use settle::{checkpoints, Advisory};

/// Why the pipeline stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("partition pair {0} must be re-read from its stored offsets, and there is no consumer to do it")]
    CannotReplay(i32),
}

pub struct Pipeline {
    store: Store,
    health: Arc<Health>,
    /// The way to the poll thread; `None` when the pipeline is driven without a
    /// broker (a benchmark): no advisory commits, and a replay is an error.
    consumer: Option<ConsumerHandle>,
    batching: Batching,
    /// The partition pairs this worker owns, and those waiting to be replayed.
    pairs: Pairs,
    /// The previous batch's commit, running while this batch is collected and applied.
    commit: Committer,
    /// When the offsets committed to PostgreSQL go to Kafka too.
    advisory: Advisory,
    open_items: OpenItemsGauges,
    /// Re-drives of rejected messages (contract §8).
    redrives: Redrives,
}

impl Pipeline {
    pub fn new(
        config: &Config,
        store: Store,
        consumer: Option<ConsumerHandle>,
        health: Arc<Health>,
    ) -> Self {
        let engine_config = EngineConfig::new(&config.matching, config.window);
        Self {
            commit: Committer::new(
                store.clone(),
                Arc::clone(&health),
                config.commit_parallelism,
            ),
            store,
            health,
            consumer,
            batching: Batching {
                max_messages: config.batch_max_messages,
                max_wait: config.batch_max_wait,
            },
            pairs: Pairs::new(engine_config),
            advisory: Advisory::default(),
            open_items: OpenItemsGauges::default(),
            redrives: Redrives::new(config.decode_limits()),
        }
    }

    /// Runs until a `Stop` (or the channel closing); returns after the last commit.
    pub async fn run(
        mut self,
        mut deliveries: mpsc::Receiver<Delivery>,
    ) -> Result<(), PipelineError> {
        loop {
            self.health.loop_turned();
            let (batch, control) = self.collect(&mut deliveries).await;
            self.process(batch).await?;
            self.open_items.refresh(&self.store, &self.pairs);
            let Some(control) = control else {
                self.commit_advisory(false);
                continue;
            };
            // Control is answered only after the batch in hand is durable.
            self.settle().await?;
            self.start_replays().await?;
            if !self.answer(control).await? {
                return Ok(());
            }
        }
    }

    /// Acts on a control delivery and answers it; false once told to stop.
    async fn answer(&mut self, control: Control) -> Result<bool, PipelineError> {
        match control {
            Control::Assign { pairs, reply } => {
                self.commit_advisory(true);
                let result = self.assign(&pairs).await;
                let answer = result.as_ref().map(Vec::clone).map_err(ToString::to_string);
                let _ = reply.send(answer);
                result?;
                // The poll thread assigns and starts fetching while the window warms.
                self.warm(&pairs).await?;
            }
            Control::Revoke { pairs, done } => {
                let _ = done.send(self.revoke(&pairs));
            }
            Control::Stop { done } => {
                let _ = done.send(self.pairs.committed_offsets(|_| true));
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Pipeline {
    async fn process(&mut self, batch: Batch) -> Result<(), PipelineError> {
        let span = batch.span();
        self.process_batch(batch).instrument(span).await
    }

    /// Everything up to the commit overlaps the previous batch's commit: the keys that
    /// batch changed are resident and pinned until it is acknowledged, so lookups and
    /// sweeps never need its uncommitted rows.
    async fn process_batch(&mut self, batch: Batch) -> Result<(), PipelineError> {
        let now = now_micros();
        let started = Instant::now();
        self.pairs.evict();
        let evicted = started.elapsed();
        self.load_misses(&batch.items).await?;
        let looked_up = started.elapsed();
        let applied = self.pairs.apply(batch.items, now);
        self.redrive().await?;
        let after_apply = started.elapsed();
        self.fire_deadlines(now).await?;
        let mut checkpoints = checkpoints(&mut self.pairs, applied.rejected);
        let swept = started.elapsed();
        self.settle().await?;
        tracing::debug!(
            evict_ms = evicted.as_secs_f64() * 1e3,
            lookup_ms = (looked_up - evicted).as_secs_f64() * 1e3,
            apply_ms = (after_apply - looked_up).as_secs_f64() * 1e3,
            sweep_ms = (swept - after_apply).as_secs_f64() * 1e3,
            commit_wait_ms = (started.elapsed() - swept).as_secs_f64() * 1e3,
            "batch phases"
        );
        // A pair fenced or clashed in the previous commit is gone, with this batch's
        // work on it.
        checkpoints.retain(|checkpoint| self.pairs.owns(checkpoint.pair));
        self.start_replays().await?;
        let timing = CommitTiming {
            started,
            messages: batch.messages,
            timestamps: applied.timestamps,
        };
        self.commit
            .start(checkpoints, self.pairs.take_counts(), timing);
        self.publish_gauges();
        Ok(())
    }
}
