//! Applying one accepted event to its key (contract §2 and §6: rules 1–5, refunds,
//! chargebacks, duplicates).
//!
//! Written once for every kind of event. An event belongs to one side of one matching
//! unit of its key ([`Unit`], [`Side`]), and every event goes through the same steps —
//! a redelivery changes nothing; a later event of a side already taken is a duplicate;
//! the first one meets the first event of the unit's other side, if any, and both take
//! what the unit's rules say of them; the counterpart's fired deadline is resolved and
//! a discrepancy opens or resolves. The units differ only in those rules
//! ([`super::units`]). A settlement line also moves the payment's net position
//! ([`super::position`]).

use super::changes::NewEvent;
use super::rules::{DiscrepancyKind, Outcome, PaymentTerms, SettlementTerms};
use super::units::{Side, Terms, Unit};
use super::window::{Id, SideItem};
use super::PairEngine;
use crate::event::{Event, Input, Line};

/// Whether an event changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Accepted(Outcome),
    Redelivery,
}

/// An accepted event reduced to what applying it needs, whichever its kind.
struct Arrival {
    key: Id,
    event_id: Id,
    unit: Unit,
    side: Side,
    terms: Terms,
    /// Its row's columns, written if it is recorded.
    new: NewEvent,
}

impl Arrival {
    fn new(event: Event, kafka_offset: i64) -> Self {
        let (unit, side) = Unit::of_event(&event);
        let (key, event_id, terms, new) = match event {
            Event::Payment(p) => {
                let terms = PaymentTerms {
                    amount: p.amount.get(),
                    currency: p.currency,
                    occurred_at: p.occurred_at,
                };
                let new = NewEvent::request(kafka_offset, terms, Some(p.merchant_id));
                (p.payment_id, p.event_id, Terms::Request(terms), new)
            }
            Event::Refund(r) => {
                let terms = PaymentTerms {
                    amount: r.amount.get(),
                    currency: r.currency,
                    occurred_at: r.requested_at,
                };
                let mut new = NewEvent::request(kafka_offset, terms, None);
                new.line = Line::Refund {
                    refund_id: r.refund_id,
                };
                (r.payment_id, r.event_id, Terms::Request(terms), new)
            }
            Event::Settlement(s) => {
                let terms = SettlementTerms {
                    gross: s.gross.get(),
                    fee: s.fee.get(),
                    net: s.net,
                    currency: s.currency,
                    settled_at: s.settled_at,
                };
                let new = NewEvent {
                    kafka_offset,
                    event_time: s.settled_at,
                    amount: terms.gross,
                    fee: Some(terms.fee),
                    net: Some(terms.net),
                    currency: s.currency,
                    reference: Some(s.settlement_id),
                    line: s.line,
                    payout_id: s.payout_id,
                };
                (s.payment_id, s.event_id, Terms::Line(terms), new)
            }
        };
        Self {
            key: Id::from(key),
            event_id: Id::from(event_id),
            unit,
            side,
            terms,
            new,
        }
    }
}

/// An arrival meeting the first event of its unit's other side.
struct Meeting {
    counterpart_event_id: Id,
    /// The counterpart's outcome before the meeting: a fired deadline is resolved.
    previous: Outcome,
    /// What the unit's rules say of the two; both events take it.
    outcome: Outcome,
}

impl PairEngine {
    /// Applies one accepted event read at `kafka_offset`. Its key must be resident.
    pub fn apply(&mut self, event: Event, kafka_offset: i64) -> Applied {
        let input = event.input();
        let payment_id = event.payment_id();
        let Some(state) = self.keys.get(payment_id) else {
            panic!("engine invariant: key {payment_id:?} was not loaded before apply");
        };
        if state.knows(input, event.event_id()) || self.seen_elsewhere(input, event.event_id()) {
            self.watermark.observe_activity(input);
            return Applied::Redelivery;
        }
        self.watermark.observe_event(input, event.event_time());
        Applied::Accepted(self.apply_arrival(Arrival::new(event, kafka_offset)))
    }

    /// Whether an event id not in its key's state was inserted by this batch or the one
    /// still committing, or found in storage: the event is then a redelivery.
    fn seen_elsewhere(&self, input: Input, event_id: &str) -> bool {
        let event = (input, Id::from(event_id));
        self.record.inserted(&event) || self.stored_elsewhere.contains(&event)
    }

    /// Applies an event that is not a redelivery: a duplicate of its side's first
    /// event, or that first event, meeting its counterpart if the unit has one.
    fn apply_arrival(&mut self, arrival: Arrival) -> Outcome {
        let Arrival {
            key,
            event_id,
            unit,
            side,
            terms,
            new,
        } = arrival;
        let kind = unit.kind(side);
        let state = self
            .keys
            .get_mut(&key)
            .expect("engine invariant: key resident (checked in apply)");
        self.pins.touch(&key, state);
        if let Some(first) = state.side(&unit, side).map(|f| f.event_id.clone()) {
            // Not kept in the key's state: see the engine's module docs.
            let duplicate = unit.duplicate(side);
            self.record
                .write_row(kind, &key, &event_id, duplicate, Some(first), Some(new));
            self.record.open(
                DiscrepancyKind::Outcome(duplicate),
                &key,
                kind.input(),
                event_id,
                None,
            );
            return duplicate;
        }
        let before = state.bytes(&key);
        let meeting = state.side(&unit, side.other()).map(|counterpart| {
            let (opening, closing) = match side {
                Side::Opening => (terms, counterpart.terms),
                Side::Closing => (counterpart.terms, terms),
            };
            Meeting {
                counterpart_event_id: counterpart.event_id.clone(),
                previous: counterpart.outcome,
                outcome: unit.meet(opening, closing, &self.config),
            }
        });
        let outcome = meeting.as_ref().map_or(unit.alone(side), |m| m.outcome);
        if meeting.is_some() {
            state.set_side_outcome(&unit, side.other(), outcome);
        }
        let is_line = matches!(terms, Terms::Line(_));
        state.set_side(
            &unit,
            side,
            SideItem {
                event_id: event_id.clone(),
                terms,
                outcome,
            },
        );
        self.bytes = self.bytes + state.bytes(&key) - before;
        let counterpart = meeting.as_ref().map(|m| m.counterpart_event_id.clone());
        self.record
            .write_row(kind, &key, &event_id, outcome, counterpart, Some(new));
        match meeting {
            Some(meeting) => self.record_meeting(&unit, side, &key, event_id, meeting),
            None if outcome == Outcome::ChargebackOpen => {
                self.record.open(
                    DiscrepancyKind::Chargeback,
                    &key,
                    kind.input(),
                    event_id,
                    None,
                );
            }
            None => {}
        }
        if is_line {
            self.reassess_position(&key);
        }
        outcome
    }

    /// What a meeting changes besides the arrival's row: the counterpart's row, its
    /// fired deadline (if it had fired) resolved, and the unit's discrepancy opened or
    /// resolved.
    fn record_meeting(
        &mut self,
        unit: &Unit,
        side: Side,
        key: &Id,
        event_id: Id,
        meeting: Meeting,
    ) {
        let Meeting {
            counterpart_event_id,
            previous,
            outcome,
        } = meeting;
        let other = side.other();
        self.record.write_row(
            unit.kind(other),
            key,
            &counterpart_event_id,
            outcome,
            Some(event_id.clone()),
            None,
        );
        if let Some((_, unmatched)) = unit.deadline(other, &self.config) {
            if previous == unmatched {
                self.record.resolve(
                    DiscrepancyKind::Outcome(unmatched),
                    counterpart_event_id.clone(),
                    outcome.as_str(),
                );
            }
        }
        let input = unit.input(side);
        if let Unit::Dispute(_) = unit {
            // The chargeback's discrepancy exists whatever the arrival order: opened
            // here if the reversal came first, and resolved by the meeting.
            let chargeback = match side {
                Side::Opening => {
                    self.record.open(
                        DiscrepancyKind::Chargeback,
                        key,
                        input,
                        event_id.clone(),
                        None,
                    );
                    event_id
                }
                Side::Closing => counterpart_event_id,
            };
            self.record
                .resolve(DiscrepancyKind::Chargeback, chargeback, REVERSED);
        } else if let Some(kind) = DiscrepancyKind::of_outcome(outcome) {
            self.record
                .open(kind, key, input, event_id, Some(counterpart_event_id));
        }
    }
}

/// The resolution of a chargeback discrepancy closed by its reversal.
pub const REVERSED: &str = "reversed";
