//! Applying one accepted event to its key (contract §2, rules 1–5 and duplicates).
//!
//! Written once for both inputs. A payment and a settlement line go through the same
//! steps — a redelivery changes nothing; a second event of an input is a duplicate;
//! the first one meets the key's first event of the other input, if any, and both take
//! the outcome of the rules; the counterpart's fired deadline is resolved and a
//! mismatch opens. They differ only in their terms, which side of the rules they are
//! on, and the names of their outcomes (`duplicate_payment`/`duplicate_settlement`,
//! `missing_settlement`/`orphan_settlement`), so an event is reduced to an [`Arrival`]
//! carrying its terms and the steps take its input as data.

use super::changes::NewEvent;
use super::config::EngineConfig;
use super::rules::{classify, Outcome, PaymentTerms, SettlementTerms, Terms};
use super::window::{Id, KeyState};
use super::PairEngine;
use crate::event::{Event, Input, Payment, Settlement};

/// Whether an event changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Accepted(Outcome),
    Redelivery,
}

/// An accepted event reduced to what applying it needs, whichever its input.
struct Arrival {
    key: Id,
    event_id: Id,
    /// Its input's terms; also says which input it is.
    terms: Terms,
    /// Its row's columns, written if it is recorded.
    new: NewEvent,
}

impl Arrival {
    fn new(event: Event, kafka_offset: i64) -> Self {
        match event {
            Event::Payment(p) => Self::payment(p, kafka_offset),
            Event::Settlement(s) => Self::settlement(s, kafka_offset),
        }
    }

    fn payment(p: Payment, kafka_offset: i64) -> Self {
        let amount = p.amount.get();
        Self {
            key: Id::from(p.payment_id),
            event_id: Id::from(p.event_id),
            terms: Terms::Payment(PaymentTerms {
                amount,
                currency: p.currency,
                occurred_at: p.occurred_at,
            }),
            new: NewEvent {
                kafka_offset,
                event_time: p.occurred_at,
                amount,
                fee: None,
                net: None,
                currency: p.currency,
                reference: p.merchant_id,
            },
        }
    }

    fn settlement(s: Settlement, kafka_offset: i64) -> Self {
        let (gross, fee) = (s.gross.get(), s.fee.get());
        Self {
            key: Id::from(s.payment_id),
            event_id: Id::from(s.event_id),
            terms: Terms::Settlement(SettlementTerms {
                gross,
                fee,
                net: s.net,
                currency: s.currency,
                settled_at: s.settled_at,
            }),
            new: NewEvent {
                kafka_offset,
                event_time: s.settled_at,
                amount: gross,
                fee: Some(fee),
                net: Some(s.net),
                currency: s.currency,
                reference: s.settlement_id,
            },
        }
    }
}

/// An arrival meeting the key's first event of the other input.
struct Meeting {
    counterpart_event_id: Id,
    /// The counterpart's outcome before the meeting: a fired deadline is resolved.
    previous: Outcome,
    /// What the rules say of the pair; both events take it.
    outcome: Outcome,
}

/// Rules 1–5 between an arrival's terms and the key's first event of the other input,
/// if it has one; the counterpart takes the outcome. The only step that must know which
/// input arrived: the rules take the payment first.
fn meet(state: &mut KeyState, terms: Terms, config: &EngineConfig) -> Option<Meeting> {
    let (deadline, tolerance) = (config.deadline, config.tolerance);
    let (counterpart_event_id, previous, outcome) = match terms {
        Terms::Payment(payment) => {
            let s = state.settlement()?;
            let outcome = classify(payment, s.terms, deadline, tolerance);
            (s.event_id.clone(), s.outcome, outcome)
        }
        Terms::Settlement(settlement) => {
            let p = state.payment()?;
            let outcome = classify(p.terms, settlement, deadline, tolerance);
            (p.event_id.clone(), p.outcome, outcome)
        }
    };
    state.set_outcome(terms.input().other(), outcome);
    Some(Meeting {
        counterpart_event_id,
        previous,
        outcome,
    })
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

    /// Applies an event that is not a redelivery: a duplicate of its input's first
    /// event, or that first event, meeting its counterpart if the key has one.
    fn apply_arrival(&mut self, arrival: Arrival) -> Outcome {
        let Arrival {
            key,
            event_id,
            terms,
            new,
        } = arrival;
        let input = terms.input();
        let state = self
            .keys
            .get_mut(&key)
            .expect("engine invariant: key resident (checked in apply)");
        self.pins.touch(&key, state);
        if let Some(first) = state.first_event_id(input).cloned() {
            // Not kept in the key's state: see the engine's module docs.
            let duplicate = Outcome::duplicate_of(input);
            self.record
                .write_row(input, &key, &event_id, duplicate, Some(first), Some(new));
            self.record.open(duplicate, &key, input, event_id, None);
            return duplicate;
        }
        let before = state.bytes(&key);
        let meeting = meet(state, terms, &self.config);
        let outcome = meeting.as_ref().map_or(Outcome::Pending, |m| m.outcome);
        state.set_first(event_id.clone(), terms, outcome);
        self.bytes = self.bytes + state.bytes(&key) - before;
        let counterpart = meeting.as_ref().map(|m| m.counterpart_event_id.clone());
        self.record
            .write_row(input, &key, &event_id, outcome, counterpart, Some(new));
        if let Some(meeting) = meeting {
            self.record_meeting(input, &key, event_id, meeting);
        }
        outcome
    }

    /// What a meeting changes besides the arrival's row: the counterpart's row, its
    /// fired deadline (if it had fired) resolved, and a mismatch opened.
    fn record_meeting(&mut self, input: Input, key: &Id, event_id: Id, meeting: Meeting) {
        let Meeting {
            counterpart_event_id,
            previous,
            outcome,
        } = meeting;
        let other = input.other();
        self.record.write_row(
            other,
            key,
            &counterpart_event_id,
            outcome,
            Some(event_id.clone()),
            None,
        );
        let unmatched = Outcome::unmatched(other);
        if previous == unmatched {
            self.record
                .resolve(unmatched, counterpart_event_id.clone(), outcome);
        }
        if outcome.is_discrepancy() {
            self.record
                .open(outcome, key, input, event_id, Some(counterpart_event_id));
        }
    }
}
