//! The matching units of a payment id (contract §6) and the rules that differ between
//! them, as data: everything else in the engine is written once for all of them.
//!
//! A payment id holds one **capture** unit (the payment and its first capture line,
//! contract §2), one **refund** unit per `refund_id` (the refund request and its first
//! refund line) and one **dispute** unit per `dispute_id` (the chargeback line and its
//! first reversal). Each unit has two sides: the event that opens the matter (payment,
//! refund request, chargeback) and the one that closes it (capture line, refund line,
//! reversal). A unit matches 1:1 — the first event of each side — and every later event
//! of a side already taken is a duplicate. The units differ only in what the meeting
//! of the two sides yields, what a side alone is, the duplicate's name and which side
//! has a deadline; those are the functions here.

use super::config::EngineConfig;
use super::rules::{classify, classify_refund, Outcome, PaymentTerms, SettlementTerms};
use super::window::Id;
use crate::event::{Event, EventKind, Input, Line, Micros};

/// Which unit of its payment id an event belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Unit {
    Capture,
    Refund(Id),
    Dispute(Id),
}

/// Which side of its unit an event is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The payment, the refund request, the chargeback line.
    Opening,
    /// The capture line, the refund line, the reversal line.
    Closing,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Opening, Side::Closing];

    pub fn other(self) -> Side {
        match self {
            Side::Opening => Side::Closing,
            Side::Closing => Side::Opening,
        }
    }
}

/// What the rules need of one event of a unit: a payment's or refund request's terms
/// (the refund's `requested_at` as `occurred_at`), or a settlement line's.
#[derive(Debug, Clone, Copy)]
pub enum Terms {
    Request(PaymentTerms),
    Line(SettlementTerms),
}

impl Terms {
    /// `occurred_at`, `requested_at` or `settled_at`.
    pub fn event_time(self) -> Micros {
        match self {
            Terms::Request(terms) => terms.occurred_at,
            Terms::Line(terms) => terms.settled_at,
        }
    }
}

impl Unit {
    /// The unit and side an event of `kind` with this `line` (a settlement line's type
    /// and id; a refund request's refund id as `Line::Refund`) belongs to.
    pub fn place(kind: EventKind, line: &Line) -> (Unit, Side) {
        match (kind, line) {
            (EventKind::Payment, _) => (Unit::Capture, Side::Opening),
            (EventKind::Refund, Line::Refund { refund_id }) => {
                (Unit::Refund(Id::from(refund_id.as_str())), Side::Opening)
            }
            // A refund request always carries its refund id; this arm is unreachable
            // from decoded or stored events, and a request without one is its own unit.
            (EventKind::Refund, _) => (Unit::Refund(Id::default()), Side::Opening),
            (EventKind::Settlement, Line::Capture) => (Unit::Capture, Side::Closing),
            (EventKind::Settlement, Line::Refund { refund_id }) => {
                (Unit::Refund(Id::from(refund_id.as_str())), Side::Closing)
            }
            (EventKind::Settlement, Line::Chargeback { dispute_id }) => {
                (Unit::Dispute(Id::from(dispute_id.as_str())), Side::Opening)
            }
            (EventKind::Settlement, Line::ChargebackReversal { dispute_id }) => {
                (Unit::Dispute(Id::from(dispute_id.as_str())), Side::Closing)
            }
        }
    }

    /// The unit and side of a decoded event.
    pub fn of_event(event: &Event) -> (Unit, Side) {
        match event {
            Event::Payment(_) => Unit::place(EventKind::Payment, &Line::Capture),
            Event::Refund(r) => (Unit::Refund(Id::from(r.refund_id.as_str())), Side::Opening),
            Event::Settlement(s) => Unit::place(EventKind::Settlement, &s.line),
        }
    }

    /// The kind of the events on `side` of this unit.
    pub fn kind(&self, side: Side) -> EventKind {
        match (self, side) {
            (Unit::Capture, Side::Opening) => EventKind::Payment,
            (Unit::Refund(_), Side::Opening) => EventKind::Refund,
            _ => EventKind::Settlement,
        }
    }

    pub fn input(&self, side: Side) -> Input {
        self.kind(side).input()
    }

    /// What both sides are once they meet. Captures follow rules 1–5 of §2; refunds
    /// too, the request in the payment's role and the line's gross negated (a refund
    /// line is money leaving the merchant); a dispute is reversed.
    pub fn meet(&self, opening: Terms, closing: Terms, config: &EngineConfig) -> Outcome {
        let (deadline, tolerance) = (config.deadline, config.tolerance);
        match (self, opening, closing) {
            (Unit::Dispute(_), _, _) => Outcome::ChargebackReversed,
            (Unit::Capture, Terms::Request(payment), Terms::Line(line)) => {
                classify(payment, line, deadline, tolerance)
            }
            (Unit::Refund(_), Terms::Request(request), Terms::Line(line)) => {
                classify_refund(request, line, deadline, tolerance)
            }
            // Sides with the other shape of terms do not occur (see `place`).
            _ => {
                debug_assert!(false, "a unit's sides have a request's and a line's terms");
                Outcome::Pending
            }
        }
    }

    /// What the first event of `side` is while the other side has none.
    pub fn alone(&self, side: Side) -> Outcome {
        match (self, side) {
            (Unit::Dispute(_), Side::Opening) => Outcome::ChargebackOpen,
            _ => Outcome::Pending,
        }
    }

    /// What a later event of a side already taken is.
    pub fn duplicate(&self, side: Side) -> Outcome {
        match (self, side) {
            (Unit::Capture, Side::Opening) => Outcome::DuplicatePayment,
            (Unit::Refund(_), Side::Opening) => Outcome::DuplicateRefund,
            _ => Outcome::DuplicateSettlement,
        }
    }

    /// When the first event of `side`, still alone, becomes `missing_settlement` (a
    /// payment or refund request, after D) or `orphan_settlement` (a line, after O),
    /// and what it becomes. A chargeback waits for its reversal for ever.
    pub fn deadline(&self, side: Side, config: &EngineConfig) -> Option<(Micros, Outcome)> {
        match (self, side) {
            (Unit::Dispute(_), Side::Opening) => None,
            (_, Side::Opening) => Some((config.deadline, Outcome::MissingSettlement)),
            (_, Side::Closing) => Some((config.orphan_timeout, Outcome::OrphanSettlement)),
        }
    }
}
