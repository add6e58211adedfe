//! The Kafka client: librdkafka's configuration, the start-up check that the two
//! topics are co-partitioned (which is also the first contact with the brokers), and
//! the cached watermarks read without a round trip.

use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaRespErr;

use super::rebalance::RebalanceContext;
use super::{security, ConsumerError};
use crate::config::{Config, GroupProtocol};

pub type KafkaConsumer = BaseConsumer<RebalanceContext>;

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
        // Bounded prefetch: memory must not grow with a backlog. librdkafka checks
        // both bounds against the queue a partition's fetched messages go to, and
        // for a consumer polled through its main queue (as this one is) that is one
        // queue for all its partitions (`rd_kafka_toppar_fetch_decide` measures it
        // with `rd_kafka_q_len`, which follows the forward): the worker as a whole
        // holds about 2,000 messages (512 KiB) ahead of the pipeline, plus the fetch
        // response that crossed the bound. librdkafka keeps each fetch buffer alive
        // until its last message is consumed, so these bound most of its memory: at
        // 2 MiB and 20,000, its buffers were 11.5 MB of a drain's 48.6 MB peak
        // (heaptrack), and the peak RSS 50 MB; at 512 KiB and 2,000, 45-46 MB with
        // the same drain rate (docs/bench-profile.md).
        .set("queued.max.messages.kbytes", "512")
        .set("queued.min.messages", "2000")
        .set("fetch.max.bytes", "2097152")
        // At most 64 KiB of each partition per fetch (default 1 MiB), so that one
        // response holds a little of every partition instead of 1 MiB of two: with
        // the default, a response of two payments partitions filled the queue above,
        // every partition then waited for it to drain, and a drain read thousands of
        // one topic's messages before the other's: payments were stored pending and
        // updated when their settlements came, and lookups multiplied. Draining
        // 631,410 messages in alternating runs (docs/bench-profile.md): 134-271 s at
        // 1 MiB, 61-79 s at 64 KiB; 309-326k against 281k outcome updates; peak RSS
        // 53-54 against 47-49 MB. A message larger than this is still
        // fetched whole (the broker always returns the first batch).
        .set("max.partition.fetch.bytes", "65536")
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

/// Checks every topic read (two, or three with payouts) exists, all with the same
/// partition count; returns that count.
pub fn check_co_partitioned(
    consumer: &KafkaConsumer,
    config: &Config,
) -> Result<usize, ConsumerError> {
    let count = |topic: &str| -> Result<usize, ConsumerError> {
        let metadata = metadata(consumer, topic, config)?;
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
    let mut topics = vec![&config.payments_topic, &config.settlements_topic];
    topics.extend(config.payouts.as_ref().map(|p| &p.topic));
    let mut counts = Vec::with_capacity(topics.len());
    for topic in topics {
        counts.push((topic.clone(), count(topic)?));
    }
    let partitions = counts[0].1;
    if counts.iter().any(|&(_, n)| n != partitions) {
        return Err(ConsumerError::NotCoPartitioned { counts });
    }
    Ok(partitions)
}

/// How long the start-up check waits for a broker to answer.
const METADATA_PATIENCE: Duration = Duration::from_secs(10);

/// `topic`'s metadata, waiting up to [`METADATA_PATIENCE`] for a broker, but ending at
/// the first refusal of the worker's credentials or TLS: librdkafka retries those as
/// it retries an outage, so one long request would report them 10 s later as a
/// timeout, without the cause. Requests are short at first and grow (0.5 s, 1 s, 2 s,
/// 4 s), so a slow answer still arrives; between them the client's queued events are
/// served, and the context records the errors among them.
fn metadata(
    consumer: &KafkaConsumer,
    topic: &str,
    config: &Config,
) -> Result<Metadata, ConsumerError> {
    let started = Instant::now();
    let mut step = Duration::from_millis(500);
    loop {
        let remaining = METADATA_PATIENCE.saturating_sub(started.elapsed());
        if let Ok(metadata) = consumer.fetch_metadata(Some(topic), step.min(remaining)) {
            return Ok(metadata);
        }
        serve_events(consumer);
        let errors = &consumer.context().connection;
        if let Some(refusal) = errors.refusal() {
            return Err(security::refused(refusal, config));
        }
        if started.elapsed() >= METADATA_PATIENCE {
            return Err(ConsumerError::Unreachable {
                brokers: config.brokers.clone(),
                waited: METADATA_PATIENCE,
                last_error: errors.last(),
            });
        }
        step = (step * 2).min(Duration::from_secs(4));
    }
}

/// Serves the client's queued events (error events reach the context's `error`
/// callback, log lines its `log`), until none came for 20 ms or a refusal is recorded.
/// Before the subscription a poll returns no messages.
fn serve_events(consumer: &KafkaConsumer) {
    // Bounded: a client failing in a tight loop must not keep the check here.
    for _ in 0..1000 {
        let served = consumer.poll(Duration::from_millis(20));
        if served.is_none() || consumer.context().connection.refusal().is_some() {
            return;
        }
    }
}

/// The low and high watermarks librdkafka cached from its last fetch response for this
/// partition (no network round trip); −1 when not known yet.
pub(super) fn cached_watermarks(
    consumer: &KafkaConsumer,
    topic: &str,
    partition: i32,
) -> (i64, i64) {
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
