//! The watermark and the deadlines it drives (contract §2). The consumer reports what
//! it reads of each input; at the end of a batch the watermark is recomputed, stored
//! pending items it made due are requested from storage ([`SweepRequest`]), and
//! deadlines fire over those and the keys the batch changed. One rule for both inputs:
//! a first event still pending with no counterpart past its input's timeout becomes
//! `missing_settlement` (a payment, after D) or `orphan_settlement` (a settlement
//! line, after O).

use hashbrown::HashSet;

use super::config::EngineConfig;
use super::rules::Outcome;
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

/// The event id of the key's first event of `input` if its deadline has passed at
/// `watermark`: still pending, no counterpart, older than its input's timeout.
fn overdue(state: &KeyState, input: Input, watermark: Micros, config: &EngineConfig) -> Option<Id> {
    let first = state.first_event(input)?;
    let deadline = first
        .event_time
        .saturating_add(config.unmatched_after(input));
    let due = first.outcome == Outcome::Pending
        && state.first_event(input.other()).is_none()
        && watermark > deadline;
    due.then(|| first.event_id.clone())
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

    /// Fires the deadline of the key's pending event, of either input, if it is due.
    fn fire_key(&mut self, key: &Id, watermark: Micros) {
        for input in Input::ALL {
            let Some(state) = self.keys.get_mut(key) else {
                return;
            };
            let Some(event_id) = overdue(state, input, watermark, &self.config) else {
                continue;
            };
            let unmatched = Outcome::unmatched(input);
            self.pins.touch(key, state);
            state.set_outcome(input, unmatched);
            self.record
                .write_row(input, key, &event_id, unmatched, None, None);
            self.record.open(unmatched, key, input, event_id, None);
        }
    }
}
