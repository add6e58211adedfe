//! Gauges of what the pipeline holds: window size, watermarks, consumer lag against
//! the offsets stored in PostgreSQL, and the open items and unresolved discrepancies
//! of the pairs it owns.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::pairs::Pairs;
use super::Pipeline;
use crate::clock::now_micros;
use crate::engine::DiscrepancyKind;
use crate::event::Topic;
use crate::store::Store;
use crate::telemetry::metrics as m;

/// How often the open-item and open-discrepancy gauges are refreshed from PostgreSQL.
const OPEN_ITEMS_EVERY: Duration = Duration::from_secs(15);

impl Pipeline {
    pub(super) fn publish_gauges(&self) {
        let (items, bytes) = self
            .pairs
            .iter()
            .fold((0, 0), |(items, bytes), (_, owned)| {
                (
                    items + owned.engine.window_items(),
                    bytes + owned.engine.window_bytes(),
                )
            });
        metrics::gauge!(m::WINDOW_ITEMS).set(items as f64);
        metrics::gauge!(m::WINDOW_BYTES).set(bytes as f64);
        for (pair, owned) in self.pairs.iter() {
            if let Some(watermark) = owned.engine.watermark() {
                metrics::gauge!(m::WATERMARK, "partition" => pair.to_string())
                    .set(watermark as f64 / 1e6);
            }
            // The payouts partition too, once the poll thread has reported it (a
            // worker without payouts never does: no series for it).
            for topic in Topic::ALL {
                let high = owned.high_watermarks[topic];
                if high < 0 {
                    continue;
                }
                let stored = owned.committed[topic].unwrap_or(0);
                metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.label(), "partition" => pair.to_string())
                    .set((high - stored).max(0) as f64);
            }
        }
    }
}

/// The open-item gauges' refresh: open items and the age of the oldest, per kind, and
/// unresolved discrepancies per kind, of the pairs this worker owns. A monitoring read:
/// a failure is logged and retried next time, never fatal. It runs beside the loop: the
/// count grows with the open items in PostgreSQL (35-60 ms with a few hundred thousand
/// rows here), and inline it stalled every message arriving meanwhile. At most one runs
/// at a time. A worker that owns no pair reports zeros without asking (what it reported
/// for pairs it no longer owns is now their new owner's to report).
pub(super) struct OpenItemsGauges {
    due: Instant,
    refresh: Option<tokio::task::JoinHandle<()>>,
    /// The gauges say zero because no pair is owned.
    zeroed: bool,
}

impl Default for OpenItemsGauges {
    fn default() -> Self {
        Self {
            due: Instant::now(),
            refresh: None,
            zeroed: false,
        }
    }
}

impl OpenItemsGauges {
    pub fn refresh(&mut self, store: &Store, pairs: &Pairs) {
        let running = self
            .refresh
            .as_ref()
            .is_some_and(|task| !task.is_finished());
        if pairs.is_empty() {
            // Once, after any refresh still running has published.
            if !self.zeroed && !running {
                publish_open_items(&[]);
                publish_open_discrepancies(&[]);
                self.zeroed = true;
            }
            return;
        }
        self.zeroed = false;
        if Instant::now() < self.due || running {
            return;
        }
        self.due = Instant::now() + OPEN_ITEMS_EVERY;
        let pairs = pairs.numbers();
        let store = store.clone();
        let task = async move {
            match store.open_items(&pairs).await {
                Ok(rows) => publish_open_items(&rows),
                Err(error) => tracing::warn!(%error, "could not read open items for the gauges"),
            }
            match store.open_discrepancies(&pairs).await {
                Ok(rows) => publish_open_discrepancies(&rows),
                Err(error) => {
                    tracing::warn!(%error, "could not read open discrepancies for the gauges")
                }
            }
        };
        self.refresh = Some(tokio::spawn(task.in_current_span()));
    }
}

/// Sets the open-item gauges from (event_kind, outcome, count, oldest event time) rows.
fn publish_open_items(rows: &[(String, String, i64, i64)]) {
    let now = now_micros();
    for (event_kind, outcome) in m::OPEN_KINDS {
        let found = rows
            .iter()
            .find(|(k, o, _, _)| k == event_kind && o == outcome);
        let (count, age) = found.map_or((0.0, 0.0), |(_, _, count, oldest)| {
            (*count as f64, (now - oldest).max(0) as f64 / 1e6)
        });
        metrics::gauge!(m::OPEN_ITEMS, "event_kind" => event_kind, "outcome" => outcome).set(count);
        metrics::gauge!(m::OLDEST_OPEN_ITEM_AGE, "event_kind" => event_kind, "outcome" => outcome)
            .set(age);
    }
}

/// Sets the open-discrepancy gauges from (kind, count) rows: every kind of a pair, 0
/// when absent (payout kinds belong to no pair: the payout evaluator reports them).
fn publish_open_discrepancies(rows: &[(String, i64)]) {
    for kind in DiscrepancyKind::of_pairs() {
        let count = rows
            .iter()
            .find(|(k, _)| k == kind.as_str())
            .map_or(0, |(_, count)| *count);
        metrics::gauge!(m::OPEN_DISCREPANCIES, "kind" => kind.as_str()).set(count as f64);
    }
}
