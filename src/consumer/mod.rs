//! Kafka side: consumer configuration, the co-partitioning check, and the poll thread.
//!
//! A dedicated OS thread owns `poll`: librdkafka runs rebalance callbacks on the thread
//! that polls, and ours must wait for the pipeline (bump epochs and read stored offsets
//! from PostgreSQL before `assign`; finish the batch in hand before `unassign`). Waiting
//! there is fine on a plain thread and would not be on a tokio worker. The thread also
//! decodes, so decoding runs beside the pipeline rather than on it.
//!
//! Everything the pipeline needs arrives as [`Delivery`] values on one bounded channel,
//! in the order it happened: messages, assignments, revocations and progress reports.
//! The bound (in messages) plus librdkafka's bounded prefetch keep memory flat under
//! any backlog. The pipeline can ask the thread to read a pair again from given
//! offsets ([`Rewind`]); the thread seeks and answers with a marker in the same
//! channel, so everything of that pair before the marker is stale. The thread also
//! keeps each pair's two topics in step (by Kafka timestamp) while both have a
//! backlog, pausing the partition that runs ahead.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::event::{decode, Event, Input, Micros, REJECTED_PAYLOAD_CAP};
use crate::store::{PairPosition, RejectedMessage};
use crate::telemetry::Health;

/// A Kafka failure at start, saying whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Kafka client error: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {topic:?} does not exist on {brokers}")]
    MissingTopic { topic: String, brokers: String },
    #[error(
        "topics are not co-partitioned: {payments:?} has {payments_partitions} partitions, \
         {settlements:?} has {settlements_partitions}; both must have the same count"
    )]
    NotCoPartitioned {
        payments: String,
        payments_partitions: usize,
        settlements: String,
        settlements_partitions: usize,
    },
}

/// One message as read, decoded or rejected.
#[derive(Debug)]
pub struct ReadMessage {
    pub input: Input,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp in milliseconds, when the producer or broker set one.
    pub timestamp_ms: Option<i64>,
    pub decoded: Result<Event, RejectedMessage>,
}

/// Whether one input partition has nothing left to read.
#[derive(Debug, Clone, Copy)]
pub struct PartitionProgress {
    pub input: Input,
    pub partition: i32,
    pub caught_up: bool,
    /// High watermark last seen by the client (−1 when unknown).
    pub high_watermark: i64,
}

/// What the poll thread hands to the pipeline, in order.
#[derive(Debug)]
pub enum Delivery {
    Message(ReadMessage),
    /// New partition pairs: the pipeline takes ownership in PostgreSQL and replies
    /// with where to resume.
    Assign {
        pairs: Vec<i32>,
        reply: std_mpsc::SyncSender<Result<Vec<PairPosition>, String>>,
    },
    /// The pairs are going away: the pipeline finishes the batch in hand, drops their
    /// state and replies.
    Revoke {
        pairs: Vec<i32>,
        done: std_mpsc::SyncSender<()>,
    },
    Progress(Vec<PartitionProgress>),
    /// A [`Rewind`] of this pair took effect: its messages from here on are read from
    /// the requested offsets; any of its messages before this were read before.
    Rewound {
        pair: i32,
    },
    /// Shutdown: the pipeline commits what it holds and replies before the consumer
    /// leaves the group.
    Stop {
        done: std_mpsc::SyncSender<()>,
    },
}

pub type KafkaConsumer = BaseConsumer<RebalanceContext>;

/// The pipeline's request to read a partition pair again from these offsets (the
/// beginning where `None`): both topics' partitions are sought there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    pub pair: i32,
    pub next_offsets: [Option<i64>; 2],
}

/// The pipeline's handle on the consumer: advisory offset commits and rewinds.
pub struct ConsumerHandle {
    pub consumer: Arc<KafkaConsumer>,
    pub rewinds: std_mpsc::Sender<Rewind>,
}

/// Callbacks librdkafka runs on the poll thread.
pub struct RebalanceContext {
    deliveries: mpsc::Sender<Delivery>,
    payments_topic: String,
    settlements_topic: String,
    /// Set when an assignment could not be taken: the worker must stop.
    failed: Arc<AtomicBool>,
    health: Arc<Health>,
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        metrics::counter!(crate::telemetry::metrics::KAFKA_ERRORS).increment(1);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.set_brokers_down(true);
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        metrics::counter!(crate::telemetry::metrics::REBALANCES).increment(1);
        let pairs = pairs_of(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(?pairs, "partition pairs assigned");
                match self.take_ownership(&pairs) {
                    Ok(positions) => {
                        let assignment = self.assignment(&positions);
                        if let Err(error) = consumer.assign(&assignment) {
                            tracing::error!(%error, "assign failed");
                            self.failed.store(true, Ordering::SeqCst);
                        }
                        // A partition paused to keep its pair in step before it was
                        // revoked must not come back paused.
                        if let Err(error) = consumer.resume(&assignment) {
                            tracing::warn!(%error, "resume after assign failed");
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, ?pairs, "could not take ownership of partition pairs; stopping");
                        self.failed.store(true, Ordering::SeqCst);
                        let _ = consumer.unassign();
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?pairs, "partition pairs revoked");
                let (done, wait) = std_mpsc::sync_channel(1);
                // After Stop the pipeline is gone and has already committed everything.
                if self
                    .deliveries
                    .blocking_send(Delivery::Revoke { pairs, done })
                    .is_ok()
                {
                    let _ = wait.recv();
                }
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(%error, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

impl RebalanceContext {
    fn take_ownership(&self, pairs: &[i32]) -> Result<Vec<PairPosition>, String> {
        let (reply, wait) = std_mpsc::sync_channel(1);
        self.deliveries
            .blocking_send(Delivery::Assign {
                pairs: pairs.to_vec(),
                reply,
            })
            .map_err(|_| "pipeline has stopped".to_owned())?;
        wait.recv().map_err(|_| "pipeline has stopped".to_owned())?
    }

    /// Both topics' partitions of each pair, at the offsets stored in PostgreSQL, or
    /// from the beginning when nothing was stored: nothing may be skipped.
    fn assignment(&self, positions: &[PairPosition]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for position in positions {
            for input in Input::ALL {
                let offset =
                    position.next_offsets[input.index()].map_or(Offset::Beginning, Offset::Offset);
                let topic = self.topic(input);
                if let Err(error) = tpl.add_partition_offset(topic, position.pair, offset) {
                    tracing::error!(%error, topic, partition = position.pair, "bad partition offset");
                }
            }
        }
        tpl
    }

    fn topic(&self, input: Input) -> &str {
        match input {
            Input::Payments => &self.payments_topic,
            Input::Settlements => &self.settlements_topic,
        }
    }
}

fn pairs_of(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut pairs: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// Builds the librdkafka configuration: our required settings, then the user's
/// `RECON_KAFKA_PROP_*` on top (which may tune but should not undo the required ones).
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("client.id", "recon-worker")
        // Offsets live in PostgreSQL; Kafka commits are advisory and explicit.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Without stored offsets read from the start: skipping input loses money.
        .set("auto.offset.reset", "earliest")
        // Range assigns partition p of both topics to the same member.
        .set("partition.assignment.strategy", "range")
        .set("isolation.level", "read_committed")
        // Bounded prefetch: memory must not grow with a backlog.
        // 2 MiB of queued messages is about 8,000 events, over 200 ms at the
        // broker's full rate here; librdkafka keeps each fetch buffer alive until its
        // last message is consumed, so these two bound most of its memory.
        .set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "20000")
        .set("fetch.max.bytes", "2097152")
        // With a queue this small, librdkafka's default pause after the queue was full
        // (1 s) starves the consumer: measured with 1 MiB queues, a drain ran at 6.6k
        // instead of 45k msg/s. A pause of 100 ms keeps the bound without the stall.
        .set("fetch.queue.backoff.ms", "100")
        // Latency: do not let a fetch wait long on a quiet partition (default 500 ms;
        // at 50 ms, fetch waits were half of the mean latency at 8k msg/s here).
        .set("fetch.wait.max.ms", "10")
        .set("statistics.interval.ms", "0")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (name, value) in &config.kafka_properties {
        client.set(name, value);
    }
    client
}

/// Checks both topics exist with the same partition count; returns that count.
pub fn check_co_partitioned(
    consumer: &KafkaConsumer,
    config: &Config,
) -> Result<usize, ConsumerError> {
    let count = |topic: &str| -> Result<usize, ConsumerError> {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(ConsumerError::MissingTopic {
                topic: topic.to_owned(),
                brokers: config.brokers.clone(),
            });
        }
        Ok(partitions)
    };
    let payments_partitions = count(&config.payments_topic)?;
    let settlements_partitions = count(&config.settlements_topic)?;
    if payments_partitions != settlements_partitions {
        return Err(ConsumerError::NotCoPartitioned {
            payments: config.payments_topic.clone(),
            payments_partitions,
            settlements: config.settlements_topic.clone(),
            settlements_partitions,
        });
    }
    Ok(payments_partitions)
}

/// The running poll thread.
pub struct PollThread {
    handle: thread::JoinHandle<()>,
    /// True once the consumer failed for good (an assignment could not be taken).
    pub failed: Arc<AtomicBool>,
}

impl PollThread {
    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("poll thread panicked");
        }
    }
}

/// Creates the consumer, checks co-partitioning, subscribes and starts polling.
/// `stop` ends polling; the thread then hands a `Stop` to the pipeline, waits for it,
/// and closes the consumer so the group rebalances at once. The returned consumer
/// handle is for the pipeline's advisory commits; it must be dropped before the
/// pipeline acknowledges `Stop`, so the poll thread closes the consumer.
pub fn start(
    config: &Config,
    deliveries: mpsc::Sender<Delivery>,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
) -> Result<(PollThread, ConsumerHandle), ConsumerError> {
    let failed = Arc::new(AtomicBool::new(false));
    let context = RebalanceContext {
        deliveries: deliveries.clone(),
        payments_topic: config.payments_topic.clone(),
        settlements_topic: config.settlements_topic.clone(),
        failed: failed.clone(),
        health: health.clone(),
    };
    let consumer: KafkaConsumer = client_config(config).create_with_context(context)?;
    let partitions = check_co_partitioned(&consumer, config)?;
    tracing::info!(
        payments = %config.payments_topic,
        settlements = %config.settlements_topic,
        partitions,
        "topics are co-partitioned"
    );
    consumer.subscribe(&[&config.payments_topic, &config.settlements_topic])?;
    let consumer = Arc::new(consumer);
    let (rewinds, rewind_requests) = std_mpsc::channel();
    let poller = Poller {
        consumer: Arc::clone(&consumer),
        deliveries,
        rewind_requests,
        rewinds_pending: Vec::new(),
        stop,
        failed: failed.clone(),
        topics: [
            config.payments_topic.clone(),
            config.settlements_topic.clone(),
        ],
        limits: config.decode_limits(),
        positions: HashMap::new(),
        last_timestamps: HashMap::new(),
        paused: HashSet::new(),
        health,
    };
    let handle = thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || poller.run())
        .map_err(|e| ConsumerError::Kafka(KafkaError::ClientCreation(e.to_string())))?;
    Ok((
        PollThread { handle, failed },
        ConsumerHandle { consumer, rewinds },
    ))
}

struct Poller {
    consumer: Arc<KafkaConsumer>,
    deliveries: mpsc::Sender<Delivery>,
    rewind_requests: std_mpsc::Receiver<Rewind>,
    /// Rewinds not yet done (a seek that failed is tried again on the next turn).
    rewinds_pending: Vec<Rewind>,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    /// Payments, settlements.
    topics: [String; 2],
    limits: crate::event::Limits,
    /// Next offset to read per (input, partition), as far as this thread has read.
    positions: HashMap<(Input, i32), i64>,
    /// Kafka timestamp of the last message read per (input, partition).
    last_timestamps: HashMap<(Input, i32), i64>,
    /// Partitions paused for running ahead of their co-partition.
    paused: HashSet<(Input, i32)>,
    health: Arc<Health>,
}

const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long a seek may wait for the fetcher to move to the new offset.
const REWIND_TIMEOUT: Duration = Duration::from_secs(5);

/// How far (in Kafka timestamps) one topic of a pair is read ahead of the other while
/// the other still has messages to read. librdkafka fetches partitions independently
/// and hands over thousands of messages of one at a time: in a long backlog one topic
/// ran ahead of the other by up to 20k messages, so settlements met payments long
/// evicted (a lookup and an update each) and memory grew with the backlog's length.
const MAX_LEAD_MS: i64 = 1000;

impl Poller {
    fn run(mut self) {
        let mut last_progress = Instant::now();
        // A handle of its own, so a borrowed message can coexist with `&mut self`.
        let consumer = Arc::clone(&self.consumer);
        while !self.stop.load(Ordering::SeqCst) && !self.failed.load(Ordering::SeqCst) {
            let delivery = match consumer.poll(Duration::from_millis(100)) {
                None => None,
                Some(Ok(message)) => {
                    let delivery = self.read(&message);
                    self.keep_in_step(message.partition());
                    Some(delivery)
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
            if self.rewind().is_err() {
                break;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                self.check_brokers_back();
                self.review_paused();
                let progress = self.progress();
                if !progress.is_empty()
                    && self
                        .deliveries
                        .blocking_send(Delivery::Progress(progress))
                        .is_err()
                {
                    break;
                }
            }
        }
        let (done, wait) = std_mpsc::sync_channel(1);
        if self
            .deliveries
            .blocking_send(Delivery::Stop { done })
            .is_ok()
        {
            let _ = wait.recv();
        }
        drop(consumer);
        tracing::info!("leaving the consumer group");
        // Dropping the last handle closes the consumer: revoke, leave group.
        drop(self.deliveries);
        if Arc::strong_count(&self.consumer) > 1 {
            tracing::warn!("consumer still shared at shutdown; it closes with the last handle");
        }
        drop(self.consumer);
    }

    fn input_of(&self, topic: &str) -> Input {
        if topic == self.topics[Input::Payments.index()] {
            Input::Payments
        } else {
            Input::Settlements
        }
    }

    fn read(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
        let input = self.input_of(message.topic());
        let partition = message.partition();
        let offset = message.offset();
        self.positions.insert((input, partition), offset + 1);
        if let Some(timestamp) = message.timestamp().to_millis() {
            self.last_timestamps.insert((input, partition), timestamp);
        }
        let decoded = decode(
            input,
            message.key(),
            message.payload(),
            message.timestamp().to_millis(),
            self.limits,
        )
        .map_err(|rejection| {
            let payload = message.payload();
            RejectedMessage {
                input,
                partition,
                offset,
                reason: rejection.to_string(),
                class: rejection.class(),
                payload: payload.map(|p| p[..p.len().min(REJECTED_PAYLOAD_CAP)].to_vec()),
                payload_size: payload.map_or(0, |p| i32::try_from(p.len()).unwrap_or(i32::MAX)),
                key: message.key().map(|k| k[..k.len().min(1024)].to_vec()),
            }
        });
        Delivery::Message(ReadMessage {
            input,
            partition,
            offset,
            timestamp_ms: message.timestamp().to_millis(),
            decoded,
        })
    }

    /// Does the rewinds the pipeline asked for: seeks both partitions of the pair and
    /// sends the marker after which the pair's messages come from the new offsets.
    /// (librdkafka's seek with a timeout waits until the fetcher has moved, so no
    /// message fetched from the old position is polled after it.) A pair no longer
    /// assigned is skipped: its revocation reached the pipeline first. Errs when the
    /// pipeline is gone.
    fn rewind(&mut self) -> Result<(), ()> {
        self.rewinds_pending.extend(self.rewind_requests.try_iter());
        if self.rewinds_pending.is_empty() {
            return Ok(());
        }
        let Some(assigned) = self.assigned() else {
            return Ok(());
        };
        let mut retry = Vec::new();
        for rewind in std::mem::take(&mut self.rewinds_pending) {
            let pair = rewind.pair;
            if !Input::ALL.iter().all(|&i| assigned.contains(&(i, pair))) {
                tracing::info!(pair, "rewind skipped: the pair is no longer assigned");
                continue;
            }
            let sought = Input::ALL.iter().try_for_each(|&input| {
                let offset =
                    rewind.next_offsets[input.index()].map_or(Offset::Beginning, Offset::Offset);
                self.consumer
                    .seek(&self.topics[input.index()], pair, offset, REWIND_TIMEOUT)
            });
            if let Err(error) = sought {
                tracing::warn!(%error, pair, "seek for a rewind failed; trying again");
                retry.push(rewind);
                continue;
            }
            for input in Input::ALL {
                self.last_timestamps.remove(&(input, pair));
                match rewind.next_offsets[input.index()] {
                    Some(offset) => self.positions.insert((input, pair), offset),
                    None => self.positions.remove(&(input, pair)),
                };
            }
            tracing::info!(pair, offsets = ?rewind.next_offsets, "partition pair rewound");
            self.deliveries
                .blocking_send(Delivery::Rewound { pair })
                .map_err(|_| ())?;
        }
        self.rewinds_pending = retry;
        Ok(())
    }

    /// After "all brokers down", readiness returns once the cluster answers again.
    /// (A metadata request blocks this thread briefly, which is what it is for.)
    fn check_brokers_back(&self) {
        if self.health.brokers_down()
            && self
                .consumer
                .fetch_metadata(None, Duration::from_secs(1))
                .is_ok()
        {
            tracing::info!("Kafka brokers reachable again");
            self.health.set_brokers_down(false);
        }
    }

    /// Whether this thread has read everything the broker last reported.
    fn caught_up(&self, input: Input, partition: i32) -> bool {
        let watermarks = cached_watermarks(&self.consumer, &self.topics[input.index()], partition);
        self.caught_up_to(input, partition, watermarks)
    }

    fn caught_up_to(&self, input: Input, partition: i32, (low, high): (i64, i64)) -> bool {
        match self.positions.get(&(input, partition)) {
            Some(&position) => high >= 0 && position >= high,
            // Nothing read since assignment: caught up only if the partition is empty.
            None => high >= 0 && low >= 0 && high == low,
        }
    }

    /// Pauses a topic's partition that runs more than [`MAX_LEAD_MS`] ahead of its
    /// co-partition while that one has a backlog; resumes it once the other has caught
    /// up to half that lead, or has nothing left to read. Only the order of reading
    /// changes: results never depend on it.
    fn keep_in_step(&mut self, partition: i32) {
        for input in Input::ALL {
            let other = input.other();
            let key = (input, partition);
            let (Some(&mine), Some(&theirs)) = (
                self.last_timestamps.get(&key),
                self.last_timestamps.get(&(other, partition)),
            ) else {
                continue;
            };
            let paused = self.paused.contains(&key);
            match step(mine - theirs, paused, || self.caught_up(other, partition)) {
                Some(true) if self.pause_or_resume(key, true) => {
                    self.paused.insert(key);
                    metrics::counter!(crate::telemetry::metrics::TOPIC_PAUSES, "topic" => input.label())
                        .increment(1);
                }
                Some(false) if self.pause_or_resume(key, false) => {
                    self.paused.remove(&key);
                }
                _ => {}
            }
        }
    }

    /// The (input, partition)s assigned to this consumer now.
    fn assigned(&self) -> Option<HashSet<(Input, i32)>> {
        let assignment = self.consumer.assignment().ok()?;
        Some(
            assignment
                .elements()
                .iter()
                .map(|e| (self.input_of(e.topic()), e.partition()))
                .collect(),
        )
    }

    /// Forgets partitions a rebalance took away (an assignment resumes whatever it
    /// assigns) and re-checks paused partitions whose co-partition went quiet.
    fn review_paused(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let Some(assigned) = self.assigned() else {
            return;
        };
        self.paused.retain(|key| assigned.contains(key));
        let partitions: HashSet<i32> = self.paused.iter().map(|&(_, p)| p).collect();
        for partition in partitions {
            self.keep_in_step(partition);
        }
    }

    fn pause_or_resume(&self, (input, partition): (Input, i32), pause: bool) -> bool {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topics[input.index()], partition);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        match result {
            Ok(()) => {
                tracing::debug!(%input, partition, pause, "keeping the pair's topics in step");
                true
            }
            Err(error) => {
                tracing::warn!(%error, %input, partition, pause, "pause/resume failed");
                false
            }
        }
    }

    /// For every assigned partition: is there anything left to read?
    fn progress(&mut self) -> Vec<PartitionProgress> {
        let Ok(assignment) = self.consumer.assignment() else {
            return Vec::new();
        };
        let mut progress = Vec::new();
        for element in assignment.elements() {
            let input = self.input_of(element.topic());
            let partition = element.partition();
            let watermarks = cached_watermarks(&self.consumer, element.topic(), partition);
            progress.push(PartitionProgress {
                input,
                partition,
                caught_up: self.caught_up_to(input, partition, watermarks),
                high_watermark: watermarks.1,
            });
        }
        progress
    }
}

/// What to do with a partition `lead_ms` (Kafka timestamps) ahead of its co-partition:
/// pause it (`Some(true)`) when more than [`MAX_LEAD_MS`] ahead while the other still
/// has messages to read, resume it (`Some(false)`) once within half that or the other
/// has caught up, else leave it (the gap between the two keeps it from flapping).
fn step(lead_ms: i64, paused: bool, other_caught_up: impl FnOnce() -> bool) -> Option<bool> {
    if !paused {
        (lead_ms > MAX_LEAD_MS && !other_caught_up()).then_some(true)
    } else {
        (lead_ms <= MAX_LEAD_MS / 2 || other_caught_up()).then_some(false)
    }
}

/// The low and high watermarks librdkafka cached from its last fetch response for this
/// partition (no network round trip); −1 when not known yet.
fn cached_watermarks(consumer: &KafkaConsumer, topic: &str, partition: i32) -> (i64, i64) {
    let Ok(topic) = std::ffi::CString::new(topic) else {
        return (-1, -1);
    };
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed, `topic` is a
    // NUL-terminated string that outlives the call, and librdkafka only writes the two
    // out-parameters, which point to live stack variables.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        (low, high)
    } else {
        (-1, -1)
    }
}

/// Commits the stored positions to Kafka for lag tooling, after the database commit.
/// Asynchronous and advisory: PostgreSQL stays the source of truth.
pub fn commit_advisory(consumer: &KafkaConsumer, offsets: &[(&str, i32, i64)]) {
    let mut tpl = TopicPartitionList::new();
    for &(topic, partition, offset) in offsets {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    if tpl.count() > 0 {
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "advisory Kafka commit failed");
        }
    }
}

/// Micros now, from the wall clock: the only place the worker reads time.
pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::{step, MAX_LEAD_MS};

    #[test]
    fn a_partition_ahead_of_a_backlogged_co_partition_is_paused() {
        assert_eq!(step(MAX_LEAD_MS + 1, false, || false), Some(true));
        // Not while the other has nothing left to read, nor within the lead.
        assert_eq!(step(MAX_LEAD_MS + 1, false, || true), None);
        assert_eq!(step(MAX_LEAD_MS, false, || false), None);
        assert_eq!(step(-10 * MAX_LEAD_MS, false, || false), None);
    }

    #[test]
    fn a_paused_partition_resumes_within_half_the_lead_or_once_the_other_caught_up() {
        assert_eq!(step(MAX_LEAD_MS / 2, true, || false), Some(false));
        assert_eq!(step(10 * MAX_LEAD_MS, true, || true), Some(false));
        // Between half the lead and the lead it stays paused: no flapping.
        assert_eq!(step(MAX_LEAD_MS / 2 + 1, true, || false), None);
        assert_eq!(step(MAX_LEAD_MS, true, || false), None);
    }
}
