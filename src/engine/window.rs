//! The window's storage: every key's state in one dense vector of slots, found through
//! a hash index of slot numbers.
//!
//! Why not a `HashMap<Id, KeyState>`: a hash table stores its entries in power-of-two
//! bucket arrays at most 7/8 full, so at a million keys it holds two million buckets —
//! twice the entry size per key. Here the buckets hold 4-byte slot numbers and the
//! 80-byte slots sit densely in a vector (freed slots are reused), which keeps an open
//! payment near 90 bytes. Ids up to 24 bytes are stored inline (`CompactString`).
//!
//! Duplicates (`duplicate_payment`, `duplicate_settlement`) are not part of a key's
//! state: once an event is a duplicate its outcome never changes and nothing else
//! depends on it, so the window has nothing to decide with it. Holding their event ids
//! (for redelivery detection) let one payment id grow without bound: a producer
//! minting a fresh event id per resend made a single key hold every id it ever sent,
//! in memory and in every lookup. A key is therefore at most a payment and its first
//! settlement line, whatever the input; a redelivered duplicate is recognised by its
//! stored event id instead (see [`super::PairEngine::needs_event_id_check`]).
//!
//! The payment and the settlement line are laid out differently (the settlement boxed,
//! since open payments rarely have one), but the engine asks of them alike, by input:
//! `KeyState::first_event`, `KeyState::set_first`, `KeyState::set_outcome`.

use std::hash::BuildHasher;

use compact_str::CompactString;
use hashbrown::HashTable;

use super::rules::{Outcome, PaymentTerms, SettlementTerms, Terms};
use crate::event::{Input, Micros};
use crate::money::Currency;

/// Identifiers held in the window: inline up to 24 bytes.
pub type Id = CompactString;

/// A settlement line as the window keeps it.
#[derive(Debug, Clone)]
pub struct SettlementItem {
    pub event_id: Id,
    pub terms: SettlementTerms,
    pub outcome: Outcome,
}

/// What open payments rarely need, boxed so they do not pay for it.
#[derive(Debug, Default)]
struct Extra {
    settlement: Option<SettlementItem>,
}

/// A view of the payment of a key.
#[derive(Debug, Clone, Copy)]
pub struct PaymentRef<'a> {
    pub event_id: &'a Id,
    pub terms: PaymentTerms,
    pub outcome: Outcome,
}

/// The first event of one input of a key, whichever input: what deadlines need of it.
pub(super) struct FirstEvent<'a> {
    pub(super) event_id: &'a Id,
    pub(super) outcome: Outcome,
    /// `occurred_at` of a payment, `settled_at` of a settlement line.
    pub(super) event_time: Micros,
}

/// Everything known about one `payment_id`, flattened for size.
#[derive(Debug, Default)]
pub struct KeyState {
    payment_event: Id,
    payment_amount: i64,
    payment_time: Micros,
    extra: Option<Box<Extra>>,
    payment_currency: Option<Currency>,
    /// `Some` exactly when the key has a payment.
    payment_outcome: Option<Outcome>,
    /// The generation of changes not yet durable that last touched this key (see the
    /// engine's `residency`; 0: none). A pinned key must not be evicted.
    pub pin: u8,
}

impl KeyState {
    pub fn payment(&self) -> Option<PaymentRef<'_>> {
        Some(PaymentRef {
            event_id: &self.payment_event,
            terms: PaymentTerms {
                amount: self.payment_amount,
                currency: self.payment_currency?,
                occurred_at: self.payment_time,
            },
            outcome: self.payment_outcome?,
        })
    }

    pub fn set_payment(&mut self, event_id: Id, terms: PaymentTerms, outcome: Outcome) {
        self.payment_event = event_id;
        self.payment_amount = terms.amount;
        self.payment_time = terms.occurred_at;
        self.payment_currency = Some(terms.currency);
        self.payment_outcome = Some(outcome);
    }

    pub fn set_payment_outcome(&mut self, outcome: Outcome) {
        if self.payment_outcome.is_some() {
            self.payment_outcome = Some(outcome);
        }
    }

    pub fn settlement(&self) -> Option<&SettlementItem> {
        self.extra.as_ref()?.settlement.as_ref()
    }

    pub fn settlement_mut(&mut self) -> Option<&mut SettlementItem> {
        self.extra.as_mut()?.settlement.as_mut()
    }

    pub fn set_settlement(&mut self, item: SettlementItem) {
        self.extra.get_or_insert_with(Box::default).settlement = Some(item);
    }

    pub fn is_open(&self) -> bool {
        self.payment_outcome.is_some_and(Outcome::is_open)
            || self.settlement().is_some_and(|s| s.outcome.is_open())
    }

    pub const MAX_EVICTION_RANK: u8 = 2;

    /// The order in which a full window gives keys up (lowest first): 0 closed, 1 open
    /// only through a fired deadline (`missing_settlement`/`orphan_settlement`, which a
    /// counterpart rarely resolves), 2 pending (its counterpart is expected). Evicting
    /// at random among all open keys let deadline discrepancies, which never leave,
    /// crowd out pending payments over a long drain: their settlements then missed
    /// memory and had to be looked up.
    pub fn eviction_rank(&self) -> u8 {
        let outcomes = [self.payment_outcome, self.settlement().map(|s| s.outcome)];
        if outcomes.contains(&Some(Outcome::Pending)) {
            2
        } else if outcomes.iter().flatten().any(|o| o.is_open()) {
            1
        } else {
            0
        }
    }

    /// The first event of `input`: the payment, or the first settlement line.
    pub(super) fn first_event(&self, input: Input) -> Option<FirstEvent<'_>> {
        match input {
            Input::Payments => self.payment().map(|p| FirstEvent {
                event_id: p.event_id,
                outcome: p.outcome,
                event_time: p.terms.occurred_at,
            }),
            Input::Settlements => self.settlement().map(|s| FirstEvent {
                event_id: &s.event_id,
                outcome: s.outcome,
                event_time: s.terms.settled_at,
            }),
        }
    }

    /// Installs the first event of the input `terms` are of.
    pub(super) fn set_first(&mut self, event_id: Id, terms: Terms, outcome: Outcome) {
        match terms {
            Terms::Payment(terms) => self.set_payment(event_id, terms, outcome),
            Terms::Settlement(terms) => self.set_settlement(SettlementItem {
                event_id,
                terms,
                outcome,
            }),
        }
    }

    /// Sets the outcome of the first event of `input`, if the key has one.
    pub(super) fn set_outcome(&mut self, input: Input, outcome: Outcome) {
        match input {
            Input::Payments => self.set_payment_outcome(outcome),
            Input::Settlements => {
                if let Some(settlement) = self.settlement_mut() {
                    settlement.outcome = outcome;
                }
            }
        }
    }

    /// The event id of the first event of `input` (the payment, or the first
    /// settlement line): every later one of that input is a duplicate or a redelivery.
    pub fn first_event_id(&self, input: Input) -> Option<&Id> {
        self.first_event(input).map(|first| first.event_id)
    }

    /// Whether `event_id` is the key's first event of `input`. Duplicates are not
    /// held (see the module docs), so this says nothing about them.
    pub fn knows(&self, input: Input, event_id: &str) -> bool {
        self.first_event_id(input).is_some_and(|id| id == event_id)
    }

    /// Bytes this key occupies: its slot, its index bucket, and what lives on the heap.
    pub fn bytes(&self, key: &Id) -> usize {
        let heap = |id: &Id| if id.is_heap_allocated() { id.len() } else { 0 };
        let mut total = std::mem::size_of::<Slot>()
            + 2 * std::mem::size_of::<u32>()
            + heap(key)
            + heap(&self.payment_event);
        if let Some(extra) = &self.extra {
            total += std::mem::size_of::<Extra>()
                + extra.settlement.as_ref().map_or(0, |s| heap(&s.event_id));
        }
        total
    }
}

#[derive(Debug, Default)]
struct Slot {
    key: Id,
    state: KeyState,
}

/// `payment_id` → [`KeyState`], dense.
#[derive(Default)]
pub struct Window {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window").field("len", &self.len()).finish()
    }
}

impl Window {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn find(&self, key: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.index
            .find(hash, |&i| self.slots[i as usize].key == key)
            .copied()
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<&KeyState> {
        self.find(key).map(|i| &self.slots[i as usize].state)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut KeyState> {
        self.find(key).map(|i| &mut self.slots[i as usize].state)
    }

    /// Inserts a key that is not present.
    pub fn insert(&mut self, key: Id, state: KeyState) {
        debug_assert!(!self.contains_key(&key));
        let hash = self.hasher.hash_one(key.as_str());
        let slot = Slot { key, state };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                // Grow by a quarter, not double: the slots are most of the window's
                // memory and a doubling would leave up to half of it unused.
                if self.slots.len() == self.slots.capacity() {
                    self.slots.reserve_exact((self.slots.len() / 4).max(1024));
                }
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("window holds fewer than 2^32 keys")
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, i, |&j| {
            hasher.hash_one(slots[j as usize].key.as_str())
        });
    }

    /// Keeps the keys for which `keep` says so; frees the others' slots.
    pub fn retain(&mut self, mut keep: impl FnMut(&Id, &KeyState) -> bool) {
        let (slots, free) = (&mut self.slots, &mut self.free);
        self.index.retain(|&mut i| {
            let slot = &mut slots[i as usize];
            if keep(&slot.key, &slot.state) {
                return true;
            }
            *slot = Slot::default();
            free.push(i);
            false
        });
    }
}
