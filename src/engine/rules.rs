//! Outcomes and matching rules 1–5 of contract §2: the vocabulary of results, and the
//! one function that decides what a payment and its settlement line are together.

use std::fmt;
use std::str::FromStr;

use crate::event::{Input, Micros};
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
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
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
    pub const DUPLICATES: [Outcome; 2] = [Outcome::DuplicatePayment, Outcome::DuplicateSettlement];

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

    /// Whether events of this input can have this outcome: a duplicate or deadline
    /// outcome names the side that carries it, the others apply to both.
    pub const fn is_carried_by(self, input: Input) -> bool {
        match self {
            Outcome::DuplicatePayment | Outcome::MissingSettlement => {
                matches!(input, Input::Payments)
            }
            Outcome::DuplicateSettlement | Outcome::OrphanSettlement => {
                matches!(input, Input::Settlements)
            }
            Outcome::Pending
            | Outcome::Matched
            | Outcome::MatchedLate
            | Outcome::CurrencyMismatch
            | Outcome::AmountMismatch
            | Outcome::FeeMismatch => true,
        }
    }

    /// What a later event of `input` is when its payment id already has a first one
    /// of that input under another event id.
    pub(super) fn duplicate_of(input: Input) -> Outcome {
        match input {
            Input::Payments => Outcome::DuplicatePayment,
            Input::Settlements => Outcome::DuplicateSettlement,
        }
    }

    /// What a pending event of `input` becomes when its deadline passes without a
    /// counterpart; a late counterpart resolves it.
    pub(super) fn unmatched(input: Input) -> Outcome {
        match input {
            Input::Payments => Outcome::MissingSettlement,
            Input::Settlements => Outcome::OrphanSettlement,
        }
    }

    /// Outcomes recorded in the discrepancy history.
    pub fn is_discrepancy(self) -> bool {
        !matches!(
            self,
            Outcome::Pending | Outcome::Matched | Outcome::MatchedLate
        )
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

/// The terms of an event of either input, for the steps that are the same for both.
#[derive(Debug, Clone, Copy)]
pub(super) enum Terms {
    Payment(PaymentTerms),
    Settlement(SettlementTerms),
}

impl Terms {
    pub(super) fn input(self) -> Input {
        match self {
            Terms::Payment(_) => Input::Payments,
            Terms::Settlement(_) => Input::Settlements,
        }
    }
}

/// Rules 1–5, first that applies wins. `deadline` is D, `tolerance` is T.
pub fn classify(
    payment: PaymentTerms,
    settlement: SettlementTerms,
    deadline: Micros,
    tolerance: i64,
) -> Outcome {
    if settlement.currency != payment.currency {
        Outcome::CurrencyMismatch
    } else if (settlement.gross - payment.amount).abs() > tolerance {
        // Both amounts are within 1..=2^53−1, so neither subtraction can overflow.
        Outcome::AmountMismatch
    } else if settlement.gross - settlement.fee != settlement.net {
        Outcome::FeeMismatch
    } else if settlement.settled_at > payment.occurred_at.saturating_add(deadline) {
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
