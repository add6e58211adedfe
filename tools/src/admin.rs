//! Kafka administration used by the demo, the load generator and the tests: creating
//! co-partitioned topics and producing records to the topic of each record's role
//! (payments, settlements and, for contract §7, payouts).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use recon_worker::event::Topic;

/// Why records could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A record for a topic no name was given for: nothing of the batch is sent.
    #[error("a {0} record, but no {0} topic to send it to")]
    NoTopic(Topic),
}

/// The topic names records go to, by role. `[payments, settlements]` sends the two
/// input topics only (a payout announcement is then refused, [`ProduceError::NoTopic`]);
/// `[payments, settlements, payouts]` all three.
pub trait TopicNames: Sync {
    fn name(&self, topic: Topic) -> Option<&str>;
}

impl<S: AsRef<str> + Sync> TopicNames for [S; 2] {
    fn name(&self, topic: Topic) -> Option<&str> {
        let [payments, settlements] = self;
        match topic {
            Topic::Payments => Some(payments.as_ref()),
            Topic::Settlements => Some(settlements.as_ref()),
            Topic::Payouts => None,
        }
    }
}

impl<S: AsRef<str> + Sync> TopicNames for [S; 3] {
    fn name(&self, topic: Topic) -> Option<&str> {
        let [payments, settlements, payouts] = self;
        Some(match topic {
            Topic::Payments => payments.as_ref(),
            Topic::Settlements => settlements.as_ref(),
            Topic::Payouts => payouts.as_ref(),
        })
    }
}

/// Every record's topic name, or the first role without one (checked before anything
/// is sent, so a batch is sent whole or not at all).
fn names<'a>(
    records: &[crate::loadgen::Record],
    topics: &'a dyn TopicNames,
) -> Result<Vec<&'a str>, ProduceError> {
    records
        .iter()
        .map(|record| {
            topics
                .name(record.topic)
                .ok_or(ProduceError::NoTopic(record.topic))
        })
        .collect()
}

/// Creates the topics with `partitions` partitions each; existing topics are left as they are.
pub async fn create_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code))
                    .inspect_err(|_| tracing::error!(topic, "create topic failed"))
            }
        }
    }
    Ok(())
}

/// A producer for test and demo traffic, configured as an upstream payments producer
/// should be: idempotent with `acks=all`, so a retry after a lost acknowledgement (a
/// broker restart) neither duplicates nor reorders a partition's records, and nothing
/// acknowledged is lost.
pub fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
}

/// Produces records at `rate` messages per second (0: as fast as possible), with a
/// progress line on stderr every second, and waits until all are acknowledged. Each
/// record carries the current time as its Kafka timestamp, so latency can be measured.
pub async fn produce_paced(
    producer: &FutureProducer,
    records: &[crate::loadgen::Record],
    topics: impl TopicNames,
    rate: u64,
) -> Result<(), ProduceError> {
    let topics: &dyn TopicNames = &topics;
    names(records, topics)?;
    if rate == 0 && records.len() < 100_000 {
        return produce_all_to(producer, records, topics, None).await;
    }
    let started = std::time::Instant::now();
    let step = if rate == 0 {
        10_000
    } else {
        // 5 ms worth at a time: a burst would queue in the producer, and its wait
        // would count as processing latency (timestamps are set at creation).
        (rate / 200).max(1) as usize
    };
    let mut last_report = started;
    // Paced steps do not wait for their acknowledgements: the next step is due 5 ms
    // later whatever the broker's round trip (waiting capped the rate at one step per
    // produce round trip, about 9k msg/s on the test broker). A step's deliveries are
    // awaited by a task; at most ~2 s of steps are outstanding.
    let mut acknowledging = std::collections::VecDeque::new();
    for (i, chunk) in records.chunks(step).enumerate() {
        if rate == 0 {
            produce_all_to(producer, chunk, topics, None).await?;
        } else {
            let deliveries = send_all(producer, chunk, topics, None)?;
            acknowledging.push_back(tokio::spawn(async move {
                for delivery in deliveries {
                    await_delivery(delivery).await?;
                }
                Ok::<(), KafkaError>(())
            }));
            if acknowledging.len() > 400 {
                if let Some(oldest) = acknowledging.pop_front() {
                    oldest.await.map_err(|_| KafkaError::Canceled)??;
                }
            }
        }
        let sent = (i + 1) * step;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            eprintln!(
                "loadgen: {}/{} messages, {:.0} msg/s",
                sent.min(records.len()),
                records.len(),
                sent as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    for acknowledged in acknowledging {
        acknowledged.await.map_err(|_| KafkaError::Canceled)??;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Hands records to the producer without waiting; one delivery future per record.
/// Each carries `timestamp_ms` as its Kafka timestamp, or the time it is sent.
fn send_all(
    producer: &FutureProducer,
    records: &[crate::loadgen::Record],
    topics: &dyn TopicNames,
    timestamp_ms: Option<i64>,
) -> Result<Vec<rdkafka::producer::DeliveryFuture>, ProduceError> {
    let names = names(records, topics)?;
    records
        .iter()
        .zip(names)
        .map(|(record, topic)| {
            let mut future_record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .timestamp(timestamp_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis()));
            if let Some(key) = &record.key {
                future_record = future_record.key(key.as_slice());
            }
            if let Some(value) = &record.value {
                future_record = future_record.payload(value.as_slice());
            }
            producer
                .send_result(future_record)
                .map_err(|(error, _)| ProduceError::Kafka(error))
        })
        .collect()
}

/// Produces records in order and waits until all are acknowledged.
pub async fn produce_all(
    producer: &FutureProducer,
    records: &[crate::loadgen::Record],
    topics: impl TopicNames,
) -> Result<(), ProduceError> {
    produce_all_to(producer, records, &topics, None).await
}

/// [`produce_all`] with every record carrying `timestamp_ms` as its Kafka timestamp
/// (`None`: the time it is sent).
pub async fn produce_all_at(
    producer: &FutureProducer,
    records: &[crate::loadgen::Record],
    topics: impl TopicNames,
    timestamp_ms: Option<i64>,
) -> Result<(), ProduceError> {
    produce_all_to(producer, records, &topics, timestamp_ms).await
}

/// [`produce_all_at`] behind one type of topic names (the public functions take any).
async fn produce_all_to(
    producer: &FutureProducer,
    records: &[crate::loadgen::Record],
    topics: &dyn TopicNames,
    timestamp_ms: Option<i64>,
) -> Result<(), ProduceError> {
    names(records, topics)?;
    // In slices of 10,000, so the producer's queue (100,000 messages) never fills.
    for slice in records.chunks(10_000) {
        for delivery in send_all(producer, slice, topics, timestamp_ms)? {
            await_delivery(delivery).await?;
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

async fn await_delivery(delivery: rdkafka::producer::DeliveryFuture) -> Result<(), KafkaError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(error),
        Err(_) => Err(KafkaError::Canceled),
    }
}
