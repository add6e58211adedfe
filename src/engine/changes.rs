//! Recording what a batch changed, for the checkpoint: the event rows to write (each
//! row once, however often the batch changed it), the discrepancy history, and the
//! hand-over of the batch ([`PairEngine::take_changes`]). The record also remembers
//! which event ids the batch and the one before it inserted: the pipeline probes
//! storage for a batch while the previous one is still committing, so only the record
//! can tell those redeliveries.

use hashbrown::hash_map::Entry;
use hashbrown::{HashMap, HashSet};

use super::position::OverRefund;
use super::rules::{DiscrepancyKind, Outcome, PaymentTerms};
use super::window::Id;
use super::PairEngine;
use crate::event::{EventKind, Input, Line, Micros};
use crate::money::Currency;
use crate::pair::PerInput;

/// Data of an event seen for the first time, for its insert.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kafka_offset: i64,
    pub event_time: Micros,
    /// `amount_minor` of a payment or refund request, the signed `gross_minor` of a
    /// settlement line.
    pub amount: i64,
    pub fee: Option<i64>,
    pub net: Option<i64>,
    pub currency: Currency,
    /// `merchant_id` of a payment, `settlement_id` of a settlement line; a refund
    /// request has neither.
    pub reference: Option<String>,
    /// A settlement line's type and id; `Line::Refund` with the refund id of a refund
    /// request; `Line::Capture` for a payment.
    pub line: Line,
    pub payout_id: Option<String>,
}

impl NewEvent {
    /// The columns of a payment or refund request.
    pub(super) fn request(
        kafka_offset: i64,
        terms: PaymentTerms,
        reference: Option<String>,
    ) -> Self {
        Self {
            kafka_offset,
            event_time: terms.occurred_at,
            amount: terms.amount,
            fee: None,
            net: None,
            currency: terms.currency,
            reference,
            line: Line::Capture,
            payout_id: None,
        }
    }
}

/// The state of one event row after this batch.
#[derive(Debug, Clone)]
pub struct RowWrite {
    pub kind: EventKind,
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
    /// `payment_event_id` is the payments-topic event (a payment or refund request),
    /// `settlement_event_id` the line.
    Opened {
        kind: DiscrepancyKind,
        payment_id: Id,
        payment_event_id: Option<Id>,
        settlement_event_id: Option<Id>,
    },
    /// A `missing_settlement` (subject: the payment or refund request) or
    /// `orphan_settlement` (subject: the line) closed by a late counterpart, the
    /// resolution its new outcome; a `chargeback` (subject: the chargeback line)
    /// closed by its reversal, resolution `reversed`.
    Resolved {
        kind: DiscrepancyKind,
        subject_event_id: Id,
        resolution: &'static str,
    },
    /// The state the payment's one `over_refunded` discrepancy must have (`None`: it
    /// must not exist). See the engine's `position`.
    OverRefund {
        payment_id: Id,
        state: Option<OverRefund>,
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

impl PairChanges {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.discrepancies.is_empty()
    }
}

/// The changes of the batch being applied.
#[derive(Debug, Default)]
pub(super) struct BatchRecord {
    changes: PairChanges,
    /// Row index by (input, event_id) for this batch, so each row is written once.
    rows_by_event: HashMap<(Input, Id), usize>,
    /// The last state this batch gave each payment's `over_refunded` discrepancy.
    over_refunds: HashMap<Id, Option<OverRefund>>,
    /// Event ids the previous batch inserted. The pipeline looks up a batch while the
    /// previous one is still being committed, so its probe of stored event ids cannot
    /// see them yet.
    inserted_by_previous: HashSet<(Input, Id)>,
}

impl BatchRecord {
    /// Whether this batch or the previous one inserted the row of this event.
    pub(super) fn inserted(&self, event: &(Input, Id)) -> bool {
        self.rows_by_event
            .get(event)
            .is_some_and(|&i| self.changes.rows[i].new.is_some())
            || self.inserted_by_previous.contains(event)
    }

    /// The state of an event's row after a change: its outcome and counterpart, and
    /// its columns when it is `new` (seen for the first time under its key, so its row
    /// is inserted). A change to a row this batch wrote already updates it in place, so
    /// each row is written once. A `new` event whose id this batch wrote already came
    /// under another payment id (its key knew nothing of it): it gets a row of its own,
    /// whose insert clashes with the first, and the pipeline replays the pair with every
    /// event id checked against storage, which tells the redelivery apart.
    pub(super) fn write_row(
        &mut self,
        kind: EventKind,
        key: &Id,
        event_id: &Id,
        outcome: Outcome,
        counterpart: Option<Id>,
        new: Option<NewEvent>,
    ) {
        let index = self.changes.rows.len();
        match self.rows_by_event.entry((kind.input(), event_id.clone())) {
            Entry::Occupied(written) if new.is_none() => {
                let row = &mut self.changes.rows[*written.get()];
                row.outcome = outcome;
                row.counterpart = counterpart;
                return;
            }
            Entry::Occupied(mut written) => {
                written.insert(index);
            }
            Entry::Vacant(unwritten) => {
                unwritten.insert(index);
            }
        }
        self.changes.rows.push(RowWrite {
            kind,
            event_id: event_id.clone(),
            payment_id: key.clone(),
            outcome,
            counterpart,
            new,
        });
    }

    /// A discrepancy of `kind` opens on the event `event_id` of `input` and, when it is
    /// about a pair, its counterpart of the other input.
    pub(super) fn open(
        &mut self,
        kind: DiscrepancyKind,
        key: &Id,
        input: Input,
        event_id: Id,
        counterpart_event_id: Option<Id>,
    ) {
        let mut event_ids = PerInput::<Option<Id>>::default();
        event_ids[input] = Some(event_id);
        event_ids[input.other()] = counterpart_event_id;
        self.changes.discrepancies.push(DiscrepancyChange::Opened {
            kind,
            payment_id: key.clone(),
            payment_event_id: event_ids.payments,
            settlement_event_id: event_ids.settlements,
        });
    }

    /// The discrepancy `kind` of `subject_event_id` is closed (see
    /// [`DiscrepancyChange::Resolved`]).
    pub(super) fn resolve(
        &mut self,
        kind: DiscrepancyKind,
        subject_event_id: Id,
        resolution: &'static str,
    ) {
        self.changes
            .discrepancies
            .push(DiscrepancyChange::Resolved {
                kind,
                subject_event_id,
                resolution,
            });
    }

    /// The state `key`'s `over_refunded` discrepancy must have after this batch, as
    /// far as its lines so far say: the last one given wins.
    pub(super) fn over_refund(&mut self, key: &Id, state: Option<OverRefund>) {
        self.over_refunds.insert(key.clone(), state);
    }

    /// Ends the batch: hands over its changes and remembers the event ids it inserted.
    fn take(&mut self) -> PairChanges {
        for (payment_id, state) in self.over_refunds.drain() {
            self.changes
                .discrepancies
                .push(DiscrepancyChange::OverRefund { payment_id, state });
        }
        self.inserted_by_previous.clear();
        for ((input, id), i) in self.rows_by_event.drain() {
            if self.changes.rows[i].new.is_some() {
                self.inserted_by_previous.insert((input, id));
            }
        }
        let changes = std::mem::take(&mut self.changes);
        // The next batch is about as large: sized once, its rows are not copied and
        // faulted in again at every doubling.
        self.changes.rows = Vec::with_capacity(changes.rows.len());
        changes
    }
}

impl PairEngine {
    /// Hands over what this batch changed, for the checkpoint.
    pub fn take_changes(&mut self) -> PairChanges {
        self.stored_elsewhere.clear();
        let mut changes = self.record.take();
        changes.high_marks = self.watermark.high_marks();
        changes.generation = self.pins.seal_generation();
        changes
    }
}
