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
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{Config, GroupProtocol};
use crate::event::{decode, Event, Input};
use crate::pair::{PairPosition, PerInput};
use crate::rejection::{MessageAt, RejectedMessage, DATA_ERROR_CLASS};
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
    /// Set when this message's offset is below the position the poll thread expected
    /// next (and it did not seek there): the partition was reset under the consumer.
    pub reset: Option<OffsetReset>,
}

/// A partition read from below where the consumer stood, without a seek of ours: the
/// topic was recreated, an unclean leader election truncated the log, or the broker
/// answered "offset out of range" and `auto.offset.reset` moved the consumer. What
/// comes from here on may be new, so it is processed, not skipped; event ids tell
/// redeliveries apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetReset {
    /// The offset the consumer expected to read next.
    pub expected: i64,
    /// The partition's high watermark when the reset was seen (−1 when unknown).
    pub high_watermark: i64,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    pub pair: i32,
    pub next_offsets: PerInput<Option<i64>>,
    /// Messages PostgreSQL refused (a data error): when read again they are handed
    /// over as rejections with this reason, raw bytes and all, instead of decoded.
    pub refused: Vec<Refused>,
}

/// A message whose values PostgreSQL refused, and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub input: Input,
    pub offset: i64,
    pub reason: String,
}

/// The pipeline's handle on the consumer: advisory offset commits and rewinds.
pub struct ConsumerHandle {
    /// `None` when the pipeline is driven without a broker (the whole-path fuzz test,
    /// whose stand-in for the poll thread serves the rewinds): no advisory commits.
    pub consumer: Option<Arc<KafkaConsumer>>,
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
    /// Next-generation protocol only: which of each pair's partitions the coordinator
    /// has granted (payments, settlements). Only librdkafka's callbacks on the poll
    /// thread touch it; the lock satisfies the context's `Sync` bound.
    granted: Mutex<HashMap<i32, PerInput<bool>>>,
    /// Where each newly assigned partition starts, for the poll thread (the callback
    /// runs inside its `poll`, which cannot lend it the poller itself).
    assigned: Arc<Mutex<Vec<Assigned>>>,
}

/// A partition just assigned, and the offset it is read from (`None`: the beginning).
#[derive(Debug, Clone, Copy)]
struct Assigned {
    input: Input,
    partition: i32,
    next_offset: Option<i64>,
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
        if matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        ) {
            return self.rebalance_incrementally(consumer, err, tpl);
        }
        let pairs = pairs_of(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(?pairs, "partition pairs assigned");
                match self.take_ownership(&pairs) {
                    Ok(positions) => {
                        let assignment = self.assignment(&positions);
                        self.seed_positions(&positions);
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
                self.hand_back(pairs);
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
    /// The next-generation group protocol (KIP-848, `RECON_GROUP_PROTOCOL=consumer`)
    /// hands partitions over incrementally: each callback names only the partitions
    /// added or taken away, and librdkafka needs every one of them applied
    /// (`incremental_assign`/`incremental_unassign`) before it acknowledges the change
    /// to the coordinator. The two partitions of a pair may arrive (or leave) in
    /// different callbacks while the coordinator moves them. A pair is owned (epoch
    /// taken, offsets loaded) and read only while both partitions are granted; a lone
    /// half stays assigned but paused, and whatever it fetched meanwhile is dropped by
    /// the pipeline (it owns no such pair). When the other half arrives, both are
    /// sought to the stored offsets and resumed.
    fn rebalance_incrementally(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &TopicPartitionList,
    ) {
        let granting = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => true,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => false,
            other => {
                tracing::error!(error = ?other, "rebalance error");
                return;
            }
        };
        let halves: Vec<(Input, i32)> = tpl
            .elements()
            .iter()
            .map(|element| (self.input_of(element.topic()), element.partition()))
            .collect();
        let (changed, lone) = {
            let Ok(mut granted) = self.granted.lock() else {
                tracing::error!("granted-partition set poisoned; stopping");
                self.failed.store(true, Ordering::SeqCst);
                return;
            };
            let changed = regrant(&mut granted, halves.iter().copied(), granting);
            // Halves whose co-partition is not (or no longer) granted.
            let lone: Vec<(Input, i32)> = granted
                .iter()
                .filter(|(_, held)| held.payments != held.settlements)
                .map(|(&pair, held)| {
                    (
                        if held.payments {
                            Input::Payments
                        } else {
                            Input::Settlements
                        },
                        pair,
                    )
                })
                .collect();
            (changed, lone)
        };
        if granting {
            self.grant_incrementally(consumer, &halves, &changed, &lone);
        } else {
            self.revoke_incrementally(consumer, tpl, &changed, &lone);
        }
    }

    fn grant_incrementally(
        &self,
        consumer: &BaseConsumer<Self>,
        halves: &[(Input, i32)],
        whole: &[i32],
        lone: &[(Input, i32)],
    ) {
        let positions = if whole.is_empty() {
            Vec::new()
        } else {
            tracing::info!(pairs = ?whole, "partition pairs assigned (incremental)");
            match self.take_ownership(whole) {
                Ok(positions) => positions,
                Err(error) => {
                    tracing::error!(%error, pairs = ?whole, "could not take ownership of partition pairs; stopping");
                    self.failed.store(true, Ordering::SeqCst);
                    Vec::new()
                }
            }
        };
        let offset_of = |input: Input, pair: i32| {
            positions
                .iter()
                .find(|p| p.pair == pair)
                .and_then(|p| p.next_offsets[input])
                .map_or(Offset::Beginning, Offset::Offset)
        };
        let mut assignment = TopicPartitionList::new();
        for &(input, pair) in halves {
            let offset = if whole.contains(&pair) {
                offset_of(input, pair)
            } else {
                Offset::Invalid
            };
            if let Err(error) = assignment.add_partition_offset(self.topic(input), pair, offset) {
                tracing::error!(%error, pair, "bad partition offset");
            }
        }
        if let Err(error) = consumer.incremental_assign(&assignment) {
            tracing::error!(%error, "incremental assign failed");
            self.failed.store(true, Ordering::SeqCst);
            return;
        }
        self.seed_positions(&positions);
        // A half granted earlier, alone and paused until now, reads from the stored
        // offset like the half that just arrived.
        let mut resumed = TopicPartitionList::new();
        for position in &positions {
            for input in Input::ALL {
                let topic = self.topic(input);
                if !halves.contains(&(input, position.pair)) {
                    let offset = offset_of(input, position.pair);
                    if let Err(error) = consumer.seek(topic, position.pair, offset, REWIND_TIMEOUT)
                    {
                        tracing::error!(%error, topic, pair = position.pair, "seek of the earlier half failed; stopping");
                        self.failed.store(true, Ordering::SeqCst);
                    }
                }
                resumed.add_partition(topic, position.pair);
            }
        }
        if let Err(error) = consumer.resume(&resumed) {
            tracing::warn!(%error, "resume after assign failed");
        }
        self.pause_lone(consumer, lone);
    }

    fn revoke_incrementally(
        &self,
        consumer: &BaseConsumer<Self>,
        revoked: &TopicPartitionList,
        broken: &[i32],
        lone: &[(Input, i32)],
    ) {
        if !broken.is_empty() {
            tracing::info!(pairs = ?broken, "partition pairs revoked (incremental)");
            self.hand_back(broken.to_vec());
        }
        if let Err(error) = consumer.incremental_unassign(revoked) {
            tracing::warn!(%error, "incremental unassign failed");
        }
        self.pause_lone(consumer, lone);
    }

    /// Lone halves fetch nothing worth reading: their pair is not owned.
    fn pause_lone(&self, consumer: &BaseConsumer<Self>, lone: &[(Input, i32)]) {
        if lone.is_empty() {
            return;
        }
        let mut paused = TopicPartitionList::new();
        for &(input, pair) in lone {
            paused.add_partition(self.topic(input), pair);
        }
        if let Err(error) = consumer.pause(&paused) {
            tracing::warn!(%error, "pausing a lone half failed");
        }
    }

    fn input_of(&self, topic: &str) -> Input {
        if topic == self.payments_topic {
            Input::Payments
        } else {
            Input::Settlements
        }
    }

    /// Has the pipeline finish the batch in hand and drop the pairs' state, and waits
    /// for it. After Stop the pipeline is gone and has already committed everything.
    /// Only the poll thread may wait: when the pipeline stops on an error, the last
    /// consumer handle can be dropped on a tokio thread, librdkafka runs the final
    /// revoke there, and a blocking send would panic (hiding the error that stopped the
    /// worker); there is no pipeline left to ask by then.
    fn hand_back(&self, pairs: Vec<i32>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        let (done, wait) = std_mpsc::sync_channel(1);
        if self
            .deliveries
            .blocking_send(Delivery::Revoke { pairs, done })
            .is_ok()
        {
            let _ = wait.recv();
        }
    }

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
                let offset = position.next_offsets[input].map_or(Offset::Beginning, Offset::Offset);
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

    /// Hands the poll thread the offsets the pairs resume from. Without them a
    /// partition already read to its end when assigned (after a restart or a
    /// rebalance, nothing new since) would never count as caught up: nothing is read
    /// from it, so the idle rule would never release its pair's watermark.
    fn seed_positions(&self, positions: &[PairPosition]) {
        let Ok(mut assigned) = self.assigned.lock() else {
            return;
        };
        for position in positions {
            for input in Input::ALL {
                assigned.push(Assigned {
                    input,
                    partition: position.pair,
                    next_offset: position.next_offsets[input],
                });
            }
        }
    }
}

/// One offset reset (or unread messages deleted) seen on this partition.
fn count_offset_reset(input: Input, partition: i32) {
    metrics::counter!(crate::telemetry::metrics::OFFSET_RESETS, "topic" => input.label(), "partition" => partition.to_string())
        .increment(1);
}

/// Applies one incremental grant (or revocation) of partition halves to the granted
/// set; returns the pairs that became whole (granting) or stopped being whole
/// (revoking), in order. A half alone changes no pair.
fn regrant(
    granted: &mut HashMap<i32, PerInput<bool>>,
    halves: impl IntoIterator<Item = (Input, i32)>,
    granting: bool,
) -> Vec<i32> {
    let mut changed = Vec::new();
    for (input, pair) in halves {
        let held = granted.entry(pair).or_default();
        let was_whole = held.payments && held.settlements;
        held[input] = granting;
        if was_whole != (held.payments && held.settlements) {
            changed.push(pair);
        }
        if !held.payments && !held.settlements {
            granted.remove(&pair);
        }
    }
    changed.sort_unstable();
    changed.dedup();
    changed
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
        // Back to a restarted broker within a second of its return: librdkafka's
        // reconnect backoff doubles up to 10 s by default, and each second of it is a
        // second of reconciliation stopped (chaos test: broker back, then up to 10 s
        // more before the offsets moved again).
        .set("reconnect.backoff.max.ms", "1000")
        .set_log_level(RDKafkaLogLevel::Warning);
    match config.group_protocol {
        // Range assigns partition p of both topics to the same member.
        GroupProtocol::Classic => client.set("partition.assignment.strategy", "range"),
        // KIP-848: the broker assigns; its range assignor keeps co-partitioned topics'
        // partition p on one member. Sessions and heartbeats are the broker's settings.
        GroupProtocol::Consumer => client
            .set("group.protocol", "consumer")
            .set("group.remote.assignor", "range"),
    };
    if let Some(instance_id) = &config.instance_id {
        // Static membership: a member that leaves and returns with the same id within
        // the session timeout gets its partitions back without a group-wide rebalance
        // (a Kubernetes rolling restart moves no other worker's pairs).
        client.set("group.instance.id", instance_id);
    }
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
    let assigned = Arc::new(Mutex::new(Vec::new()));
    let context = RebalanceContext {
        deliveries: deliveries.clone(),
        payments_topic: config.payments_topic.clone(),
        settlements_topic: config.settlements_topic.clone(),
        failed: failed.clone(),
        health: health.clone(),
        granted: Mutex::new(HashMap::new()),
        assigned: Arc::clone(&assigned),
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
        topics: PerInput::new(
            config.payments_topic.clone(),
            config.settlements_topic.clone(),
        ),
        limits: config.decode_limits(),
        positions: HashMap::new(),
        last_timestamps: HashMap::new(),
        paused: HashSet::new(),
        health,
        assigned,
        refused: HashMap::new(),
    };
    let handle = thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || poller.run())
        .map_err(|e| ConsumerError::Kafka(KafkaError::ClientCreation(e.to_string())))?;
    Ok((
        PollThread { handle, failed },
        ConsumerHandle {
            consumer: Some(consumer),
            rewinds,
        },
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
    topics: PerInput<String>,
    limits: crate::event::Limits,
    /// Next offset to read per (input, partition), as far as this thread has read.
    positions: HashMap<(Input, i32), i64>,
    /// Kafka timestamp of the last message read per (input, partition).
    last_timestamps: HashMap<(Input, i32), i64>,
    /// Partitions paused for running ahead of their co-partition.
    paused: HashSet<(Input, i32)>,
    health: Arc<Health>,
    /// Partitions assigned by the last rebalance callback, with their start offsets.
    assigned: Arc<Mutex<Vec<Assigned>>>,
    /// Messages PostgreSQL refused, by (input, partition, offset): read again after a
    /// rewind, each becomes a rejection with PostgreSQL's reason.
    refused: HashMap<(Input, i32, i64), String>,
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
            let polled = consumer.poll(Duration::from_millis(100));
            // Before the message: it may be the first of a partition just assigned.
            self.take_assigned();
            let delivery = match polled {
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
        if topic == self.topics[Input::Payments] {
            Input::Payments
        } else {
            Input::Settlements
        }
    }

    fn read(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
        let input = self.input_of(message.topic());
        let partition = message.partition();
        let offset = message.offset();
        let reset = self.check_offset(input, partition, offset);
        self.positions.insert((input, partition), offset + 1);
        if let Some(timestamp) = message.timestamp().to_millis() {
            self.last_timestamps.insert((input, partition), timestamp);
        }
        let refused = self.refused.remove(&(input, partition, offset));
        Delivery::Message(ReadMessage {
            input,
            partition,
            offset,
            timestamp_ms: message.timestamp().to_millis(),
            decoded: decode_message(
                input,
                partition,
                offset,
                message.key(),
                message.payload(),
                message.timestamp().to_millis(),
                self.limits,
                refused,
            ),
            reset,
        })
    }

    /// Compares a message's offset with where this thread expected to read next. Below
    /// it (and not because we sought there: a seek moves the expectation) the log was
    /// reset under the consumer; above it while the log now starts above the expected
    /// offset, retention removed messages never read. Both are counted and logged at
    /// error level; neither is skipped (gaps above are otherwise normal: transaction
    /// markers, compaction).
    fn check_offset(&self, input: Input, partition: i32, offset: i64) -> Option<OffsetReset> {
        let &expected = self.positions.get(&(input, partition))?;
        let topic = &self.topics[input];
        if offset < expected {
            let (_, high) = cached_watermarks(&self.consumer, topic, partition);
            count_offset_reset(input, partition);
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
            let (low, _) = cached_watermarks(&self.consumer, topic, partition);
            if low > expected {
                count_offset_reset(input, partition);
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
    fn take_assigned(&mut self) {
        let assigned = match self.assigned.lock() {
            Ok(mut assigned) if !assigned.is_empty() => std::mem::take(&mut *assigned),
            _ => return,
        };
        for a in assigned {
            let key = (a.input, a.partition);
            match a.next_offset {
                Some(offset) => self.positions.insert(key, offset),
                None => self.positions.remove(&key),
            };
            self.last_timestamps.remove(&key);
            // The assignment resumed it.
            self.paused.remove(&key);
            self.refused
                .retain(|&(input, partition, _), _| (input, partition) != key);
        }
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
                let offset = rewind.next_offsets[input].map_or(Offset::Beginning, Offset::Offset);
                self.consumer
                    .seek(&self.topics[input], pair, offset, REWIND_TIMEOUT)
            });
            if let Err(error) = sought {
                tracing::warn!(%error, pair, "seek for a rewind failed; trying again");
                retry.push(rewind);
                continue;
            }
            for input in Input::ALL {
                self.last_timestamps.remove(&(input, pair));
                match rewind.next_offsets[input] {
                    Some(offset) => self.positions.insert((input, pair), offset),
                    None => self.positions.remove(&(input, pair)),
                };
                // With its Kafka timestamps forgotten, the in-step rule has nothing to
                // resume a partition it paused by: left paused, it would not be read
                // again until the next rebalance.
                if self.paused.remove(&(input, pair)) {
                    self.pause_or_resume((input, pair), false);
                }
            }
            self.refused
                .retain(|&(_, partition, _), _| partition != pair);
            for refused in &rewind.refused {
                self.refused.insert(
                    (refused.input, pair, refused.offset),
                    refused.reason.clone(),
                );
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
        let watermarks = cached_watermarks(&self.consumer, &self.topics[input], partition);
        self.caught_up_to(input, partition, watermarks)
    }

    fn caught_up_to(&self, input: Input, partition: i32, (low, high): (i64, i64)) -> bool {
        match self.positions.get(&(input, partition)) {
            Some(&position) => high >= 0 && position >= high,
            // Nothing read since assignment: caught up only if the partition is empty.
            None => high >= 0 && low >= 0 && high == low,
        }
    }

    /// Moves each partition's position past what librdkafka consumed without handing
    /// it over: transaction markers. A transactional producer's commit marker takes an
    /// offset, so after the last message of a transaction the high watermark is one
    /// past the next offset this thread saw, and the partition would never count as
    /// caught up (the idle rule, and resuming a partition paused to keep in step, wait
    /// for that). librdkafka advances its application position past control records;
    /// a seek resets that position, so it never reports a place before a rewind.
    fn merge_client_positions(&mut self) {
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for element in positions.elements() {
            let Offset::Offset(offset) = element.offset() else {
                continue;
            };
            let key = (self.input_of(element.topic()), element.partition());
            let position = self.positions.entry(key).or_insert(offset);
            *position = (*position).max(offset);
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
            // Saturating: Kafka timestamps are the producers' and may be anything.
            match step(mine.saturating_sub(theirs), paused, || {
                self.caught_up(other, partition)
            }) {
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
        tpl.add_partition(&self.topics[input], partition);
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
        self.merge_client_positions();
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

/// What the poll thread makes of one message: its event, or the rejection to store
/// (raw bytes and key kept). `refused` is PostgreSQL's reason when this message's
/// values were refused before (a data error): it is rejected with that reason, not
/// decoded again. Public so that a test driving the pipeline without a broker (the
/// whole-path fuzz test) hands it exactly what the poll thread would.
#[allow(clippy::too_many_arguments)]
pub fn decode_message(
    input: Input,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    limits: crate::event::Limits,
    refused: Option<String>,
) -> Result<Event, RejectedMessage> {
    let at = MessageAt {
        input,
        partition,
        offset,
    };
    let rejected =
        |reason: String, class: &'static str| RejectedMessage::new(at, reason, class, key, payload);
    match refused {
        Some(reason) => Err(rejected(reason, DATA_ERROR_CLASS)),
        None => decode(input, key, payload, timestamp_ms, limits)
            .map_err(|rejection| rejected(rejection.to_string(), rejection.class())),
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

#[cfg(test)]
mod tests {
    use super::{regrant, step, Input, MAX_LEAD_MS};
    use std::collections::HashMap;

    #[test]
    fn an_incremental_grant_owns_a_pair_only_once_both_halves_are_granted() {
        use Input::{Payments as P, Settlements as S};
        let mut granted = HashMap::new();
        assert_eq!(
            regrant(&mut granted, [(P, 0), (S, 0), (P, 1)], true),
            vec![0]
        );
        assert_eq!(regrant(&mut granted, [(P, 2)], true), Vec::<i32>::new());
        assert_eq!(regrant(&mut granted, [(S, 2), (S, 1)], true), vec![1, 2]);
        // A half taken away breaks its pair; the other half alone changes nothing.
        assert_eq!(regrant(&mut granted, [(S, 1)], false), vec![1]);
        assert_eq!(regrant(&mut granted, [(P, 1)], false), Vec::<i32>::new());
        assert!(!granted.contains_key(&1));
        assert_eq!(
            regrant(&mut granted, [(P, 0), (S, 0), (P, 2)], false),
            vec![0, 2]
        );
        assert_eq!(
            granted.len(),
            1,
            "the lone settlements half of pair 2 stays granted"
        );
    }

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
