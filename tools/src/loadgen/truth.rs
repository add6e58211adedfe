//! The ground truth of a generated stream: what the worker must end up with, written
//! down by the generator from the scenarios it made (never by the engine).

use std::collections::BTreeMap;

use recon_worker::engine::{DiscrepancyKind, Outcome};
use recon_worker::event::{EventKind, Input};

/// Identifies a row of `recon_discrepancies` as its unique key does (migration 0006):
/// (kind, `payment_event_id`, `settlement_event_id`). A refund request's event id is
/// in the `payment_event_id` column (it comes from the payments topic).
pub type DiscrepancyKey = (DiscrepancyKind, Option<String>, Option<String>);

/// The final state every accepted event must reach, the discrepancies the worker must
/// have recorded, and the count of rejects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroundTruth {
    /// (event kind, event_id) → (payment_id, outcome, counterpart_event_id).
    pub outcomes: BTreeMap<(EventKind, String), (String, Outcome, Option<String>)>,
    /// Every discrepancy of the stream → (payment_id, resolution): `None` while it
    /// must be open, the resolution once it must be resolved. Deadline discrepancies
    /// that fire and are then resolved only because of the order events are read in
    /// (a counterpart read after the watermark passed the deadline) are history the
    /// contract allows and not listed here: a missing or orphan row resolved with the
    /// final outcome of its subject.
    pub discrepancies: BTreeMap<DiscrepancyKey, (String, Option<String>)>,
    /// (topic input, reason class) of every bad message, in production order.
    pub rejected: Vec<(Input, &'static str)>,
    /// How many payment ids each scenario (by its `--mix` name) was generated for.
    pub scenarios: BTreeMap<&'static str, usize>,
}

impl GroundTruth {
    pub fn outcome_counts(&self) -> BTreeMap<Outcome, usize> {
        let mut counts = BTreeMap::new();
        for (_, outcome, _) in self.outcomes.values() {
            *counts.entry(*outcome).or_default() += 1;
        }
        counts
    }

    /// Events of `kind` whose outcome must be `outcome`.
    pub fn count(&self, kind: EventKind, outcome: Outcome) -> usize {
        self.outcomes
            .iter()
            .filter(|((k, _), (_, o, _))| *k == kind && *o == outcome)
            .count()
    }

    /// Outcomes counted by (event kind, outcome).
    pub fn outcome_counts_by_kind(&self) -> BTreeMap<(EventKind, Outcome), usize> {
        let mut counts = BTreeMap::new();
        for ((kind, _), (_, outcome, _)) in &self.outcomes {
            *counts.entry((*kind, *outcome)).or_default() += 1;
        }
        counts
    }

    /// Discrepancies counted by (kind, open), with the resolution of resolved ones:
    /// (kind, resolution or `None` for open ones) → count.
    pub fn discrepancy_counts(&self) -> BTreeMap<(DiscrepancyKind, Option<String>), usize> {
        let mut counts = BTreeMap::new();
        for ((kind, _, _), (_, resolution)) in &self.discrepancies {
            *counts.entry((*kind, resolution.clone())).or_default() += 1;
        }
        counts
    }

    /// Takes in the truth of another stream produced alongside this one.
    pub fn extend(&mut self, other: GroundTruth) {
        self.outcomes.extend(other.outcomes);
        self.discrepancies.extend(other.discrepancies);
        self.rejected.extend(other.rejected);
        for (name, count) in other.scenarios {
            *self.scenarios.entry(name).or_default() += count;
        }
    }
}
