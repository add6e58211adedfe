//! A payment's net position and its `over_refunded` discrepancy (contract §6).
//!
//! Once a payment has its capture line, its position is the capture's gross plus the
//! gross of every refund, chargeback and reversal line the key holds (duplicates take
//! no part, as in matching), taken in order of `settled_at`, then `event_id`. If the
//! running position is ever below zero the payment has one `over_refunded`
//! discrepancy, about the first line that took it below zero, open while the final
//! position is below zero.
//!
//! The discrepancy is a function of the lines, not of their arrival: a line settled
//! earlier than those already read can move the first line below zero, or lift every
//! later prefix back above it (then the discrepancy must not exist at all). So the
//! engine does not remember what it wrote: after a line arrives it hands the
//! checkpoint the state the payment's discrepancy must have ([`OverRefund`], or none),
//! and the store makes the one row per payment say so.

use super::window::{Id, KeyState};
use super::PairEngine;

/// The state a payment's `over_refunded` discrepancy must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverRefund {
    /// The first line, in settlement order, after which the position was below zero.
    pub first_below: Id,
    /// The position after the last line is below zero.
    pub open: bool,
}

/// The resolution of an `over_refunded` discrepancy whose position is back at zero or
/// above.
pub const RECOVERED: &str = "recovered";

/// What the key's lines say of its `over_refunded` discrepancy: `None` without a
/// capture line or other lines (nothing to say), `Some(None)` when the position never
/// went below zero.
fn assess(state: &KeyState) -> Option<Option<OverRefund>> {
    let capture = state.capture_gross()?;
    let mut lines: Vec<_> = state.non_capture_lines().collect();
    if lines.is_empty() {
        return None;
    }
    lines.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    // Every gross is within ±(2^53 − 1); a sum of many of them is not within i64.
    let mut position = i128::from(capture);
    let mut first_below = None;
    for (_, event_id, gross) in lines {
        position += i128::from(gross);
        if position < 0 && first_below.is_none() {
            first_below = Some(event_id.clone());
        }
    }
    Some(first_below.map(|first_below| OverRefund {
        first_below,
        open: position < 0,
    }))
}

impl PairEngine {
    /// A line of `key` arrived: records the state its `over_refunded` discrepancy must
    /// have, when its lines say anything of it.
    pub(super) fn reassess_position(&mut self, key: &Id) {
        let Some(state) = self.keys.get(key) else {
            return;
        };
        if let Some(over_refund) = assess(state) {
            self.record.over_refund(key, over_refund);
        }
    }
}
