//! The matching engine: pure, synchronous, deterministic. No IO and no clock — event
//! times, the wall-clock `now` and everything loaded from storage come in as data.
//!
//! One [`PairEngine`] per partition pair holds the in-memory window: a map from
//! `payment_id` to what matching needs of that id: the payment and its first
//! settlement line. **A key present in memory is complete**: the caller must
//! [`PairEngine::load`] every key an event needs that is not resident — one batched
//! lookup per batch — so memory is a cache over PostgreSQL and results do not depend
//! on the window size.
//!
//! Duplicates are not state. A `duplicate_payment` or `duplicate_settlement` never
//! changes outcome and takes no part in matching, so neither the window nor the
//! lookups hold them: a key's size does not grow with the number of duplicates sent
//! for it (issue 19: a producer minting a fresh event id per resend of one payment).
//! What they were kept for, telling a redelivered duplicate (same event id again) from
//! a new one, is asked of storage: an event that would be a duplicate of a resident
//! key ([`PairEngine::needs_event_id_check`]) has its event id checked against the
//! stored ones before it is applied ([`PairEngine::load_stored_event_ids`]).
//!
//! Deadlines are checked at the end of each batch ([`PairEngine::fire_deadlines`])
//! over the items touched in the batch plus the stored pending items the caller swept
//! from PostgreSQL as due, so hot and cold items follow one code path.
//!
//! Every change is recorded as a [`PairChanges`] for the checkpoint; items changed
//! since the last checkpoint are never evicted.

pub mod config;
pub mod rules;
pub mod watermark;
pub mod window;

// hashbrown's default hasher (foldhash, randomly seeded): SipHash was 6% of the
// worker's CPU in a profile of a backlog drain.
use hashbrown::{HashMap, HashSet};

use crate::event::{Event, Input, Micros, Payment, Settlement};
use crate::money::Currency;
use crate::pair::PerInput;
pub use config::{EngineConfig, MatchConfig, WindowConfig};
pub use rules::Outcome;
use rules::{classify, PaymentTerms, SettlementTerms};
use watermark::Watermark;

pub use window::{Id, SettlementItem};
use window::{KeyState, Window};

/// One event as stored in PostgreSQL, to load into the window.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub input: Input,
    pub event_id: String,
    pub payment_id: String,
    pub outcome: Outcome,
    pub event_time: Micros,
    /// `amount_minor` of a payment, `gross_minor` of a settlement.
    pub amount: i64,
    pub fee: i64,
    pub net: i64,
    pub currency: Currency,
}

/// Data of an event seen for the first time, for its insert.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kafka_offset: i64,
    pub event_time: Micros,
    pub amount: i64,
    pub fee: Option<i64>,
    pub net: Option<i64>,
    pub currency: Currency,
    /// `merchant_id` of a payment, `settlement_id` of a settlement.
    pub reference: String,
}

/// The state of one event row after this batch.
#[derive(Debug, Clone)]
pub struct RowWrite {
    pub input: Input,
    pub event_id: Id,
    pub payment_id: Id,
    pub outcome: Outcome,
    pub counterpart: Option<Id>,
    /// Present when the row does not exist yet.
    pub new: Option<NewEvent>,
}

/// A change to the discrepancy history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscrepancyChange {
    Opened {
        kind: Outcome,
        payment_id: Id,
        payment_event_id: Option<Id>,
        settlement_event_id: Option<Id>,
    },
    /// A `missing_settlement` (subject: the payment) or `orphan_settlement` (subject:
    /// the settlement) closed by a late counterpart.
    Resolved {
        kind: Outcome,
        subject_event_id: Id,
        resolution: Outcome,
    },
}

/// Everything one partition pair's checkpoint must write.
#[derive(Debug, Clone, Default)]
pub struct PairChanges {
    pub rows: Vec<RowWrite>,
    pub discrepancies: Vec<DiscrepancyChange>,
    pub high_marks: PerInput<Option<Micros>>,
    /// Which [`PairEngine::take_changes`] call produced these: acknowledge with
    /// [`PairEngine::checkpointed`] once they are durable.
    pub generation: u64,
}

/// A key's pin: the generation that last changed it, in one byte (0: not pinned). At
/// most two generations are unacknowledged at once, so 255 tags never collide.
fn pin_tag(generation: u64) -> u8 {
    (generation % 255) as u8 + 1
}

impl PairChanges {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.discrepancies.is_empty()
    }
}

/// Whether an event changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Accepted(Outcome),
    Redelivery,
}

/// A request to find stored pending items whose deadline the watermark has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepRequest {
    /// Payments with `occurred_at` strictly before this are due.
    pub payments_before: Micros,
    /// Settlements with `settled_at` strictly before this are due.
    pub settlements_before: Micros,
}

/// The window and watermark of one partition pair.
#[derive(Debug)]
pub struct PairEngine {
    config: EngineConfig,
    keys: Window,
    watermark: Watermark,
    /// Watermark up to which stored pending items have been swept.
    swept_through: Option<Micros>,
    /// Row index by (input, event_id) for this batch, so each row is written once.
    batch_rows: HashMap<(Input, Id), usize>,
    changes: PairChanges,
    /// Numbers the batches of changes handed out; keys touched now are pinned with it.
    generation: u64,
    /// Keys changed in this batch (the deadline candidates besides swept ones).
    dirty_keys: Vec<Id>,
    /// Keys of batches handed out but not yet acknowledged durable, oldest first. The
    /// pipeline applies a batch while the previous one is still committing, so up to
    /// two generations are pinned at once.
    unacknowledged: std::collections::VecDeque<(u64, Vec<Id>)>,
    /// Event ids of this batch found in storage: redeliveries, under another payment id
    /// (a replay after a clash) or as a stored duplicate of their own.
    stored_elsewhere: HashSet<(Input, Id)>,
    /// Event ids the previous batch inserted. The pipeline looks up a batch while the
    /// previous one is still being committed, so its probe of stored event ids cannot
    /// see them yet.
    previous_batch_ids: HashSet<(Input, Id)>,
    bytes: usize,
}

impl PairEngine {
    pub fn new(config: EngineConfig, high_marks: PerInput<Option<Micros>>) -> Self {
        Self {
            config,
            keys: Window::default(),
            watermark: Watermark::with_high_marks(high_marks),
            swept_through: None,
            batch_rows: HashMap::new(),
            changes: PairChanges::default(),
            generation: 1,
            dirty_keys: Vec::new(),
            unacknowledged: std::collections::VecDeque::new(),
            stored_elsewhere: HashSet::new(),
            previous_batch_ids: HashSet::new(),
            bytes: 0,
        }
    }

    /// This pair's share of the worker's window bound (the worker splits its bound
    /// among the pairs it owns). Takes effect at the next checkpoint.
    pub fn set_window(&mut self, window: WindowConfig) {
        self.config.window = window;
    }

    pub fn window_items(&self) -> usize {
        self.keys.len()
    }

    pub fn window_bytes(&self) -> usize {
        self.bytes
    }

    pub fn watermark(&self) -> Option<Micros> {
        self.watermark.current()
    }

    pub fn is_resident(&self, payment_id: &str) -> bool {
        self.keys.contains_key(payment_id)
    }

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
            let Some(state) = fresh.get_mut(row.payment_id.as_str()) else {
                continue;
            };
            let event_id = Id::from(row.event_id);
            match (row.input, row.outcome) {
                (_, Outcome::DuplicatePayment | Outcome::DuplicateSettlement) => {}
                (Input::Payments, outcome) => {
                    let terms = PaymentTerms {
                        amount: row.amount,
                        currency: row.currency,
                        occurred_at: row.event_time,
                    };
                    state.set_payment(event_id, terms, outcome);
                }
                (Input::Settlements, outcome) => state.set_settlement(SettlementItem {
                    event_id,
                    terms: SettlementTerms {
                        gross: row.amount,
                        fee: row.fee,
                        net: row.net,
                        currency: row.currency,
                        settled_at: row.event_time,
                    },
                    outcome,
                }),
            }
        }
        for (key, state) in fresh {
            self.bytes += state.bytes(&key);
            self.keys.insert(key, state);
        }
    }

    /// Whether the event id of this event must be checked against storage before it
    /// is applied: its key is resident and already has a first event of its input
    /// under another event id, so the event is a duplicate — or a duplicate stored
    /// before and sent again, which only storage can tell now that duplicates are not
    /// held. Asked after the batch's keys are loaded (an event whose key has no first
    /// event of its input cannot have a stored duplicate there: a key's first event is
    /// stored no later than its duplicates, and memory or a lookup has it). Duplicates
    /// written by this batch or by the one still committing are known without storage.
    pub fn needs_event_id_check(&self, input: Input, payment_id: &str, event_id: &str) -> bool {
        self.keys
            .get(payment_id)
            .and_then(|state| state.first_event_id(input))
            .is_some_and(|first| first != event_id)
    }

    /// Event ids of this batch's events that storage already holds. An event id is
    /// unique for all time (contract §1), so such an event is a redelivery even under
    /// another payment id. Valid until the end of the batch.
    pub fn load_stored_event_ids(&mut self, ids: impl IntoIterator<Item = (Input, String)>) {
        self.stored_elsewhere
            .extend(ids.into_iter().map(|(input, id)| (input, Id::from(id))));
    }

    /// A message was read from `input` (even one that was rejected).
    pub fn observe_activity(&mut self, input: Input) {
        self.watermark.observe_activity(input);
    }

    pub fn observe_caught_up(&mut self, input: Input, caught_up: bool, now: Micros) {
        self.watermark.observe_caught_up(input, caught_up, now);
    }

    /// Applies one accepted event read at `kafka_offset`. Its key must be resident.
    pub fn apply(&mut self, event: Event, kafka_offset: i64) -> Applied {
        let input = event.input();
        let payment_id = event.payment_id();
        let Some(state) = self.keys.get(payment_id) else {
            panic!("engine invariant: key {payment_id:?} was not loaded before apply");
        };
        let seen_in_batch = |id: &str| {
            let key = (input, Id::from(id));
            self.batch_rows
                .get(&key)
                .is_some_and(|&i| self.changes.rows[i].new.is_some())
                || self.stored_elsewhere.contains(&key)
                || self.previous_batch_ids.contains(&key)
        };
        if state.knows(input, event.event_id()) || seen_in_batch(event.event_id()) {
            self.watermark.observe_activity(input);
            return Applied::Redelivery;
        }
        self.watermark.observe_event(input, event.event_time());
        let outcome = match event {
            Event::Payment(p) => self.apply_payment(p, kafka_offset),
            Event::Settlement(s) => self.apply_settlement(s, kafka_offset),
        };
        Applied::Accepted(outcome)
    }

    fn apply_payment(&mut self, p: Payment, kafka_offset: i64) -> Outcome {
        let key = Id::from(p.payment_id);
        let event_id = Id::from(p.event_id);
        let new = NewEvent {
            kafka_offset,
            event_time: p.occurred_at,
            amount: p.amount.get(),
            fee: None,
            net: None,
            currency: p.currency,
            reference: p.merchant_id,
        };
        let terms = PaymentTerms {
            amount: p.amount.get(),
            currency: p.currency,
            occurred_at: p.occurred_at,
        };
        let (deadline, tolerance) = (self.config.deadline, self.config.tolerance);
        self.touch(&key);
        let state = self
            .keys
            .get_mut(&key)
            .expect("engine invariant: key resident (checked in apply)");
        let before = state.bytes(&key);
        if let Some(original) = state.payment().map(|p| p.event_id.clone()) {
            // Not kept in the key's state: see the module docs.
            self.record_new(
                Input::Payments,
                &key,
                &event_id,
                Outcome::DuplicatePayment,
                Some(original),
                new,
            );
            self.open(Outcome::DuplicatePayment, &key, Some(event_id), None);
            return Outcome::DuplicatePayment;
        }
        let matched = state.settlement_mut().map(|s| {
            let previous = s.outcome;
            s.outcome = classify(terms, s.terms, deadline, tolerance);
            (s.event_id.clone(), previous, s.outcome)
        });
        let outcome = matched.as_ref().map_or(Outcome::Pending, |(_, _, o)| *o);
        state.set_payment(event_id.clone(), terms, outcome);
        self.bytes = self.bytes + state.bytes(&key) - before;
        let counterpart = matched.as_ref().map(|(id, _, _)| id.clone());
        self.record_new(Input::Payments, &key, &event_id, outcome, counterpart, new);
        if let Some((settlement_id, previous, outcome)) = matched {
            self.record_update(
                Input::Settlements,
                &key,
                &settlement_id,
                outcome,
                Some(event_id.clone()),
            );
            self.after_match(
                &key,
                &event_id,
                &settlement_id,
                previous,
                Outcome::OrphanSettlement,
                outcome,
            );
        }
        outcome
    }

    fn apply_settlement(&mut self, s: Settlement, kafka_offset: i64) -> Outcome {
        let key = Id::from(s.payment_id);
        let event_id = Id::from(s.event_id);
        let new = NewEvent {
            kafka_offset,
            event_time: s.settled_at,
            amount: s.gross.get(),
            fee: Some(s.fee.get()),
            net: Some(s.net),
            currency: s.currency,
            reference: s.settlement_id,
        };
        let terms = SettlementTerms {
            gross: s.gross.get(),
            fee: s.fee.get(),
            net: s.net,
            currency: s.currency,
            settled_at: s.settled_at,
        };
        let (deadline, tolerance) = (self.config.deadline, self.config.tolerance);
        self.touch(&key);
        let state = self
            .keys
            .get_mut(&key)
            .expect("engine invariant: key resident (checked in apply)");
        let before = state.bytes(&key);
        if let Some(original) = state.settlement().map(|s| s.event_id.clone()) {
            // Not kept in the key's state: see the module docs.
            self.record_new(
                Input::Settlements,
                &key,
                &event_id,
                Outcome::DuplicateSettlement,
                Some(original),
                new,
            );
            self.open(Outcome::DuplicateSettlement, &key, None, Some(event_id));
            return Outcome::DuplicateSettlement;
        }
        let matched = state.payment().map(|p| {
            (
                p.event_id.clone(),
                p.outcome,
                classify(p.terms, terms, deadline, tolerance),
            )
        });
        if let Some((_, _, outcome)) = matched {
            state.set_payment_outcome(outcome);
        }
        let outcome = matched.as_ref().map_or(Outcome::Pending, |(_, _, o)| *o);
        state.set_settlement(SettlementItem {
            event_id: event_id.clone(),
            terms,
            outcome,
        });
        self.bytes = self.bytes + state.bytes(&key) - before;
        let counterpart = matched.as_ref().map(|(id, _, _)| id.clone());
        self.record_new(
            Input::Settlements,
            &key,
            &event_id,
            outcome,
            counterpart,
            new,
        );
        if let Some((payment_event_id, previous, outcome)) = matched {
            self.record_update(
                Input::Payments,
                &key,
                &payment_event_id,
                outcome,
                Some(event_id.clone()),
            );
            self.after_match(
                &key,
                &payment_event_id,
                &event_id,
                previous,
                Outcome::MissingSettlement,
                outcome,
            );
        }
        outcome
    }

    /// Discrepancy bookkeeping once a payment and its settlement meet: the earlier
    /// side's deadline discrepancy (if it had fired) is resolved, and a mismatch opens.
    fn after_match(
        &mut self,
        key: &Id,
        payment_event_id: &Id,
        settlement_event_id: &Id,
        previous: Outcome,
        resolvable: Outcome,
        outcome: Outcome,
    ) {
        if previous == resolvable {
            let subject = if resolvable == Outcome::MissingSettlement {
                payment_event_id
            } else {
                settlement_event_id
            };
            self.changes
                .discrepancies
                .push(DiscrepancyChange::Resolved {
                    kind: resolvable,
                    subject_event_id: subject.clone(),
                    resolution: outcome,
                });
        }
        if outcome.is_discrepancy() {
            self.open(
                outcome,
                key,
                Some(payment_event_id.clone()),
                Some(settlement_event_id.clone()),
            );
        }
    }

    fn open(
        &mut self,
        kind: Outcome,
        key: &Id,
        payment_event_id: Option<Id>,
        settlement_event_id: Option<Id>,
    ) {
        self.changes.discrepancies.push(DiscrepancyChange::Opened {
            kind,
            payment_id: key.clone(),
            payment_event_id,
            settlement_event_id,
        });
    }

    /// Marks a key changed in this batch: a deadline candidate, not evictable.
    fn touch(&mut self, key: &Id) {
        if let Some(state) = self.keys.get_mut(key) {
            let pin = pin_tag(self.generation);
            if state.pin != pin {
                state.pin = pin;
                self.dirty_keys.push(key.clone());
            }
        }
    }

    fn record_new(
        &mut self,
        input: Input,
        key: &Id,
        event_id: &Id,
        outcome: Outcome,
        counterpart: Option<Id>,
        new: NewEvent,
    ) {
        self.batch_rows
            .insert((input, event_id.clone()), self.changes.rows.len());
        self.changes.rows.push(RowWrite {
            input,
            event_id: event_id.clone(),
            payment_id: key.clone(),
            outcome,
            counterpart,
            new: Some(new),
        });
    }

    fn record_update(
        &mut self,
        input: Input,
        key: &Id,
        event_id: &Id,
        outcome: Outcome,
        counterpart: Option<Id>,
    ) {
        if let Some(&index) = self.batch_rows.get(&(input, event_id.clone())) {
            let row = &mut self.changes.rows[index];
            row.outcome = outcome;
            row.counterpart = counterpart;
            return;
        }
        self.batch_rows
            .insert((input, event_id.clone()), self.changes.rows.len());
        self.changes.rows.push(RowWrite {
            input,
            event_id: event_id.clone(),
            payment_id: key.clone(),
            outcome,
            counterpart,
            new: None,
        });
    }

    /// Recomputes the watermark at `now` and says whether stored pending items must be
    /// swept (the watermark moved past the last sweep, or the last sweep was cut short).
    pub fn advance(&mut self, now: Micros) -> Option<SweepRequest> {
        let current = self.watermark.advance(now, self.config.idle_timeout)?;
        if self.swept_through.is_some_and(|s| s >= current) {
            return None;
        }
        Some(SweepRequest {
            payments_before: current.saturating_sub(self.config.deadline),
            settlements_before: current.saturating_sub(self.config.orphan_timeout),
        })
    }

    /// Fires deadlines at the current watermark over the keys touched in this batch
    /// and the keys in `swept` (stored pending items found due, loaded if not resident).
    /// `sweep_complete` says the sweep returned every due item, not a bounded page.
    pub fn fire_deadlines(
        &mut self,
        swept_keys: Vec<String>,
        swept_rows: Vec<StoredEvent>,
        sweep_complete: bool,
    ) {
        let Some(watermark) = self.watermark.current() else {
            return;
        };
        let swept: Vec<Id> = swept_keys.iter().map(|k| Id::from(k.as_str())).collect();
        self.load(swept_keys, swept_rows);
        if sweep_complete {
            self.swept_through = Some(watermark);
        }
        // Keys of a batch still being committed are candidates too: the sweep reads
        // PostgreSQL, which does not show their pending items yet.
        let mut candidates: Vec<Id> = self.dirty_keys.clone();
        for (_, keys) in &self.unacknowledged {
            candidates.extend(keys.iter().cloned());
        }
        candidates.extend(swept);
        let mut seen = HashSet::with_capacity(candidates.len());
        for key in candidates {
            if seen.insert(key.clone()) {
                self.fire_key(&key, watermark);
            }
        }
    }

    fn fire_key(&mut self, key: &Id, watermark: Micros) {
        let Some(state) = self.keys.get(key) else {
            return;
        };
        let (deadline, orphan_timeout) = (self.config.deadline, self.config.orphan_timeout);
        let payment_due = match (state.payment(), state.settlement()) {
            (Some(p), None)
                if p.outcome == Outcome::Pending
                    && watermark > p.terms.occurred_at.saturating_add(deadline) =>
            {
                Some(p.event_id.clone())
            }
            _ => None,
        };
        let settlement_due = match (state.payment(), state.settlement()) {
            (None, Some(s))
                if s.outcome == Outcome::Pending
                    && watermark > s.terms.settled_at.saturating_add(orphan_timeout) =>
            {
                Some(s.event_id.clone())
            }
            _ => None,
        };
        if let Some(event_id) = payment_due {
            self.touch(key);
            if let Some(state) = self.keys.get_mut(key) {
                state.set_payment_outcome(Outcome::MissingSettlement);
            }
            self.record_update(
                Input::Payments,
                key,
                &event_id,
                Outcome::MissingSettlement,
                None,
            );
            self.open(Outcome::MissingSettlement, key, Some(event_id), None);
        }
        if let Some(event_id) = settlement_due {
            self.touch(key);
            if let Some(s) = self.keys.get_mut(key).and_then(KeyState::settlement_mut) {
                s.outcome = Outcome::OrphanSettlement;
            }
            self.record_update(
                Input::Settlements,
                key,
                &event_id,
                Outcome::OrphanSettlement,
                None,
            );
            self.open(Outcome::OrphanSettlement, key, None, Some(event_id));
        }
    }

    /// Hands over what this batch changed, for the checkpoint.
    pub fn take_changes(&mut self) -> PairChanges {
        self.previous_batch_ids.clear();
        for ((input, id), i) in self.batch_rows.drain() {
            if self.changes.rows[i].new.is_some() {
                self.previous_batch_ids.insert((input, id));
            }
        }
        self.stored_elsewhere.clear();
        let mut changes = std::mem::take(&mut self.changes);
        // The next batch is about as large: sized once, its rows are not copied and
        // faulted in again at every doubling.
        self.changes.rows = Vec::with_capacity(changes.rows.len());
        changes.high_marks = self.watermark.high_marks();
        changes.generation = self.generation;
        if !self.dirty_keys.is_empty() {
            let keys = std::mem::take(&mut self.dirty_keys);
            self.unacknowledged.push_back((self.generation, keys));
        }
        self.generation += 1;
        changes
    }

    pub fn high_marks(&self) -> PerInput<Option<Micros>> {
        self.watermark.high_marks()
    }

    /// The changes of `generation` (and of every earlier one) are durable: their keys
    /// may be evicted again, unless a later batch changed them since.
    pub fn checkpointed(&mut self, generation: u64) {
        while let Some((oldest, _)) = self.unacknowledged.front() {
            if *oldest > generation {
                break;
            }
            let Some((oldest, keys)) = self.unacknowledged.pop_front() else {
                break;
            };
            let pin = pin_tag(oldest);
            for key in keys {
                if let Some(state) = self.keys.get_mut(&key) {
                    if state.pin == pin {
                        state.pin = 0;
                    }
                }
            }
        }
    }

    /// Evicts down to 90% of the bounds when over them, in [`KeyState::eviction_rank`]
    /// order: closed keys, then keys open only through a fired deadline, then pending
    /// ones. Evicted keys stay in PostgreSQL and come back through lookups and sweeps.
    /// Keys not yet checkpointed stay. Called before a batch's keys are loaded, never
    /// between loading and applying them.
    pub fn evict(&mut self) {
        let window = self.config.window;
        if self.keys.len() <= window.max_items && self.bytes <= window.max_bytes {
            return;
        }
        let target_items = window.max_items - window.max_items / 10;
        let target_bytes = window.max_bytes - window.max_bytes / 10;
        for rank in 0..=KeyState::MAX_EVICTION_RANK {
            let mut freed = 0usize;
            let mut remaining = self.keys.len();
            self.keys.retain(|key, state| {
                let over = remaining > target_items || self.bytes - freed > target_bytes;
                if over && state.pin == 0 && state.eviction_rank() <= rank {
                    freed += state.bytes(key);
                    remaining -= 1;
                    return false;
                }
                true
            });
            self.bytes -= freed;
            if self.keys.len() <= target_items && self.bytes <= target_bytes {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(input: Input, payment_id: &str, outcome: Outcome) -> StoredEvent {
        StoredEvent {
            input,
            event_id: format!("{payment_id}-{}", input.event_kind()),
            payment_id: payment_id.to_owned(),
            outcome,
            event_time: 0,
            amount: 100,
            fee: 1,
            net: 99,
            currency: Currency::from_code("EUR").expect("EUR is a currency"),
        }
    }

    fn eur() -> Currency {
        Currency::from_code("EUR").expect("EUR is a currency")
    }

    fn payment(event_id: &str, payment_id: &str) -> Event {
        Event::Payment(Payment {
            event_id: event_id.to_owned(),
            payment_id: payment_id.to_owned(),
            merchant_id: "m".to_owned(),
            amount: crate::money::MinorUnits::new(100),
            currency: eur(),
            occurred_at: 0,
        })
    }

    fn settlement(event_id: &str, payment_id: &str) -> Event {
        Event::Settlement(Settlement {
            event_id: event_id.to_owned(),
            settlement_id: "po".to_owned(),
            payment_id: payment_id.to_owned(),
            gross: crate::money::MinorUnits::new(100),
            fee: crate::money::MinorUnits::new(1),
            net: 99,
            currency: eur(),
            settled_at: 0,
        })
    }

    fn new_engine(max_items: usize) -> PairEngine {
        let window = WindowConfig {
            max_items,
            max_bytes: usize::MAX / 2,
        };
        PairEngine::new(
            EngineConfig::new(&MatchConfig::default(), window),
            PerInput::default(),
        )
    }

    /// Hands the batch's changes over and acknowledges them as durable.
    fn commit(engine: &mut PairEngine) {
        let generation = engine.take_changes().generation;
        engine.checkpointed(generation);
    }

    /// Issue 19: a producer minting fresh event ids for one payment id must not grow
    /// that key's state. Ids longer than 24 bytes, as UUIDs are, live on the heap.
    #[test]
    fn ten_thousand_duplicates_of_one_key_leave_its_accounted_size_unchanged() {
        let mut engine = new_engine(10);
        engine.load(["storm".to_owned()], Vec::new());
        engine.apply(payment("storm-payment-0000-first-event", "storm"), 0);
        engine.apply(settlement("storm-settlement-000-first-line", "storm"), 0);
        let (items, bytes) = (engine.window_items(), engine.window_bytes());
        for i in 1..=10_000i64 {
            let outcome = engine.apply(payment(&format!("storm-payment-dup-{i:012}"), "storm"), i);
            assert_eq!(outcome, Applied::Accepted(Outcome::DuplicatePayment));
            let outcome = engine.apply(
                settlement(&format!("storm-settlement-dup-{i:012}"), "storm"),
                i,
            );
            assert_eq!(outcome, Applied::Accepted(Outcome::DuplicateSettlement));
            if i % 500 == 0 {
                commit(&mut engine);
                engine.evict();
            }
        }
        assert_eq!(engine.window_items(), items);
        assert_eq!(
            engine.window_bytes(),
            bytes,
            "window bytes grew with duplicates"
        );
        assert!(bytes < 512, "one matched key: {bytes} bytes");
    }

    #[test]
    fn a_duplicate_sent_again_is_a_redelivery_once_storage_says_its_id_is_stored() {
        let mut engine = new_engine(10);
        engine.load(["k".to_owned()], Vec::new());
        assert_eq!(
            engine.apply(payment("first", "k"), 0),
            Applied::Accepted(Outcome::Pending)
        );
        // A key's first event is known from memory; nothing to ask storage.
        assert!(!engine.needs_event_id_check(Input::Payments, "k", "first"));
        assert!(!engine.needs_event_id_check(Input::Settlements, "k", "line"));
        assert_eq!(engine.apply(payment("first", "k"), 1), Applied::Redelivery);
        assert_eq!(
            engine.apply(payment("dup", "k"), 2),
            Applied::Accepted(Outcome::DuplicatePayment)
        );
        // Within the batch, and in the next one while this one commits: known.
        assert_eq!(engine.apply(payment("dup", "k"), 3), Applied::Redelivery);
        commit(&mut engine);
        assert_eq!(engine.apply(payment("dup", "k"), 4), Applied::Redelivery);
        commit(&mut engine);
        // Committed: only storage knows it. The engine asks for its id to be checked,
        // and with storage's answer the event is a redelivery.
        assert!(engine.needs_event_id_check(Input::Payments, "k", "dup"));
        engine.load_stored_event_ids([(Input::Payments, "dup".to_owned())]);
        assert_eq!(engine.apply(payment("dup", "k"), 5), Applied::Redelivery);
        assert!(engine.take_changes().rows.is_empty());
        // A key loaded from storage: its duplicate rows are not state.
        let mut reloaded = new_engine(10);
        let mut first = stored(Input::Payments, "k", Outcome::Pending);
        first.event_id = "first".to_owned();
        let mut dup = stored(Input::Payments, "k", Outcome::DuplicatePayment);
        dup.event_id = "dup".to_owned();
        reloaded.load(["k".to_owned()], vec![first, dup]);
        assert_eq!(reloaded.window_bytes(), engine.window_bytes());
        assert!(reloaded.needs_event_id_check(Input::Payments, "k", "dup"));
    }

    #[test]
    fn a_full_window_gives_up_closed_keys_then_fired_deadlines_then_pending_ones() {
        let window = WindowConfig {
            max_items: 10,
            max_bytes: usize::MAX / 2,
        };
        let mut engine = PairEngine::new(
            EngineConfig::new(&MatchConfig::default(), window),
            PerInput::default(),
        );
        // 4 closed, 4 open through a fired deadline, 4 pending: 12 keys over a cap
        // of 10 are evicted down to 9.
        let mut keys = Vec::new();
        let mut rows = Vec::new();
        for i in 0..4 {
            for (name, input, outcome) in [
                ("closed", Input::Payments, Outcome::Matched),
                ("missing", Input::Payments, Outcome::MissingSettlement),
                ("pending", Input::Settlements, Outcome::Pending),
            ] {
                let key = format!("{name}-{i}");
                rows.push(stored(input, &key, outcome));
                keys.push(key);
            }
        }
        engine.load(keys, rows);
        engine.evict();
        let resident = |engine: &PairEngine, name: &str| {
            (0..4)
                .filter(|i| engine.is_resident(&format!("{name}-{i}")))
                .count()
        };
        assert_eq!(engine.window_items(), 9);
        assert_eq!(resident(&engine, "pending"), 4);
        assert_eq!(resident(&engine, "missing"), 4);
        assert_eq!(resident(&engine, "closed"), 1);

        // Over the cap again with no closed key left to spare: fired deadlines go next.
        let extra: Vec<String> = (0..4).map(|i| format!("pending-x{i}")).collect();
        let extra_rows = extra
            .iter()
            .map(|k| stored(Input::Payments, k, Outcome::Pending))
            .collect();
        engine.load(extra, extra_rows);
        engine.evict();
        assert_eq!(engine.window_items(), 9);
        assert_eq!(resident(&engine, "closed"), 0);
        assert_eq!(resident(&engine, "pending"), 4);
        assert_eq!(resident(&engine, "missing"), 1);
    }
}
