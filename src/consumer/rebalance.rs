//! Rebalances: librdkafka's callbacks, run on the poll thread inside `poll`.
//!
//! An assignment is taken only once the pipeline has taken ownership of the pairs in
//! PostgreSQL (epochs bumped, stored offsets read), and each partition starts at its
//! stored offset; a revocation lets the partitions go only after the pipeline has
//! finished the batch in hand and answered with the offsets to commit. Both wait on a
//! `oneshot` answer, which is fine on the poll thread and would not be on a tokio
//! worker. A pair is owned only while this worker holds its partition of every topic it
//! reads (two, or three with payouts): under the next-generation protocol they may
//! come and go in different callbacks, and a group whose members disagree on the
//! payouts topic can hand one member a payouts partition without its inputs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::delivery::{Control, Delivery};
use super::poller::commit_advisory;
use super::security::ConnectionErrors;
use crate::config::Scrubber;
use crate::event::Topic;
use crate::pair::{PairPosition, PerTopic, TopicNames};
use crate::telemetry::Health;

/// Callbacks librdkafka runs on the poll thread.
pub struct RebalanceContext {
    pub(super) deliveries: mpsc::Sender<Delivery>,
    pub(super) topics: TopicNames,
    /// Set when an assignment could not be taken: the worker must stop.
    pub(super) failed: Arc<AtomicBool>,
    pub(super) health: Arc<Health>,
    /// Next-generation protocol only: which of each pair's partitions the coordinator
    /// has granted, per topic. Only librdkafka's callbacks on the poll thread touch
    /// it; the lock satisfies the context's `Sync` bound.
    pub(super) granted: Mutex<HashMap<i32, PerTopic<bool>>>,
    /// Where each newly assigned partition starts, for the poll thread (the callback
    /// runs inside its `poll`, which cannot lend it the poller itself).
    pub(super) assigned: Mutex<Vec<Assigned>>,
    /// Connection errors, for the start-up check (a refusal ends the start).
    pub(super) connection: ConnectionErrors,
    /// librdkafka's lines may quote configuration values; secrets are blanked out.
    pub(super) scrubber: Scrubber,
}

/// A partition just assigned, and the offset it is read from (`None`: the beginning).
#[derive(Debug, Clone, Copy)]
pub(super) struct Assigned {
    pub topic: Topic,
    pub partition: i32,
    pub next_offset: Option<i64>,
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let log_message = self.scrubber.scrub(log_message);
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
        let reason = self.scrubber.scrub(reason);
        tracing::warn!(%error, reason, "Kafka client error");
        self.connection.record(error.rdkafka_error_code(), &reason);
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
        let (pairs, lone) = self.pairs_of(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(?pairs, "partition pairs assigned");
                if !lone.is_empty() {
                    tracing::error!(
                        partitions = ?lone,
                        "assigned partitions whose pair is not whole here (do all workers of the \
                         group read the same topics? RECON_PAYOUTS_TOPIC must be the same on \
                         every worker); they are not read"
                    );
                }
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
                self.hand_back(consumer, pairs);
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
    pub(super) fn new(
        deliveries: mpsc::Sender<Delivery>,
        topics: TopicNames,
        failed: Arc<AtomicBool>,
        health: Arc<Health>,
        scrubber: Scrubber,
    ) -> Self {
        Self {
            deliveries,
            topics,
            failed,
            health,
            granted: Mutex::new(HashMap::new()),
            assigned: Mutex::new(Vec::new()),
            connection: ConnectionErrors::default(),
            scrubber,
        }
    }

    /// The partitions assigned since the last call, with where each starts.
    pub(super) fn take_assigned(&self) -> Vec<Assigned> {
        match self.assigned.lock() {
            Ok(mut assigned) => std::mem::take(&mut *assigned),
            Err(_) => Vec::new(),
        }
    }

    pub(super) fn topic_of(&self, name: &str) -> Option<Topic> {
        self.topics.topic_of(name)
    }

    /// Has the pipeline finish the batch in hand and drop the pairs' state, waits for
    /// it, and commits the offsets it answers with to Kafka while the partitions are
    /// still ours. After Stop the pipeline is gone and has already committed
    /// everything: the send or the wait fails and there is nothing to do.
    pub(super) fn hand_back(&self, consumer: &BaseConsumer<Self>, pairs: Vec<i32>) {
        let (done, wait) = oneshot::channel();
        if self
            .deliveries
            .blocking_send(Control::Revoke { pairs, done }.into())
            .is_err()
        {
            return;
        }
        if let Ok(offsets) = wait.blocking_recv() {
            commit_advisory(consumer, &self.topics, &offsets);
        }
    }

    pub(super) fn take_ownership(&self, pairs: &[i32]) -> Result<Vec<PairPosition>, String> {
        let (reply, wait) = oneshot::channel();
        let assign = Control::Assign {
            pairs: pairs.to_vec(),
            reply,
        };
        self.deliveries
            .blocking_send(assign.into())
            .map_err(|_| "pipeline has stopped".to_owned())?;
        wait.blocking_recv()
            .map_err(|_| "pipeline has stopped".to_owned())?
    }

    /// Every topic's partition of each pair, at the offsets stored in PostgreSQL, or
    /// from the beginning when nothing was stored: nothing may be skipped.
    pub(super) fn assignment(&self, positions: &[PairPosition]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for position in positions {
            for role in self.topics.active() {
                let offset = position.next_offsets[role].map_or(Offset::Beginning, Offset::Offset);
                let topic = self.topic(role);
                if let Err(error) = tpl.add_partition_offset(topic, position.pair, offset) {
                    tracing::error!(%error, topic, partition = position.pair, "bad partition offset");
                }
            }
        }
        tpl
    }

    /// The name of a topic this worker reads.
    pub(super) fn topic(&self, topic: Topic) -> &str {
        self.topics.name(topic).unwrap_or_default()
    }

    /// Hands the poll thread the offsets the pairs resume from. Without them a
    /// partition already read to its end when assigned (after a restart or a
    /// rebalance, nothing new since) would never count as caught up: nothing is read
    /// from it, so the idle rule would never release its pair's watermark.
    pub(super) fn seed_positions(&self, positions: &[PairPosition]) {
        let Ok(mut assigned) = self.assigned.lock() else {
            return;
        };
        for position in positions {
            for topic in self.topics.active() {
                assigned.push(Assigned {
                    topic,
                    partition: position.pair,
                    next_offset: position.next_offsets[topic],
                });
            }
        }
    }

    /// The pairs of which `tpl` holds every topic's partition, and the partitions
    /// left over (whose pair is not whole in it).
    fn pairs_of(&self, tpl: &TopicPartitionList) -> (Vec<i32>, Vec<(Topic, i32)>) {
        let mut held: HashMap<i32, PerTopic<bool>> = HashMap::new();
        for element in tpl.elements() {
            if let Some(topic) = self.topic_of(element.topic()) {
                held.entry(element.partition()).or_default()[topic] = true;
            }
        }
        let (mut pairs, mut lone) = (Vec::new(), Vec::new());
        for (pair, held) in held {
            if self.topics.active().all(|topic| held[topic]) {
                pairs.push(pair);
            } else {
                lone.extend(self.topics.active().filter(|&t| held[t]).map(|t| (t, pair)));
            }
        }
        pairs.sort_unstable();
        lone.sort_unstable();
        (pairs, lone)
    }
}
