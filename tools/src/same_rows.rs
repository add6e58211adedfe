//! The pipeline benchmark's PostgreSQL reference: the raw insert rate of THE SAME
//! ROWS the pipeline stores (`recon-tools bench pg-same-rows`, `scripts/bench.sh`'s
//! `pg_raw_rows_per_s`).
//!
//! `bench pg-write` inserts rows of its own (one pair, short ascending ids, all
//! `matched`, events only), which flattered the reference: the pipeline writes
//! loadgen's rows (longer ids interleaved over partitions, open outcomes,
//! discrepancies, rejects) through several connections (docs/bench-profile.md (b)).
//! This module owns the fair reference: it runs the pipeline once over the benchmark
//! stream ([`bench::stream`]) into a scratch database, reads back the final rows
//! (events, discrepancies, rejected messages, the pairs' marks), and times only their
//! insertion into a fresh database with the store's own checkpoint
//! ([`Store::checkpoint`]): in the pipeline's batches (`batch_max_messages` messages of
//! the stream in delivery order), one [`PairCheckpoint`] per pair, the pairs of a batch
//! split over `commit_parallelism` concurrent transactions as the pipeline's committer
//! splits them, one batch after the other. Nothing else: no lookups, no updates, no
//! engine. Afterwards the two databases' contents are compared, so the reference is
//! known to have written what the pipeline did, not something like it.
//!
//! A row's batch is that of its message; a discrepancy's, that of the later of its
//! events. A discrepancy the pipeline left resolved would need the resolve statement
//! (an update) after its insert; the version-1 stream leaves none, and a stream that
//! does is refused, as are payouts and `over_refunded` rows (written by statements
//! that are not plain inserts).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use recon_worker::config::Config;
use recon_worker::engine::{DiscrepancyChange, DiscrepancyKind, NewEvent, Outcome, RowWrite};
use recon_worker::event::{EventKind, Input, Line, Rejection, Topic};
use recon_worker::money::Currency;
use recon_worker::pair::{PerInput, PerTopic};
use recon_worker::rejection::{MessageAt, RejectedMessage, DATA_ERROR_CLASS};
use recon_worker::store::{PairCheckpoint, Store};
use sqlx::Row;

use crate::bench::{self, PipelineRun};
use crate::loadgen::Mix;

/// What [`same_rows`] wrote and how long the insertion took.
#[derive(Debug, Clone, Copy)]
pub struct SameRowsRun {
    /// Messages of the stream whose rows were written.
    pub messages: usize,
    pub event_rows: usize,
    pub discrepancies: usize,
    pub rejected: usize,
    pub batches: usize,
    /// The insertion alone.
    pub elapsed: Duration,
    /// The pipeline's run into the scratch database (for information: always the
    /// first of the two, so not a fair comparison).
    pub source: PipelineRun,
}

/// Runs the pipeline over the benchmark stream into `scratch`, then inserts its final
/// rows into `target` (both must be empty) and checks that the two hold the same.
pub async fn same_rows(
    config: &Config,
    target: Store,
    scratch: Store,
    scenarios: usize,
    partitions: i32,
    mix: Mix,
) -> anyhow::Result<SameRowsRun> {
    for (store, name) in [(&target, "target"), (&scratch, "scratch")] {
        store.migrate().await?;
        let empty: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT FROM recon_events) AND NOT EXISTS (SELECT FROM rejected_events)
                    AND NOT EXISTS (SELECT FROM recon_partition_pairs)",
        )
        .fetch_one(store.pool())
        .await?;
        if !empty {
            bail!("the {name} database is not empty: give a freshly created one");
        }
    }
    let stream = bench::stream(config, scenarios, partitions, mix, 0);
    let positions = stream.positions.clone();
    let source = bench::run_pipeline(config, scratch.clone(), partitions, stream).await?;
    let stored = read_back(config, &scratch).await?;
    settle(&scratch).await?;
    let batches = batches(config, &positions, partitions, stored)?;
    let epochs: HashMap<i32, i64> = target
        .acquire_pairs(&(0..partitions).collect::<Vec<_>>())
        .await?
        .into_iter()
        .map(|p| (p.pair, p.epoch))
        .collect();
    let (mut event_rows, mut discrepancies, mut rejected) = (0, 0, 0);
    let batches: Vec<Vec<PairCheckpoint>> = batches
        .into_iter()
        .map(|pairs| {
            pairs
                .into_iter()
                .map(|mut checkpoint| {
                    checkpoint.epoch = epochs.get(&checkpoint.pair).copied().unwrap_or(0);
                    event_rows += checkpoint.changes.rows.len();
                    discrepancies += checkpoint.changes.discrepancies.len();
                    rejected += checkpoint.rejected.len();
                    checkpoint
                })
                .collect()
        })
        .collect();
    let batch_count = batches.len();
    let parallelism = config.commit_parallelism.max(1);
    let started = Instant::now();
    for mut pairs in batches {
        // As the pipeline's committer splits a batch: whole pairs, this many
        // transactions at once.
        let per_transaction = pairs.len().div_ceil(parallelism).max(1);
        let mut writes = tokio::task::JoinSet::new();
        while !pairs.is_empty() {
            let group: Vec<PairCheckpoint> =
                pairs.drain(..per_transaction.min(pairs.len())).collect();
            let store = target.clone();
            writes.spawn(async move { store.checkpoint(&group).await });
        }
        while let Some(written) = writes.join_next().await {
            written.context("a checkpoint task failed")??;
        }
    }
    let elapsed = started.elapsed();
    compare(&scratch, &target).await?;
    Ok(SameRowsRun {
        messages: positions.len(),
        event_rows,
        discrepancies,
        rejected,
        batches: batch_count,
        elapsed,
        source,
    })
}

/// The final rows of the scratch database, as the checkpoint takes them.
struct Stored {
    events: Vec<(i32, RowWrite)>,
    discrepancies: Vec<(i32, DiscrepancyChange)>,
    rejected: Vec<RejectedMessage>,
    /// High marks and watermark per pair, as the pipeline left them.
    marks: HashMap<i32, (PerInput<Option<i64>>, Option<i64>)>,
}

async fn read_back(config: &Config, scratch: &Store) -> anyhow::Result<Stored> {
    let pool = scratch.pool();
    let payouts: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM recon_events WHERE payout_id IS NOT NULL)
             OR EXISTS (SELECT FROM recon_payout_announcements)
             OR EXISTS (SELECT FROM recon_discrepancies
                        WHERE payout_id IS NOT NULL OR kind = 'over_refunded' OR resolved_at IS NOT NULL)",
    )
    .fetch_one(pool)
    .await?;
    if payouts {
        bail!("the stream left payouts, over_refunded or resolved discrepancies: rows that are not plain inserts (see the module doc)");
    }
    let mut events = Vec::new();
    let rows = sqlx::query(
        "SELECT event_kind, event_id, payment_id, kafka_partition, kafka_offset, outcome,
                counterpart_event_id, event_time, amount_minor, fee_minor, net_minor, currency,
                merchant_id, settlement_id, line_type, refund_id, dispute_id
         FROM recon_events",
    )
    .fetch_all(pool)
    .await?;
    for row in rows {
        let input: Input = row.try_get("event_kind")?;
        let refund_id: Option<String> = row.try_get("refund_id")?;
        let dispute_id: Option<String> = row.try_get("dispute_id")?;
        let line_type: Option<String> = row.try_get("line_type")?;
        let kind = match (input, &refund_id) {
            (Input::Payments, None) => EventKind::Payment,
            (Input::Payments, Some(_)) => EventKind::Refund,
            (Input::Settlements, _) => EventKind::Settlement,
        };
        let line = match (kind, line_type.as_deref(), refund_id, dispute_id) {
            (EventKind::Payment, None, None, None) => Line::Capture,
            (EventKind::Refund, None, Some(refund_id), None) => Line::Refund { refund_id },
            (EventKind::Settlement, None, None, None) => Line::Capture,
            (EventKind::Settlement, Some("refund"), Some(refund_id), None) => {
                Line::Refund { refund_id }
            }
            (EventKind::Settlement, Some("chargeback"), None, Some(dispute_id)) => {
                Line::Chargeback { dispute_id }
            }
            (EventKind::Settlement, Some("chargeback_reversal"), None, Some(dispute_id)) => {
                Line::ChargebackReversal { dispute_id }
            }
            other => bail!("a stored row this reference cannot write again: {other:?}"),
        };
        let reference: Option<String> = match kind {
            EventKind::Payment => row.try_get("merchant_id")?,
            EventKind::Settlement => row.try_get("settlement_id")?,
            EventKind::Refund => None,
        };
        let event_time: chrono::DateTime<chrono::Utc> = row.try_get("event_time")?;
        let currency: Currency = row.try_get("currency")?;
        let outcome: Outcome = row.try_get("outcome")?;
        let partition: i32 = row.try_get("kafka_partition")?;
        events.push((
            partition,
            RowWrite {
                kind,
                event_id: row.try_get::<String, _>("event_id")?.into(),
                payment_id: row.try_get::<String, _>("payment_id")?.into(),
                outcome,
                counterpart: row
                    .try_get::<Option<String>, _>("counterpart_event_id")?
                    .map(Into::into),
                new: Some(NewEvent {
                    kafka_offset: row.try_get("kafka_offset")?,
                    event_time: event_time.timestamp_micros(),
                    amount: row.try_get("amount_minor")?,
                    fee: row.try_get("fee_minor")?,
                    net: row.try_get("net_minor")?,
                    currency,
                    reference,
                    line,
                    payout_id: None,
                }),
            },
        ));
    }
    let mut discrepancies = Vec::new();
    let rows = sqlx::query(
        "SELECT kind, payment_id, kafka_partition, payment_event_id, settlement_event_id
         FROM recon_discrepancies ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    for row in rows {
        let text: String = row.try_get("kind")?;
        let kind = DiscrepancyKind::of_pairs()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| anyhow!("unknown discrepancy kind {text:?}"))?;
        let payment_id: String = row.try_get("payment_id")?;
        discrepancies.push((
            row.try_get("kafka_partition")?,
            DiscrepancyChange::Opened {
                kind,
                payment_id: payment_id.into(),
                payment_event_id: row
                    .try_get::<Option<String>, _>("payment_event_id")?
                    .map(Into::into),
                settlement_event_id: row
                    .try_get::<Option<String>, _>("settlement_event_id")?
                    .map(Into::into),
            },
        ));
    }
    let mut rejected = Vec::new();
    let rows = sqlx::query(
        "SELECT topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size,
                kafka_key, kafka_timestamp
         FROM rejected_events ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    for row in rows {
        let topic_name: String = row.try_get("topic")?;
        let topic = if topic_name == config.payments_topic {
            Topic::Payments
        } else if topic_name == config.settlements_topic {
            Topic::Settlements
        } else {
            bail!("a rejected message of topic {topic_name:?}");
        };
        let class_name: String = row.try_get("reason_class")?;
        // The column is the crate's own `&'static` class names.
        let class = Rejection::CLASSES
            .into_iter()
            .chain([DATA_ERROR_CLASS])
            .find(|c| *c == class_name)
            .ok_or_else(|| anyhow!("unknown reason class {class_name:?}"))?;
        let timestamp: Option<chrono::DateTime<chrono::Utc>> = row.try_get("kafka_timestamp")?;
        rejected.push(RejectedMessage {
            topic,
            partition: row.try_get("kafka_partition")?,
            offset: row.try_get("kafka_offset")?,
            reason: row.try_get("reason")?,
            class,
            payload: row
                .try_get::<Option<Vec<u8>>, _>("payload")?
                .map(Vec::into_boxed_slice),
            payload_size: row.try_get("payload_size")?,
            key: row
                .try_get::<Option<Vec<u8>>, _>("kafka_key")?
                .map(Vec::into_boxed_slice),
            timestamp_ms: timestamp.map(|t| t.timestamp_millis()),
        });
    }
    let mut marks = HashMap::new();
    let rows = sqlx::query(
        "SELECT kafka_partition, payments_high_mark, settlements_high_mark, watermark
         FROM recon_partition_pairs",
    )
    .fetch_all(pool)
    .await?;
    for row in rows {
        let micros = |column: &str| -> Result<Option<i64>, sqlx::Error> {
            Ok(row
                .try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(column)?
                .map(|t| t.timestamp_micros()))
        };
        marks.insert(
            row.try_get("kafka_partition")?,
            (
                PerInput::new(
                    micros("payments_high_mark")?,
                    micros("settlements_high_mark")?,
                ),
                micros("watermark")?,
            ),
        );
    }
    Ok(Stored {
        events,
        discrepancies,
        rejected,
        marks,
    })
}

/// Leaves the scratch database's traces out of the timed insertion: vacuums it
/// (what autovacuum would do meanwhile) and flushes the WAL written so far.
async fn settle(scratch: &Store) -> anyhow::Result<()> {
    sqlx::query("VACUUM (ANALYZE)")
        .execute(scratch.pool())
        .await?;
    if let Err(error) = sqlx::query("CHECKPOINT").execute(scratch.pool()).await {
        eprintln!("(no CHECKPOINT before the timed insertion: {error})");
    }
    Ok(())
}

/// The stored rows as the pipeline's batches would write them: batch `i` holds the
/// rows of messages `i * batch_max_messages ..` of the stream, one checkpoint per pair
/// (in pair order, rows in delivery order), with the pair's next offsets after the
/// batch's messages and its final marks.
fn batches(
    config: &Config,
    positions: &[MessageAt],
    partitions: i32,
    stored: Stored,
) -> anyhow::Result<Vec<Vec<PairCheckpoint>>> {
    let size = config.batch_max_messages.max(1);
    let index: HashMap<(Topic, i32, i64), usize> = positions
        .iter()
        .enumerate()
        .map(|(i, at)| ((at.topic, at.partition, at.offset), i))
        .collect();
    let count = positions.len().div_ceil(size);
    let pairs = partitions.max(1) as usize;
    let mut batches: Vec<Vec<PairCheckpoint>> = (0..count)
        .map(|_| {
            (0..partitions)
                .map(|pair| {
                    let (high_marks, watermark) =
                        stored.marks.get(&pair).copied().unwrap_or_default();
                    let mut checkpoint = PairCheckpoint {
                        pair,
                        epoch: 0,
                        next_offsets: PerTopic::default(),
                        changes: Default::default(),
                        rejected: Vec::new(),
                        announcements: Vec::new(),
                        watermark,
                        redriven: Vec::new(),
                    };
                    checkpoint.changes.high_marks = high_marks;
                    checkpoint
                })
                .collect()
        })
        .collect();
    for (i, at) in positions.iter().enumerate() {
        let checkpoint = &mut batches[i / size][at.partition as usize];
        let next = match at.topic {
            Topic::Payments => &mut checkpoint.next_offsets.payments,
            Topic::Settlements => &mut checkpoint.next_offsets.settlements,
            Topic::Payouts => &mut checkpoint.next_offsets.payouts,
        };
        *next = Some(next.unwrap_or(0).max(at.offset + 1));
    }
    let position_of = |topic: Topic, partition: i32, offset: i64| {
        index
            .get(&(topic, partition, offset))
            .copied()
            .ok_or_else(|| anyhow!("no message at {topic:?}/{partition}:{offset}"))
    };
    // Events in delivery order, each into its message's batch and pair.
    let mut events = Vec::with_capacity(stored.events.len());
    let mut event_position: HashMap<(Input, String), usize> = HashMap::new();
    for (pair, row) in stored.events {
        let offset = row.new.as_ref().map_or(0, |new| new.kafka_offset);
        let at = position_of(row.kind.input().into(), pair, offset)?;
        event_position.insert((row.kind.input(), row.event_id.to_string()), at);
        events.push((at, pair, row));
    }
    events.sort_by_key(|(at, _, _)| *at);
    for (at, pair, row) in events {
        batches[at / size][pair as usize % pairs]
            .changes
            .rows
            .push(row);
    }
    for (pair, change) in stored.discrepancies {
        let DiscrepancyChange::Opened {
            payment_event_id,
            settlement_event_id,
            ..
        } = &change
        else {
            bail!("only opened discrepancies are read back");
        };
        let mut at = None;
        for (input, id) in [
            (Input::Payments, payment_event_id),
            (Input::Settlements, settlement_event_id),
        ] {
            if let Some(id) = id {
                let position = event_position
                    .get(&(input, id.to_string()))
                    .copied()
                    .ok_or_else(|| anyhow!("a discrepancy about an unstored event {id}"))?;
                at = at.max(Some(position));
            }
        }
        let at = at.ok_or_else(|| anyhow!("a discrepancy about no event"))?;
        batches[at / size][pair as usize % pairs]
            .changes
            .discrepancies
            .push(change);
    }
    for message in stored.rejected {
        let at = position_of(message.topic, message.partition, message.offset)?;
        batches[at / size][message.partition as usize % pairs]
            .rejected
            .push(message);
    }
    for batch in &mut batches {
        // A pair that read nothing in a batch has no checkpoint in it.
        batch.retain(|c| {
            c.next_offsets.payments.is_some()
                || c.next_offsets.settlements.is_some()
                || c.next_offsets.payouts.is_some()
        });
    }
    Ok(batches)
}

/// Fails unless the two databases hold the same rows (ids and times of writing
/// aside): the reference wrote what the pipeline did.
async fn compare(scratch: &Store, target: &Store) -> anyhow::Result<()> {
    const TABLES: [(&str, &str); 5] = [
        (
            "recon_events",
            "SELECT row(event_kind, event_id, payment_id, kafka_partition, kafka_offset, outcome,
                        counterpart_event_id, event_time, amount_minor, fee_minor, net_minor, currency,
                        merchant_id, settlement_id, line_type, refund_id, dispute_id, payout_id)::text
             FROM recon_events",
        ),
        (
            "recon_discrepancies",
            "SELECT row(kind, payment_id, kafka_partition, payment_event_id, settlement_event_id,
                        resolved_at IS NULL, resolution, payout_id)::text
             FROM recon_discrepancies",
        ),
        (
            "recon_discrepancy_actions",
            "SELECT row(d.kind, d.payment_event_id, d.settlement_event_id, a.action, a.actor, a.note)::text
             FROM recon_discrepancy_actions a JOIN recon_discrepancies d ON d.id = a.discrepancy_id",
        ),
        (
            "rejected_events",
            "SELECT row(topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size,
                        kafka_key, kafka_timestamp, redrive_requested_at, redriven_at, redrive_result)::text
             FROM rejected_events",
        ),
        (
            "recon_partition_pairs",
            "SELECT row(payments_topic, settlements_topic, kafka_partition, epoch, payments_next_offset,
                        settlements_next_offset, payments_high_mark, settlements_high_mark, watermark,
                        payouts_topic, payouts_next_offset, payout_seq)::text
             FROM recon_partition_pairs",
        ),
    ];
    for (table, rows) in TABLES {
        let sql =
            format!("SELECT count(*), md5(string_agg(r, ',' ORDER BY r)) FROM ({rows}) AS t(r)");
        let mut digests = Vec::new();
        for store in [scratch, target] {
            let digest: (i64, Option<String>) =
                sqlx::query_as(&sql).fetch_one(store.pool()).await?;
            digests.push(digest);
        }
        if digests[0] != digests[1] {
            bail!(
                "{table} differs: the pipeline stored {} rows (md5 {:?}), the reference {} (md5 {:?})",
                digests[0].0,
                digests[0].1,
                digests[1].0,
                digests[1].1
            );
        }
    }
    Ok(())
}
