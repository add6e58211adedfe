//! The batch commit in flight: started in the background while the next batch is
//! collected, and what it did pair by pair once it ends.
//!
//! A batch is written in up to `commit_parallelism` transactions at once, each holding
//! whole partition pairs: a pair's offsets and results stay in one transaction
//! (everything a pair writes concerns only that pair, as the topics are
//! co-partitioned), and PostgreSQL spreads the work over its cores instead of one
//! backend (measured on 2 cores, batches of 10,000: 82k events/s in one transaction,
//! 119k in two, 112k in four). A fenced pair, or one whose inserts clash with stored
//! event ids, is reported and the rest of its transaction written again without it; a
//! transient failure retries the pairs that did not commit, with backoff.

use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::pairs::ReadCounts;
use crate::consumer::Delivery;
use crate::retry::{Backoff, Operation};
use crate::store::{PairCheckpoint, RefusedMessage, Store, StoreError};
use crate::telemetry::metrics as m;
use crate::telemetry::Health;

/// The previous batch's commit. At most one: it is awaited before the next starts.
pub(super) struct Committer {
    store: Store,
    health: Arc<Health>,
    parallelism: usize,
    in_flight: Option<InFlight>,
    /// What the batch being committed read, per pair, for the metrics.
    pub counts: HashMap<i32, ReadCounts>,
}

/// Still running, or finished while the next batch was being collected (and not yet
/// acted on).
enum InFlight {
    Running(tokio::task::JoinHandle<Written>),
    Done(Written),
}

/// What a batch's commit did, pair by pair.
pub(super) struct Written {
    pub committed: Vec<PairCheckpoint>,
    pub fenced: Vec<i32>,
    /// Pairs that inserted event ids already stored: nothing of theirs was written.
    pub clashed: Vec<i32>,
    /// Messages whose values PostgreSQL refused: nothing of their pairs was written.
    pub refused: Vec<RefusedMessage>,
    /// A permanent failure; the pairs in `committed` did commit.
    pub failed: Option<StoreError>,
}

/// What the latency and batch-size metrics of a commit need.
pub(super) struct CommitTiming {
    pub started: Instant,
    pub messages: usize,
    pub timestamps: Vec<i64>,
}

impl Committer {
    pub fn new(store: Store, health: Arc<Health>, parallelism: usize) -> Self {
        Self {
            store,
            health,
            parallelism,
            in_flight: None,
            counts: HashMap::new(),
        }
    }

    /// Starts committing a batch in the background.
    pub fn start(
        &mut self,
        checkpoints: Vec<PairCheckpoint>,
        counts: HashMap<i32, ReadCounts>,
        timing: CommitTiming,
    ) {
        self.counts = counts;
        if checkpoints.is_empty() {
            return;
        }
        let (store, health) = (self.store.clone(), Arc::clone(&self.health));
        let parallelism = self.parallelism;
        let task = async move {
            let written = write(&store, &health, checkpoints, parallelism).await;
            if written.failed.is_none() {
                record_commit_metrics(timing);
            }
            written
        };
        self.in_flight = Some(InFlight::Running(tokio::spawn(task.in_current_span())));
    }

    /// Waits for the next delivery until `deadline`, but only while a commit runs; a
    /// commit finishing first ends the wait (see `collect`).
    pub async fn wait_for_more(
        &mut self,
        deliveries: &mut mpsc::Receiver<Delivery>,
        deadline: tokio::time::Instant,
    ) -> Option<Delivery> {
        let Some(InFlight::Running(task)) = &mut self.in_flight else {
            return None;
        };
        let finished = tokio::select! {
            written = task => written.expect("the commit task does not panic"),
            delivery = tokio::time::timeout_at(deadline, deliveries.recv()) => {
                return delivery.ok().flatten();
            }
        };
        self.in_flight = Some(InFlight::Done(finished));
        None
    }

    /// Waits for the commit in flight, if any; returns what it did.
    pub async fn finish(&mut self) -> Option<Written> {
        match self.in_flight.take()? {
            InFlight::Done(written) => Some(written),
            InFlight::Running(task) => Some(task.await.expect("the commit task does not panic")),
        }
    }
}

fn record_commit_metrics(timing: CommitTiming) {
    metrics::histogram!(m::CHECKPOINT_DURATION).record(timing.started.elapsed().as_secs_f64());
    metrics::histogram!(m::CHECKPOINT_BATCH_SIZE).record(timing.messages as f64);
    let committed_ms = chrono::Utc::now().timestamp_millis();
    for ts in timing.timestamps {
        // Saturating: a producer sets the Kafka timestamp, to anything (i64::MIN
        // overflowed the subtraction: a panic in a debug build, found by
        // tests/fuzz_path.rs).
        metrics::histogram!(m::PROCESSING_LATENCY)
            .record(committed_ms.saturating_sub(ts).max(0) as f64 / 1000.0);
    }
}

/// Writes a batch's checkpoints, a few transactions at once (see the module doc).
async fn write(
    store: &Store,
    health: &Health,
    checkpoints: Vec<PairCheckpoint>,
    parallelism: usize,
) -> Written {
    let mut backoff = Backoff::new(Operation::Checkpoint, health);
    let mut pending = checkpoints;
    let mut written = Written {
        committed: Vec::with_capacity(pending.len()),
        fenced: Vec::new(),
        clashed: Vec::new(),
        refused: Vec::new(),
        failed: None,
    };
    while !pending.is_empty() {
        let mut writes = tokio::task::JoinSet::new();
        let per_transaction = pending.len().div_ceil(parallelism.max(1));
        while !pending.is_empty() {
            let group: Vec<PairCheckpoint> = pending
                .drain(..per_transaction.min(pending.len()))
                .collect();
            let store = store.clone();
            writes.spawn(async move {
                let result = store.checkpoint(&group).await;
                (group, result)
            });
        }
        let mut transient = None;
        while let Some(joined) = writes.join_next().await {
            let (group, result) = joined.expect("checkpoint tasks do not panic");
            if let Some(error) = written.sort(group, result, &mut pending) {
                transient = Some(error);
            }
        }
        if written.failed.is_some() {
            break;
        }
        if let Some(error) = transient {
            metrics::counter!(m::CHECKPOINT_FAILURES, "kind" => "transient").increment(1);
            backoff.wait(&error).await;
        }
    }
    written
}

impl Written {
    /// Files one transaction's result: its pairs committed, or the ones to write again
    /// back in `pending`. Returns a transient error to back off from.
    fn sort(
        &mut self,
        group: Vec<PairCheckpoint>,
        result: Result<(), StoreError>,
        pending: &mut Vec<PairCheckpoint>,
    ) -> Option<StoreError> {
        match result {
            Ok(()) => self.committed.extend(group),
            Err(StoreError::Fenced(pairs)) => {
                // Nothing of this transaction was written: the others go again.
                pending.extend(group.into_iter().filter(|c| !pairs.contains(&c.pair)));
                self.fenced.extend(pairs);
            }
            Err(StoreError::EventIdsClash(pairs)) => {
                pending.extend(group.into_iter().filter(|c| !pairs.contains(&c.pair)));
                self.clashed.extend(pairs);
            }
            Err(StoreError::DataErrors(refused)) => {
                pending.extend(
                    group
                        .into_iter()
                        .filter(|c| !refused.iter().any(|r| r.pair == c.pair)),
                );
                self.refused.extend(refused);
            }
            Err(error) if error.is_transient() => {
                pending.extend(group);
                return Some(error);
            }
            Err(error) => {
                metrics::counter!(m::CHECKPOINT_FAILURES, "kind" => "permanent").increment(1);
                self.failed = Some(error);
            }
        }
        None
    }
}
