//! The ground truth of a generated stream: what the worker must end up with, written
//! down by the generator from the scenarios it made (never by the engine).

use std::collections::BTreeMap;

use recon_worker::engine::{DiscrepancyKind, Outcome};
use recon_worker::event::{EventKind, Input, Micros};

/// Identifies a row of `recon_discrepancies` as its unique key does (migration 0006):
/// (kind, `payment_event_id`, `settlement_event_id`). A refund request's event id is
/// in the `payment_event_id` column (it comes from the payments topic).
pub type DiscrepancyKey = (DiscrepancyKind, Option<String>, Option<String>);

/// The final state every accepted event must reach, the discrepancies the worker must
/// have recorded, the count of rejects, and each payout's final state.
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
    /// How many times each scenario (by its `--mix` name) was drawn: one payment id
    /// each, except a payout scenario's 3 to 50.
    pub scenarios: BTreeMap<&'static str, usize>,
    /// Every payout of the stream (contract §7), announced or not, by `payout_id`: its
    /// state once the global watermark has passed every deadline (`recon_payouts`).
    /// Payout discrepancies are here, not in `discrepancies` (they have a payout and
    /// no payment events).
    pub payouts: BTreeMap<String, PayoutTruth>,
}

/// A payout's `status` in `recon_payouts` once its deadline has passed (contract §7):
/// `pending` is never final, so it is not one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PayoutStatus {
    Balanced,
    TotalMismatch,
    CurrencyMismatch,
    Unannounced,
}

impl PayoutStatus {
    pub const ALL: [PayoutStatus; 4] = [
        PayoutStatus::Balanced,
        PayoutStatus::TotalMismatch,
        PayoutStatus::CurrencyMismatch,
        PayoutStatus::Unannounced,
    ];

    /// As `recon_payouts.status` spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            PayoutStatus::Balanced => "balanced",
            PayoutStatus::TotalMismatch => "total_mismatch",
            PayoutStatus::CurrencyMismatch => "currency_mismatch",
            PayoutStatus::Unannounced => "unannounced",
        }
    }

    /// The payout discrepancy open while a payout is in this status past its
    /// deadline: `payout_mismatch` for either mismatch, `unannounced_payout` for an
    /// unannounced payout, none for a balanced one.
    pub const fn discrepancy(self) -> Option<PayoutDiscrepancy> {
        match self {
            PayoutStatus::Balanced => None,
            PayoutStatus::TotalMismatch | PayoutStatus::CurrencyMismatch => {
                Some(PayoutDiscrepancy::PayoutMismatch)
            }
            PayoutStatus::Unannounced => Some(PayoutDiscrepancy::UnannouncedPayout),
        }
    }
}

/// The two payout discrepancy kinds of contract §7 (`recon_discrepancies.kind` of a
/// row with a `payout_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PayoutDiscrepancy {
    PayoutMismatch,
    UnannouncedPayout,
}

impl PayoutDiscrepancy {
    /// As `recon_discrepancies.kind` spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            PayoutDiscrepancy::PayoutMismatch => "payout_mismatch",
            PayoutDiscrepancy::UnannouncedPayout => "unannounced_payout",
        }
    }
}

/// One payout's final row of `recon_payouts`, and its open discrepancy. Lines count
/// as design section 9 reads contract §7: every accepted settlement line with the
/// `payout_id` (a `duplicate_settlement` line too, a redelivery never), summed by its
/// reported `net_minor`; only lines in the announced currency make `lines_net_minor`;
/// the first announcement in partition order is the one that counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutTruth {
    pub status: PayoutStatus,
    /// Open at the end: `status.discrepancy()`.
    pub discrepancy: Option<PayoutDiscrepancy>,
    /// The announced currency; for an unannounced payout, its lines' currency when
    /// they have only one.
    pub currency: Option<String>,
    /// The announcement's `net_minor` (none: unannounced).
    pub expected_net_minor: Option<i64>,
    /// Σ `net_minor` of the lines in `currency` (none: unannounced with lines in
    /// several currencies). Generated amounts keep it far inside i64.
    pub lines_net_minor: Option<i64>,
    /// The announcement's `line_count`, when it gives one.
    pub expected_line_count: Option<i64>,
    /// Lines in any currency.
    pub line_count: i64,
    /// Lines in another currency than the announced one.
    pub other_currency_lines: i64,
    /// The counting announcement's `paid_at` and event id, and how many
    /// announcements (distinct event ids) the payout had.
    pub paid_at: Option<Micros>,
    pub announcement_event_id: Option<String>,
    pub announcements: usize,
    /// The latest `settled_at` of its lines (an unannounced payout's deadline is this
    /// plus O).
    pub last_settled_at: Option<Micros>,
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

    /// Payouts counted by final status, every status present (0 when none).
    pub fn payout_counts(&self) -> BTreeMap<PayoutStatus, usize> {
        let mut counts: BTreeMap<PayoutStatus, usize> =
            PayoutStatus::ALL.into_iter().map(|s| (s, 0)).collect();
        for payout in self.payouts.values() {
            *counts.entry(payout.status).or_default() += 1;
        }
        counts
    }

    /// Payout discrepancies that must be open at the end, counted by kind.
    pub fn payout_discrepancy_counts(&self) -> BTreeMap<PayoutDiscrepancy, usize> {
        let mut counts = BTreeMap::new();
        for kind in self.payouts.values().filter_map(|p| p.discrepancy) {
            *counts.entry(kind).or_default() += 1;
        }
        counts
    }

    /// Takes in the truth of another stream produced alongside this one.
    pub fn extend(&mut self, other: GroundTruth) {
        self.outcomes.extend(other.outcomes);
        self.discrepancies.extend(other.discrepancies);
        self.rejected.extend(other.rejected);
        self.payouts.extend(other.payouts);
        for (name, count) in other.scenarios {
            *self.scenarios.entry(name).or_default() += count;
        }
    }
}
