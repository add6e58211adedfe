//! The payout rows a checkpoint writes (contract §7), in the transaction of the lines
//! and announcements they come from, with the offsets.
//!
//! - Partial sums: each pair adds its new lines to one `recon_payout_parts` row per
//!   (payout, pair, currency). Only the pair's fenced owner writes rows of that pair,
//!   so no two workers ever contend for a row, however hot the payout. A line counts
//!   in the transaction that inserts its `recon_events` row, which has no `ON
//!   CONFLICT`: a redelivered line inserts no row and adds nothing, and a checkpoint
//!   retried after a COMMIT that did succeed clashes on the event's key and rolls
//!   back, sums included. So `+=` counts every line exactly once.
//! - Announcements: inserted in partition order; a redelivery (the same `event_id`)
//!   inserts nothing.
//!
//! Both carry the pair's payout sequence, which `advance_pairs` bumped in this
//! transaction: the evaluator reads what is new since its cursor by it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::engine::RowWrite;
use crate::event::EventKind;

use super::checkpoint::{AnnouncementAt, PairCheckpoint};
use super::rows::to_time;
use super::StoreError;

/// One pair's new lines of one payout in one currency.
struct Part {
    lines: i64,
    /// Wider than any stored amount: a sum of `i64`s.
    net: i128,
    first: i64,
    last: i64,
}

/// The new settlement lines of `rows` that name a payout.
pub(super) fn payout_lines(rows: &[RowWrite]) -> impl Iterator<Item = &RowWrite> {
    rows.iter().filter(|row| {
        row.kind == EventKind::Settlement
            && row.new.as_ref().is_some_and(|new| new.payout_id.is_some())
    })
}

/// Adds each pair's new lines to their payouts' partial sums.
pub(super) async fn write_payout_parts(
    tx: &mut sqlx::PgConnection,
    batch: &[PairCheckpoint],
    seqs: &HashMap<i32, i64>,
) -> Result<(), StoreError> {
    let mut parts: HashMap<(&str, i32, &'static str), Part> = HashMap::new();
    for pair in batch {
        for row in payout_lines(&pair.changes.rows) {
            let Some(new) = &row.new else { continue };
            let Some(payout_id) = new.payout_id.as_deref() else {
                continue;
            };
            let net = i128::from(new.net.unwrap_or_default());
            let part = parts
                .entry((payout_id, pair.pair, new.currency.code()))
                .or_insert(Part {
                    lines: 0,
                    net: 0,
                    first: new.event_time,
                    last: new.event_time,
                });
            part.lines += 1;
            part.net += net;
            part.first = part.first.min(new.event_time);
            part.last = part.last.max(new.event_time);
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    let mut columns = PartColumns::default();
    for ((payout_id, pair, currency), part) in parts {
        columns.payout_ids.push(payout_id);
        columns.pairs.push(pair);
        columns.currencies.push(currency);
        columns.lines.push(part.lines);
        columns.nets.push(part.net.to_string());
        columns.firsts.push(to_time(part.first));
        columns.lasts.push(to_time(part.last));
        columns
            .seqs
            .push(seqs.get(&pair).copied().unwrap_or_default());
    }
    sqlx::query(
        "INSERT INTO recon_payout_parts AS t
             (payout_id, kafka_partition, currency, line_count, net_minor, first_settled_at,
              last_settled_at, seq)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::text[], $4::bigint[], $5::text[]::numeric[],
                              $6::timestamptz[], $7::timestamptz[], $8::bigint[])
         ON CONFLICT (payout_id, kafka_partition, currency) DO UPDATE
         SET line_count = t.line_count + EXCLUDED.line_count,
             net_minor = t.net_minor + EXCLUDED.net_minor,
             first_settled_at = LEAST(t.first_settled_at, EXCLUDED.first_settled_at),
             last_settled_at = GREATEST(t.last_settled_at, EXCLUDED.last_settled_at),
             seq = EXCLUDED.seq",
    )
    .bind(&columns.payout_ids)
    .bind(&columns.pairs)
    .bind(&columns.currencies)
    .bind(&columns.lines)
    .bind(&columns.nets)
    .bind(&columns.firsts)
    .bind(&columns.lasts)
    .bind(&columns.seqs)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[derive(Default)]
struct PartColumns<'a> {
    payout_ids: Vec<&'a str>,
    pairs: Vec<i32>,
    currencies: Vec<&'static str>,
    lines: Vec<i64>,
    nets: Vec<String>,
    firsts: Vec<DateTime<Utc>>,
    lasts: Vec<DateTime<Utc>>,
    seqs: Vec<i64>,
}

/// Inserts announcements into `table` (`recon_payout_announcements`, or its probe
/// copy), in the order given: the first of a payout keeps the lowest id.
pub(super) async fn insert_announcements(
    tx: &mut sqlx::PgConnection,
    table: &str,
    announcements: &[(i32, &AnnouncementAt)],
    seqs: &HashMap<i32, i64>,
) -> Result<(), StoreError> {
    if announcements.is_empty() {
        return Ok(());
    }
    let mut columns = AnnouncementColumns::default();
    for &(pair, at) in announcements {
        let a = &at.announcement;
        columns.event_ids.push(&a.event_id);
        columns.payout_ids.push(&a.payout_id);
        columns.currencies.push(a.currency.code());
        columns.nets.push(a.net);
        columns.line_counts.push(a.line_count);
        columns.paid_at.push(to_time(a.paid_at));
        columns.pairs.push(pair);
        columns.offsets.push(at.offset);
        columns
            .seqs
            .push(seqs.get(&pair).copied().unwrap_or_default());
    }
    // The probe copy has no key to conflict on; `DO NOTHING` without a target means
    // the same for the real table, whose other key is its id.
    let sql = format!(
        "INSERT INTO {table} (event_id, payout_id, currency, net_minor, line_count, paid_at,
                              kafka_partition, kafka_offset, seq)
         SELECT event_id, payout_id, currency, net_minor, line_count, paid_at, kafka_partition,
                kafka_offset, seq
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                     $6::timestamptz[], $7::int[], $8::bigint[], $9::bigint[])
              WITH ORDINALITY AS u(event_id, payout_id, currency, net_minor, line_count, paid_at,
                                   kafka_partition, kafka_offset, seq, position)
         ORDER BY position
         ON CONFLICT DO NOTHING"
    );
    sqlx::query(&sql)
        .bind(&columns.event_ids)
        .bind(&columns.payout_ids)
        .bind(&columns.currencies)
        .bind(&columns.nets)
        .bind(&columns.line_counts)
        .bind(&columns.paid_at)
        .bind(&columns.pairs)
        .bind(&columns.offsets)
        .bind(&columns.seqs)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[derive(Default)]
struct AnnouncementColumns<'a> {
    event_ids: Vec<&'a str>,
    payout_ids: Vec<&'a str>,
    currencies: Vec<&'static str>,
    nets: Vec<i64>,
    line_counts: Vec<Option<i64>>,
    paid_at: Vec<DateTime<Utc>>,
    pairs: Vec<i32>,
    offsets: Vec<i64>,
    seqs: Vec<i64>,
}
