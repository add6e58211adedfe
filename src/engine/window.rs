//! The window's storage: every key's state in one dense vector of slots, found through
//! a hash index of slot numbers.
//!
//! Why not a `HashMap<Id, KeyState>`: a hash table stores its entries in power-of-two
//! bucket arrays at most 7/8 full, so at a million keys it holds two million buckets —
//! twice the entry size per key. Here the buckets hold 4-byte slot numbers and the
//! 80-byte slots sit densely in a vector (freed slots are reused), which keeps an open
//! payment near 90 bytes. Ids up to 24 bytes are stored inline (`CompactString`).
//!
//! A key holds the first event of each side of each of its matching units (see
//! [`super::units`]): the payment and its capture line inline or in one box, and the
//! refund and dispute units, which few keys have, in a vector inside that box.
//!
//! Duplicates (`duplicate_payment`, `duplicate_refund`, `duplicate_settlement`) are not part of a key's
//! state: once an event is a duplicate its outcome never changes and nothing else
//! depends on it, so the window has nothing to decide with it. Holding their event ids
//! (for redelivery detection) let one payment id grow without bound: a producer
//! minting a fresh event id per resend made a single key hold every id it ever sent,
//! in memory and in every lookup. A key is therefore at most the first event of each
//! side of its units; a redelivered duplicate is recognised by its stored event id
//! instead (see [`super::PairEngine::needs_event_id_check`]).
//!
//! The payment and the capture line are laid out apart from the other units (the line
//! boxed, since open payments rarely have one), but the engine asks of every side
//! alike: [`KeyState::side`], [`KeyState::set_side`], [`KeyState::set_side_outcome`],
//! [`KeyState::sides`].

use std::hash::BuildHasher;

use compact_str::CompactString;
use hashbrown::HashTable;

use super::rules::{Outcome, PaymentTerms, SettlementTerms};
use super::units::{Side, Terms, Unit};
use crate::event::{Input, Micros};
use crate::money::Currency;

/// Identifiers held in the window: inline up to 24 bytes.
pub type Id = CompactString;

/// The first event of one side of a unit, as the window keeps it.
#[derive(Debug, Clone)]
pub struct SideItem {
    pub event_id: Id,
    pub terms: Terms,
    pub outcome: Outcome,
}

/// A refund or dispute unit: the first event of each side.
#[derive(Debug)]
struct UnitItem {
    unit: Unit,
    /// Opening, closing.
    sides: [Option<SideItem>; 2],
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Opening => 0,
        Side::Closing => 1,
    }
}

/// What open payments rarely need, boxed so they do not pay for it.
#[derive(Debug, Default)]
struct Extra {
    /// The first capture line.
    capture_line: Option<SideItem>,
    /// Refund and dispute units, in arrival order.
    units: Vec<UnitItem>,
}

/// A view of the first event of one side of a unit.
#[derive(Debug, Clone, Copy)]
pub struct SideRef<'a> {
    pub event_id: &'a Id,
    pub terms: Terms,
    pub outcome: Outcome,
}

impl<'a> From<&'a SideItem> for SideRef<'a> {
    fn from(item: &'a SideItem) -> Self {
        Self {
            event_id: &item.event_id,
            terms: item.terms,
            outcome: item.outcome,
        }
    }
}

/// The capture unit, for iterating every side alike.
static CAPTURE: Unit = Unit::Capture;

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
    fn payment(&self) -> Option<SideRef<'_>> {
        Some(SideRef {
            event_id: &self.payment_event,
            terms: Terms::Request(PaymentTerms {
                amount: self.payment_amount,
                currency: self.payment_currency?,
                occurred_at: self.payment_time,
            }),
            outcome: self.payment_outcome?,
        })
    }

    fn unit(&self, unit: &Unit) -> Option<&UnitItem> {
        self.extra.as_ref()?.units.iter().find(|u| u.unit == *unit)
    }

    fn unit_mut(&mut self, unit: &Unit) -> Option<&mut UnitItem> {
        self.extra
            .as_mut()?
            .units
            .iter_mut()
            .find(|u| u.unit == *unit)
    }

    /// The first event of `side` of `unit`, if the key has one.
    pub fn side(&self, unit: &Unit, side: Side) -> Option<SideRef<'_>> {
        match (unit, side) {
            (Unit::Capture, Side::Opening) => self.payment(),
            (Unit::Capture, Side::Closing) => self
                .extra
                .as_ref()?
                .capture_line
                .as_ref()
                .map(SideRef::from),
            _ => self.unit(unit)?.sides[side_index(side)]
                .as_ref()
                .map(SideRef::from),
        }
    }

    /// Installs the first event of `side` of `unit`.
    pub fn set_side(&mut self, unit: &Unit, side: Side, item: SideItem) {
        match (unit, side, item.terms) {
            (Unit::Capture, Side::Opening, Terms::Request(terms)) => {
                self.payment_event = item.event_id;
                self.payment_amount = terms.amount;
                self.payment_time = terms.occurred_at;
                self.payment_currency = Some(terms.currency);
                self.payment_outcome = Some(item.outcome);
            }
            (Unit::Capture, Side::Opening, Terms::Line(_)) => {
                debug_assert!(false, "a payment has a payment's terms");
            }
            (Unit::Capture, Side::Closing, _) => {
                self.extra.get_or_insert_with(Box::default).capture_line = Some(item);
            }
            _ => {
                if self.unit(unit).is_none() {
                    let units = &mut self.extra.get_or_insert_with(Box::default).units;
                    // One more, not the four a first push reserves: most keys have
                    // one refund or dispute, and each unit is about 200 bytes.
                    units.reserve_exact(1);
                    units.push(UnitItem {
                        unit: unit.clone(),
                        sides: [None, None],
                    });
                }
                if let Some(found) = self.unit_mut(unit) {
                    found.sides[side_index(side)] = Some(item);
                }
            }
        }
    }

    /// Sets the outcome of the first event of `side` of `unit`, if the key has one.
    pub fn set_side_outcome(&mut self, unit: &Unit, side: Side, outcome: Outcome) {
        match (unit, side) {
            (Unit::Capture, Side::Opening) => {
                if self.payment_outcome.is_some() {
                    self.payment_outcome = Some(outcome);
                }
            }
            (Unit::Capture, Side::Closing) => {
                if let Some(line) = self.extra.as_mut().and_then(|e| e.capture_line.as_mut()) {
                    line.outcome = outcome;
                }
            }
            _ => {
                if let Some(item) = self
                    .unit_mut(unit)
                    .and_then(|u| u.sides[side_index(side)].as_mut())
                {
                    item.outcome = outcome;
                }
            }
        }
    }

    /// Every first event the key holds, with its unit and side: the capture unit's,
    /// then the other units' in arrival order.
    pub fn sides(&self) -> impl Iterator<Item = (&Unit, Side, SideRef<'_>)> {
        let capture = Side::BOTH
            .into_iter()
            .filter_map(|side| Some((&CAPTURE, side, self.side(&CAPTURE, side)?)));
        let units = self.extra.iter().flat_map(|extra| {
            extra.units.iter().flat_map(|u| {
                Side::BOTH.into_iter().filter_map(move |side| {
                    let item = u.sides[side_index(side)].as_ref()?;
                    Some((&u.unit, side, SideRef::from(item)))
                })
            })
        });
        capture.chain(units)
    }

    /// The lines of the key other than captures: (settled_at, event_id, gross) of the
    /// first refund line of each refund and both lines of each dispute.
    pub fn non_capture_lines(&self) -> impl Iterator<Item = (Micros, &Id, i64)> {
        self.extra.iter().flat_map(|extra| {
            extra.units.iter().flat_map(|u| {
                u.sides
                    .iter()
                    .flatten()
                    .filter_map(|item| match item.terms {
                        Terms::Line(line) => Some((line.settled_at, &item.event_id, line.gross)),
                        Terms::Request(_) => None,
                    })
            })
        })
    }

    /// The first capture line's gross, if the key has one.
    pub fn capture_gross(&self) -> Option<i64> {
        match self.side(&Unit::Capture, Side::Closing)?.terms {
            Terms::Line(SettlementTerms { gross, .. }) => Some(gross),
            Terms::Request(_) => None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.sides().any(|(_, _, item)| item.outcome.is_open())
    }

    pub const MAX_EVICTION_RANK: u8 = 2;

    /// The order in which a full window gives keys up (lowest first): 0 closed, 1 open
    /// only through a fired deadline (`missing_settlement`/`orphan_settlement`, which a
    /// counterpart rarely resolves) or an open chargeback, 2 pending (its counterpart
    /// is expected). Evicting at random among all open keys let deadline
    /// discrepancies, which never leave, crowd out pending payments over a long drain:
    /// their settlements then missed memory and had to be looked up.
    pub fn eviction_rank(&self) -> u8 {
        let mut rank = 0;
        for (_, _, item) in self.sides() {
            if item.outcome == Outcome::Pending {
                return 2;
            }
            if item.outcome.is_open() || item.outcome == Outcome::ChargebackOpen {
                rank = 1;
            }
        }
        rank
    }

    /// Whether `event_id` is a first event of `input` the key holds. Duplicates are not
    /// held (see the module docs), so this says nothing about them.
    pub fn knows(&self, input: Input, event_id: &str) -> bool {
        self.sides()
            .any(|(unit, side, item)| unit.input(side) == input && item.event_id == event_id)
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
                + extra.capture_line.as_ref().map_or(0, |s| heap(&s.event_id))
                + extra.units.capacity() * std::mem::size_of::<UnitItem>();
            for unit in &extra.units {
                if let Unit::Refund(id) | Unit::Dispute(id) = &unit.unit {
                    total += heap(id);
                }
                total += unit
                    .sides
                    .iter()
                    .flatten()
                    .map(|s| heap(&s.event_id))
                    .sum::<usize>();
            }
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
