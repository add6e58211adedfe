//! Kafka side: the consumer's configuration, the co-partitioning check, and the poll
//! thread that owns the consumer.
//!
//! - [`delivery`]: what the poll thread and the pipeline say to each other: data and
//!   control to the pipeline (one bounded channel, in order), commands back (advisory
//!   commits, rewinds).
//! - `client`: librdkafka's settings and the start-up checks.
//! - `poller`: the poll thread, the consumer's only owner: poll, decode, hand over,
//!   serve commands, rewind.
//! - `rebalance`: librdkafka's rebalance callbacks, which wait for the pipeline to take
//!   (or let go of) partition pairs; `incremental` for the next-generation protocol.
//! - `in_step`: progress reports and keeping each pair's two topics in step.
//! - `security`: a broker refusing the worker's credentials or TLS at start, told from
//!   an outage and named (authentication, untrusted certificate, hostname mismatch).

mod client;
pub mod delivery;
mod in_step;
mod incremental;
mod poller;
mod rebalance;
mod security;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

pub use client::{check_co_partitioned, client_config, KafkaConsumer};
pub use delivery::{
    decode_announcement_message, decode_message, Command, ConsumerHandle, Control, Data, Delivery,
    OffsetReset, PartitionProgress, ReadAnnouncement, ReadMessage, Refused, Rewind, StoredOffset,
};
use poller::{Poller, Reader};
use rebalance::RebalanceContext;
pub use security::TlsCause;

use crate::config::Config;
use crate::pair::TopicNames;
use crate::telemetry::Health;

/// A Kafka failure at start, saying whether retrying can help
/// ([`ConsumerError::is_configuration`]).
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Kafka client error: {0}")]
    Kafka(#[from] KafkaError),
    /// librdkafka refused its configuration: a `RECON_KAFKA_PROP_*` value it does not
    /// accept, or properties that do not go together (SASL without a user name, say).
    #[error("librdkafka refused the Kafka configuration (RECON_KAFKA_PROP_*): {0}")]
    Configuration(KafkaError),
    /// No broker answered in time: down, unreachable, or a listener that speaks another
    /// protocol (PLAINTEXT against TLS, say), which librdkafka cannot tell apart.
    #[error("no Kafka broker of {brokers} answered within {waited:?}{}", last_error_text(.last_error))]
    Unreachable {
        brokers: String,
        waited: std::time::Duration,
        /// librdkafka's last connection error.
        last_error: Option<String>,
    },
    /// The broker refused the worker's SASL credentials.
    #[error(
        "Kafka authentication failed: {reason} (check RECON_KAFKA_PROP_SASL_MECHANISM, \
         RECON_KAFKA_PROP_SASL_USERNAME and RECON_KAFKA_PROP_SASL_PASSWORD)"
    )]
    Authentication { reason: String },
    /// TLS with a broker failed: its certificate was not trusted, or not issued to the
    /// name connected to.
    #[error("TLS with the Kafka broker failed: {cause}; librdkafka: {reason}")]
    Tls { cause: TlsCause, reason: String },
    #[error("topic {topic:?} does not exist on {brokers}")]
    MissingTopic { topic: String, brokers: String },
    /// The topics' partition counts, in the order payments, settlements (, payouts).
    #[error("topics are not co-partitioned: {}; all must have the same count", partition_counts(.counts))]
    NotCoPartitioned { counts: Vec<(String, usize)> },
}

impl ConsumerError {
    /// Whether only a change of configuration (or of the broker's) can help: the same
    /// start would be refused the same way, so the binary exits 2 as for an invalid
    /// variable, not 1 as for an outage.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::Configuration(_) | Self::Authentication { .. } | Self::Tls { .. }
        )
    }
}

fn partition_counts(counts: &[(String, usize)]) -> String {
    let counts: Vec<String> = counts
        .iter()
        .map(|(topic, partitions)| format!("{topic:?} has {partitions} partitions"))
        .collect();
    counts.join(", ")
}

fn last_error_text(last_error: &Option<String>) -> String {
    last_error
        .as_ref()
        .map(|error| format!("; last connection error: {error}"))
        .unwrap_or_default()
}

/// The running poll thread.
pub struct PollThread {
    handle: thread::JoinHandle<()>,
    /// True once the consumer failed for good (an assignment could not be taken).
    pub failed: Arc<AtomicBool>,
    /// The topics' partition count (all the same: checked at start), so the number of
    /// partition pairs.
    pub partitions: usize,
}

impl PollThread {
    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("poll thread panicked");
        }
    }
}

/// Creates the consumer, checks co-partitioning, subscribes and starts the poll
/// thread, which owns the consumer from then on. `stop` ends polling; the thread then
/// hands a `Stop` to the pipeline, commits the offsets it answers with, and closes the
/// consumer so the group rebalances at once. The returned handle is the pipeline's way
/// to the consumer.
pub fn start(
    config: &Config,
    deliveries: mpsc::Sender<Delivery>,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
) -> Result<(PollThread, ConsumerHandle), ConsumerError> {
    let failed = Arc::new(AtomicBool::new(false));
    let topics = TopicNames {
        payments: config.payments_topic.clone(),
        settlements: config.settlements_topic.clone(),
        payouts: config.payouts.as_ref().map(|p| p.topic.clone()),
    };
    let context = RebalanceContext::new(
        deliveries.clone(),
        topics.clone(),
        failed.clone(),
        health.clone(),
        config.scrubber.clone(),
    );
    let consumer: KafkaConsumer = client_config(config)
        .create_with_context(context)
        .map_err(ConsumerError::Configuration)?;
    let partitions = check_co_partitioned(&consumer, config)?;
    tracing::info!(
        payments = %config.payments_topic,
        settlements = %config.settlements_topic,
        payouts = ?topics.payouts,
        partitions,
        "topics are co-partitioned"
    );
    let names: Vec<&str> = topics.active().filter_map(|t| topics.name(t)).collect();
    consumer.subscribe(&names)?;
    let (commands, command_receiver) = std_mpsc::channel();
    let poller = Poller {
        consumer,
        reader: Reader::new(topics, config.decode_limits(), health),
        commands: command_receiver,
        deliveries,
        stop,
        failed: failed.clone(),
    };
    let handle = thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || poller.run())
        .map_err(|e| ConsumerError::Kafka(KafkaError::ClientCreation(e.to_string())))?;
    Ok((
        PollThread {
            handle,
            failed,
            partitions,
        },
        ConsumerHandle { commands },
    ))
}
