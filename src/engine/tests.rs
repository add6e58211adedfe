//! Unit tests of the engine as a whole, through its public methods: duplicates and
//! redeliveries against the window's size, and eviction order. Matching itself is
//! tested against an independent oracle in `tests/engine_oracle.rs`.

use super::{Applied, EngineConfig, MatchConfig, Outcome, PairEngine, StoredEvent, WindowConfig};
use crate::event::{Event, EventKind, Input, Line, Payment, Settlement};
use crate::money::Currency;
use crate::pair::PerInput;

fn stored(kind: EventKind, payment_id: &str, outcome: Outcome) -> StoredEvent {
    StoredEvent {
        kind,
        line: Line::Capture,
        event_id: format!("{payment_id}-{kind}"),
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
        line: Line::Capture,
        payout_id: None,
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
    assert!(!engine.needs_event_id_check(&payment("first", "k")));
    assert!(!engine.needs_event_id_check(&settlement("line", "k")));
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
    assert!(engine.needs_event_id_check(&payment("dup", "k")));
    engine.load_stored_event_ids([(Input::Payments, "dup".to_owned())]);
    assert_eq!(engine.apply(payment("dup", "k"), 5), Applied::Redelivery);
    assert!(engine.take_changes().rows.is_empty());
    // A key loaded from storage: its duplicate rows are not state.
    let mut reloaded = new_engine(10);
    let mut first = stored(EventKind::Payment, "k", Outcome::Pending);
    first.event_id = "first".to_owned();
    let mut dup = stored(EventKind::Payment, "k", Outcome::DuplicatePayment);
    dup.event_id = "dup".to_owned();
    reloaded.load(["k".to_owned()], vec![first, dup]);
    assert_eq!(reloaded.window_bytes(), engine.window_bytes());
    assert!(reloaded.needs_event_id_check(&payment("dup", "k")));
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
            ("closed", EventKind::Payment, Outcome::Matched),
            ("missing", EventKind::Payment, Outcome::MissingSettlement),
            ("pending", EventKind::Settlement, Outcome::Pending),
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
        .map(|k| stored(EventKind::Payment, k, Outcome::Pending))
        .collect();
    engine.load(extra, extra_rows);
    engine.evict();
    assert_eq!(engine.window_items(), 9);
    assert_eq!(resident(&engine, "closed"), 0);
    assert_eq!(resident(&engine, "pending"), 4);
    assert_eq!(resident(&engine, "missing"), 1);
}
