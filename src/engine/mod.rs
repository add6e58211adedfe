//! The matching engine: pure, synchronous, deterministic. No IO and no clock — event
//! times, the wall-clock `now` and everything loaded from storage come in as data. It
//! depends on the event, money and pair vocabularies and on its own [`config`], nothing
//! else, so the pipeline, the store, the benchmarks and the oracle test all drive it the
//! same way without a broker or a database.
//!
//! One [`PairEngine`] per partition pair holds the in-memory window: a map from
//! `payment_id` to what matching needs of that id: the first event of each side of
//! each of its matching units ([`units`]: the payment and its capture line, each
//! refund request and its refund line, each chargeback and its reversal). **A key present in memory is complete**: the caller must
//! [`PairEngine::load`] every key an event needs that is not resident — one batched
//! lookup per batch — so memory is a cache over PostgreSQL and results do not depend
//! on the window size.
//!
//! Duplicates are not state. A `duplicate_payment` or `duplicate_settlement` never
//! changes outcome and takes no part in matching, so neither the window nor the
//! lookups hold them: a key's size does not grow with the number of duplicates sent
//! for it (issue 19: a producer minting a fresh event id per resend of one payment).
//! What they were kept for, telling a redelivered duplicate (same event id again) from
//! a new one, is asked of storage: an event that would be a duplicate of a resident
//! key ([`PairEngine::needs_event_id_check`]) has its event id checked against the
//! stored ones before it is applied ([`PairEngine::load_stored_event_ids`]).
//!
//! Deadlines are checked at the end of each batch ([`PairEngine::fire_deadlines`])
//! over the items touched in the batch plus the stored pending items the caller swept
//! from PostgreSQL as due, so hot and cold items follow one code path.
//!
//! Every change is recorded as a [`PairChanges`] for the checkpoint; items changed
//! since the last checkpoint are never evicted.
//!
//! One file per concern, each adding its part of [`PairEngine`]'s methods:
//! - this file: the engine's state, which part of it each owner holds, and its gauges;
//! - `load`: installing what storage holds (keys, and which event ids it has);
//! - `apply`: applying an accepted event, written once for every unit and side;
//! - `position`: a payment's net position and its `over_refunded` discrepancy;
//! - `deadlines`: the watermark's inputs, sweep requests and firing deadlines;
//! - `changes`: recording a batch's changes and handing them to the checkpoint;
//! - `residency`: which keys must stay in memory (pins) and eviction to the bounds;
//! - `tests`: unit tests of the engine through its public methods;
//! - [`rules`], [`units`], [`window`], [`watermark`], [`config`]: the matching rules,
//!   the matching units, the keys' storage, the watermark and the engine's parameters.

mod apply;
mod changes;
pub mod config;
mod deadlines;
mod load;
mod position;
mod residency;
pub mod rules;
pub mod units;
pub mod watermark;
pub mod window;

#[cfg(test)]
mod tests;

// hashbrown's default hasher (foldhash, randomly seeded): SipHash was 6% of the
// worker's CPU in a profile of a backlog drain.
use hashbrown::HashSet;

use crate::event::{Input, Micros};
use crate::pair::PerInput;
use changes::BatchRecord;
use residency::Pins;
use watermark::Watermark;
use window::Window;

pub use apply::{Applied, REVERSED};
pub use changes::{DiscrepancyChange, NewEvent, PairChanges, RowWrite};
pub use config::{EngineConfig, MatchConfig, WindowConfig};
pub use deadlines::SweepRequest;
pub use load::StoredEvent;
pub use position::{OverRefund, RECOVERED};
pub use rules::{DiscrepancyKind, Outcome, PayoutStatus};
pub use window::Id;

/// The window and watermark of one partition pair.
#[derive(Debug)]
pub struct PairEngine {
    config: EngineConfig,
    keys: Window,
    /// What the resident keys occupy ([`window::KeyState::bytes`] summed), held
    /// against the window's byte bound.
    bytes: usize,
    watermark: Watermark,
    /// Watermark up to which stored pending items have been swept.
    swept_through: Option<Micros>,
    /// What this batch changed, for the checkpoint.
    record: BatchRecord,
    /// Keys whose changes are not durable yet: eviction keeps them.
    pins: Pins,
    /// Event ids of this batch found in storage: redeliveries, under another payment id
    /// (a replay after a clash) or as a stored duplicate of their own.
    stored_elsewhere: HashSet<(Input, Id)>,
}

impl PairEngine {
    pub fn new(config: EngineConfig, high_marks: PerInput<Option<Micros>>) -> Self {
        Self {
            config,
            keys: Window::default(),
            bytes: 0,
            watermark: Watermark::with_high_marks(high_marks),
            swept_through: None,
            record: BatchRecord::default(),
            pins: Pins::default(),
            stored_elsewhere: HashSet::new(),
        }
    }

    /// This pair's share of the worker's window bound (the worker splits its bound
    /// among the pairs it owns). Takes effect at the next checkpoint.
    pub fn set_window(&mut self, window: WindowConfig) {
        self.config.window = window;
    }

    pub fn window_items(&self) -> usize {
        self.keys.len()
    }

    pub fn window_bytes(&self) -> usize {
        self.bytes
    }

    pub fn watermark(&self) -> Option<Micros> {
        self.watermark.current()
    }

    pub fn high_marks(&self) -> PerInput<Option<Micros>> {
        self.watermark.high_marks()
    }

    pub fn is_resident(&self, payment_id: &str) -> bool {
        self.keys.contains_key(payment_id)
    }
}
