//! Outcomes and matching rules 1–5 of contract §2: the vocabulary of results, and the
//! one function that decides what a payment and its settlement line are together.

use std::fmt;
use std::str::FromStr;

use crate::event::{EventKind, Micros};
use crate::money::Currency;

/// Every outcome an accepted event can have, as stored in `recon_outcomes.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Pending,
    Matched,
    MatchedLate,
    CurrencyMismatch,
    AmountMismatch,
    FeeMismatch,
    DuplicatePayment,
    DuplicateSettlement,
    MissingSettlement,
    OrphanSettlement,
    /// A second `refund_requested` for a (`payment_id`, `refund_id`) (contract §6).
    DuplicateRefund,
    /// A chargeback line with no reversal of its dispute (yet).
    ChargebackOpen,
    /// A chargeback line and its reversal, both.
    ChargebackReversed,
}

impl Outcome {
    pub const ALL: [Outcome; 13] = [
        Outcome::Pending,
        Outcome::Matched,
        Outcome::MatchedLate,
        Outcome::CurrencyMismatch,
        Outcome::AmountMismatch,
        Outcome::FeeMismatch,
        Outcome::DuplicatePayment,
        Outcome::DuplicateSettlement,
        Outcome::MissingSettlement,
        Outcome::OrphanSettlement,
        Outcome::DuplicateRefund,
        Outcome::ChargebackOpen,
        Outcome::ChargebackReversed,
    ];

    /// The open outcomes: still waiting for a counterpart, `pending` or a deadline
    /// discrepancy that a late counterpart can resolve. The one definition: the
    /// window's eviction order, the store's open-item queries (SQL generated from this
    /// list) and the open-item gauges all derive from it, and a test checks the
    /// predicate of the open-items index (migration 0002) against it.
    pub const OPEN: [Outcome; 3] = [
        Outcome::Pending,
        Outcome::MissingSettlement,
        Outcome::OrphanSettlement,
    ];

    /// The duplicate outcomes: never changed, and no part of matching, so not window
    /// state. The one definition: the engine skips them when loading a key, the
    /// store's window lookup excludes them (SQL generated from this list) and a test
    /// checks the predicate of the index it reads (migration 0007) against it.
    pub const DUPLICATES: [Outcome; 3] = [
        Outcome::DuplicatePayment,
        Outcome::DuplicateSettlement,
        Outcome::DuplicateRefund,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Matched => "matched",
            Outcome::MatchedLate => "matched_late",
            Outcome::CurrencyMismatch => "currency_mismatch",
            Outcome::AmountMismatch => "amount_mismatch",
            Outcome::FeeMismatch => "fee_mismatch",
            Outcome::DuplicatePayment => "duplicate_payment",
            Outcome::DuplicateSettlement => "duplicate_settlement",
            Outcome::MissingSettlement => "missing_settlement",
            Outcome::OrphanSettlement => "orphan_settlement",
            Outcome::DuplicateRefund => "duplicate_refund",
            Outcome::ChargebackOpen => "chargeback_open",
            Outcome::ChargebackReversed => "chargeback_reversed",
        }
    }

    /// Still waiting for a counterpart: one of [`Outcome::OPEN`].
    pub fn is_open(self) -> bool {
        Outcome::OPEN.contains(&self)
    }

    /// One of [`Outcome::DUPLICATES`].
    pub fn is_duplicate(self) -> bool {
        Outcome::DUPLICATES.contains(&self)
    }

    /// Whether events of this kind can have this outcome: a duplicate or deadline
    /// outcome names the side that carries it, a chargeback outcome belongs to lines,
    /// the others apply to every kind.
    pub const fn is_carried_by(self, kind: EventKind) -> bool {
        match self {
            Outcome::DuplicatePayment => matches!(kind, EventKind::Payment),
            Outcome::DuplicateRefund => matches!(kind, EventKind::Refund),
            Outcome::MissingSettlement => !matches!(kind, EventKind::Settlement),
            Outcome::DuplicateSettlement
            | Outcome::OrphanSettlement
            | Outcome::ChargebackOpen
            | Outcome::ChargebackReversed => matches!(kind, EventKind::Settlement),
            Outcome::Pending
            | Outcome::Matched
            | Outcome::MatchedLate
            | Outcome::CurrencyMismatch
            | Outcome::AmountMismatch
            | Outcome::FeeMismatch => true,
        }
    }

    /// Outcomes that open a discrepancy of their own name. A chargeback opens one of
    /// kind `chargeback` instead ([`DiscrepancyKind::Chargeback`]).
    pub fn is_discrepancy(self) -> bool {
        DiscrepancyKind::of_outcome(self).is_some()
    }
}

/// `recon_discrepancies.kind`: the outcomes that are discrepancies, the two kinds of
/// contract §6 that are about a payment's money rather than one event's outcome, and
/// the two kinds of contract §7 that are about a payout.
///
/// The first ones belong to a partition pair (they carry its `kafka_partition` and a
/// `payment_id`) and only the engine produces them: [`DiscrepancyKind::of_pairs`]. The
/// payout kinds ([`DiscrepancyKind::PAYOUT`]) carry a `payout_id` instead, belong to no
/// pair, and only the payout evaluator (`store::payouts`) opens and resolves them; the
/// engine never produces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiscrepancyKind {
    Outcome(Outcome),
    /// A chargeback line: open until its dispute's reversal (resolution `reversed`).
    Chargeback,
    /// The payment's net position went below zero (resolution `recovered`).
    OverRefunded,
    /// An announced payout past its deadline whose lines do not add up to it (status
    /// `total_mismatch` or `currency_mismatch`): open until they do (resolution
    /// `balanced`).
    PayoutMismatch,
    /// Lines of a payout never announced, past their deadline: open until the
    /// announcement is read (resolution `announced`).
    UnannouncedPayout,
}

impl DiscrepancyKind {
    /// The discrepancy an outcome opens, if it is one.
    pub fn of_outcome(outcome: Outcome) -> Option<DiscrepancyKind> {
        match outcome {
            Outcome::Pending
            | Outcome::Matched
            | Outcome::MatchedLate
            | Outcome::ChargebackOpen
            | Outcome::ChargebackReversed => None,
            other => Some(DiscrepancyKind::Outcome(other)),
        }
    }

    /// The kinds about a payout (contract §7), opened by the payout evaluator only.
    pub const PAYOUT: [DiscrepancyKind; 2] = [
        DiscrepancyKind::PayoutMismatch,
        DiscrepancyKind::UnannouncedPayout,
    ];

    /// Every kind: what `recon_discrepancies.kind` may hold.
    pub fn all() -> impl Iterator<Item = DiscrepancyKind> {
        DiscrepancyKind::of_pairs().chain(DiscrepancyKind::PAYOUT)
    }

    /// The kinds a partition pair's checkpoint writes (the engine's): those the
    /// per-pair gauge `recon_open_discrepancies` reports. Payout kinds have no pair and
    /// their own gauge.
    pub fn of_pairs() -> impl Iterator<Item = DiscrepancyKind> {
        Outcome::ALL
            .into_iter()
            .filter_map(DiscrepancyKind::of_outcome)
            .chain([DiscrepancyKind::Chargeback, DiscrepancyKind::OverRefunded])
    }

    /// A payout's kind rather than a pair's.
    pub const fn is_payout(self) -> bool {
        matches!(
            self,
            DiscrepancyKind::PayoutMismatch | DiscrepancyKind::UnannouncedPayout
        )
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            DiscrepancyKind::Outcome(outcome) => outcome.as_str(),
            DiscrepancyKind::Chargeback => "chargeback",
            DiscrepancyKind::OverRefunded => "over_refunded",
            DiscrepancyKind::PayoutMismatch => "payout_mismatch",
            DiscrepancyKind::UnannouncedPayout => "unannounced_payout",
        }
    }
}

/// A payout's status in `recon_payouts` (contract §7), decided by the payout evaluator
/// (`store::payouts`) from the payout's first announcement, its lines and the global
/// watermark; never by the engine. Here beside the other output vocabulary so the
/// metrics (`recon_payouts{status}`) and the store share one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayoutStatus {
    /// Announced, and its lines add up to it: all in its currency, summing to its
    /// `net_minor`, as many as its `line_count` when given.
    Balanced,
    /// Announced, not balanced, its deadline (`paid_at` + grace) not passed yet.
    Pending,
    /// Past its deadline, its lines (all in its currency) not adding up.
    TotalMismatch,
    /// Past its deadline, with lines in another currency than its own.
    CurrencyMismatch,
    /// Lines carry its id but it was not announced (yet).
    Unannounced,
}

impl PayoutStatus {
    pub const ALL: [PayoutStatus; 5] = [
        PayoutStatus::Balanced,
        PayoutStatus::Pending,
        PayoutStatus::TotalMismatch,
        PayoutStatus::CurrencyMismatch,
        PayoutStatus::Unannounced,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            PayoutStatus::Balanced => "balanced",
            PayoutStatus::Pending => "pending",
            PayoutStatus::TotalMismatch => "total_mismatch",
            PayoutStatus::CurrencyMismatch => "currency_mismatch",
            PayoutStatus::Unannounced => "unannounced",
        }
    }
}

impl fmt::Display for PayoutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for DiscrepancyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown outcome {0:?}")]
pub struct UnknownOutcome(pub String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOutcome(s.to_owned()))
    }
}

/// What the rules need of a payment.
#[derive(Debug, Clone, Copy)]
pub struct PaymentTerms {
    pub amount: i64,
    pub currency: Currency,
    pub occurred_at: Micros,
}

/// What the rules need of a settlement line.
#[derive(Debug, Clone, Copy)]
pub struct SettlementTerms {
    pub gross: i64,
    pub fee: i64,
    pub net: i64,
    pub currency: Currency,
    pub settled_at: Micros,
}

/// Rules 1–5, first that applies wins. `deadline` is D, `tolerance` is T.
pub fn classify(
    payment: PaymentTerms,
    settlement: SettlementTerms,
    deadline: Micros,
    tolerance: i64,
) -> Outcome {
    decide(Rules {
        currency_differs: settlement.currency != payment.currency,
        // Both amounts are within 1..=2^53−1, so the subtraction cannot overflow.
        amount_difference: settlement.gross - payment.amount,
        fee_balances: settlement_balances(settlement),
        late: settlement.settled_at > payment.occurred_at.saturating_add(deadline),
        tolerance,
    })
}

/// Rules 1–5 for a refund request and its refund line (contract §6): the request in
/// the payment's role, the amount compared with the line's gross negated (a refund
/// line is money leaving the merchant), the fee rule on the line as reported, the
/// deadline counted from `requested_at` (the request's `occurred_at` here).
pub fn classify_refund(
    request: PaymentTerms,
    line: SettlementTerms,
    deadline: Micros,
    tolerance: i64,
) -> Outcome {
    decide(Rules {
        currency_differs: line.currency != request.currency,
        // −gross and the amount are both within 1..=2^53−1.
        amount_difference: line.gross.saturating_neg() - request.amount,
        fee_balances: settlement_balances(line),
        late: line.settled_at > request.occurred_at.saturating_add(deadline),
        tolerance,
    })
}

/// Rule 3: gross − fee = net. Gross and fee are within ±(2^53−1), so the subtraction
/// cannot overflow.
fn settlement_balances(line: SettlementTerms) -> bool {
    line.gross - line.fee == line.net
}

/// What rules 1–5 look at, whichever pair of events they are about.
struct Rules {
    currency_differs: bool,
    amount_difference: i64,
    fee_balances: bool,
    late: bool,
    tolerance: i64,
}

fn decide(rules: Rules) -> Outcome {
    if rules.currency_differs {
        Outcome::CurrencyMismatch
    } else if rules.amount_difference.abs() > rules.tolerance {
        Outcome::AmountMismatch
    } else if !rules.fee_balances {
        Outcome::FeeMismatch
    } else if rules.late {
        Outcome::MatchedLate
    } else {
        Outcome::Matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Micros = 3_600_000_000;

    fn eur() -> Currency {
        Currency::from_code("EUR").expect("EUR")
    }

    fn payment(amount: i64) -> PaymentTerms {
        PaymentTerms {
            amount,
            currency: eur(),
            occurred_at: 0,
        }
    }

    fn settlement(gross: i64, fee: i64, net: i64, settled_at: Micros) -> SettlementTerms {
        SettlementTerms {
            gross,
            fee,
            net,
            currency: eur(),
            settled_at,
        }
    }

    #[test]
    fn rule_1_currency_mismatch_wins_over_everything() {
        let mut s = settlement(1, 5, 0, 100 * HOUR);
        s.currency = Currency::from_code("USD").expect("USD");
        assert_eq!(
            classify(payment(1000), s, 72 * HOUR, 0),
            Outcome::CurrencyMismatch
        );
    }

    #[test]
    fn rule_2_amount_mismatch_honours_tolerance() {
        let s = settlement(1005, 5, 1000, HOUR);
        assert_eq!(
            classify(payment(1000), s, 72 * HOUR, 0),
            Outcome::AmountMismatch
        );
        assert_eq!(
            classify(payment(1000), s, 72 * HOUR, 4),
            Outcome::AmountMismatch
        );
        assert_eq!(classify(payment(1000), s, 72 * HOUR, 5), Outcome::Matched);
        let under = settlement(995, 5, 990, HOUR);
        assert_eq!(
            classify(payment(1000), under, 72 * HOUR, 5),
            Outcome::Matched
        );
        assert_eq!(
            classify(payment(1000), under, 72 * HOUR, 4),
            Outcome::AmountMismatch
        );
    }

    #[test]
    fn rule_3_fee_mismatch_when_net_is_not_gross_minus_fee() {
        let s = settlement(1000, 30, 971, HOUR);
        assert_eq!(
            classify(payment(1000), s, 72 * HOUR, 0),
            Outcome::FeeMismatch
        );
    }

    #[test]
    fn rule_4_matched_late_strictly_after_deadline() {
        let on_time = settlement(1000, 30, 970, 72 * HOUR);
        assert_eq!(
            classify(payment(1000), on_time, 72 * HOUR, 0),
            Outcome::Matched
        );
        let late = settlement(1000, 30, 970, 72 * HOUR + 1);
        assert_eq!(
            classify(payment(1000), late, 72 * HOUR, 0),
            Outcome::MatchedLate
        );
    }

    #[test]
    fn outcome_names_round_trip() {
        for outcome in Outcome::ALL {
            assert_eq!(outcome.as_str().parse::<Outcome>().expect("known"), outcome);
        }
    }
}
