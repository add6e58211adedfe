//! The refund and chargeback scenarios (contract §6), and the net position that
//! decides an `over_refunded` discrepancy.

use rand::rngs::StdRng;
use rand::Rng;

use recon_worker::engine::{DiscrepancyKind, Outcome, RECOVERED};
use recon_worker::event::{EventKind, Line, Micros};

use super::mix::Scenario;
use super::scenarios::{Amounts, Writer, CHARGEBACK_FEE};
use super::{Plan, HOUR, MINUTE};

/// The line (in `(settled_at, event_id)` order) after which a payment's net position
/// first went below zero, and whether it is still below zero after the last line
/// (contract §6, the semantics v2-spec settles): the position starts at the capture
/// line's gross and adds the gross of every non-duplicate refund, chargeback and
/// reversal line.
pub(super) fn over_refund(
    capture_gross: i64,
    lines: &[(Micros, &str, i64)],
) -> Option<(String, bool)> {
    let mut lines = lines.to_vec();
    lines.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut position = i128::from(capture_gross);
    let mut first_below = None;
    for (_, event_id, gross) in lines {
        position += i128::from(gross);
        if position < 0 && first_below.is_none() {
            first_below = Some(event_id.to_owned());
        }
    }
    first_below.map(|line| (line, position < 0))
}

/// The refund and chargeback scenarios (contract §6).
#[allow(clippy::too_many_arguments)]
pub(super) fn version_2(
    plan: &Plan,
    rng: &mut StdRng,
    i: usize,
    scenario: Scenario,
    w: &mut Writer<'_>,
    now: Micros,
    stale: Micros,
    other_currency: &str,
) {
    let (currency, amount, occurred) = (w.currency, w.amount, w.occurred);
    // Contract §6: refunds by this id, disputes by this one.
    let refund_id = format!("{}refund-{i:08}", plan.id_prefix);
    let dispute_id = format!("{}dispute-{i:08}", plan.id_prefix);
    // A refund is requested after its capture, never after `now`: its late line then
    // comes no later than a late capture line does (see `Scenario::Pending`).
    let requested = (occurred + rng.random_range(MINUTE..30 * MINUTE)).min(now);
    let refund_on_time =
        |rng: &mut StdRng| requested + rng.random_range(MINUTE..plan.deadline.max(2 * MINUTE));
    // Disputes come within D/2 of the capture, reversals within D/4 of them: every
    // line of a scenario is dated before `now` + D.
    let half = (plan.deadline / 2).max(2 * MINUTE);
    let quarter = (plan.deadline / 4).max(2 * MINUTE);
    // A refund line's fee: the PSP gives back its share of the fee (negative).
    let fee_back = |r: i64| -(r / 100);
    let chargeback = Line::Chargeback {
        dispute_id: dispute_id.clone(),
    };
    let reversal = Line::ChargebackReversal {
        dispute_id: dispute_id.clone(),
    };
    match scenario {
        Scenario::RefundMatched
        | Scenario::RefundLate
        | Scenario::RefundCurrencyMismatch
        | Scenario::RefundAmountMismatch
        | Scenario::RefundFeeMismatch => {
            // A partial refund: the position stays at or above zero.
            let refunded = rng.random_range(1..=amount / 2);
            let mut settled = refund_on_time(rng);
            let mut line = Amounts::of(-refunded, fee_back(refunded));
            let mut line_currency = currency;
            let outcome = match scenario {
                Scenario::RefundLate => {
                    settled = requested + plan.deadline + HOUR;
                    Outcome::MatchedLate
                }
                Scenario::RefundCurrencyMismatch => {
                    line_currency = other_currency;
                    Outcome::CurrencyMismatch
                }
                Scenario::RefundAmountMismatch => {
                    let gross = -(refunded + 1 + refunded / 10);
                    line = Amounts::of(gross, fee_back(refunded));
                    Outcome::AmountMismatch
                }
                Scenario::RefundFeeMismatch => {
                    line.net -= 1;
                    Outcome::FeeMismatch
                }
                _ => Outcome::Matched,
            };
            w.capture(rng);
            w.refund_pair(
                outcome,
                &refund_id,
                requested,
                refunded,
                settled,
                line,
                line_currency,
            );
        }
        Scenario::RefundMissing => {
            // A refund of a payment captured long before this stream: no capture.
            let r = w.ids.event("r");
            w.refund(&r, &refund_id, stale, amount / 2);
            w.expect(EventKind::Refund, &r, Outcome::MissingSettlement, None);
            w.opened(Outcome::MissingSettlement, Some(&r), None);
        }
        Scenario::RefundOrphan => {
            let l = w.ids.event("l");
            let line = Line::Refund {
                refund_id: refund_id.clone(),
            };
            let refunded = amount / 2;
            w.line(
                &l,
                &line,
                stale,
                Amounts::of(-refunded, fee_back(refunded)),
                currency,
            );
            w.expect(EventKind::Settlement, &l, Outcome::OrphanSettlement, None);
            w.opened(Outcome::OrphanSettlement, None, Some(&l));
        }
        Scenario::DuplicateRefund => {
            let refunded = rng.random_range(1..=amount / 2);
            let settled = refund_on_time(rng);
            let line = Amounts::of(-refunded, fee_back(refunded));
            w.capture(rng);
            let (r, _) = w.refund_pair(
                Outcome::Matched,
                &refund_id,
                requested,
                refunded,
                settled,
                line,
                currency,
            );
            // Sent again with a fresh event id: a second request of the same refund.
            let dup = w.ids.event("r2");
            w.refund(&dup, &refund_id, requested + MINUTE, refunded);
            w.expect(EventKind::Refund, &dup, Outcome::DuplicateRefund, Some(&r));
            w.opened(Outcome::DuplicateRefund, Some(&dup), None);
        }
        Scenario::DuplicateRefundLine => {
            // Three quarters refunded: were the duplicate line counted, the position
            // would go below zero (duplicates take no part in it).
            let refunded = amount * 3 / 4;
            let settled = refund_on_time(rng);
            let line = Amounts::of(-refunded, fee_back(refunded));
            w.capture(rng);
            let (_, l) = w.refund_pair(
                Outcome::Matched,
                &refund_id,
                requested,
                refunded,
                settled,
                line,
                currency,
            );
            let dup = w.ids.event("l2");
            let refund_line = Line::Refund {
                refund_id: refund_id.clone(),
            };
            w.line(&dup, &refund_line, settled + MINUTE, line, currency);
            w.expect(
                EventKind::Settlement,
                &dup,
                Outcome::DuplicateSettlement,
                Some(&l),
            );
            w.opened(Outcome::DuplicateSettlement, None, Some(&dup));
        }
        Scenario::ChargebackOpen => {
            // The whole amount taken back: the position is zero, not below.
            w.capture(rng);
            let cb = w.ids.event("cb");
            let at = occurred + rng.random_range(MINUTE..half);
            w.line(
                &cb,
                &chargeback,
                at,
                Amounts::of(-amount, CHARGEBACK_FEE),
                currency,
            );
            w.expect(EventKind::Settlement, &cb, Outcome::ChargebackOpen, None);
            w.discrepancy(DiscrepancyKind::Chargeback, None, Some(&cb), None);
        }
        Scenario::ChargebackReversed => {
            w.capture(rng);
            let (cb, cr) = (w.ids.event("cb"), w.ids.event("cr"));
            let at = occurred + rng.random_range(MINUTE..half);
            let reversed_at = at + rng.random_range(MINUTE..quarter);
            w.line(
                &cb,
                &chargeback,
                at,
                Amounts::of(-amount, CHARGEBACK_FEE),
                currency,
            );
            w.reversal(&cb, &cr, &reversal, reversed_at, amount, currency);
        }
        Scenario::OrphanReversal => {
            // A reversal of a dispute this stream never saw open: no capture either.
            let cr = w.ids.event("cr");
            w.line(
                &cr,
                &reversal,
                stale,
                Amounts::of(amount, -CHARGEBACK_FEE),
                currency,
            );
            w.expect(EventKind::Settlement, &cr, Outcome::OrphanSettlement, None);
            w.opened(Outcome::OrphanSettlement, None, Some(&cr));
        }
        Scenario::OverRefunded | Scenario::OverRefundedRecovered => {
            // Refunded (half or more) and charged back in full: paid back twice.
            let refunded = rng.random_range(amount / 2..=amount);
            let settled = requested + rng.random_range(MINUTE..quarter);
            let line = Amounts::of(-refunded, fee_back(refunded));
            w.capture(rng);
            let (_, l) = w.refund_pair(
                Outcome::Matched,
                &refund_id,
                requested,
                refunded,
                settled,
                line,
                currency,
            );
            let cb = w.ids.event("cb");
            let at = occurred + rng.random_range(MINUTE..half);
            w.line(
                &cb,
                &chargeback,
                at,
                Amounts::of(-amount, CHARGEBACK_FEE),
                currency,
            );
            let mut lines = vec![(settled, l.as_str(), -refunded), (at, cb.as_str(), -amount)];
            let cr = w.ids.event("cr");
            if scenario == Scenario::OverRefundedRecovered {
                // The dispute won after both: the position is back at amount − refunded.
                let reversed_at = settled.max(at) + rng.random_range(MINUTE..quarter);
                w.reversal(&cb, &cr, &reversal, reversed_at, amount, currency);
                lines.push((reversed_at, cr.as_str(), amount));
            } else {
                w.expect(EventKind::Settlement, &cb, Outcome::ChargebackOpen, None);
                w.discrepancy(DiscrepancyKind::Chargeback, None, Some(&cb), None);
            }
            if let Some((first_below, open)) = over_refund(amount, &lines) {
                let resolution = (!open).then_some(RECOVERED);
                w.discrepancy(
                    DiscrepancyKind::OverRefunded,
                    None,
                    Some(&first_below),
                    resolution,
                );
            }
        }
        _ => {}
    }
}
