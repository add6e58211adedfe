//! Decoding (contract §1): every rejection class, the accepted shapes, and a property
//! test that no input — arbitrary bytes or mutated valid events — makes decoding panic.

use proptest::prelude::*;
use recon_worker::event::{decode, parse_timestamp, Event, Input, Limits, Rejection};
use serde_json::{json, Value};

const MAX: usize = 64 * 1024;
const DAY_MICROS: i64 = 24 * 3600 * 1_000_000;
/// The worker's defaults: 64 KiB values, events at most 24h ahead of Kafka time.
const LIMITS: Limits = Limits {
    max_bytes: MAX,
    max_future_skew: DAY_MICROS,
};

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

/// Decodes a message without a Kafka timestamp (so any event time after 1970 passes).
fn run(input: Input, key: &str, value: &Value) -> Result<Event, Rejection> {
    run_at(input, key, value, None)
}

fn run_at(
    input: Input,
    key: &str,
    value: &Value,
    timestamp_ms: Option<i64>,
) -> Result<Event, Rejection> {
    decode(
        input,
        Some(key.as_bytes()),
        Some(value.to_string().as_bytes()),
        timestamp_ms,
        LIMITS,
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
    let d = |value: Option<&[u8]>| decode(Input::Payments, Some(b"pay-1"), value, None, LIMITS);
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
        None,
        LIMITS,
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

/// Every string of an accepted event that reaches a text column.
fn stored_strings(event: &Event) -> Vec<&str> {
    match event {
        Event::Payment(p) => vec![
            &p.event_id,
            &p.payment_id,
            &p.merchant_id,
            p.currency.code(),
        ],
        Event::Refund(r) => vec![&r.event_id, &r.refund_id, &r.payment_id, r.currency.code()],
        Event::Settlement(s) => {
            let mut strings = vec![
                &*s.event_id,
                &s.settlement_id,
                &s.payment_id,
                s.currency.code(),
            ];
            strings.extend(s.line.refund_id().into_iter().chain(s.line.dispute_id()));
            strings.extend(s.payout_id.as_deref());
            strings
        }
    }
}

fn is_forbidden(c: char) -> bool {
    c <= '\u{1f}' || c == '\u{7f}'
}

#[test]
fn ids_with_control_characters_are_rejected_naming_the_field() {
    let fields = [
        (Input::Payments, "event_id"),
        (Input::Payments, "payment_id"),
        (Input::Payments, "merchant_id"),
        (Input::Settlements, "event_id"),
        (Input::Settlements, "settlement_id"),
        (Input::Settlements, "payment_id"),
    ];
    for (input, field) in fields {
        for (c, code) in [
            ('\0', "U+0000"),
            ('\u{1}', "U+0001"),
            ('\t', "U+0009"),
            ('\n', "U+000A"),
            ('\u{1f}', "U+001F"),
            ('\u{7f}', "U+007F"),
        ] {
            let id = format!("a{c}b");
            let base = if input == Input::Payments {
                payment()
            } else {
                settlement()
            };
            let value = with(base, field, json!(id));
            // The Kafka key carries the same bytes, so only the character is wrong.
            let key = if field == "payment_id" { &id } else { "pay-1" };
            let err = run(input, key, &value).expect_err("control character");
            assert_eq!(err.class(), "control_character", "{field} {code}: {err}");
            let reason = err.to_string();
            assert!(
                reason.contains(field) && reason.contains(code) && reason.contains("character 2"),
                "{reason}"
            );
            // The reason is stored in a text column too.
            assert!(!reason.chars().any(is_forbidden), "{reason:?}");
        }
    }
}

#[test]
fn ids_outside_the_forbidden_range_are_accepted() {
    // U+0080..U+009F are not in the contract's range and PostgreSQL stores them;
    // neither is anything printable.
    for id in [
        "caf\u{e9}",
        "\u{80}x",
        "x\u{9f}",
        "\u{1F4B6}",
        "a b",
        "\u{7e}",
    ] {
        let value = with(payment(), "payment_id", json!(id));
        let event = run(Input::Payments, id, &value).expect(id);
        assert_eq!(event.payment_id(), id);
    }
}

#[test]
fn a_currency_with_a_nul_is_unknown_and_its_reason_is_storable() {
    let value = with(payment(), "currency", json!("EU\u{0}R"));
    let err = run(Input::Payments, "pay-1", &value).expect_err("unknown currency");
    assert_eq!(err.class(), "unknown_currency");
    assert!(!err.to_string().contains('\0'), "{err:?}");
}

#[test]
fn event_times_before_1970_are_rejected() {
    for (input, base, field) in [
        (Input::Payments, payment(), "occurred_at"),
        (Input::Settlements, settlement(), "settled_at"),
    ] {
        for at in ["1969-12-31T23:59:59.999999Z", "0001-01-01T00:00:00Z"] {
            let value = with(base.clone(), field, json!(at));
            let err = run(input, "pay-1", &value).expect_err(at);
            assert_eq!(err.class(), "event_time_out_of_range", "{at}");
            assert!(
                err.to_string().contains(field) && err.to_string().contains("1970"),
                "{err}"
            );
        }
        let epoch = with(base.clone(), field, json!("1970-01-01T00:00:00Z"));
        let event = run(input, "pay-1", &epoch).expect("the epoch itself");
        assert_eq!(event.event_time(), 0);
    }
}

/// A valid RFC 3339 text for an instant after 9999-12-31 UTC cannot be stored as it is
/// (PostgreSQL would hold it, the worker's times stop at 9999): rejected, even without
/// a Kafka timestamp (found by tests/fuzz_path.rs: it was stored clamped).
#[test]
fn event_times_after_the_year_9999_are_rejected() {
    for (input, base, field) in [
        (Input::Payments, payment(), "occurred_at"),
        (Input::Settlements, settlement(), "settled_at"),
    ] {
        let last = with(base.clone(), field, json!("9999-12-31T23:59:59.999999Z"));
        let event = run(input, "pay-1", &last).expect("the last instant of 9999");
        assert_eq!(event.event_time(), recon_worker::event::MAX_EVENT_TIME);
        for at in [
            "9999-12-31T23:59:59-23:59",
            "9999-12-31T23:59:59.9999999-00:01",
        ] {
            let value = with(base.clone(), field, json!(at));
            let err = run_at(input, "pay-1", &value, Some(i64::MAX)).expect_err(at);
            assert_eq!(err.class(), "event_time_out_of_range", "{at}");
            assert!(err.to_string().contains("9999"), "{err}");
            assert_eq!(
                class(run(input, "pay-1", &value)),
                "event_time_out_of_range"
            );
        }
    }
}

#[test]
fn event_times_too_far_ahead_of_the_kafka_timestamp_are_rejected() {
    let kafka_ms = 1_800_000_000_000i64;
    let kafka_micros = kafka_ms * 1000;
    let at = |micros: i64| json!(recon_worker::event::format_timestamp(micros));
    for (input, base, field) in [
        (Input::Payments, payment(), "occurred_at"),
        (Input::Settlements, settlement(), "settled_at"),
    ] {
        let edge = with(base.clone(), field, at(kafka_micros + DAY_MICROS));
        assert!(
            run_at(input, "pay-1", &edge, Some(kafka_ms)).is_ok(),
            "exactly the skew ahead is accepted"
        );
        let over = with(base.clone(), field, at(kafka_micros + DAY_MICROS + 1));
        let err = run_at(input, "pay-1", &over, Some(kafka_ms)).expect_err("1µs over");
        assert_eq!(err.class(), "event_time_out_of_range");
        let reason = err.to_string();
        assert!(
            reason.contains(field) && reason.contains("ahead") && reason.contains("1day"),
            "{reason}"
        );
        let far = with(base.clone(), field, json!("2205-01-01T00:00:00Z"));
        assert_eq!(
            class(run_at(input, "pay-1", &far, Some(kafka_ms))),
            "event_time_out_of_range"
        );
        // Without a Kafka timestamp there is nothing to compare with.
        assert!(run_at(input, "pay-1", &far, None).is_ok());
        // Event times in the past of the message are ordinary (a backlog, a replay).
        let old = with(base.clone(), field, at(kafka_micros - 400 * DAY_MICROS));
        assert!(run_at(input, "pay-1", &old, Some(kafka_ms)).is_ok());
    }
    // The bound is the configured one.
    let hour = Limits {
        max_future_skew: 3600 * 1_000_000,
        ..LIMITS
    };
    let two_hours = with(
        payment(),
        "occurred_at",
        at(kafka_micros + 2 * 3600 * 1_000_000),
    );
    let bytes = two_hours.to_string();
    let decoded = decode(
        Input::Payments,
        Some(b"pay-1"),
        Some(bytes.as_bytes()),
        Some(kafka_ms),
        hour,
    );
    assert_eq!(class(decoded), "event_time_out_of_range");
}

/// Ids built from printable text with control characters mixed in.
fn id_with_controls() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::char::range('\u{0}', '\u{7f}'),
            1 => prop::char::range('\u{80}', '\u{10ffff}'),
        ],
        0..8,
    )
    .prop_map(|chars| chars.into_iter().collect())
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
            let limits = Limits { max_bytes: 256, ..LIMITS };
            let _ = decode(input, key.as_deref(), Some(&bytes), Some(0), limits);
        }
    }

    #[test]
    fn nothing_accepted_or_rejected_carries_a_control_character_to_postgres(
        is_payment in any::<bool>(),
        ids in prop::collection::vec(id_with_controls(), 4),
        currency in id_with_controls(),
    ) {
        let (input, mut value, fields) = if is_payment {
            (Input::Payments, payment(), ["event_id", "payment_id", "merchant_id"])
        } else {
            (Input::Settlements, settlement(), ["event_id", "payment_id", "settlement_id"])
        };
        for (field, id) in fields.iter().zip(&ids) {
            value = with(value, field, json!(id));
        }
        if currency.len() % 2 == 0 {
            value = with(value, "currency", json!(currency));
        }
        let key = ids[1].clone();
        match run(input, &key, &value) {
            Ok(event) => {
                for text in stored_strings(&event) {
                    prop_assert!(!text.chars().any(is_forbidden), "{:?}", text);
                }
            }
            Err(rejection) => {
                let reason = rejection.to_string();
                prop_assert!(!reason.contains('\0'), "{:?}", reason);
            }
        }
    }

    #[test]
    fn mutated_events_decode_or_are_rejected_with_a_reason((is_payment, bytes) in mutated_event()) {
        let input = if is_payment { Input::Payments } else { Input::Settlements };
        match decode(input, Some(b"pay-1"), Some(&bytes), None, LIMITS) {
            Ok(event) => prop_assert_eq!(event.payment_id(), "pay-1"),
            Err(rejection) => prop_assert!(!rejection.to_string().is_empty()),
        }
    }
}
