//! Differential property test of the matching engine against a batch oracle.
//!
//! The oracle below is written from the contract (§2, and §6 for refunds and
//! chargebacks) and shares no code with the engine: it sees the whole input at once and
//! says what every accepted event's final outcome and counterpart must be, and which
//! discrepancies must (or may) exist at the end and how they are resolved. It names
//! outcomes and discrepancy kinds by their stored text; the engine's types are used only
//! to drive the engine and to read those names back.
//!
//! The engine is driven the way the pipeline drives it — random interleavings of the
//! two topics, random batch splits, random window caps (so keys are evicted and come
//! back through lookups and sweeps), random idle reports and clock jumps, and crashes
//! that drop the batch in flight and restart from storage — against an in-memory
//! stand-in for the store's lookup/sweep/checkpoint protocol. After draining and moving
//! the watermark past every deadline, both must agree on every event and discrepancy.
//!
//! Where §6 is silent the oracle follows the semantics decided for issue 21:
//! - Matching units per `payment_id`: the capture (first payment, first capture line),
//!   a refund per `refund_id` (first `refund_requested`, first refund line) and a
//!   dispute per `dispute_id` (first chargeback line, first reversal line). A later
//!   event for a side already taken is a duplicate (`duplicate_payment`,
//!   `duplicate_refund`, `duplicate_settlement`) whose counterpart is that side's first
//!   event, and it opens a discrepancy of its outcome's name on itself.
//! - A refund pair takes rules 1–5 with the request as the payment and the line as the
//!   settlement: |−gross − amount| against T, gross − fee = net, late when the line's
//!   `settled_at` is after `requested_at` + D. A mismatch opens a discrepancy on the
//!   pair; `missing_settlement` (after D) and `orphan_settlement` (after O) are resolved,
//!   with the pair's outcome as resolution, by a late counterpart.
//! - A chargeback line is `chargeback_open` and opens a `chargeback` discrepancy on
//!   itself (no payment event); its reversal turns both lines `chargeback_reversed`,
//!   counterparts of each other, and resolves it (`reversed`). A reversal alone is
//!   `pending`, then `orphan_settlement` after O, resolved as `chargeback_reversed` by
//!   a late chargeback. `chargeback_open` has no deadline.
//! - Over-refund: only once the payment's first capture line is accepted. The position
//!   starts at that line's gross and adds the gross of every non-duplicate refund,
//!   chargeback and reversal line of the payment in (`settled_at`, `event_id`) order.
//!   If it is ever below zero there is exactly one `over_refunded` discrepancy, on the
//!   line that first took it below zero, open iff the final position is below zero
//!   (resolution `recovered` otherwise); if it never is, there is none.
//! - Redelivery is per topic: the payments topic's two kinds share one id space.
//!
//! Whether a `missing_settlement` or `orphan_settlement` fired before its counterpart
//! arrived depends on arrival order, so for a pair that is complete in the end such a
//! resolved discrepancy may exist or not; the oracle only allows it where the deadline
//! could have fired at all (the counterpart's topic held an event time past it before
//! the counterpart), and requires its resolution to be the pair's outcome.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use recon_worker::engine::{
    DiscrepancyChange, EngineConfig, MatchConfig, Outcome, PairChanges, PairEngine, StoredEvent,
    SweepRequest, WindowConfig,
};
use recon_worker::event::{Event, EventKind, Input, Line, Micros, Payment, Refund, Settlement};
use recon_worker::money::{Currency, MinorUnits};
use recon_worker::pair::PerInput;

const SEC: Micros = 1_000_000;

/// The type of a generated settlement line, with the id its type requires.
#[derive(Debug, Clone, Copy)]
enum LineKind {
    Capture,
    Refund(u8),
    Chargeback(u8),
    Reversal(u8),
}

#[derive(Debug, Clone)]
enum Msg {
    Payment {
        event: u8,
        key: u8,
        amount: i64,
        currency: u8,
        at: Micros,
    },
    Refund {
        event: u8,
        /// The event id is taken from the payments' ids: the two kinds of the payments
        /// topic share one id space, so this may be a redelivery of a payment.
        payment_id_space: bool,
        key: u8,
        refund: u8,
        amount: i64,
        currency: u8,
        at: Micros,
    },
    Line {
        event: u8,
        key: u8,
        kind: LineKind,
        /// |gross|; the sign is the one §6 gives the line's type.
        magnitude: i64,
        fee: i64,
        net_delta: i64,
        currency: u8,
        at: Micros,
    },
    Poison,
}

impl Msg {
    fn is_v1(&self) -> bool {
        match self {
            Msg::Payment { .. } | Msg::Poison => true,
            Msg::Refund { .. } => false,
            Msg::Line { kind, .. } => matches!(kind, LineKind::Capture),
        }
    }
}

fn currency(i: u8) -> Currency {
    Currency::from_code(["EUR", "USD"][usize::from(i % 2)]).expect("known currency")
}

fn to_event(msg: &Msg) -> Option<Event> {
    match *msg {
        Msg::Payment {
            event,
            key,
            amount,
            currency: c,
            at,
        } => Some(Event::Payment(Payment {
            event_id: format!("p{event}"),
            payment_id: format!("k{key}"),
            merchant_id: "m".into(),
            amount: MinorUnits::new(amount),
            currency: currency(c),
            occurred_at: at,
        })),
        Msg::Refund {
            event,
            payment_id_space,
            key,
            refund,
            amount,
            currency: c,
            at,
        } => Some(Event::Refund(Refund {
            event_id: format!("{}{event}", if payment_id_space { "p" } else { "r" }),
            refund_id: format!("f{refund}"),
            payment_id: format!("k{key}"),
            amount: MinorUnits::new(amount),
            currency: currency(c),
            requested_at: at,
        })),
        Msg::Line {
            event,
            key,
            kind,
            magnitude,
            fee,
            net_delta,
            currency: c,
            at,
        } => {
            let (line, gross) = match kind {
                LineKind::Capture => (Line::Capture, magnitude),
                LineKind::Refund(r) => (
                    Line::Refund {
                        refund_id: format!("f{r}"),
                    },
                    -magnitude,
                ),
                LineKind::Chargeback(d) => (
                    Line::Chargeback {
                        dispute_id: format!("d{d}"),
                    },
                    -magnitude,
                ),
                LineKind::Reversal(d) => (
                    Line::ChargebackReversal {
                        dispute_id: format!("d{d}"),
                    },
                    magnitude,
                ),
            };
            Some(Event::Settlement(Settlement {
                event_id: format!("s{event}"),
                settlement_id: "batch".into(),
                payment_id: format!("k{key}"),
                gross: MinorUnits::new(gross),
                fee: MinorUnits::new(fee),
                net: gross - fee + net_delta,
                currency: currency(c),
                settled_at: at,
                line,
                payout_id: None,
            }))
        }
        Msg::Poison => None,
    }
}

// ---------------------------------------------------------------- the oracle

/// Final outcome name and counterpart of every accepted event, by (kind, event id).
type Truth = BTreeMap<(EventKind, String), (&'static str, Option<String>)>;

/// A discrepancy as compared: kind name, payment id, payment event, settlement event.
type DiscrepancyKey = (&'static str, String, Option<String>, Option<String>);

/// The discrepancies at the end: `None` while open, else the resolution.
type Discrepancies = BTreeMap<DiscrepancyKey, Option<&'static str>>;

/// What the oracle says of one discrepancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// It must exist, open (`None`) or with this resolution.
    Required(Option<&'static str>),
    /// A fired deadline later resolved: it may exist, and if it does it is resolved so.
    Allowed(&'static str),
}

/// An accepted event and where its topic stood when it was read.
struct Seen {
    event: Event,
    /// Its place in its topic.
    position: usize,
    /// The largest event time of the messages before it in its topic: the engine's
    /// watermark cannot have passed this before the event was read.
    topic_high_before: Option<Micros>,
}

impl Seen {
    fn id(&self) -> String {
        self.event.event_id().to_owned()
    }

    fn key(&self) -> String {
        self.event.payment_id().to_owned()
    }

    fn time(&self) -> Micros {
        self.event.event_time()
    }

    /// (amount compared with the other side, fee, gross, net, currency) of the event.
    /// A request's amount; a line's gross in the request's direction (a refund line's
    /// gross is negative).
    fn terms(&self) -> (i64, i64, i64, i64, Currency) {
        match &self.event {
            Event::Payment(p) => (p.amount.get(), 0, 0, 0, p.currency),
            Event::Refund(r) => (r.amount.get(), 0, 0, 0, r.currency),
            Event::Settlement(s) => {
                let gross = s.gross.get();
                let toward_request = if matches!(s.line, Line::Refund { .. }) {
                    -gross
                } else {
                    gross
                };
                (toward_request, s.fee.get(), gross, s.net, s.currency)
            }
        }
    }
}

/// The events of a topic that are accepted: the first of each event id, in order.
fn accepted(stream: &[Msg]) -> Vec<Seen> {
    let mut ids = HashSet::new();
    let mut high: Option<Micros> = None;
    let mut out = Vec::new();
    for (position, msg) in stream.iter().enumerate() {
        let Some(event) = to_event(msg) else {
            continue;
        };
        let time = event.event_time();
        if ids.insert(event.event_id().to_owned()) {
            out.push(Seen {
                event,
                position,
                topic_high_before: high,
            });
        }
        high = high.max(Some(time));
    }
    out
}

/// A matching unit of a payment id (contract §6 as decided for issue 21).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Unit {
    Capture(String),
    Refund(String, String),
    Dispute(String, String),
}

/// Which side of its unit an event is: 0 is the payment, the refund request or the
/// chargeback line; 1 the capture line, the refund line or the reversal line.
fn unit_of(event: &Event) -> (Unit, u8) {
    let key = event.payment_id().to_owned();
    match event {
        Event::Payment(_) => (Unit::Capture(key), 0),
        Event::Refund(r) => (Unit::Refund(key, r.refund_id.clone()), 0),
        Event::Settlement(s) => match &s.line {
            Line::Capture => (Unit::Capture(key), 1),
            Line::Refund { refund_id } => (Unit::Refund(key, refund_id.clone()), 1),
            Line::Chargeback { dispute_id } => (Unit::Dispute(key, dispute_id.clone()), 0),
            Line::ChargebackReversal { dispute_id } => (Unit::Dispute(key, dispute_id.clone()), 1),
        },
    }
}

/// Rules 1–5 of contract §2 (for a refund pair as §6 restates them), first that applies.
fn rules(request: &Seen, line: &Seen, d: Micros, t: i64) -> &'static str {
    let (amount, _, _, _, request_currency) = request.terms();
    let (line_amount, fee, gross, net, line_currency) = line.terms();
    if line_currency != request_currency {
        "currency_mismatch"
    } else if (line_amount - amount).abs() > t {
        "amount_mismatch"
    } else if gross - fee != net {
        "fee_mismatch"
    } else if line.time() > request.time() + d {
        "matched_late"
    } else {
        "matched"
    }
}

fn is_mismatch(outcome: &str) -> bool {
    matches!(
        outcome,
        "currency_mismatch" | "amount_mismatch" | "fee_mismatch"
    )
}

/// Final outcomes and discrepancies from the whole input, per contract §2 and §6.
fn oracle(
    payments: &[Msg],
    settlements: &[Msg],
    d: Micros,
    o: Micros,
    t: i64,
) -> (Truth, BTreeMap<DiscrepancyKey, Expect>) {
    let mut truth = Truth::new();
    let mut discrepancies = BTreeMap::new();
    let payments = accepted(payments);
    let settlements = accepted(settlements);

    // Each side of each unit, its events in topic order.
    let mut sides: BTreeMap<(Unit, u8), Vec<&Seen>> = BTreeMap::new();
    for seen in payments.iter().chain(&settlements) {
        sides.entry(unit_of(&seen.event)).or_default().push(seen);
    }

    // Duplicates: every event of a side but its first.
    for events in sides.values() {
        let first = events[0];
        for dup in &events[1..] {
            let (name, on_payment_side) = match dup.event.kind() {
                EventKind::Payment => ("duplicate_payment", true),
                EventKind::Refund => ("duplicate_refund", true),
                EventKind::Settlement => ("duplicate_settlement", false),
            };
            truth.insert((dup.event.kind(), dup.id()), (name, Some(first.id())));
            let (pe, se) = if on_payment_side {
                (Some(dup.id()), None)
            } else {
                (None, Some(dup.id()))
            };
            discrepancies.insert((name, dup.key(), pe, se), Expect::Required(None));
        }
    }

    let first = |unit: &Unit, side: u8| sides.get(&(unit.clone(), side)).map(|events| events[0]);
    let units: Vec<Unit> = {
        let mut units: Vec<Unit> = sides.keys().map(|(u, _)| u.clone()).collect();
        units.dedup();
        units
    };
    for unit in &units {
        let (a, b) = (first(unit, 0), first(unit, 1));
        match unit {
            Unit::Capture(_) | Unit::Refund(..) => match (a, b) {
                (Some(request), Some(line)) => {
                    let outcome = rules(request, line, d, t);
                    let key = request.key();
                    truth.insert(
                        (request.event.kind(), request.id()),
                        (outcome, Some(line.id())),
                    );
                    truth.insert(
                        (EventKind::Settlement, line.id()),
                        (outcome, Some(request.id())),
                    );
                    if is_mismatch(outcome) {
                        discrepancies.insert(
                            (outcome, key.clone(), Some(request.id()), Some(line.id())),
                            Expect::Required(None),
                        );
                    }
                    // The request's deadline can only have fired before the line was
                    // read if the settlements topic had passed it by then, and the
                    // other way round.
                    if line
                        .topic_high_before
                        .is_some_and(|h| h > request.time() + d)
                    {
                        discrepancies.insert(
                            ("missing_settlement", key.clone(), Some(request.id()), None),
                            Expect::Allowed(outcome),
                        );
                    }
                    if request
                        .topic_high_before
                        .is_some_and(|h| h > line.time() + o)
                    {
                        discrepancies.insert(
                            ("orphan_settlement", key, None, Some(line.id())),
                            Expect::Allowed(outcome),
                        );
                    }
                }
                (Some(request), None) => {
                    truth.insert(
                        (request.event.kind(), request.id()),
                        ("missing_settlement", None),
                    );
                    discrepancies.insert(
                        (
                            "missing_settlement",
                            request.key(),
                            Some(request.id()),
                            None,
                        ),
                        Expect::Required(None),
                    );
                }
                (None, Some(line)) => {
                    truth.insert(
                        (EventKind::Settlement, line.id()),
                        ("orphan_settlement", None),
                    );
                    discrepancies.insert(
                        ("orphan_settlement", line.key(), None, Some(line.id())),
                        Expect::Required(None),
                    );
                }
                (None, None) => {}
            },
            Unit::Dispute(..) => match (a, b) {
                (Some(chargeback), Some(reversal)) => {
                    truth.insert(
                        (EventKind::Settlement, chargeback.id()),
                        ("chargeback_reversed", Some(reversal.id())),
                    );
                    truth.insert(
                        (EventKind::Settlement, reversal.id()),
                        ("chargeback_reversed", Some(chargeback.id())),
                    );
                    discrepancies.insert(
                        ("chargeback", chargeback.key(), None, Some(chargeback.id())),
                        Expect::Required(Some("reversed")),
                    );
                    // Both lines are on the settlements topic: the reversal waited only
                    // if it was read first, and its deadline fired only if that topic
                    // passed it before the chargeback.
                    if reversal.position < chargeback.position
                        && chargeback
                            .topic_high_before
                            .is_some_and(|h| h > reversal.time() + o)
                    {
                        discrepancies.insert(
                            (
                                "orphan_settlement",
                                reversal.key(),
                                None,
                                Some(reversal.id()),
                            ),
                            Expect::Allowed("chargeback_reversed"),
                        );
                    }
                }
                (Some(chargeback), None) => {
                    truth.insert(
                        (EventKind::Settlement, chargeback.id()),
                        ("chargeback_open", None),
                    );
                    discrepancies.insert(
                        ("chargeback", chargeback.key(), None, Some(chargeback.id())),
                        Expect::Required(None),
                    );
                }
                (None, Some(reversal)) => {
                    truth.insert(
                        (EventKind::Settlement, reversal.id()),
                        ("orphan_settlement", None),
                    );
                    discrepancies.insert(
                        (
                            "orphan_settlement",
                            reversal.key(),
                            None,
                            Some(reversal.id()),
                        ),
                        Expect::Required(None),
                    );
                }
                (None, None) => {}
            },
        }
    }

    // Over-refund, per payment id that has a capture line.
    for unit in &units {
        let Unit::Capture(key) = unit else {
            continue;
        };
        let Some(capture) = first(unit, 1) else {
            continue;
        };
        let mut lines: Vec<&Seen> = units
            .iter()
            .filter(|u| match u {
                Unit::Refund(k, _) | Unit::Dispute(k, _) => k == key,
                Unit::Capture(_) => false,
            })
            .flat_map(|u| [first(u, 0), first(u, 1)])
            .flatten()
            .filter(|seen| seen.event.kind() == EventKind::Settlement)
            .collect();
        lines.sort_by_key(|seen| (seen.time(), seen.id()));
        let (_, _, capture_gross, _, _) = capture.terms();
        let mut position = capture_gross;
        let mut first_below = None;
        for line in lines {
            let (_, _, gross, _, _) = line.terms();
            position += gross;
            if position < 0 && first_below.is_none() {
                first_below = Some(line.id());
            }
        }
        if let Some(line) = first_below {
            let resolution = (position >= 0).then_some("recovered");
            discrepancies.insert(
                ("over_refunded", key.clone(), None, Some(line)),
                Expect::Required(resolution),
            );
        }
    }
    (truth, discrepancies)
}

// ------------------------------------------------- the store, as the engine sees it

#[derive(Debug, Clone)]
struct Row {
    payment_id: String,
    outcome: Outcome,
    counterpart: Option<String>,
    time: Micros,
    amount: i64,
    fee: i64,
    net: i64,
    currency: Currency,
    line: Line,
}

#[derive(Debug, Clone)]
struct DiscrepancyRow {
    kind: &'static str,
    payment_id: String,
    payment_event_id: Option<String>,
    settlement_event_id: Option<String>,
    resolution: Option<&'static str>,
}

#[derive(Default)]
struct FakeStore {
    /// Committed rows: all that lookups, probes and sweeps see.
    rows: BTreeMap<(EventKind, String), Row>,
    discrepancies: Vec<DiscrepancyRow>,
    /// What the store was asked to do that it cannot: a resolution of no open row.
    anomalies: Vec<String>,
    /// The committed high marks and position in the interleaving: where a restart
    /// resumes.
    high_marks: PerInput<Option<Micros>>,
    committed_cursor: usize,
    /// The previous batch's changes, and where it ended in the interleaving. The
    /// pipeline looks up, applies and sweeps a batch while the previous one is still
    /// being committed.
    in_flight: Option<(PairChanges, usize)>,
}

fn is_duplicate(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::DuplicatePayment | Outcome::DuplicateSettlement | Outcome::DuplicateRefund
    )
}

impl FakeStore {
    /// A key's stored events but its duplicates, as the store's lookup reads them.
    fn lookup(&self, keys: &[String]) -> Vec<StoredEvent> {
        self.rows
            .iter()
            .filter(|(_, row)| keys.contains(&row.payment_id) && !is_duplicate(row.outcome))
            .map(|((kind, id), row)| StoredEvent {
                kind: *kind,
                event_id: id.clone(),
                payment_id: row.payment_id.clone(),
                outcome: row.outcome,
                event_time: row.time,
                amount: row.amount,
                fee: row.fee,
                net: row.net,
                currency: row.currency,
                line: row.line.clone(),
            })
            .collect()
    }

    /// A stored row of this topic with this event id, if any.
    fn stored(&self, input: Input, event_id: &str) -> Option<&Row> {
        EventKind::ALL
            .into_iter()
            .filter(|kind| kind.input() == input)
            .find_map(|kind| self.rows.get(&(kind, event_id.to_owned())))
    }

    /// Pending rows past their deadline, oldest first, at most `limit` per topic:
    /// payments and refund requests due by D, settlement lines by O.
    fn due(&self, request: SweepRequest, limit: usize) -> (Vec<String>, bool) {
        let mut complete = true;
        let mut keys = Vec::new();
        for (input, before) in [
            (Input::Payments, request.payments_before),
            (Input::Settlements, request.settlements_before),
        ] {
            let mut due: Vec<&Row> = self
                .rows
                .iter()
                .filter(|((kind, _), r)| {
                    kind.input() == input && r.outcome == Outcome::Pending && r.time < before
                })
                .map(|(_, r)| r)
                .collect();
            due.sort_by_key(|r| r.time);
            if due.len() >= limit {
                complete = false;
            }
            keys.extend(due.into_iter().take(limit).map(|r| r.payment_id.clone()));
        }
        keys.sort();
        keys.dedup();
        (keys, complete)
    }

    fn apply_discrepancy(&mut self, change: DiscrepancyChange) {
        match change {
            DiscrepancyChange::Opened {
                kind,
                payment_id,
                payment_event_id,
                settlement_event_id,
            } => {
                let (kind, pe, se) = (
                    kind.as_str(),
                    payment_event_id.map(|id| id.to_string()),
                    settlement_event_id.map(|id| id.to_string()),
                );
                let exists = self.discrepancies.iter().any(|d| {
                    d.kind == kind && d.payment_event_id == pe && d.settlement_event_id == se
                });
                if !exists {
                    self.discrepancies.push(DiscrepancyRow {
                        kind,
                        payment_id: payment_id.to_string(),
                        payment_event_id: pe,
                        settlement_event_id: se,
                        resolution: None,
                    });
                }
            }
            DiscrepancyChange::Resolved {
                kind,
                subject_event_id,
                resolution,
            } => {
                let kind = kind.as_str();
                let subject = Some(subject_event_id.to_string());
                let open = self.discrepancies.iter_mut().find(|d| {
                    d.kind == kind
                        && d.resolution.is_none()
                        && if kind == "missing_settlement" {
                            d.payment_event_id == subject
                        } else {
                            d.settlement_event_id == subject
                        }
                });
                match open {
                    Some(d) => d.resolution = Some(resolution),
                    None => self.anomalies.push(format!(
                        "resolved {kind} of {subject:?} as {resolution}: no open row"
                    )),
                }
            }
            DiscrepancyChange::OverRefund { payment_id, state } => {
                let payment_id = payment_id.to_string();
                let at = self
                    .discrepancies
                    .iter()
                    .position(|d| d.kind == "over_refunded" && d.payment_id == payment_id);
                match (state, at) {
                    (None, Some(i)) => {
                        self.discrepancies.remove(i);
                    }
                    (None, None) => {}
                    (Some(state), at) => {
                        let row = DiscrepancyRow {
                            kind: "over_refunded",
                            payment_id,
                            payment_event_id: None,
                            settlement_event_id: Some(state.first_below.to_string()),
                            resolution: (!state.open).then_some("recovered"),
                        };
                        match at {
                            Some(i) => self.discrepancies[i] = row,
                            None => self.discrepancies.push(row),
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Deliver the next `n` messages of the interleaving as one batch.
    Batch { n: usize },
    /// A progress report: which inputs are caught up.
    Progress { payments: bool, settlements: bool },
    /// The wall clock moves on.
    Clock { advance: Micros },
    /// The worker stops (after committing the batch in flight) or crashes (losing it),
    /// and a new engine resumes from what storage holds.
    Restart { commit_in_flight: bool },
}

/// Whether the pipeline asks storage about this event's id before applying it.
fn needs_event_id_check(engine: &PairEngine, event: &Event) -> bool {
    engine.needs_event_id_check(event)
}

fn run_batch(
    engine: &mut PairEngine,
    store: &mut FakeStore,
    batch: &[(Input, i64, Msg)],
    end_cursor: usize,
    now: Micros,
    sweep_limit: usize,
) {
    // As the pipeline runs it: eviction, lookups, applying and sweeps overlap the
    // previous batch's commit, which is acknowledged just before this batch's starts.
    engine.evict();
    let events: Vec<Event> = batch.iter().filter_map(|(_, _, m)| to_event(m)).collect();
    let keys: Vec<String> = {
        let mut keys: Vec<String> = events
            .iter()
            .map(|e| e.payment_id().to_owned())
            .filter(|k| !engine.is_resident(k))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    };
    // Which event ids are checked against storage, as the pipeline picks them: those
    // the engine asks about (would-be duplicates of a key it holds, before the lookup
    // for resident keys and after it for the others), and those stored under another
    // payment id, which the pipeline learns of when their insert clashes and it
    // replays the pair checking every id (this stand-in skips the replay).
    let mut checked: Vec<(Input, String)> = events
        .iter()
        .filter(|e| engine.is_resident(e.payment_id()) && needs_event_id_check(engine, e))
        .map(|e| (e.input(), e.event_id().to_owned()))
        .collect();
    let rows = store.lookup(&keys);
    engine.load(keys.clone(), rows);
    checked.extend(
        events
            .iter()
            .filter(|e| keys.iter().any(|k| k == e.payment_id()) && needs_event_id_check(engine, e))
            .map(|e| (e.input(), e.event_id().to_owned())),
    );
    // An id stored on its topic that the key does not hold (under another payment id,
    // under another kind, or as a duplicate of another unit of the key) makes the
    // batch's insert clash, and the pipeline replays the pair with every id checked:
    // checking every stored id up front gives the replay's result.
    checked.extend(
        events
            .iter()
            .filter(|e| store.stored(e.input(), e.event_id()).is_some())
            .map(|e| (e.input(), e.event_id().to_owned())),
    );
    let stored: Vec<(Input, String)> = checked
        .into_iter()
        .filter(|(input, id)| store.stored(*input, id).is_some())
        .collect();
    engine.load_stored_event_ids(stored);
    for (input, offset, msg) in batch {
        match to_event(msg) {
            Some(event) => {
                engine.apply(event, *offset);
            }
            None => engine.observe_activity(*input),
        }
    }
    match engine.advance(now) {
        Some(request) => {
            let (due, complete) = store.due(request, sweep_limit);
            let missing: Vec<String> = due
                .iter()
                .filter(|k| !engine.is_resident(k))
                .cloned()
                .collect();
            let rows = store.lookup(&missing);
            engine.fire_deadlines(due, rows, complete);
        }
        None => engine.fire_deadlines(Vec::new(), Vec::new(), false),
    }
    let changes = engine.take_changes();
    settle(engine, store);
    store.in_flight = Some((changes, end_cursor));
}

/// The in-flight batch commits and is acknowledged.
fn settle(engine: &mut PairEngine, store: &mut FakeStore) {
    let Some((changes, end_cursor)) = store.in_flight.take() else {
        return;
    };
    engine.checkpointed(changes.generation);
    for row in changes.rows {
        let key = (row.kind, row.event_id.to_string());
        match row.new {
            Some(new) => {
                // The store's key is unique per topic (event id, topic's kind).
                assert!(
                    store.stored(key.0.input(), &key.1).is_none(),
                    "inserted twice: {key:?}"
                );
                store.rows.insert(
                    key,
                    Row {
                        payment_id: row.payment_id.to_string(),
                        outcome: row.outcome,
                        counterpart: row.counterpart.map(|c| c.to_string()),
                        time: new.event_time,
                        amount: new.amount,
                        fee: new.fee.unwrap_or(0),
                        net: new.net.unwrap_or(0),
                        currency: new.currency,
                        line: new.line,
                    },
                );
            }
            None => {
                let stored = store
                    .rows
                    .get_mut(&key)
                    .unwrap_or_else(|| panic!("update of a missing row {key:?}"));
                stored.outcome = row.outcome;
                stored.counterpart = row.counterpart.map(|c| c.to_string());
            }
        }
    }
    for change in changes.discrepancies {
        store.apply_discrepancy(change);
    }
    store.high_marks = changes.high_marks;
    store.committed_cursor = end_cursor;
}

fn at_strategy() -> impl Strategy<Value = Micros> {
    prop_oneof![
        3 => (0i64..200).prop_map(|s| 1_000 * SEC + s * SEC),
        // Coarse times: ties in settled_at, ordered by event id.
        1 => (0i64..20).prop_map(|s| 1_000 * SEC + s * 10 * SEC),
    ]
}

fn line_kind_strategy() -> impl Strategy<Value = LineKind> {
    prop_oneof![
        8 => Just(LineKind::Capture),
        5 => (0u8..3).prop_map(LineKind::Refund),
        3 => (0u8..2).prop_map(LineKind::Chargeback),
        3 => (0u8..2).prop_map(LineKind::Reversal),
    ]
}

fn msg_strategy(keys: u8, events: u8) -> impl Strategy<Value = (bool, Msg)> {
    let currency = (0u8..8).prop_map(|c| u8::from(c == 0));
    prop_oneof![
        8 => (0..events, 0..keys, 1i64..6, currency.clone(), at_strategy()).prop_map(|(event, key, amount, currency, at)| (true, Msg::Payment {
            event, key, amount, currency, at
        })),
        5 => (0..events, prop::bool::weighted(0.05), 0..keys, 0u8..3, 1i64..5, currency.clone(), at_strategy()).prop_map(
            |(event, payment_id_space, key, refund, amount, currency, at)| (true, Msg::Refund {
                event, payment_id_space, key, refund, amount, currency, at
            })),
        19 => (0..2 * events, 0..keys, line_kind_strategy(), 1i64..7, -2i64..3, 0i64..6, currency, at_strategy()).prop_map(
            |(event, key, kind, magnitude, fee, nd, currency, at)| {
                // A capture line's fee is 0 or more (contract §1); others may give one back.
                let fee = if matches!(kind, LineKind::Capture) { fee.abs() } else { fee };
                (false, Msg::Line {
                    event, key, kind, magnitude, fee, net_delta: i64::from(nd == 0), currency, at
                })
            }),
        1 => any::<bool>().prop_map(|payments| (payments, Msg::Poison)),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => (1usize..8).prop_map(|n| Step::Batch { n }),
        4 => (any::<bool>(), any::<bool>()).prop_map(|(payments, settlements)| Step::Progress { payments, settlements }),
        4 => (0i64..120).prop_map(|s| Step::Clock { advance: s * SEC }),
        1 => any::<bool>().prop_map(|commit_in_flight| Step::Restart { commit_in_flight }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("ORACLE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000),
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_agrees_with_the_batch_oracle(
        messages in prop::collection::vec(msg_strategy(5, 10), 0..48),
        // Some streams hold version-1 messages only: they mean what they meant.
        v1_only in prop::bool::weighted(0.15),
        redeliveries in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..6),
        steps in prop::collection::vec(step_strategy(), 1..40),
        interleave in prop::collection::vec(any::<bool>(), 80),
        deadline_s in 0i64..150,
        orphan_s in 0i64..150,
        tolerance in 0i64..3,
        idle_s in 1i64..60,
        max_items in 1usize..12,
        sweep_limit in 1usize..4,
    ) {
        // Split into the two topics, then add redeliveries of earlier messages.
        let (mut payments, mut settlements): (Vec<Msg>, Vec<Msg>) = (Vec::new(), Vec::new());
        for (is_payment, msg) in messages {
            if v1_only && !msg.is_v1() {
                continue;
            }
            if is_payment { payments.push(msg) } else { settlements.push(msg) }
        }
        for (which, at) in redeliveries {
            let stream = if which.index(2) == 0 { &mut payments } else { &mut settlements };
            if !stream.is_empty() {
                let original = stream[at.index(stream.len())].clone();
                stream.push(original);
            }
        }
        let config = EngineConfig::new(
            &MatchConfig {
                settlement_deadline: std::time::Duration::from_secs(deadline_s as u64),
                orphan_timeout: std::time::Duration::from_secs(orphan_s as u64),
                amount_tolerance_minor: tolerance,
                idle_timeout: std::time::Duration::from_secs(idle_s as u64),
            },
            WindowConfig { max_items, max_bytes: usize::MAX / 2 },
        );
        let (truth, expected) = oracle(&payments, &settlements, deadline_s * SEC, orphan_s * SEC, tolerance);

        // One random interleaving that keeps each topic's order.
        let mut order: Vec<(Input, i64, Msg)> = Vec::new();
        let (mut pi, mut si) = (0usize, 0usize);
        let mut coin = interleave.iter().cycle();
        while pi < payments.len() || si < settlements.len() {
            let take_payment = si >= settlements.len() || (pi < payments.len() && *coin.next().unwrap_or(&true));
            if take_payment {
                order.push((Input::Payments, pi as i64, payments[pi].clone()));
                pi += 1;
            } else {
                order.push((Input::Settlements, si as i64, settlements[si].clone()));
                si += 1;
            }
        }

        let mut engine = PairEngine::new(config, PerInput::default());
        let mut store = FakeStore::default();
        let mut now: Micros = 1_000 * SEC;
        let mut cursor = 0usize;
        for step in steps {
            match step {
                Step::Batch { n } => {
                    let end = (cursor + n).min(order.len());
                    run_batch(&mut engine, &mut store, &order[cursor..end], end, now, sweep_limit);
                    cursor = end;
                }
                Step::Progress { payments, settlements } => {
                    // Only what is true may be reported: an input with unread messages is not caught up.
                    let left = |input| order[cursor..].iter().any(|(i, _, _)| *i == input);
                    engine.observe_caught_up(Input::Payments, payments && !left(Input::Payments), now);
                    engine.observe_caught_up(Input::Settlements, settlements && !left(Input::Settlements), now);
                    run_batch(&mut engine, &mut store, &[], cursor, now, sweep_limit);
                }
                Step::Clock { advance } => now += advance,
                Step::Restart { commit_in_flight } => {
                    if commit_in_flight {
                        settle(&mut engine, &mut store);
                    }
                    store.in_flight = None;
                    engine = PairEngine::new(config, store.high_marks);
                    cursor = store.committed_cursor;
                }
            }
        }
        // Drain the rest, then idle both inputs until the watermark passes every deadline.
        while cursor < order.len() {
            let end = (cursor + 5).min(order.len());
            run_batch(&mut engine, &mut store, &order[cursor..end], end, now, sweep_limit);
            cursor = end;
        }
        engine.observe_caught_up(Input::Payments, true, now);
        engine.observe_caught_up(Input::Settlements, true, now);
        now += 10_000 * SEC;
        for _ in 0..200 {
            run_batch(&mut engine, &mut store, &[], cursor, now, sweep_limit);
            if !store.rows.values().any(|r| r.outcome == Outcome::Pending) {
                break;
            }
        }
        settle(&mut engine, &mut store);

        let actual: Truth = store
            .rows
            .iter()
            .map(|((kind, id), row)| ((*kind, id.clone()), (row.outcome.as_str(), row.counterpart.clone())))
            .collect();
        prop_assert_eq!(actual, truth);

        prop_assert!(store.anomalies.is_empty(), "store anomalies: {:?}", store.anomalies);
        let mut found = Discrepancies::new();
        for d in &store.discrepancies {
            let key = (d.kind, d.payment_id.clone(), d.payment_event_id.clone(), d.settlement_event_id.clone());
            prop_assert!(found.insert(key.clone(), d.resolution).is_none(), "two rows {:?}", key);
        }
        // What the oracle says of the rows found: every required one, and the allowed
        // ones that exist.
        let wanted: Discrepancies = expected
            .iter()
            .filter_map(|(key, expect)| match *expect {
                Expect::Required(resolution) => Some((key.clone(), resolution)),
                Expect::Allowed(resolution) => found.contains_key(key).then(|| (key.clone(), Some(resolution))),
            })
            .collect();
        prop_assert_eq!(found, wanted);
    }
}
