//! Measurements behind `recon-tools bench …` and `scripts/bench.sh`: the physical
//! limits around the worker (raw broker consume rate, raw PostgreSQL write rate), the
//! worker's own ceiling without the broker (pre-decoded events through engine and
//! checkpoint), and the window's memory per item. They print figures; they assert
//! nothing.
//!
//! They reach into the worker's library (its pipeline, consumer settings, store and
//! engine) on purpose: each measures one of the worker's own parts in isolation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use recon_worker::config::{Config, WindowConfig};
use recon_worker::consumer::{
    decode_announcement_message, decode_message, Control, Data, Delivery, ReadAnnouncement,
    ReadMessage,
};
use recon_worker::engine::{EngineConfig, PairEngine, StoredEvent};
use recon_worker::event::{EventKind, Line};
use recon_worker::pair::{PerInput, PerTopic};
use recon_worker::pipeline::Pipeline;
use recon_worker::rejection::MessageAt;
use recon_worker::store::{PairCheckpoint, Store};
use recon_worker::telemetry::Health;
use tokio::sync::mpsc;

use crate::loadgen::{self, Mix, Plan};

/// Resident set size of this process in bytes (Linux).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// The open items the window-memory measurement loads, one per key: what a key holds
/// while it waits for the event of the other side (contract §2, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OpenItem {
    /// A payment waiting for its capture line.
    Payment,
    /// A refund request waiting for its refund line.
    Refund,
    /// A refund line waiting for its request.
    RefundLine,
    /// A chargeback waiting for (possibly) its reversal.
    Chargeback,
    /// A reversal waiting for its chargeback.
    Reversal,
}

impl OpenItem {
    /// The stored row of the open item of key number `i`.
    fn stored(self, i: usize, currency: recon_worker::money::Currency) -> StoredEvent {
        use recon_worker::engine::Outcome;
        let (kind, outcome, amount, line) = match self {
            OpenItem::Payment => (EventKind::Payment, Outcome::Pending, 1_000, Line::Capture),
            OpenItem::Refund => (
                EventKind::Refund,
                Outcome::Pending,
                1_000,
                Line::Refund {
                    refund_id: format!("ref-{i:012}"),
                },
            ),
            OpenItem::RefundLine => (
                EventKind::Settlement,
                Outcome::Pending,
                -1_000,
                Line::Refund {
                    refund_id: format!("ref-{i:012}"),
                },
            ),
            OpenItem::Chargeback => (
                EventKind::Settlement,
                Outcome::ChargebackOpen,
                -1_000,
                Line::Chargeback {
                    dispute_id: format!("dsp-{i:012}"),
                },
            ),
            OpenItem::Reversal => (
                EventKind::Settlement,
                Outcome::Pending,
                1_000,
                Line::ChargebackReversal {
                    dispute_id: format!("dsp-{i:012}"),
                },
            ),
        };
        StoredEvent {
            kind,
            event_id: format!("evt-{i:012}-{kind}"),
            payment_id: format!("pay-{i:012}"),
            outcome,
            event_time: 1_700_000_000_000_000,
            amount,
            fee: 0,
            net: amount,
            currency,
            line,
        }
    }
}

/// Loads `items` open items of one kind (one per key) into one window and reports
/// RSS growth per item, and what the window accounts for each.
pub fn window_memory(items: usize, item: OpenItem) -> (u64, u64, f64, usize) {
    let config = EngineConfig::new(
        &recon_worker::config::MatchConfig::default(),
        WindowConfig {
            max_items: items * 2,
            max_bytes: usize::MAX / 2,
        },
    );
    let eur = recon_worker::money::Currency::from_code("EUR").expect("EUR is active");
    let mut engine = PairEngine::new(config, PerInput::default());
    let before = rss_bytes();
    // Loaded as the worker does: at most one batch of keys (5,000) at a time.
    let chunk = 5_000;
    for start in (0..items).step_by(chunk) {
        let end = (start + chunk).min(items);
        let rows: Vec<StoredEvent> = (start..end).map(|i| item.stored(i, eur)).collect();
        let keys = rows
            .iter()
            .map(|row| row.payment_id.clone())
            .collect::<Vec<_>>();
        engine.load(keys, rows);
    }
    let after = rss_bytes();
    let per_item = after.saturating_sub(before) as f64 / items as f64;
    (
        before,
        after,
        per_item,
        engine.window_bytes() / items.max(1),
    )
}

/// Every partition of both topics, each starting at `offset`.
fn every_partition(
    consumer: &BaseConsumer,
    config: &Config,
    offset: Offset,
) -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for topic in [&config.payments_topic, &config.settlements_topic] {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len());
        for partition in 0..partitions {
            tpl.add_partition_offset(topic, partition as i32, offset)?;
        }
    }
    Ok(tpl)
}

/// Counts messages from the start of both topics with a minimal consumer.
pub fn raw_consume(
    config: &Config,
    expected: u64,
) -> Result<(u64, Duration), rdkafka::error::KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", format!("bench-raw-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608")
        .create()?;
    consumer.assign(&every_partition(&consumer, config, Offset::Beginning)?)?;
    let mut count = 0u64;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < expected && Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            started.get_or_insert_with(Instant::now);
            count += 1;
        }
    }
    Ok((count, started.map_or(Duration::ZERO, |s| s.elapsed())))
}

/// Consumes both topics from their current end with the worker's client settings and
/// measures, per message, the time from its Kafka timestamp to its arrival: what the
/// producer's queue, the broker and the fetch settings add before the worker sees it.
/// Returns (messages, p50 ms, p99 ms).
pub fn broker_latency(
    config: &Config,
    messages: u64,
) -> Result<(u64, f64, f64), rdkafka::error::KafkaError> {
    use rdkafka::Message;
    let mut client = recon_worker::consumer::client_config(config);
    client.set("group.id", format!("bench-latency-{}", std::process::id()));
    let consumer: BaseConsumer = client.create()?;
    consumer.assign(&every_partition(&consumer, config, Offset::End)?)?;
    let mut latencies_ms = Vec::new();
    let mut last_arrival = None::<Instant>;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (latencies_ms.len() as u64) < messages && Instant::now() < deadline {
        if last_arrival.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            last_arrival = Some(Instant::now());
            if let Some(ts) = message.timestamp().to_millis() {
                let now = chrono::Utc::now().timestamp_millis();
                latencies_ms.push((now - ts).max(0) as f64);
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        latencies_ms
            .get(
                ((latencies_ms.len() as f64 * q) as usize)
                    .min(latencies_ms.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((latencies_ms.len() as u64, quantile(0.5), quantile(0.99)))
}

/// Writes `rows` outcome rows with the checkpoint's batched UNNEST insert.
pub async fn raw_pg_write(
    store: &Store,
    rows: usize,
    batch: usize,
) -> Result<Duration, recon_worker::store::StoreError> {
    store.migrate().await?;
    let epoch = store.acquire_pairs(&[0]).await?[0].epoch;
    let eur = recon_worker::money::Currency::from_code("EUR").expect("EUR is active");
    let started = Instant::now();
    for start in (0..rows).step_by(batch) {
        let end = (start + batch).min(rows);
        let writes = (start..end)
            .map(|i| recon_worker::engine::RowWrite {
                kind: EventKind::Payment,
                event_id: format!("raw-{i:012}").into(),
                payment_id: format!("pay-{i:012}").into(),
                outcome: recon_worker::engine::Outcome::Matched,
                counterpart: Some(format!("raw-{i:012}-s").into()),
                new: Some(recon_worker::engine::NewEvent {
                    kafka_offset: i as i64,
                    event_time: 1_700_000_000_000_000,
                    amount: 1_000,
                    fee: None,
                    net: None,
                    currency: eur,
                    reference: Some("merchant".into()),
                    line: Line::Capture,
                    payout_id: None,
                }),
            })
            .collect();
        let checkpoint = PairCheckpoint {
            pair: 0,
            epoch,
            next_offsets: PerTopic {
                payments: Some(end as i64),
                ..Default::default()
            },
            changes: recon_worker::engine::PairChanges {
                rows: writes,
                ..Default::default()
            },
            rejected: Vec::new(),
            announcements: Vec::new(),
            watermark: None,
            redriven: Vec::new(),
        };
        store.checkpoint(&[checkpoint]).await?;
    }
    Ok(started.elapsed())
}

/// What [`pipeline_only`] fed through the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineRun {
    /// Messages delivered, payout announcements included.
    pub messages: usize,
    /// Of which payout announcements.
    pub announcements: usize,
    pub elapsed: Duration,
}

/// A generated stream, decoded up front as the poll thread would deliver it, and
/// where each message sits: the pipeline benchmark feeds the deliveries, and the
/// same-rows reference (`same_rows`) batches its rows by the positions.
pub struct Stream {
    pub deliveries: Vec<Delivery>,
    /// Topic, partition and offset of each delivery, in delivery order.
    pub positions: Vec<MessageAt>,
    /// Payout announcements among the deliveries.
    pub announcements: usize,
}

/// Generates and decodes the benchmark stream: seed 1, ids prefixed with this
/// process's id (fixed width, so every run's ids have the same length and two runs
/// write rows of the same size), keys spread over `partitions` with
/// [`partition_of`]. `payout_every_line` > 0 puts every capture line in a payout of
/// that many lines ([`Plan::payout_every_line`]).
pub fn stream(
    config: &Config,
    scenarios: usize,
    partitions: i32,
    mix: Mix,
    payout_every_line: usize,
) -> Stream {
    let engine = EngineConfig::new(&config.matching, config.window);
    let plan = Plan {
        seed: 1,
        scenarios,
        mix,
        base_time: chrono::Utc::now().timestamp_micros(),
        deadline: engine.deadline,
        orphan_timeout: engine.orphan_timeout,
        max_message_bytes: config.max_message_bytes,
        id_prefix: format!("bench{:07}-", std::process::id()),
        payout_every_line,
    };
    let (records, _) = loadgen::generate(&plan);
    let mut offsets = vec![[0i64; 3]; partitions as usize];
    let announcements = records.iter().filter(|r| r.input().is_none()).count();
    let limits = config.decode_limits();
    let mut positions = Vec::with_capacity(records.len());
    let deliveries = records
        .iter()
        .map(|record| {
            let partition = record
                .key
                .as_deref()
                .map_or(0, |k| partition_of(k, partitions));
            let slot = &mut offsets[partition as usize][record.topic as usize];
            *slot += 1;
            let at = MessageAt {
                topic: record.topic,
                partition,
                offset: *slot - 1,
            };
            positions.push(at);
            let (key, value) = (record.key.as_deref(), record.value.as_deref());
            let data = match record.input() {
                Some(input) => Data::Message(ReadMessage {
                    input,
                    partition,
                    offset: at.offset,
                    timestamp_ms: None,
                    decoded: decode_message(at, key, value, None, limits, None),
                    reset: None,
                }),
                None => Data::Announcement(ReadAnnouncement {
                    partition,
                    offset: at.offset,
                    timestamp_ms: None,
                    decoded: decode_announcement_message(at, key, value, None, limits, None),
                    reset: None,
                }),
            };
            Delivery::Data(data)
        })
        .collect();
    Stream {
        deliveries,
        positions,
        announcements,
    }
}

/// The worker's own ceiling: a generated stream ([`stream`]), decoded up front, fed
/// through the real pipeline (engine and PostgreSQL checkpoints) with no broker.
/// `payout_every_line` > 0: the same stream, with payouts (lines summed into their
/// payouts' partial sums, announcements stored with the pairs' checkpoints).
pub async fn pipeline_only(
    config: &Config,
    store: Store,
    scenarios: usize,
    partitions: i32,
    mix: Mix,
    payout_every_line: usize,
) -> anyhow::Result<PipelineRun> {
    let stream = stream(config, scenarios, partitions, mix, payout_every_line);
    run_pipeline(config, store, partitions, stream).await
}

/// Feeds a stream's deliveries through the pipeline on `store`, owning pairs
/// `0..partitions`, and times it from the first delivery to the last commit.
pub async fn run_pipeline(
    config: &Config,
    store: Store,
    partitions: i32,
    stream: Stream,
) -> anyhow::Result<PipelineRun> {
    store.migrate().await?;
    let count = stream.deliveries.len();
    let (sender, receiver) = mpsc::channel(config.batch_max_messages * 2);
    let pipeline = Pipeline::new(config, store, None, Arc::new(Health::default()));
    let task = tokio::spawn(pipeline.run(receiver));
    let (reply, answer) = tokio::sync::oneshot::channel();
    let assign = Control::Assign {
        pairs: (0..partitions).collect(),
        reply,
    };
    sender.send(assign.into()).await?;
    answer.await?.map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    for message in stream.deliveries {
        sender.send(message).await?;
    }
    let (done, stopped) = tokio::sync::oneshot::channel();
    sender.send(Control::Stop { done }.into()).await?;
    task.await??;
    let elapsed = started.elapsed();
    let _ = stopped.await;
    Ok(PipelineRun {
        messages: count,
        announcements: stream.announcements,
        elapsed,
    })
}

/// Any stable spread of keys over partitions will do without a broker.
fn partition_of(key: &[u8], partitions: i32) -> i32 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % partitions.max(1) as u64) as i32
}
