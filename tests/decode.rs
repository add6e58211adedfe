//! Decoding (contract §1): every rejection class, the accepted shapes, and a property
//! test that no input — arbitrary bytes or mutated valid events — makes decoding panic.

use proptest::prelude::*;
use recon_worker::event::{decode, parse_timestamp, Event, Input, Rejection};
use serde_json::{json, Value};

const MAX: usize = 64 * 1024;

fn payment() -> Value {
    json!({
        "event_id": "evt-1", "type": "payment_captured", "payment_id": "pay-1",
        "merchant_id": "m-1", "amount_minor": 1250, "currency": "EUR",
        "occurred_at": "2026-11-23T10:00:00+01:00"
    })
}

fn settlement() -> Value {
    json!({
        "event_id": "evt-2", "type": "settlement_line", "settlement_id": "po-1",
        "payment_id": "pay-1", "gross_minor": 1250, "fee_minor": 25, "net_minor": 1225,
        "currency": "EUR", "settled_at": "2026-11-24T09:00:00Z"
    })
}

fn with(mut base: Value, field: &str, value: Value) -> Value {
    let object = base.as_object_mut().expect("object");
    if value.is_null() {
        object.remove(field);
    } else {
        object.insert(field.to_owned(), value);
    }
    base
}

fn run(input: Input, key: &str, value: &Value) -> Result<Event, Rejection> {
    decode(
        input,
        Some(key.as_bytes()),
        Some(value.to_string().as_bytes()),
        MAX,
    )
}

fn class(result: Result<Event, Rejection>) -> &'static str {
    result.expect_err("must be rejected").class()
}

#[test]
fn valid_payment_and_settlement_decode() {
    let Event::Payment(p) = run(Input::Payments, "pay-1", &payment()).expect("valid payment")
    else {
        panic!("not a payment");
    };
    assert_eq!(
        (p.event_id.as_str(), p.payment_id.as_str(), p.amount.get()),
        ("evt-1", "pay-1", 1250)
    );
    assert_eq!(p.currency.code(), "EUR");
    assert_eq!(Some(p.occurred_at), parse_timestamp("2026-11-23T09:00:00Z"));
    let Event::Settlement(s) =
        run(Input::Settlements, "pay-1", &settlement()).expect("valid settlement")
    else {
        panic!("not a settlement");
    };
    assert_eq!((s.gross.get(), s.fee.get(), s.net), (1250, 25, 1225));
}

#[test]
fn unknown_fields_are_ignored_and_net_is_not_trusted() {
    let extra = with(payment(), "schema_version", json!(7));
    assert!(run(Input::Payments, "pay-1", &extra).is_ok());
    let wrong_net = with(settlement(), "net_minor", json!(-5));
    assert!(
        run(Input::Settlements, "pay-1", &wrong_net).is_ok(),
        "net is checked by the rules, not the decoder"
    );
}

#[test]
fn bytes_level_rejections() {
    let d = |value: Option<&[u8]>| decode(Input::Payments, Some(b"pay-1"), value, MAX);
    assert_eq!(d(None).expect_err("tombstone").class(), "empty");
    assert_eq!(d(Some(b"")).expect_err("empty").class(), "empty");
    assert_eq!(
        d(Some(&[0xff, 0xfe, 0x7b])).expect_err("utf8").class(),
        "not_utf8"
    );
    assert_eq!(
        d(Some(b"{\"event_id\":")).expect_err("json").class(),
        "not_json"
    );
    assert_eq!(d(Some(b"[1,2]")).expect_err("array").class(), "not_object");
    assert_eq!(
        d(Some(b"\"text\"")).expect_err("string").class(),
        "not_object"
    );
    let big = with(payment(), "padding", json!("x".repeat(MAX))).to_string();
    let err = d(Some(big.as_bytes())).expect_err("too large");
    assert_eq!(err.class(), "too_large");
    assert!(err.to_string().contains(&big.len().to_string()), "{err}");
}

#[test]
fn field_level_rejections_name_the_field() {
    let cases: Vec<(Input, Value, &str, &str)> = vec![
        (
            Input::Payments,
            with(payment(), "amount_minor", Value::Null),
            "missing_field",
            "amount_minor",
        ),
        (
            Input::Payments,
            with(payment(), "event_id", Value::Null),
            "missing_field",
            "event_id",
        ),
        (
            Input::Settlements,
            with(settlement(), "settlement_id", Value::Null),
            "missing_field",
            "settlement_id",
        ),
        (
            Input::Payments,
            with(payment(), "amount_minor", json!("1250")),
            "wrong_type",
            "amount_minor",
        ),
        (
            Input::Payments,
            with(payment(), "amount_minor", json!(12.5)),
            "wrong_type",
            "amount_minor",
        ),
        (
            Input::Payments,
            with(payment(), "merchant_id", json!(42)),
            "wrong_type",
            "merchant_id",
        ),
        (
            Input::Payments,
            with(payment(), "amount_minor", json!(0)),
            "out_of_range",
            "amount_minor",
        ),
        (
            Input::Payments,
            with(payment(), "amount_minor", json!(-1)),
            "out_of_range",
            "amount_minor",
        ),
        (
            Input::Payments,
            with(payment(), "amount_minor", json!(9_007_199_254_740_992i64)),
            "out_of_range",
            "amount_minor",
        ),
        (
            Input::Payments,
            with(payment(), "amount_minor", json!(u64::MAX)),
            "out_of_range",
            "amount_minor",
        ),
        (
            Input::Settlements,
            with(settlement(), "fee_minor", json!(-1)),
            "out_of_range",
            "fee_minor",
        ),
        (
            Input::Payments,
            with(payment(), "event_id", json!("")),
            "out_of_range",
            "event_id",
        ),
        (
            Input::Payments,
            with(payment(), "payment_id", json!("p".repeat(129))),
            "out_of_range",
            "payment_id",
        ),
        (
            Input::Payments,
            with(payment(), "currency", json!("XYZ")),
            "unknown_currency",
            "currency",
        ),
        (
            Input::Payments,
            with(payment(), "currency", json!("eur")),
            "unknown_currency",
            "currency",
        ),
        (
            Input::Payments,
            with(payment(), "currency", json!("HRK")),
            "unknown_currency",
            "currency",
        ),
        (
            Input::Payments,
            with(payment(), "occurred_at", json!("2026-11-23T10:00:00")),
            "bad_timestamp",
            "occurred_at",
        ),
        (
            Input::Payments,
            with(payment(), "occurred_at", json!("yesterday")),
            "bad_timestamp",
            "occurred_at",
        ),
        (
            Input::Settlements,
            with(settlement(), "settled_at", json!("2026-13-01T00:00:00Z")),
            "bad_timestamp",
            "settled_at",
        ),
        (
            Input::Payments,
            with(payment(), "type", json!("refund_issued")),
            "unknown_type",
            "refund_issued",
        ),
        (
            Input::Payments,
            with(payment(), "type", Value::Null),
            "missing_field",
            "type",
        ),
        (
            Input::Payments,
            with(payment(), "type", json!("settlement_line")),
            "wrong_topic_type",
            "settlement_line",
        ),
        (
            Input::Settlements,
            with(settlement(), "type", json!("payment_captured")),
            "wrong_topic_type",
            "payment_captured",
        ),
    ];
    for (input, value, expected_class, mentioned) in cases {
        let err = run(input, "pay-1", &value).expect_err(expected_class);
        assert_eq!(err.class(), expected_class, "{value}");
        assert!(
            err.to_string().contains(mentioned),
            "reason {err:?} should mention {mentioned}"
        );
    }
}

#[test]
fn the_kafka_key_must_be_the_payment_id() {
    assert_eq!(
        class(run(Input::Payments, "pay-2", &payment())),
        "key_mismatch"
    );
    assert_eq!(
        class(run(Input::Settlements, "other", &settlement())),
        "key_mismatch"
    );
    let no_key = decode(
        Input::Payments,
        None,
        Some(payment().to_string().as_bytes()),
        MAX,
    );
    assert_eq!(class(no_key), "key_mismatch");
}

#[test]
fn every_class_has_a_distinct_stable_name() {
    let mut classes = Rejection::CLASSES.to_vec();
    classes.sort_unstable();
    classes.dedup();
    assert_eq!(classes.len(), Rejection::CLASSES.len());
}

fn mutated_event() -> impl Strategy<Value = (bool, Vec<u8>)> {
    let field = prop::sample::select(vec![
        "event_id",
        "type",
        "payment_id",
        "merchant_id",
        "amount_minor",
        "currency",
        "occurred_at",
        "settlement_id",
        "gross_minor",
        "fee_minor",
        "net_minor",
        "settled_at",
    ]);
    let value = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,200}".prop_map(Value::from),
        Just(json!([])),
        Just(json!({})),
        Just(json!(true)),
    ];
    (
        any::<bool>(),
        prop::collection::vec((field, value), 0..4),
        any::<prop::sample::Index>(),
        any::<u8>(),
    )
        .prop_map(|(is_payment, edits, at, byte)| {
            let mut base = if is_payment { payment() } else { settlement() };
            for (field, value) in edits {
                base = with(base, field, value);
            }
            let mut bytes = base.to_string().into_bytes();
            if byte % 3 == 0 && !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            (is_payment, bytes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), key in prop::option::of(prop::collection::vec(any::<u8>(), 0..16))) {
        for input in Input::ALL {
            let _ = decode(input, key.as_deref(), Some(&bytes), 256);
        }
    }

    #[test]
    fn mutated_events_decode_or_are_rejected_with_a_reason((is_payment, bytes) in mutated_event()) {
        let input = if is_payment { Input::Payments } else { Input::Settlements };
        match decode(input, Some(b"pay-1"), Some(&bytes), MAX) {
            Ok(event) => prop_assert_eq!(event.payment_id(), "pay-1"),
            Err(rejection) => prop_assert!(!rejection.to_string().is_empty()),
        }
    }
}
