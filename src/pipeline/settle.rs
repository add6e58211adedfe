//! After a commit: acting on what each pair's transaction did (fenced pairs dropped,
//! clashed and refused ones queued for a replay, committed ones acknowledged), building
//! the next batch's checkpoints, and the advisory Kafka commits that follow the
//! PostgreSQL ones.

use std::time::{Duration, Instant};

use hashbrown::HashMap;

use super::pairs::{Pairs, ReadCounts};
use super::{Pipeline, PipelineError};
use crate::consumer::Command;
use crate::event::Topic;
use crate::pair::PerTopic;
use crate::rejection::RejectedMessage;
use crate::store::{PairCheckpoint, RefusedMessage};
use crate::telemetry::metrics as m;

/// How often the offsets committed to PostgreSQL are also committed to Kafka. They are
/// advisory (for lag tools); PostgreSQL is the source of truth. Once per batch would
/// write to `__consumer_offsets` 50 times a second under load for a lag figure that
/// nobody reads more often than every few seconds.
const ADVISORY_EVERY: Duration = Duration::from_secs(1);

/// How often a pair with nothing else to write checkpoints its moved watermark. The
/// global watermark (contract §7) is the smallest pair watermark PostgreSQL holds, so
/// an idle pair must store its watermark as it follows the clock, or payout deadlines
/// would wait for traffic on every partition.
const WATERMARK_EVERY: Duration = Duration::from_secs(1);

impl Pipeline {
    /// Waits for the batch being committed, then acts on it: fenced pairs are
    /// dropped, clashed and refused ones queued for a replay, committed ones
    /// acknowledged; a permanent failure stops the pipeline.
    pub(super) async fn settle(&mut self) -> Result<(), PipelineError> {
        let Some(written) = self.commit.finish().await else {
            return Ok(());
        };
        if !written.fenced.is_empty() {
            metrics::counter!(m::FENCED_CHECKPOINTS).increment(written.fenced.len() as u64);
            tracing::warn!(pairs = ?written.fenced, "fenced: another worker owns these partition pairs; dropping their state");
            for &pair in &written.fenced {
                self.pairs.drop_pair(pair);
            }
            self.publish_assignment();
        }
        if !written.clashed.is_empty() {
            metrics::counter!(m::PAIR_REPLAYS).increment(written.clashed.len() as u64);
            tracing::warn!(pairs = ?written.clashed, "event ids already stored (a redelivery under another payment id?); \
                re-reading these partition pairs from their stored offsets, checking every event id");
            self.pairs.clash(written.clashed);
        }
        if !written.refused.is_empty() {
            self.redrives.note_refused(&self.pairs, &written.refused);
            refuse(&mut self.pairs, written.refused);
        }
        // Pairs that did commit are acknowledged even when another failed for good,
        // so their offsets are not replayed on top of their results.
        let pending = acknowledge(&mut self.pairs, &mut self.commit.counts, &written.committed);
        self.redrives.acknowledged(&written.committed);
        self.advisory.pending |= pending;
        match written.failed {
            Some(error) => Err(error.into()),
            None => {
                self.health.set_backing_off(false);
                self.health.set_database_ok(true);
                Ok(())
            }
        }
    }

    /// Commits the offsets stored in PostgreSQL to Kafka too, at most once per
    /// [`ADVISORY_EVERY`] unless `now`. The loop turns at least every tick, so a quiet
    /// stream's last offsets follow within a second.
    pub(super) fn commit_advisory(&mut self, now: bool) {
        if !self.advisory.due(now) {
            return;
        }
        if let Some(consumer) = &self.consumer {
            consumer.send(Command::Commit(self.pairs.committed_offsets(|_| true)));
        }
    }
}

/// Offsets committed to PostgreSQL since the last advisory Kafka commit, and when the
/// next one is due.
pub(super) struct Advisory {
    pending: bool,
    due: Instant,
}

impl Default for Advisory {
    fn default() -> Self {
        Self {
            pending: false,
            due: Instant::now(),
        }
    }
}

impl Advisory {
    /// Whether to commit now; if so, the next is due in [`ADVISORY_EVERY`].
    fn due(&mut self, now: bool) -> bool {
        if !self.pending || (!now && Instant::now() < self.due) {
            return false;
        }
        self.pending = false;
        self.due = Instant::now() + ADVISORY_EVERY;
        true
    }
}

/// Messages PostgreSQL refused (contract §1: a value the decoder accepts but the
/// database cannot hold is that message's fault, never the partition's): their pairs
/// are dropped, with the batch applied after, and re-read from their stored offsets
/// with those messages rejected, so the engine never sees them and the rest of their
/// batch commits as if they had been rejected from the start.
fn refuse(pairs: &mut Pairs, refused: Vec<RefusedMessage>) {
    for message in &refused {
        tracing::error!(
            partition = message.pair,
            topic = %message.topic,
            offset = message.offset,
            reason = %message.reason,
            "PostgreSQL refused a message's values; rejecting it and re-reading its partition pair"
        );
    }
    let replayed = pairs.refuse(refused);
    metrics::counter!(m::PAIR_REPLAYS).increment(replayed as u64);
}

/// What each pair's part of the batch writes: its changes, its rejections, its payout
/// announcements, the offsets it moved, and its watermark; a pair with none of them
/// has nothing to commit. A moved watermark alone is written at most every
/// [`WATERMARK_EVERY`].
pub(super) fn checkpoints(
    pairs: &mut Pairs,
    mut rejected: HashMap<i32, Vec<RejectedMessage>>,
) -> Vec<PairCheckpoint> {
    let mut checkpoints = Vec::new();
    for (pair, owned) in pairs.iter_mut() {
        let changes = owned.engine.take_changes();
        let rejected = rejected.remove(&pair).unwrap_or_default();
        let watermark = owned.engine.watermark();
        let (watermark_sent, sent_at) = owned.watermark_sent;
        let watermark_due = watermark > watermark_sent && sent_at.elapsed() >= WATERMARK_EVERY;
        if changes.is_empty()
            && rejected.is_empty()
            && owned.announcements.is_empty()
            && owned.redriven.is_empty()
            && owned.read == owned.sent
            && !watermark_due
        {
            continue;
        }
        let next_offsets = PerTopic::from_fn(|topic| {
            (owned.read[topic] != owned.sent[topic])
                .then_some(owned.read[topic])
                .flatten()
        });
        owned.sent = owned.read;
        if watermark > watermark_sent {
            owned.watermark_sent = (watermark, std::time::Instant::now());
        }
        checkpoints.push(PairCheckpoint {
            pair,
            epoch: owned.epoch,
            next_offsets,
            changes,
            rejected,
            announcements: std::mem::take(&mut owned.announcements),
            watermark,
            redriven: std::mem::take(&mut owned.redriven),
        });
    }
    checkpoints
}

/// After the commit: counts what the pairs read and their outcomes, makes their keys
/// evictable again and records the committed offsets. Returns whether any offset moved
/// (for the next advisory Kafka commit).
fn acknowledge(
    pairs: &mut Pairs,
    counts: &mut HashMap<i32, ReadCounts>,
    committed: &[PairCheckpoint],
) -> bool {
    let mut moved = false;
    for checkpoint in committed {
        count_committed(checkpoint, counts.remove(&checkpoint.pair));
        let Some(owned) = pairs.get_mut(checkpoint.pair) else {
            continue;
        };
        owned.engine.checkpointed(checkpoint.changes.generation);
        if !checkpoint.redriven.is_empty() {
            owned
                .redrives_held
                .retain(|held| !checkpoint.redriven.iter().any(|r| r.id == held.id));
        }
        for topic in Topic::ALL {
            if let Some(offset) = checkpoint.next_offsets[topic] {
                owned.committed[topic] = Some(offset);
                moved = true;
            }
        }
        if !owned.refused.is_empty() {
            let committed = owned.committed;
            owned
                .refused
                .retain(|r| committed[r.topic].is_none_or(|next| r.offset >= next));
        }
        if owned.probed_through() {
            owned.probe_until = None;
            tracing::info!(
                pair = checkpoint.pair,
                "partition pair replayed past its clash"
            );
        }
    }
    moved
}

/// Outcomes as committed: each event's outcome after this batch, counted once per batch
/// in which it was set or changed; and what the pair read for this batch.
fn count_committed(checkpoint: &PairCheckpoint, counts: Option<ReadCounts>) {
    for row in &checkpoint.changes.rows {
        metrics::counter!(m::OUTCOMES, "outcome" => row.outcome.as_str()).increment(1);
    }
    for rejection in &checkpoint.rejected {
        metrics::counter!(m::EVENTS_REJECTED, "topic" => rejection.topic.label(), "reason" => rejection.class)
            .increment(1);
    }
    for redriven in &checkpoint.redriven {
        metrics::counter!(m::REDRIVES, "result" => redriven.result.as_str()).increment(1);
    }
    if let Some(counts) = counts {
        for topic in Topic::ALL {
            if topic == Topic::Payouts && counts.consumed[topic] == 0 {
                // No series for a topic this worker may not read.
                continue;
            }
            metrics::counter!(m::EVENTS_CONSUMED, "topic" => topic.label())
                .increment(counts.consumed[topic]);
            metrics::counter!(m::EVENTS_REDELIVERED, "topic" => topic.label())
                .increment(counts.redelivered[topic]);
        }
    }
}
