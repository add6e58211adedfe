//! The watermark and the deadlines it drives (contract §2). The consumer reports what
//! it reads of each input; at the end of a batch the watermark is recomputed, stored
//! pending items it made due are requested from storage ([`SweepRequest`]), and
//! deadlines fire over those and the keys the batch changed. One rule for every unit
//! and side: a first event still pending with no counterpart past its side's timeout
//! becomes `missing_settlement` (a payment or refund request, after D) or
//! `orphan_settlement` (a line, after O); see [`super::units::Unit::deadline`].

use hashbrown::HashSet;

use super::config::EngineConfig;
use super::rules::{DiscrepancyKind, Outcome};
use super::units::{Side, Unit};
use super::window::{Id, KeyState};
use super::{PairEngine, StoredEvent};
use crate::event::{Input, Micros};

/// A request to find stored pending items whose deadline the watermark has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepRequest {
    /// Payments with `occurred_at` strictly before this are due.
    pub payments_before: Micros,
    /// Settlements with `settled_at` strictly before this are due.
    pub settlements_before: Micros,
}

/// The first events of the key whose deadline has passed at `watermark`: still
/// pending, no counterpart, older than their side's timeout; with what they become.
fn overdue(
    state: &KeyState,
    watermark: Micros,
    config: &EngineConfig,
) -> Vec<(Unit, Side, Id, Outcome)> {
    let mut due = Vec::new();
    for (unit, side, item) in state.sides() {
        if item.outcome != Outcome::Pending || state.side(unit, side.other()).is_some() {
            continue;
        }
        let Some((timeout, unmatched)) = unit.deadline(side, config) else {
            continue;
        };
        if watermark > item.terms.event_time().saturating_add(timeout) {
            due.push((unit.clone(), side, item.event_id.clone(), unmatched));
        }
    }
    due
}

impl PairEngine {
    /// A message was read from `input` (even one that was rejected).
    pub fn observe_activity(&mut self, input: Input) {
        self.watermark.observe_activity(input);
    }

    pub fn observe_caught_up(&mut self, input: Input, caught_up: bool, now: Micros) {
        self.watermark.observe_caught_up(input, caught_up, now);
    }

    /// Recomputes the watermark at `now` and says whether stored pending items must be
    /// swept (the watermark moved past the last sweep, or the last sweep was cut short).
    pub fn advance(&mut self, now: Micros) -> Option<SweepRequest> {
        let current = self.watermark.advance(now, self.config.idle_timeout)?;
        if self.swept_through.is_some_and(|s| s >= current) {
            return None;
        }
        let due_before = |input| current.saturating_sub(self.config.unmatched_after(input));
        Some(SweepRequest {
            payments_before: due_before(Input::Payments),
            settlements_before: due_before(Input::Settlements),
        })
    }

    /// Fires deadlines at the current watermark over the keys touched in this batch
    /// and the keys in `swept` (stored pending items found due, loaded if not resident).
    /// `sweep_complete` says the sweep returned every due item, not a bounded page.
    pub fn fire_deadlines(
        &mut self,
        swept_keys: Vec<String>,
        swept_rows: Vec<StoredEvent>,
        sweep_complete: bool,
    ) {
        let Some(watermark) = self.watermark.current() else {
            return;
        };
        let swept: Vec<Id> = swept_keys.iter().map(|k| Id::from(k.as_str())).collect();
        self.load(swept_keys, swept_rows);
        if sweep_complete {
            self.swept_through = Some(watermark);
        }
        // Keys of a batch still being committed are candidates too: the sweep reads
        // PostgreSQL, which does not show their pending items yet.
        let candidates: Vec<Id> = self.pins.changed_keys().cloned().chain(swept).collect();
        let mut seen = HashSet::with_capacity(candidates.len());
        for key in candidates {
            if seen.insert(key.clone()) {
                self.fire_key(&key, watermark);
            }
        }
    }

    /// Fires the deadlines of the key's pending events, of every unit, that are due.
    fn fire_key(&mut self, key: &Id, watermark: Micros) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let due = overdue(state, watermark, &self.config);
        if due.is_empty() {
            return;
        }
        self.pins.touch(key, state);
        for (unit, side, event_id, unmatched) in due {
            state.set_side_outcome(&unit, side, unmatched);
            let kind = unit.kind(side);
            self.record
                .write_row(kind, key, &event_id, unmatched, None, None);
            self.record.open(
                DiscrepancyKind::Outcome(unmatched),
                key,
                kind.input(),
                event_id,
                None,
            );
        }
    }
}
