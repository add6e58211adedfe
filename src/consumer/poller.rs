//! The poll thread: the Kafka consumer's only owner.
//!
//! A dedicated OS thread owns `poll`: librdkafka runs rebalance callbacks on the
//! thread that polls, and ours must wait for the pipeline (see `rebalance`). The
//! thread also decodes, so decoding runs beside the pipeline rather than on it. Each
//! turn it polls one message and hands it over, serves the pipeline's commands
//! (advisory commits, rewinds) and, every [`PROGRESS_EVERY`], reports which partitions
//! are caught up. Messages are handed over on a bounded channel: with librdkafka's
//! bounded prefetch, memory stays flat under any backlog.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::client::{cached_watermarks, KafkaConsumer};
use super::delivery::{
    decode_announcement_message, decode_message, Command, Control, Data, Delivery, OffsetReset,
    ReadAnnouncement, ReadMessage, Rewind, StoredOffset,
};
use crate::event::{Limits, Topic};
use crate::pair::TopicNames;
use crate::rejection::MessageAt;
use crate::telemetry::Health;

pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long a seek may wait for the fetcher to move to the new offset.
pub(super) const REWIND_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Poller {
    pub consumer: KafkaConsumer,
    pub reader: Reader,
    pub commands: std_mpsc::Receiver<Command>,
    pub deliveries: mpsc::Sender<Delivery>,
    pub stop: Arc<AtomicBool>,
    /// Set by the rebalance callbacks when an assignment could not be taken.
    pub failed: Arc<AtomicBool>,
}

/// What the poll thread knows of each partition it reads. Kept apart from the consumer
/// so that a message borrowed from the consumer can be read into it.
pub(super) struct Reader {
    pub topics: TopicNames,
    pub limits: Limits,
    /// Next offset to read per (topic, partition), as far as this thread has read.
    pub positions: HashMap<(Topic, i32), i64>,
    /// Kafka timestamp of the last message read per (topic, partition).
    pub last_timestamps: HashMap<(Topic, i32), i64>,
    /// Partitions paused for running ahead of their co-partition.
    pub paused: HashSet<(Topic, i32)>,
    /// Messages PostgreSQL refused, by (topic, partition, offset): read again after a
    /// rewind, each becomes a rejection with PostgreSQL's reason.
    pub refused: HashMap<(Topic, i32, i64), String>,
    /// Rewinds not yet done (a seek that failed is tried again on the next turn).
    pub rewinds_pending: Vec<Rewind>,
    pub health: Arc<Health>,
}

impl Poller {
    pub fn run(mut self) {
        let mut last_progress = Instant::now();
        while !self.stop.load(Ordering::SeqCst) && !self.failed.load(Ordering::SeqCst) {
            let polled = self.consumer.poll(Duration::from_millis(100));
            // Before the message: it may be the first of a partition just assigned.
            self.reader.take_assigned(&self.consumer);
            let delivery = match polled {
                None => None,
                Some(Ok(message)) => {
                    let delivery = self.reader.read(&self.consumer, &message);
                    self.reader
                        .keep_in_step(&self.consumer, message.partition());
                    delivery
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "poll error");
                    None
                }
            };
            if let Some(delivery) = delivery {
                if self.deliveries.blocking_send(delivery).is_err() {
                    break;
                }
            }
            if self.serve_commands().is_err() {
                break;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                self.reader.check_brokers_back(&self.consumer);
                self.reader.review_paused(&self.consumer);
                let progress = self.reader.progress(&self.consumer);
                if !progress.is_empty()
                    && self
                        .deliveries
                        .blocking_send(Delivery::Data(Data::Progress(progress)))
                        .is_err()
                {
                    break;
                }
            }
        }
        let (done, wait) = oneshot::channel();
        if self
            .deliveries
            .blocking_send(Control::Stop { done }.into())
            .is_ok()
        {
            if let Ok(offsets) = wait.blocking_recv() {
                commit_advisory(&self.consumer, &self.reader.topics, &offsets);
            }
        }
        tracing::info!("leaving the consumer group");
        // The pipeline is gone: a revoke while closing has nobody to ask.
        drop(self.deliveries);
        // Closing the consumer revokes its partitions and leaves the group at once.
        drop(self.consumer);
    }

    /// Commits what the pipeline committed to PostgreSQL, and does the rewinds it asked
    /// for. Errs when the pipeline is gone.
    fn serve_commands(&mut self) -> Result<(), ()> {
        for command in self.commands.try_iter() {
            match command {
                Command::Commit(mut offsets) => {
                    // Sent before a revocation the pipeline answered since: the
                    // revoke committed these partitions' offsets, and another worker
                    // may own them now.
                    if let Some(assigned) = self.reader.assigned(&self.consumer) {
                        offsets.retain(|o| assigned.contains(&(o.topic, o.partition)));
                    }
                    commit_advisory(&self.consumer, &self.reader.topics, &offsets)
                }
                Command::Rewind(rewind) => self.reader.rewinds_pending.push(rewind),
            }
        }
        self.reader.rewind(&self.consumer, &self.deliveries)
    }
}

impl Reader {
    pub fn new(topics: TopicNames, limits: Limits, health: Arc<Health>) -> Self {
        Self {
            topics,
            limits,
            positions: HashMap::new(),
            last_timestamps: HashMap::new(),
            paused: HashSet::new(),
            refused: HashMap::new(),
            rewinds_pending: Vec::new(),
            health,
        }
    }

    /// Which topic a name is; `None` for one this worker does not read.
    pub fn topic_of(&self, name: &str) -> Option<Topic> {
        self.topics.topic_of(name)
    }

    /// The delivery of one message; `None` for a message of a topic this worker does
    /// not read (it subscribes to none such: a broker's mistake, logged and dropped
    /// rather than handed to another topic's decoder).
    fn read(
        &mut self,
        consumer: &KafkaConsumer,
        message: &BorrowedMessage<'_>,
    ) -> Option<Delivery> {
        let Some(topic) = self.topic_of(message.topic()) else {
            tracing::error!(
                topic = message.topic(),
                "message of a topic not subscribed to; dropped"
            );
            return None;
        };
        let at = MessageAt {
            topic,
            partition: message.partition(),
            offset: message.offset(),
        };
        let key = (at.topic, at.partition);
        let reset = self.check_offset(consumer, at);
        self.positions.insert(key, at.offset + 1);
        let timestamp_ms = message.timestamp().to_millis();
        if let Some(timestamp) = timestamp_ms {
            self.last_timestamps.insert(key, timestamp);
        }
        let refused = self.refused.remove(&(at.topic, at.partition, at.offset));
        let (payload_key, payload) = (message.key(), message.payload());
        let data = match topic.input() {
            Some(input) => Data::Message(ReadMessage {
                input,
                partition: at.partition,
                offset: at.offset,
                timestamp_ms,
                decoded: decode_message(
                    at,
                    payload_key,
                    payload,
                    timestamp_ms,
                    self.limits,
                    refused,
                ),
                reset,
            }),
            None => Data::Announcement(ReadAnnouncement {
                partition: at.partition,
                offset: at.offset,
                timestamp_ms,
                decoded: decode_announcement_message(
                    at,
                    payload_key,
                    payload,
                    timestamp_ms,
                    self.limits,
                    refused,
                ),
                reset,
            }),
        };
        Some(Delivery::Data(data))
    }

    /// Compares a message's offset with where this thread expected to read next. Below
    /// it (and not because we sought there: a seek moves the expectation) the log was
    /// reset under the consumer; above it while the log now starts above the expected
    /// offset, retention removed messages never read. Both are counted and logged at
    /// error level; neither is skipped (gaps above are otherwise normal: transaction
    /// markers, compaction).
    fn check_offset(&self, consumer: &KafkaConsumer, at: MessageAt) -> Option<OffsetReset> {
        let MessageAt {
            topic: role,
            partition,
            offset,
        } = at;
        let &expected = self.positions.get(&(role, partition))?;
        let topic = self.topics.name(role).unwrap_or_default();
        if offset < expected {
            let (_, high) = cached_watermarks(consumer, topic, partition);
            count_offset_reset(role, partition);
            tracing::error!(
                topic = %topic,
                partition,
                expected,
                offset,
                high_watermark = high,
                "offset reset: reading below the position the consumer stood at (topic recreated, \
                 log truncated or offsets reset); processing again, event ids tell redeliveries apart"
            );
            return Some(OffsetReset {
                expected,
                high_watermark: high,
            });
        }
        if offset > expected {
            let (low, _) = cached_watermarks(consumer, topic, partition);
            if low > expected {
                count_offset_reset(role, partition);
                tracing::error!(
                    topic = %topic,
                    partition,
                    expected,
                    offset,
                    log_start = low,
                    "offset reset: messages from the expected offset were deleted before they \
                     were read (retention); they are lost to this worker"
                );
            }
        }
        None
    }

    /// Takes the partitions the last rebalance assigned: reading starts at their
    /// stored offsets, and nothing read before belongs to them any more.
    fn take_assigned(&mut self, consumer: &KafkaConsumer) {
        for a in consumer.context().take_assigned() {
            let key = (a.topic, a.partition);
            match a.next_offset {
                Some(offset) => self.positions.insert(key, offset),
                None => self.positions.remove(&key),
            };
            self.last_timestamps.remove(&key);
            // The assignment resumed it.
            self.paused.remove(&key);
            self.refused
                .retain(|&(topic, partition, _), _| (topic, partition) != key);
        }
    }

    /// Does the rewinds the pipeline asked for: seeks both partitions of the pair and
    /// sends the marker after which the pair's messages come from the new offsets.
    /// (librdkafka's seek with a timeout waits until the fetcher has moved, so no
    /// message fetched from the old position is polled after it.) A pair no longer
    /// assigned is skipped: its revocation reached the pipeline first. Errs when the
    /// pipeline is gone.
    fn rewind(
        &mut self,
        consumer: &KafkaConsumer,
        deliveries: &mpsc::Sender<Delivery>,
    ) -> Result<(), ()> {
        if self.rewinds_pending.is_empty() {
            return Ok(());
        }
        let Some(assigned) = self.assigned(consumer) else {
            return Ok(());
        };
        let mut retry = Vec::new();
        for rewind in std::mem::take(&mut self.rewinds_pending) {
            let pair = rewind.pair;
            if !self.topics.active().all(|t| assigned.contains(&(t, pair))) {
                tracing::info!(pair, "rewind skipped: the pair is no longer assigned");
                continue;
            }
            let sought = self.topics.active().try_for_each(|topic| {
                let offset = rewind.next_offsets[topic].map_or(Offset::Beginning, Offset::Offset);
                let name = self.topics.name(topic).unwrap_or_default();
                consumer.seek(name, pair, offset, REWIND_TIMEOUT)
            });
            if let Err(error) = sought {
                tracing::warn!(%error, pair, "seek for a rewind failed; trying again");
                retry.push(rewind);
                continue;
            }
            self.rewound(consumer, &rewind);
            tracing::info!(pair, offsets = ?rewind.next_offsets, "partition pair rewound");
            deliveries
                .blocking_send(Delivery::Data(Data::Rewound { pair }))
                .map_err(|_| ())?;
        }
        self.rewinds_pending = retry;
        Ok(())
    }

    /// After the seeks of a rewind: reading starts again at the requested offsets, and
    /// the refused messages there will be rejected with PostgreSQL's reason.
    fn rewound(&mut self, consumer: &KafkaConsumer, rewind: &Rewind) {
        let pair = rewind.pair;
        let topics: Vec<Topic> = self.topics.active().collect();
        for topic in topics {
            self.last_timestamps.remove(&(topic, pair));
            match rewind.next_offsets[topic] {
                Some(offset) => self.positions.insert((topic, pair), offset),
                None => self.positions.remove(&(topic, pair)),
            };
            // With its Kafka timestamps forgotten, the in-step rule has nothing to
            // resume a partition it paused by: left paused, it would not be read again
            // until the next rebalance.
            if self.paused.remove(&(topic, pair)) {
                self.pause_or_resume(consumer, (topic, pair), false);
            }
        }
        self.refused
            .retain(|&(_, partition, _), _| partition != pair);
        for refused in &rewind.refused {
            self.refused.insert(
                (refused.topic, pair, refused.offset),
                refused.reason.clone(),
            );
        }
    }

    /// After "all brokers down", readiness returns once the cluster answers again.
    /// (A metadata request blocks this thread briefly, which is what it is for.)
    fn check_brokers_back(&self, consumer: &KafkaConsumer) {
        if self.health.brokers_down()
            && consumer
                .fetch_metadata(None, Duration::from_secs(1))
                .is_ok()
        {
            tracing::info!("Kafka brokers reachable again");
            self.health.set_brokers_down(false);
        }
    }

    /// The (topic, partition)s assigned to this consumer now.
    pub fn assigned(&self, consumer: &KafkaConsumer) -> Option<HashSet<(Topic, i32)>> {
        let assignment = consumer.assignment().ok()?;
        Some(
            assignment
                .elements()
                .iter()
                .filter_map(|e| Some((self.topic_of(e.topic())?, e.partition())))
                .collect(),
        )
    }
}

/// One offset reset (or unread messages deleted) seen on this partition.
fn count_offset_reset(topic: Topic, partition: i32) {
    metrics::counter!(crate::telemetry::metrics::OFFSET_RESETS, "topic" => topic.label(), "partition" => partition.to_string())
        .increment(1);
}

/// Commits the offsets stored in PostgreSQL to Kafka for lag tooling, after the
/// database commit. Asynchronous and advisory: PostgreSQL stays the source of truth.
pub(super) fn commit_advisory(
    consumer: &KafkaConsumer,
    topics: &TopicNames,
    offsets: &[StoredOffset],
) {
    let mut tpl = TopicPartitionList::new();
    for stored in offsets {
        let Some(topic) = topics.name(stored.topic) else {
            continue;
        };
        let offset = Offset::Offset(stored.next_offset);
        let _ = tpl.add_partition_offset(topic, stored.partition, offset);
    }
    if tpl.count() > 0 {
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "advisory Kafka commit failed");
        }
    }
}
