//! Reads of open items (events still waiting for a counterpart): the deadline sweep,
//! which finds stored pending items whose deadline the watermark passed, and the
//! counts behind the open-item gauges.
//!
//! What "open" means is defined once, in Rust: [`Outcome::OPEN`]. The statements here
//! filter on it with SQL text generated from that list ([`outcome_in`]), not with a
//! bound array: both read the partial index `recon_events_open_items` (migration
//! 0002), and PostgreSQL uses a partial index only when it can prove from the query
//! text that the query's condition implies the index predicate. A bound `= ANY($n)` is
//! a parameter in a generic plan, so the planner cannot prove it and leaves the index
//! out (checked with `plan_cache_mode = force_generic_plan`: a sequential scan). The index
//! predicate itself is fixed in a shipped migration; `tests/store.rs` checks it
//! against [`Outcome::is_open`] on the migrated database.

use std::sync::LazyLock;

use crate::engine::{Outcome, SweepRequest};
use crate::event::{Input, Micros};
use crate::pair::PerInput;

use super::rows::{to_time, DueKeyRow, OpenItemsRow};
use super::{Store, StoreError};

/// The payment ids a sweep found due.
#[derive(Debug, Clone)]
pub struct DueKeys {
    pub payment_ids: Vec<String>,
    /// Fewer than the limit came back: the sweep saw everything due.
    pub complete: bool,
}

/// `outcome IN ('a', 'b')`: a condition on `recon_events.outcome` as literal SQL, so
/// the planner can match it against partial index predicates. Outcome names are fixed
/// lower-case identifiers (a unit test checks), so quoting them needs no escaping.
pub(super) fn outcome_in(outcomes: &[Outcome]) -> String {
    format!("outcome IN ({})", quoted(outcomes))
}

/// `outcome NOT IN ('a', 'b')`, likewise.
pub(super) fn outcome_not_in(outcomes: &[Outcome]) -> String {
    format!("outcome NOT IN ({})", quoted(outcomes))
}

fn quoted(outcomes: &[Outcome]) -> String {
    let names: Vec<String> = outcomes.iter().map(|o| format!("'{o}'")).collect();
    names.join(", ")
}

/// Open items of a set of pairs by kind and outcome. Reads `recon_events_open_items`.
static OPEN_ITEMS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT CASE WHEN refund_id IS NULL THEN event_kind ELSE 'refund' END AS event_kind,
                outcome, count(*) AS items, min(event_time) AS oldest FROM recon_events
         WHERE kafka_partition = ANY($1) AND {}
         GROUP BY 1, outcome",
        outcome_in(&Outcome::OPEN)
    )
});

/// Pending items of one pair past each topic's bound, oldest first: payments and
/// refund requests (stored as the payments topic's kind) past D, lines past O. Reads
/// `recon_events_open_items` (partition, kind, outcome, event_time): pending is an
/// open outcome, so this condition implies the index predicate. The kinds are bound:
/// they are index columns, not part of the predicate, so a parameter serves.
static DUE_KEYS: LazyLock<String> = LazyLock::new(|| {
    let pending = format!("outcome = '{}'", Outcome::Pending);
    format!(
        "(SELECT event_kind, payment_id FROM recon_events
           WHERE kafka_partition = $1 AND event_kind = $5 AND {pending} AND event_time < $2
           ORDER BY event_time LIMIT $4)
         UNION ALL
         (SELECT event_kind, payment_id FROM recon_events
           WHERE kafka_partition = $1 AND event_kind = $6 AND {pending} AND event_time < $3
           ORDER BY event_time LIMIT $4)"
    )
});

impl Store {
    /// Open items of these pairs: (event_kind, outcome, count, oldest event time).
    pub async fn open_items(
        &self,
        pairs: &[i32],
    ) -> Result<Vec<(String, String, i64, Micros)>, StoreError> {
        let rows: Vec<OpenItemsRow> = sqlx::query_as(&OPEN_ITEMS)
            .bind(pairs)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.event_kind.as_str().to_owned(),
                    row.outcome.as_str().to_owned(),
                    row.items,
                    row.oldest.timestamp_micros(),
                )
            })
            .collect())
    }

    /// Payment ids of one pair with pending items whose deadline the watermark passed,
    /// oldest first, at most `limit` of each kind.
    pub async fn due_keys(
        &self,
        pair: i32,
        request: SweepRequest,
        limit: i64,
    ) -> Result<DueKeys, StoreError> {
        let rows: Vec<DueKeyRow> = sqlx::query_as(&DUE_KEYS)
            .bind(pair)
            .bind(to_time(request.payments_before))
            .bind(to_time(request.settlements_before))
            .bind(limit)
            .bind(Input::Payments)
            .bind(Input::Settlements)
            .fetch_all(&self.pool)
            .await?;
        let mut counts: PerInput<i64> = PerInput::default();
        let mut payment_ids = Vec::with_capacity(rows.len());
        for row in rows {
            counts[row.event_kind] += 1;
            payment_ids.push(row.payment_id);
        }
        payment_ids.sort_unstable();
        payment_ids.dedup();
        let complete = counts.iter().all(|(_, &count)| count < limit);
        Ok(DueKeys {
            payment_ids,
            complete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_items_filter_on_exactly_the_open_outcomes() {
        let open = Outcome::ALL.into_iter().filter(|o| o.is_open());
        let expected: Vec<String> = open.map(|o| format!("'{o}'")).collect();
        let condition = format!("outcome IN ({})", expected.join(", "));
        assert!(OPEN_ITEMS.contains(&condition), "{}", *OPEN_ITEMS);
    }

    #[test]
    fn the_sweep_reads_a_subset_of_the_open_outcomes() {
        // Its condition implies the predicate of the open-items index it reads.
        assert!(Outcome::Pending.is_open());
        assert!(DUE_KEYS.contains("outcome = 'pending'"), "{}", *DUE_KEYS);
    }

    #[test]
    fn outcome_names_need_no_quoting() {
        for outcome in Outcome::ALL {
            let name = outcome.as_str();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
    }
}
