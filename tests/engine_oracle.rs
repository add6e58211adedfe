//! Differential property test of the matching engine against a batch oracle.
//!
//! The oracle below is written from contract §2 alone and shares no code with the
//! engine: it sees the whole input at once and says what every accepted event's final
//! outcome must be. The engine is driven the way the pipeline drives it — random
//! interleavings of the two topics, random batch splits, random window caps (so keys
//! are evicted and come back through lookups and sweeps), random idle reports and
//! clock jumps — against an in-memory stand-in for the store's lookup/sweep/checkpoint
//! protocol. After draining and moving the watermark past every deadline, both must
//! agree on every event.

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use recon_worker::engine::{
    EngineConfig, Outcome, PairChanges, PairEngine, StoredEvent, SweepRequest,
};
use recon_worker::engine::{MatchConfig, WindowConfig};
use recon_worker::event::{Event, Input, Micros, Payment, Settlement};
use recon_worker::money::{Currency, MinorUnits};
use recon_worker::pair::PerInput;

const SEC: Micros = 1_000_000;

#[derive(Debug, Clone)]
enum Msg {
    Payment {
        event: u8,
        key: u8,
        amount: i64,
        currency: u8,
        at: Micros,
    },
    Settlement {
        event: u8,
        key: u8,
        gross: i64,
        fee: i64,
        net_delta: i64,
        currency: u8,
        at: Micros,
    },
    Poison,
}

fn currency(i: u8) -> Currency {
    Currency::from_code(["EUR", "USD"][usize::from(i % 2)]).expect("known")
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
        Msg::Settlement {
            event,
            key,
            gross,
            fee,
            net_delta,
            currency: c,
            at,
        } => Some(Event::Settlement(Settlement {
            event_id: format!("s{event}"),
            settlement_id: "batch".into(),
            payment_id: format!("k{key}"),
            gross: MinorUnits::new(gross),
            fee: MinorUnits::new(fee),
            net: gross - fee + net_delta,
            currency: currency(c),
            settled_at: at,
        })),
        Msg::Poison => None,
    }
}

// ---------------------------------------------------------------- the oracle

type Truth = BTreeMap<(Input, String), (Outcome, Option<String>)>;

/// Final outcomes from the whole input, per contract §2, written independently.
fn oracle(payments: &[Msg], settlements: &[Msg], d: Micros, t: i64) -> Truth {
    struct P {
        id: String,
        key: String,
        amount: i64,
        cur: Currency,
        at: Micros,
    }
    struct S {
        id: String,
        key: String,
        gross: i64,
        fee: i64,
        net: i64,
        cur: Currency,
        at: Micros,
    }
    let mut truth = Truth::new();
    let mut first_payment: HashMap<String, P> = HashMap::new();
    let mut seen = HashSet::new();
    for msg in payments {
        let Some(Event::Payment(p)) = to_event(msg) else {
            continue;
        };
        if !seen.insert(p.event_id.clone()) {
            continue; // redelivery
        }
        if let Some(first) = first_payment.get(&p.payment_id) {
            truth.insert(
                (Input::Payments, p.event_id),
                (Outcome::DuplicatePayment, Some(first.id.clone())),
            );
        } else {
            first_payment.insert(
                p.payment_id.clone(),
                P {
                    id: p.event_id,
                    key: p.payment_id,
                    amount: p.amount.get(),
                    cur: p.currency,
                    at: p.occurred_at,
                },
            );
        }
    }
    let mut first_settlement: HashMap<String, S> = HashMap::new();
    let mut seen = HashSet::new();
    for msg in settlements {
        let Some(Event::Settlement(s)) = to_event(msg) else {
            continue;
        };
        if !seen.insert(s.event_id.clone()) {
            continue;
        }
        if let Some(first) = first_settlement.get(&s.payment_id) {
            truth.insert(
                (Input::Settlements, s.event_id),
                (Outcome::DuplicateSettlement, Some(first.id.clone())),
            );
        } else {
            first_settlement.insert(
                s.payment_id.clone(),
                S {
                    id: s.event_id,
                    key: s.payment_id,
                    gross: s.gross.get(),
                    fee: s.fee.get(),
                    net: s.net,
                    cur: s.currency,
                    at: s.settled_at,
                },
            );
        }
    }
    for p in first_payment.values() {
        match first_settlement.get(&p.key) {
            None => {
                truth.insert(
                    (Input::Payments, p.id.clone()),
                    (Outcome::MissingSettlement, None),
                );
            }
            Some(s) => {
                let outcome = if s.cur != p.cur {
                    Outcome::CurrencyMismatch
                } else if (s.gross - p.amount).abs() > t {
                    Outcome::AmountMismatch
                } else if s.gross - s.fee != s.net {
                    Outcome::FeeMismatch
                } else if s.at > p.at + d {
                    Outcome::MatchedLate
                } else {
                    Outcome::Matched
                };
                truth.insert(
                    (Input::Payments, p.id.clone()),
                    (outcome, Some(s.id.clone())),
                );
                truth.insert(
                    (Input::Settlements, s.id.clone()),
                    (outcome, Some(p.id.clone())),
                );
            }
        }
    }
    for s in first_settlement.values() {
        if !first_payment.contains_key(&s.key) {
            truth.insert(
                (Input::Settlements, s.id.clone()),
                (Outcome::OrphanSettlement, None),
            );
        }
    }
    truth
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
}

#[derive(Default)]
struct FakeStore {
    /// Committed rows: all that lookups, probes and sweeps see.
    rows: BTreeMap<(Input, String), Row>,
    /// The previous batch's changes. The pipeline looks up, applies and sweeps a batch
    /// while the previous one is still being committed.
    in_flight: Option<PairChanges>,
}

impl FakeStore {
    /// A key's stored events but its duplicates, as the store's lookup reads them.
    fn lookup(&self, keys: &[String]) -> Vec<StoredEvent> {
        self.rows
            .iter()
            .filter(|(_, row)| keys.contains(&row.payment_id))
            .filter(|(_, row)| {
                !matches!(
                    row.outcome,
                    Outcome::DuplicatePayment | Outcome::DuplicateSettlement
                )
            })
            .map(|((input, id), row)| StoredEvent {
                input: *input,
                event_id: id.clone(),
                payment_id: row.payment_id.clone(),
                outcome: row.outcome,
                event_time: row.time,
                amount: row.amount,
                fee: row.fee,
                net: row.net,
                currency: row.currency,
            })
            .collect()
    }

    /// Pending rows past their deadline, oldest first, at most `limit` per kind.
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
                .filter(|((i, _), r)| {
                    *i == input && r.outcome == Outcome::Pending && r.time < before
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
}

#[derive(Debug, Clone)]
enum Step {
    /// Deliver the next `n` messages of the interleaving as one batch.
    Batch { n: usize },
    /// A progress report: which inputs are caught up.
    Progress { payments: bool, settlements: bool },
    /// The wall clock moves on.
    Clock { advance: Micros },
}

fn run_batch(
    engine: &mut PairEngine,
    store: &mut FakeStore,
    batch: &[(Input, i64, Msg)],
    now: Micros,
    sweep_limit: usize,
) {
    // As the pipeline runs it: eviction, lookups, applying and sweeps overlap the
    // previous batch's commit, which is acknowledged just before this batch's starts.
    engine.evict();
    let keys: Vec<String> = {
        let mut keys: Vec<String> = batch
            .iter()
            .filter_map(|(_, _, m)| to_event(m))
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
    let events: Vec<Event> = batch.iter().filter_map(|(_, _, m)| to_event(m)).collect();
    let check = |engine: &PairEngine, e: &Event| {
        engine.needs_event_id_check(e.input(), e.payment_id(), e.event_id())
    };
    let mut checked: Vec<(Input, String)> = events
        .iter()
        .filter(|e| engine.is_resident(e.payment_id()) && check(engine, e))
        .map(|e| (e.input(), e.event_id().to_owned()))
        .collect();
    let rows = store.lookup(&keys);
    engine.load(keys.clone(), rows);
    checked.extend(
        events
            .iter()
            .filter(|e| keys.iter().any(|k| k == e.payment_id()) && check(engine, e))
            .map(|e| (e.input(), e.event_id().to_owned())),
    );
    checked.extend(
        events
            .iter()
            .filter(|e| {
                store
                    .rows
                    .get(&(e.input(), e.event_id().to_owned()))
                    .is_some_and(|row| row.payment_id != e.payment_id())
            })
            .map(|e| (e.input(), e.event_id().to_owned())),
    );
    let stored: Vec<(Input, String)> = checked
        .into_iter()
        .filter(|k| store.rows.contains_key(k))
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
    store.in_flight = Some(changes);
}

/// The in-flight batch commits and is acknowledged.
fn settle(engine: &mut PairEngine, store: &mut FakeStore) {
    let Some(changes) = store.in_flight.take() else {
        return;
    };
    engine.checkpointed(changes.generation);
    for row in changes.rows {
        let key = (row.input, row.event_id.to_string());
        match row.new {
            Some(new) => {
                assert!(!store.rows.contains_key(&key), "inserted twice: {key:?}");
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
}

fn msg_strategy(keys: u8, events: u8) -> impl Strategy<Value = (bool, Msg)> {
    let at = (0i64..200).prop_map(|s| 1_000 * SEC + s * SEC);
    let amount = 1i64..6;
    prop_oneof![
        10 => (0..events, 0..keys, amount.clone(), 0u8..8, at.clone()).prop_map(|(event, key, amount, c, at)| (true, Msg::Payment {
            event, key, amount, currency: u8::from(c == 0), at
        })),
        10 => (0..events, 0..keys, amount, 0i64..3, 0i64..6, 0u8..8, at).prop_map(|(event, key, gross, fee, nd, c, at)| (false, Msg::Settlement {
            event, key, gross, fee, net_delta: i64::from(nd == 0), currency: u8::from(c == 0), at
        })),
        1 => any::<bool>().prop_map(|payments| (payments, Msg::Poison)),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1usize..8).prop_map(|n| Step::Batch { n }),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(payments, settlements)| Step::Progress { payments, settlements }),
        2 => (0i64..120).prop_map(|s| Step::Clock { advance: s * SEC }),
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
        messages in prop::collection::vec(msg_strategy(6, 12), 0..40),
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
        let truth = oracle(&payments, &settlements, deadline_s * SEC, tolerance);

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
                    run_batch(&mut engine, &mut store, &order[cursor..end], now, sweep_limit);
                    cursor = end;
                }
                Step::Progress { payments, settlements } => {
                    // Only what is true may be reported: an input with unread messages is not caught up.
                    let left = |input| order[cursor..].iter().any(|(i, _, _)| *i == input);
                    engine.observe_caught_up(Input::Payments, payments && !left(Input::Payments), now);
                    engine.observe_caught_up(Input::Settlements, settlements && !left(Input::Settlements), now);
                    run_batch(&mut engine, &mut store, &[], now, sweep_limit);
                }
                Step::Clock { advance } => now += advance,
            }
        }
        // Drain the rest, then idle both inputs until the watermark passes every deadline.
        while cursor < order.len() {
            let end = (cursor + 5).min(order.len());
            run_batch(&mut engine, &mut store, &order[cursor..end], now, sweep_limit);
            cursor = end;
        }
        engine.observe_caught_up(Input::Payments, true, now);
        engine.observe_caught_up(Input::Settlements, true, now);
        now += 10_000 * SEC;
        for _ in 0..200 {
            run_batch(&mut engine, &mut store, &[], now, sweep_limit);
            if !store.rows.values().any(|r| r.outcome == Outcome::Pending) {
                break;
            }
        }
        settle(&mut engine, &mut store);

        let actual: Truth = store
            .rows
            .iter()
            .map(|((input, id), row)| ((*input, id.clone()), (row.outcome, row.counterpart.clone())))
            .collect();
        prop_assert_eq!(actual, truth);
    }
}
