//! Loading from storage: what the engine is told of PostgreSQL before a batch is
//! applied. Memory is a cache, so every key a batch needs is loaded whole before its
//! events are applied, and event ids that only storage can still recognise (duplicates
//! are not held in memory: see the engine's module docs) are checked against it.

use hashbrown::HashMap;

use super::rules::{Outcome, PaymentTerms, SettlementTerms};
use super::units::{Terms, Unit};
use super::window::{Id, KeyState, SideItem};
use super::PairEngine;
use crate::event::{Event, EventKind, Input, Line, Micros};
use crate::money::Currency;

/// One event as stored in PostgreSQL, to load into the window.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub kind: EventKind,
    pub event_id: String,
    pub payment_id: String,
    pub outcome: Outcome,
    pub event_time: Micros,
    /// `amount_minor` of a payment or refund request, the signed `gross_minor` of a
    /// settlement line.
    pub amount: i64,
    pub fee: i64,
    pub net: i64,
    pub currency: Currency,
    /// A settlement line's type and id; `Line::Refund` with its refund id for a
    /// refund request; `Line::Capture` for a payment.
    pub line: Line,
}

impl StoredEvent {
    /// What the rules need of the stored event, read from the columns of its kind.
    fn terms(&self) -> Terms {
        match self.kind {
            EventKind::Payment | EventKind::Refund => Terms::Request(PaymentTerms {
                amount: self.amount,
                currency: self.currency,
                occurred_at: self.event_time,
            }),
            EventKind::Settlement => Terms::Line(SettlementTerms {
                gross: self.amount,
                fee: self.fee,
                net: self.net,
                currency: self.currency,
                settled_at: self.event_time,
            }),
        }
    }
}

impl PairEngine {
    /// Installs keys fetched from storage. Every id in `looked_up` becomes resident
    /// (empty if it has no rows); `rows` must hold every stored event of those ids
    /// except duplicates, which the store's lookup leaves out and this skips (they are
    /// not state: see the module docs). Keys already resident are left alone: memory
    /// is authoritative for them.
    pub fn load(&mut self, looked_up: impl IntoIterator<Item = String>, rows: Vec<StoredEvent>) {
        let mut fresh: HashMap<Id, KeyState> = HashMap::new();
        for id in looked_up {
            if !self.keys.contains_key(id.as_str()) {
                fresh.entry(Id::from(id)).or_default();
            }
        }
        for row in rows {
            if row.outcome.is_duplicate() {
                continue;
            }
            let Some(state) = fresh.get_mut(row.payment_id.as_str()) else {
                continue;
            };
            let (unit, side) = Unit::place(row.kind, &row.line);
            let item = SideItem {
                terms: row.terms(),
                event_id: Id::from(row.event_id),
                outcome: row.outcome,
            };
            state.set_side(&unit, side, item);
        }
        for (key, state) in fresh {
            self.bytes += state.bytes(&key);
            self.keys.insert(key, state);
        }
    }

    /// Whether the event id of this event must be checked against storage before it
    /// is applied: its key is resident and already has a first event of the event's
    /// side of its unit under another event id, so the event is a duplicate — or a
    /// duplicate stored before and sent again, which only storage can tell now that
    /// duplicates are not held. Asked after the batch's keys are loaded (an event whose
    /// side has no first event cannot have a stored duplicate there: a side's first
    /// event is stored no later than its duplicates, and memory or a lookup has it).
    /// Duplicates written by this batch or by the one still committing are known
    /// without storage.
    pub fn needs_event_id_check(&self, event: &Event) -> bool {
        let (unit, side) = Unit::of_event(event);
        self.keys
            .get(event.payment_id())
            .and_then(|state| state.side(&unit, side))
            .is_some_and(|first| first.event_id != event.event_id())
    }

    /// Event ids of this batch's events that storage already holds. An event id is
    /// unique for all time (contract §1), so such an event is a redelivery even under
    /// another payment id. Valid until the end of the batch.
    pub fn load_stored_event_ids(&mut self, ids: impl IntoIterator<Item = (Input, String)>) {
        self.stored_elsewhere
            .extend(ids.into_iter().map(|(input, id)| (input, Id::from(id))));
    }
}
