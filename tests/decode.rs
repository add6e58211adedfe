//! Decoding (contract §1, §6, §7): every rejection class, the accepted shapes, and
//! property tests that no input — arbitrary bytes or mutated valid events and payout
//! announcements — makes decoding panic.

use proptest::prelude::*;
use recon_worker::event::{
    decode, decode_announcement, parse_timestamp, Announcement, Event, EventKind, Input, Limits,
    Line, Rejection,
};
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
                s.event_id.as_str(),
                &s.settlement_id,
                &s.payment_id,
                s.currency.code(),
                s.line.line_type(),
            ];
            strings.extend(s.line.refund_id());
            strings.extend(s.line.dispute_id());
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
// ---------------------------------------------------------------------------------
// Version 2 of the input contract (§6): `refund_requested` on the payments topic and
// the optional `settlement_line` fields. Every rule of §1 applies to the new fields.

/// The largest magnitude of an amount (2^53 − 1).
const MAX_MINOR: i64 = 9_007_199_254_740_991;

fn refund() -> Value {
    json!({
        "event_id": "evt-3", "type": "refund_requested", "refund_id": "ref-1",
        "payment_id": "pay-1", "amount_minor": 500, "currency": "EUR",
        "requested_at": "2026-11-25T10:00:00+01:00"
    })
}

/// A version-2 settlement line of `line_type` with signed `gross`, `fee` and a
/// consistent net, carrying the id its type requires.
fn line(line_type: &str, gross: i64, fee: i64) -> Value {
    let mut value = with(settlement(), "line_type", json!(line_type));
    value = with(value, "gross_minor", json!(gross));
    value = with(value, "fee_minor", json!(fee));
    value = with(value, "net_minor", json!(gross - fee));
    match line_type {
        "refund" => with(value, "refund_id", json!("ref-1")),
        "chargeback" | "chargeback_reversal" => with(value, "dispute_id", json!("dp-1")),
        _ => value,
    }
}

/// A valid line of each type: (line_type, gross, fee).
const LINES: [(&str, i64, i64); 4] = [
    ("capture", 1250, 25),
    ("refund", -500, -5),
    ("chargeback", -1250, 1500),
    ("chargeback_reversal", 1250, -1500),
];

fn settlement_of(result: Result<Event, Rejection>) -> recon_worker::event::Settlement {
    match result.expect("valid settlement line") {
        Event::Settlement(s) => s,
        other => panic!("not a settlement: {other:?}"),
    }
}

/// Asserts a rejection's class, that its reason mentions `mentioned`, and that the
/// reason can be stored (no control character reaches the text column).
fn assert_rejected(result: Result<Event, Rejection>, expected_class: &str, mentioned: &str) {
    let err = result.expect_err(expected_class);
    assert_eq!(err.class(), expected_class, "{err}");
    assert!(
        Rejection::CLASSES.contains(&err.class()),
        "class {} is listed",
        err.class()
    );
    let reason = err.to_string();
    assert!(
        reason.contains(mentioned),
        "reason {reason:?} should mention {mentioned}"
    );
    assert!(!reason.chars().any(is_forbidden), "{reason:?}");
}

#[test]
fn a_refund_request_decodes_with_every_field() {
    let event = run(Input::Payments, "pay-1", &refund()).expect("valid refund request");
    assert_eq!(event.kind(), EventKind::Refund);
    assert_eq!(event.input(), Input::Payments);
    assert_eq!((event.event_id(), event.payment_id()), ("evt-3", "pay-1"));
    assert_eq!(event.event_time_field(), "requested_at");
    let Event::Refund(r) = event else {
        panic!("not a refund");
    };
    assert_eq!(
        (
            r.event_id.as_str(),
            r.refund_id.as_str(),
            r.payment_id.as_str(),
            r.amount.get()
        ),
        ("evt-3", "ref-1", "pay-1", 500)
    );
    assert_eq!(r.currency.code(), "EUR");
    // The offset is applied: 10:00+01:00 is 09:00Z.
    assert_eq!(
        Some(r.requested_at),
        parse_timestamp("2026-11-25T09:00:00Z")
    );
    // The bounds of the amount are those of a payment.
    for amount in [1, MAX_MINOR] {
        let value = with(refund(), "amount_minor", json!(amount));
        let Event::Refund(r) = run(Input::Payments, "pay-1", &value).expect("in range") else {
            panic!("not a refund");
        };
        assert_eq!(r.amount.get(), amount);
    }
    // Unknown fields are ignored, as on every message.
    let extra = with(refund(), "reason", json!("customer request"));
    assert!(run(Input::Payments, "pay-1", &extra).is_ok());
}

#[test]
fn refund_request_field_rejections_name_the_field() {
    let mut cases: Vec<(Value, &str, &str)> = Vec::new();
    for field in [
        "event_id",
        "refund_id",
        "payment_id",
        "amount_minor",
        "currency",
        "requested_at",
    ] {
        cases.push((with(refund(), field, Value::Null), "missing_field", field));
    }
    let mut explicit_null = refund();
    explicit_null["refund_id"] = Value::Null;
    cases.push((explicit_null, "missing_field", "refund_id"));
    // A refund request names the time it was requested; a payment's field is no
    // substitute.
    let occurred = with(
        with(refund(), "requested_at", Value::Null),
        "occurred_at",
        json!("2026-11-25T09:00:00Z"),
    );
    cases.push((occurred, "missing_field", "requested_at"));
    cases.extend([
        (
            with(refund(), "refund_id", json!(42)),
            "wrong_type",
            "refund_id",
        ),
        (
            with(refund(), "refund_id", json!(["ref-1"])),
            "wrong_type",
            "refund_id",
        ),
        (
            with(refund(), "amount_minor", json!("500")),
            "wrong_type",
            "amount_minor",
        ),
        (
            with(refund(), "amount_minor", json!(5.5)),
            "wrong_type",
            "amount_minor",
        ),
        (
            with(refund(), "currency", json!(978)),
            "wrong_type",
            "currency",
        ),
        (
            with(refund(), "requested_at", json!(1_764_061_200)),
            "wrong_type",
            "requested_at",
        ),
        (
            with(refund(), "amount_minor", json!(0)),
            "out_of_range",
            "amount_minor",
        ),
        (
            with(refund(), "amount_minor", json!(-500)),
            "out_of_range",
            "amount_minor",
        ),
        (
            with(refund(), "amount_minor", json!(MAX_MINOR + 1)),
            "out_of_range",
            "amount_minor",
        ),
        (
            with(refund(), "amount_minor", json!(u64::MAX)),
            "out_of_range",
            "amount_minor",
        ),
        (
            with(refund(), "refund_id", json!("")),
            "out_of_range",
            "refund_id",
        ),
        (
            with(refund(), "refund_id", json!("r".repeat(129))),
            "out_of_range",
            "refund_id",
        ),
        (
            with(refund(), "currency", json!("XYZ")),
            "unknown_currency",
            "currency",
        ),
        (
            with(refund(), "currency", json!("eur")),
            "unknown_currency",
            "currency",
        ),
        (
            with(refund(), "currency", json!("HRK")),
            "unknown_currency",
            "currency",
        ),
        (
            with(refund(), "requested_at", json!("2026-11-25T10:00:00")),
            "bad_timestamp",
            "requested_at",
        ),
        (
            with(refund(), "requested_at", json!("tomorrow")),
            "bad_timestamp",
            "requested_at",
        ),
        (
            with(refund(), "requested_at", json!("2026-02-30T10:00:00Z")),
            "bad_timestamp",
            "requested_at",
        ),
    ]);
    for (value, expected_class, mentioned) in cases {
        assert_rejected(
            run(Input::Payments, "pay-1", &value),
            expected_class,
            mentioned,
        );
    }
    // The longest id is accepted.
    let longest = with(refund(), "refund_id", json!("r".repeat(128)));
    assert!(run(Input::Payments, "pay-1", &longest).is_ok());
}

#[test]
fn refund_request_ids_with_control_characters_are_rejected_naming_the_field() {
    for field in ["event_id", "refund_id", "payment_id"] {
        for (c, code) in [('\0', "U+0000"), ('\n', "U+000A"), ('\u{7f}', "U+007F")] {
            let id = format!("r{c}1");
            let key = if field == "payment_id" { &id } else { "pay-1" };
            let value = with(refund(), field, json!(id));
            let err = run(Input::Payments, key, &value).expect_err("control character");
            assert_eq!(err.class(), "control_character", "{field} {code}: {err}");
            let reason = err.to_string();
            assert!(
                reason.contains(field) && reason.contains(code) && reason.contains("character 2"),
                "{reason}"
            );
            assert!(!reason.chars().any(is_forbidden), "{reason:?}");
        }
    }
}

#[test]
fn a_refund_request_is_keyed_by_the_refunded_payment() {
    assert_eq!(
        class(run(Input::Payments, "ref-1", &refund())),
        "key_mismatch"
    );
    let no_key = decode(
        Input::Payments,
        None,
        Some(refund().to_string().as_bytes()),
        None,
        LIMITS,
    );
    assert_eq!(class(no_key), "key_mismatch");
}

#[test]
fn refund_request_times_follow_the_rules_of_event_times() {
    let kafka_ms = 1_800_000_000_000i64;
    let kafka_micros = kafka_ms * 1000;
    let at = |micros: i64| json!(recon_worker::event::format_timestamp(micros));
    let edge = with(refund(), "requested_at", at(kafka_micros + DAY_MICROS));
    assert!(
        run_at(Input::Payments, "pay-1", &edge, Some(kafka_ms)).is_ok(),
        "exactly the skew ahead is accepted"
    );
    let over = with(refund(), "requested_at", at(kafka_micros + DAY_MICROS + 1));
    let err = run_at(Input::Payments, "pay-1", &over, Some(kafka_ms)).expect_err("1µs over");
    assert_eq!(err.class(), "event_time_out_of_range");
    let reason = err.to_string();
    assert!(
        reason.contains("requested_at") && reason.contains("ahead") && reason.contains("1day"),
        "{reason}"
    );
    let far = with(refund(), "requested_at", json!("2205-01-01T00:00:00Z"));
    assert_eq!(
        class(run_at(Input::Payments, "pay-1", &far, Some(kafka_ms))),
        "event_time_out_of_range"
    );
    assert!(run_at(Input::Payments, "pay-1", &far, None).is_ok());
    let old = with(
        refund(),
        "requested_at",
        at(kafka_micros - 400 * DAY_MICROS),
    );
    assert!(run_at(Input::Payments, "pay-1", &old, Some(kafka_ms)).is_ok());
    // Before 1970 and after 9999, with or without a Kafka timestamp.
    for at in ["1969-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59"] {
        let value = with(refund(), "requested_at", json!(at));
        assert_rejected(
            run_at(Input::Payments, "pay-1", &value, Some(i64::MAX)),
            "event_time_out_of_range",
            "requested_at",
        );
        assert_eq!(
            class(run(Input::Payments, "pay-1", &value)),
            "event_time_out_of_range"
        );
    }
}

#[test]
fn event_types_on_the_wrong_topic_are_rejected() {
    let err = run(Input::Settlements, "pay-1", &refund()).expect_err("wrong topic");
    assert_eq!(err.class(), "wrong_topic_type");
    let reason = err.to_string();
    assert!(
        reason.contains("refund_requested") && reason.contains("settlement_line"),
        "{reason}"
    );
    // The payments topic now carries two types; a settlement line there names both.
    let err = run(Input::Payments, "pay-1", &line("refund", -500, 0)).expect_err("wrong topic");
    assert_eq!(err.class(), "wrong_topic_type");
    let reason = err.to_string();
    assert!(
        reason.contains("payment_captured") && reason.contains("refund_requested"),
        "{reason}"
    );
    // Near misses of the new type are unknown types.
    for found in ["refund_request", "Refund_Requested", "refund_issued"] {
        let value = with(refund(), "type", json!(found));
        assert_rejected(run(Input::Payments, "pay-1", &value), "unknown_type", found);
    }
}

#[test]
fn every_line_type_decodes_with_its_signed_amounts_and_id() {
    for (line_type, gross, fee) in LINES {
        let s = settlement_of(run(
            Input::Settlements,
            "pay-1",
            &line(line_type, gross, fee),
        ));
        assert_eq!(s.line.line_type(), line_type);
        assert_eq!(
            (s.gross.get(), s.fee.get(), s.net),
            (gross, fee, gross - fee),
            "{line_type}"
        );
        assert_eq!(s.line.gross_is_positive(), gross > 0, "{line_type}");
        let expected = match line_type {
            "capture" => Line::Capture,
            "refund" => Line::Refund {
                refund_id: "ref-1".into(),
            },
            "chargeback" => Line::Chargeback {
                dispute_id: "dp-1".into(),
            },
            _ => Line::ChargebackReversal {
                dispute_id: "dp-1".into(),
            },
        };
        assert_eq!(s.line, expected);
        assert_eq!(s.payout_id, None);
        assert_eq!(
            (
                s.event_id.as_str(),
                s.settlement_id.as_str(),
                s.payment_id.as_str()
            ),
            ("evt-2", "po-1", "pay-1")
        );
        assert_eq!(s.currency.code(), "EUR");
        assert_eq!(Some(s.settled_at), parse_timestamp("2026-11-24T09:00:00Z"));
    }
    // A version-1 line (no line_type) is a capture, as is an explicit null.
    let v1 = settlement_of(run(Input::Settlements, "pay-1", &settlement()));
    assert_eq!(v1.line, Line::Capture);
    let mut null_type = settlement();
    null_type["line_type"] = Value::Null;
    assert_eq!(
        settlement_of(run(Input::Settlements, "pay-1", &null_type)).line,
        Line::Capture
    );
    // The gross's bound is the same in both directions.
    for (line_type, gross) in [
        ("refund", -MAX_MINOR),
        ("chargeback", -MAX_MINOR),
        ("chargeback_reversal", MAX_MINOR),
        ("capture", MAX_MINOR),
        ("refund", -1),
        ("chargeback_reversal", 1),
    ] {
        let s = settlement_of(run(Input::Settlements, "pay-1", &line(line_type, gross, 0)));
        assert_eq!(s.gross.get(), gross, "{line_type}");
    }
}

#[test]
fn rule_3_is_checked_by_the_rules_not_the_decoder_on_every_line() {
    for (line_type, gross, fee) in LINES {
        let wrong_net = with(
            line(line_type, gross, fee),
            "net_minor",
            json!(gross - fee + 7),
        );
        let s = settlement_of(run(Input::Settlements, "pay-1", &wrong_net));
        assert_eq!(s.net, gross - fee + 7, "{line_type}");
    }
    // Net is any integer: the extremes of i64 are read, not rejected.
    for net in [i64::MIN, i64::MAX] {
        let value = with(line("chargeback", -1250, 0), "net_minor", json!(net));
        assert_eq!(
            settlement_of(run(Input::Settlements, "pay-1", &value)).net,
            net
        );
    }
}

#[test]
fn an_unknown_line_type_is_rejected() {
    for found in [
        "Refund",
        "REFUND",
        "refunds",
        "capture ",
        "",
        "fee",
        "chargeback-reversal",
        "dispute",
    ] {
        let value = with(line("refund", -500, 0), "line_type", json!(found));
        let err = run(Input::Settlements, "pay-1", &value).expect_err(found);
        assert_eq!(err.class(), "unknown_line_type", "{found:?}: {err}");
        assert!(err.to_string().contains(&format!("{found:?}")), "{err}");
    }
    // A line_type that is not a string is the wrong type, naming the field.
    for found in [
        json!(1),
        json!(true),
        json!(["refund"]),
        json!({"type": "refund"}),
    ] {
        let value = with(line("refund", -500, 0), "line_type", found);
        assert_rejected(
            run(Input::Settlements, "pay-1", &value),
            "wrong_type",
            "line_type",
        );
    }
    // The reason is stored: a control character in the type does not reach it raw.
    let value = with(line("refund", -500, 0), "line_type", json!("ref\u{0}und"));
    assert_rejected(
        run(Input::Settlements, "pay-1", &value),
        "unknown_line_type",
        "line_type",
    );
    // A very long type is reported truncated.
    let value = with(
        line("refund", -500, 0),
        "line_type",
        json!("x".repeat(10_000)),
    );
    let err = run(Input::Settlements, "pay-1", &value).expect_err("long type");
    assert_eq!(err.class(), "unknown_line_type");
    assert!(err.to_string().len() < 1_000, "{}", err.to_string().len());
}

#[test]
fn a_gross_whose_sign_contradicts_the_line_type_is_rejected() {
    for (line_type, gross) in [
        ("refund", 1),
        ("refund", 500),
        ("refund", MAX_MINOR),
        ("refund", 0),
        ("chargeback", 1),
        ("chargeback", 1250),
        ("chargeback", 0),
        ("chargeback_reversal", -1),
        ("chargeback_reversal", -1250),
        ("chargeback_reversal", -MAX_MINOR),
        ("chargeback_reversal", 0),
    ] {
        let value = line(line_type, gross, 0);
        let err = run(Input::Settlements, "pay-1", &value).expect_err(line_type);
        assert_eq!(
            err.class(),
            "sign_contradicts_type",
            "{line_type} {gross}: {err}"
        );
        assert_eq!(
            err,
            Rejection::SignContradictsType { line_type, gross },
            "{line_type} {gross}"
        );
        let reason = err.to_string();
        assert!(
            reason.contains(line_type) && reason.contains(&gross.to_string()),
            "{reason}"
        );
    }
    // A capture keeps version 1's rule, whether its type is written or not: a gross
    // below 1 is out of range (the class version-1 producers have always seen).
    for gross in [0, -1, -1250] {
        for value in [
            line("capture", gross, 0),
            with(settlement(), "gross_minor", json!(gross)),
        ] {
            assert_rejected(
                run(Input::Settlements, "pay-1", &value),
                "out_of_range",
                "gross_minor",
            );
        }
    }
}

#[test]
fn a_gross_beyond_2_pow_53_is_out_of_range_in_either_direction() {
    for (line_type, gross) in [
        ("capture", json!(MAX_MINOR + 1)),
        ("refund", json!(-MAX_MINOR - 1)),
        ("chargeback", json!(-MAX_MINOR - 1)),
        ("chargeback_reversal", json!(MAX_MINOR + 1)),
        ("refund", json!(i64::MIN)),
        ("chargeback", json!(i64::MIN)),
        ("chargeback_reversal", json!(i64::MAX)),
        ("chargeback_reversal", json!(u64::MAX)),
        ("refund", json!(-1e19)),
        // The wrong sign and out of range: out of range is what is wrong first.
        ("refund", json!(MAX_MINOR + 1)),
        ("chargeback_reversal", json!(-MAX_MINOR - 1)),
    ] {
        let value = with(line(line_type, -1, 0), "gross_minor", gross);
        let value = with(value, "net_minor", json!(0));
        assert_rejected(
            run(Input::Settlements, "pay-1", &value),
            "out_of_range",
            "gross_minor",
        );
    }
    // Mistyped amounts are the wrong type on every line.
    for gross in [json!("-500"), json!(-5.5), json!(null)] {
        let value = with(line("refund", -500, 0), "gross_minor", gross.clone());
        let expected = if gross.is_null() {
            "missing_field"
        } else {
            "wrong_type"
        };
        assert_rejected(
            run(Input::Settlements, "pay-1", &value),
            expected,
            "gross_minor",
        );
    }
}

#[test]
fn a_negative_fee_is_a_fee_given_back_except_on_a_capture() {
    for line_type in ["refund", "chargeback", "chargeback_reversal"] {
        let gross = if line_type == "chargeback_reversal" {
            1250
        } else {
            -1250
        };
        for fee in [-1, -MAX_MINOR, 0, MAX_MINOR] {
            let s = settlement_of(run(
                Input::Settlements,
                "pay-1",
                &line(line_type, gross, fee),
            ));
            assert_eq!(s.fee.get(), fee, "{line_type}");
        }
        for fee in [json!(-MAX_MINOR - 1), json!(MAX_MINOR + 1), json!(i64::MIN)] {
            let value = with(line(line_type, gross, 0), "fee_minor", fee);
            assert_rejected(
                run(Input::Settlements, "pay-1", &value),
                "out_of_range",
                "fee_minor",
            );
        }
        let value = with(line(line_type, gross, 0), "fee_minor", json!("5"));
        assert_rejected(
            run(Input::Settlements, "pay-1", &value),
            "wrong_type",
            "fee_minor",
        );
    }
    // Version 1 is unchanged: a capture's fee is 0..=2^53−1, written type or not.
    for value in [
        line("capture", 1250, -1),
        with(settlement(), "fee_minor", json!(-1)),
        line("capture", 1250, MAX_MINOR + 1),
    ] {
        assert_rejected(
            run(Input::Settlements, "pay-1", &value),
            "out_of_range",
            "fee_minor",
        );
    }
    assert!(run(Input::Settlements, "pay-1", &line("capture", 1250, 0)).is_ok());
}

#[test]
fn a_line_without_the_id_its_type_requires_is_rejected() {
    let cases = [
        ("refund", "refund_id", "dispute_id"),
        ("chargeback", "dispute_id", "refund_id"),
        ("chargeback_reversal", "dispute_id", "refund_id"),
    ];
    for (line_type, required, other) in cases {
        let (gross, fee) = LINES
            .iter()
            .find(|(t, _, _)| *t == line_type)
            .map(|(_, g, f)| (*g, *f))
            .expect("a line of the type");
        // Absent, or null.
        let absent = with(line(line_type, gross, fee), required, Value::Null);
        assert_rejected(
            run(Input::Settlements, "pay-1", &absent),
            "missing_field",
            required,
        );
        let mut null = line(line_type, gross, fee);
        null[required] = Value::Null;
        assert_rejected(
            run(Input::Settlements, "pay-1", &null),
            "missing_field",
            required,
        );
        // The other type's id is no substitute.
        let wrong_id = with(absent, other, json!("x-1"));
        assert_rejected(
            run(Input::Settlements, "pay-1", &wrong_id),
            "missing_field",
            required,
        );
        // A present but bad required id is rejected by the rules of ids.
        for (id, expected) in [
            (json!(""), "out_of_range"),
            (json!("i".repeat(129)), "out_of_range"),
            (json!(7), "wrong_type"),
            (json!("a\u{1}b"), "control_character"),
        ] {
            let value = with(line(line_type, gross, fee), required, id);
            assert_rejected(run(Input::Settlements, "pay-1", &value), expected, required);
        }
        let longest = with(
            line(line_type, gross, fee),
            required,
            json!("i".repeat(128)),
        );
        assert!(run(Input::Settlements, "pay-1", &longest).is_ok());
    }
    // A capture needs neither.
    assert!(run(Input::Settlements, "pay-1", &line("capture", 1250, 25)).is_ok());
}

#[test]
fn optional_ids_are_checked_as_ids_wherever_they_appear() {
    // (line_type, field, value, class)
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "capture",
            "payout_id",
            json!("po\u{0}9"),
            "control_character",
        ),
        (
            "capture",
            "payout_id",
            json!("po\u{1f}9"),
            "control_character",
        ),
        (
            "refund",
            "payout_id",
            json!("po\u{7f}9"),
            "control_character",
        ),
        ("chargeback", "payout_id", json!(""), "out_of_range"),
        (
            "capture",
            "payout_id",
            json!("p".repeat(129)),
            "out_of_range",
        ),
        ("chargeback_reversal", "payout_id", json!(9), "wrong_type"),
        // An id the type does not use is still checked when present.
        ("capture", "refund_id", json!(""), "out_of_range"),
        ("capture", "dispute_id", json!("d\n1"), "control_character"),
        ("refund", "dispute_id", json!(""), "out_of_range"),
        (
            "chargeback",
            "refund_id",
            json!("r\t1"),
            "control_character",
        ),
        (
            "chargeback_reversal",
            "refund_id",
            json!(false),
            "wrong_type",
        ),
    ];
    for (line_type, field, id, expected) in cases {
        let (gross, fee) = LINES
            .iter()
            .find(|(t, _, _)| *t == line_type)
            .map(|(_, g, f)| (*g, *f))
            .expect("a line of the type");
        let value = with(line(line_type, gross, fee), field, id.clone());
        assert_rejected(run(Input::Settlements, "pay-1", &value), expected, field);
        if expected == "control_character" {
            let reason = class_reason(run(Input::Settlements, "pay-1", &value));
            assert!(
                reason.contains("character 2") || reason.contains("character 3"),
                "{reason}"
            );
        }
    }
    // On a version-1 line too: optional fields are checked whatever the version.
    let v1 = with(settlement(), "refund_id", json!(""));
    assert_rejected(
        run(Input::Settlements, "pay-1", &v1),
        "out_of_range",
        "refund_id",
    );
    // Ids a type does not use, when valid, are accepted and ignored.
    let extra = with(
        with(line("capture", 1250, 25), "refund_id", json!("ref-9")),
        "dispute_id",
        json!("dp-9"),
    );
    assert_eq!(
        settlement_of(run(Input::Settlements, "pay-1", &extra)).line,
        Line::Capture
    );
    let refund_with_dispute = with(line("refund", -500, 0), "dispute_id", json!("dp-9"));
    assert_eq!(
        settlement_of(run(Input::Settlements, "pay-1", &refund_with_dispute)).line,
        Line::Refund {
            refund_id: "ref-1".into()
        }
    );
}

fn class_reason(result: Result<Event, Rejection>) -> String {
    result.expect_err("rejected").to_string()
}

#[test]
fn the_payout_id_is_decoded_when_present() {
    for (line_type, gross, fee) in LINES {
        let value = with(
            line(line_type, gross, fee),
            "payout_id",
            json!("po-2026-11-24"),
        );
        let s = settlement_of(run(Input::Settlements, "pay-1", &value));
        assert_eq!(s.payout_id.as_deref(), Some("po-2026-11-24"), "{line_type}");
        let mut null = line(line_type, gross, fee);
        null["payout_id"] = Value::Null;
        assert_eq!(
            settlement_of(run(Input::Settlements, "pay-1", &null)).payout_id,
            None
        );
    }
    // On a version-1 line as well (§7 needs it for captures).
    let v1 = with(settlement(), "payout_id", json!("po-9"));
    let s = settlement_of(run(Input::Settlements, "pay-1", &v1));
    assert_eq!(
        (s.line, s.payout_id.as_deref()),
        (Line::Capture, Some("po-9"))
    );
    // Printable non-ASCII is an ordinary id.
    let v1 = with(settlement(), "payout_id", json!("auszahlung-\u{e4}\u{80}"));
    assert!(run(Input::Settlements, "pay-1", &v1).is_ok());
}

#[test]
fn version_2_lines_keep_the_rules_of_section_1() {
    for (line_type, gross, fee) in LINES {
        let base = line(line_type, gross, fee);
        assert_eq!(
            class(run(Input::Settlements, "other", &base)),
            "key_mismatch"
        );
        assert_rejected(
            run(
                Input::Settlements,
                "pay-1",
                &with(base.clone(), "currency", json!("EURO")),
            ),
            "unknown_currency",
            "currency",
        );
        assert_rejected(
            run(
                Input::Settlements,
                "pay-1",
                &with(base.clone(), "settled_at", json!("2026-11-24 09:00")),
            ),
            "bad_timestamp",
            "settled_at",
        );
        assert_rejected(
            run(
                Input::Settlements,
                "pay-1",
                &with(base.clone(), "settlement_id", Value::Null),
            ),
            "missing_field",
            "settlement_id",
        );
        let kafka_ms = 1_800_000_000_000i64;
        let ahead = with(
            base.clone(),
            "settled_at",
            json!(recon_worker::event::format_timestamp(
                kafka_ms * 1000 + DAY_MICROS + 1
            )),
        );
        assert_rejected(
            run_at(Input::Settlements, "pay-1", &ahead, Some(kafka_ms)),
            "event_time_out_of_range",
            "settled_at",
        );
    }
}

/// Version-2 messages of either topic: a refund request, or a line of any type.
fn v2_message(kind: u8) -> (Input, Value) {
    match kind % 5 {
        0 => (Input::Payments, refund()),
        n => {
            let (line_type, gross, fee) = LINES[usize::from(n - 1)];
            (Input::Settlements, line(line_type, gross, fee))
        }
    }
}

fn mutated_v2_event() -> impl Strategy<Value = (Input, Vec<u8>)> {
    let field = prop::sample::select(vec![
        "event_id",
        "type",
        "refund_id",
        "dispute_id",
        "payout_id",
        "line_type",
        "payment_id",
        "amount_minor",
        "currency",
        "requested_at",
        "gross_minor",
        "fee_minor",
        "net_minor",
        "settled_at",
    ]);
    let value = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        (-MAX_MINOR - 2..=MAX_MINOR + 2).prop_map(Value::from),
        prop::sample::select(vec![
            "capture",
            "refund",
            "chargeback",
            "chargeback_reversal",
            "refund_requested",
            "settlement_line",
            "payment_captured",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(json!([])),
        Just(json!(true)),
    ];
    (
        any::<u8>(),
        prop::collection::vec((field, value), 0..4),
        any::<prop::sample::Index>(),
        any::<u8>(),
    )
        .prop_map(|(kind, edits, at, byte)| {
            let (input, mut base) = v2_message(kind);
            for (field, value) in edits {
                base = with(base, field, value);
            }
            let mut bytes = base.to_string().into_bytes();
            if byte % 3 == 0 && !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            (input, bytes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// Whatever a version-2 message is mutated into, decoding yields an event that
    /// keeps every rule of §6 or a rejection with a storable reason.
    #[test]
    fn mutated_v2_events_are_decoded_within_the_rules_or_rejected((input, bytes) in mutated_v2_event()) {
        match decode(input, Some(b"pay-1"), Some(&bytes), None, LIMITS) {
            Ok(event) => {
                prop_assert_eq!(event.payment_id(), "pay-1");
                prop_assert_eq!(event.input(), input);
                for text in stored_strings(&event) {
                    prop_assert!(!text.chars().any(is_forbidden), "{:?}", text);
                }
                match event {
                    Event::Payment(p) => prop_assert!((1..=MAX_MINOR).contains(&p.amount.get())),
                    Event::Refund(r) => prop_assert!((1..=MAX_MINOR).contains(&r.amount.get())),
                    Event::Settlement(s) => {
                        let (gross, fee) = (s.gross.get(), s.fee.get());
                        prop_assert!(gross != 0 && gross.abs() <= MAX_MINOR);
                        prop_assert_eq!(gross > 0, s.line.gross_is_positive(), "{:?}", s.line);
                        prop_assert!(fee.abs() <= MAX_MINOR);
                        if s.line == Line::Capture {
                            prop_assert!(fee >= 0);
                        }
                        match &s.line {
                            Line::Refund { refund_id } => prop_assert!(!refund_id.is_empty()),
                            Line::Chargeback { dispute_id } | Line::ChargebackReversal { dispute_id } => {
                                prop_assert!(!dispute_id.is_empty())
                            }
                            Line::Capture => {}
                        }
                    }
                }
            }
            Err(rejection) => {
                let reason = rejection.to_string();
                prop_assert!(!reason.is_empty());
                prop_assert!(!reason.contains('\0'), "{:?}", reason);
                prop_assert!(Rejection::CLASSES.contains(&rejection.class()));
            }
        }
    }

    #[test]
    fn no_v2_id_carries_a_control_character_to_postgres(
        kind in any::<u8>(),
        ids in prop::collection::vec(id_with_controls(), 4),
    ) {
        let (input, mut value) = v2_message(kind);
        let fields: &[&str] = if input == Input::Payments {
            &["event_id", "refund_id", "payment_id"]
        } else {
            &["refund_id", "dispute_id", "payout_id", "event_id"]
        };
        for (field, id) in fields.iter().zip(&ids) {
            value = with(value, field, json!(id));
        }
        let key = if input == Input::Payments { ids[2].clone() } else { "pay-1".to_owned() };
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
}

// ---------------------------------------------------------------------------------
// Payout announcements (§7): `payout_announced` on the payouts topic, keyed by
// `payout_id`. Every reason is asserted as the exact text stored in `rejected_events`.

fn announcement() -> Value {
    json!({
        "event_id": "evt-po-1", "type": "payout_announced", "payout_id": "po-1",
        "currency": "EUR", "net_minor": 123_456, "line_count": 3,
        "paid_at": "2026-11-25T06:00:00+01:00"
    })
}

/// Decodes an announcement keyed `key`, without a Kafka timestamp.
fn announce(key: &str, value: &Value) -> Result<Announcement, Rejection> {
    announce_at(key, value, None)
}

fn announce_at(
    key: &str,
    value: &Value,
    timestamp_ms: Option<i64>,
) -> Result<Announcement, Rejection> {
    decode_announcement(
        Some(key.as_bytes()),
        Some(value.to_string().as_bytes()),
        timestamp_ms,
        LIMITS,
    )
}

/// Asserts the rejection's class and its exact reason (the stored text).
fn assert_reason<T: std::fmt::Debug>(
    result: Result<T, Rejection>,
    expected_class: &str,
    expected_reason: &str,
) {
    let err = result.expect_err(expected_reason);
    assert_eq!(
        (err.class(), err.to_string().as_str()),
        (expected_class, expected_reason)
    );
    assert!(Rejection::CLASSES.contains(&err.class()));
}

/// The announcement with `field` set to `value` (removed when `value` is null).
fn announcement_with(field: &str, value: Value) -> Value {
    with(announcement(), field, value)
}

#[test]
fn a_valid_announcement_decodes_with_every_field() {
    let a = announce("po-1", &announcement()).expect("valid announcement");
    assert_eq!(
        (
            a.event_id.as_str(),
            a.payout_id.as_str(),
            a.currency.code(),
            a.net,
            a.line_count
        ),
        ("evt-po-1", "po-1", "EUR", 123_456, Some(3))
    );
    // The offset is applied: 06:00+01:00 is 05:00Z.
    assert_eq!(Some(a.paid_at), parse_timestamp("2026-11-25T05:00:00Z"));
    // Unknown fields are ignored, as on every message.
    let extra = announcement_with("bank_reference", json!("SEPA-42"));
    assert_eq!(announce("po-1", &extra), Ok(a));
}

#[test]
fn an_announcement_without_line_count_decodes() {
    let absent =
        announce("po-1", &announcement_with("line_count", Value::Null)).expect("line_count absent");
    assert_eq!(absent.line_count, None);
    let mut null = announcement();
    null["line_count"] = Value::Null;
    assert_eq!(
        announce("po-1", &null).expect("line_count null").line_count,
        None
    );
    // Both bounds of a given count.
    for count in [0, i64::MAX] {
        let value = announcement_with("line_count", json!(count));
        assert_eq!(
            announce("po-1", &value).expect("in range").line_count,
            Some(count)
        );
    }
}

#[test]
fn an_announcement_with_a_negative_or_zero_net_decodes() {
    // Refunds and chargebacks can outweigh captures: the payout takes money back.
    for net in [-5, 0, i64::MIN, i64::MAX] {
        let value = announcement_with("net_minor", json!(net));
        assert_eq!(announce("po-1", &value).expect("any i64").net, net);
    }
}

#[test]
fn announcement_bytes_level_rejections_are_those_of_every_message() {
    let big = announcement_with("padding", json!("x".repeat(MAX))).to_string();
    let values: [Option<&[u8]>; 7] = [
        None,
        Some(b""),
        Some(&[0xff, 0xfe, 0x7b]),
        Some(b"{\"event_id\":"),
        Some(b"[1,2]"),
        Some(b"\"text\""),
        Some(big.as_bytes()),
    ];
    let classes = [
        "empty",
        "empty",
        "not_utf8",
        "not_json",
        "not_object",
        "not_object",
        "too_large",
    ];
    for (value, expected) in values.into_iter().zip(classes) {
        let err = decode_announcement(Some(b"po-1"), value, None, LIMITS).expect_err(expected);
        assert_eq!(err.class(), expected);
        // The same steps, the same reason, whichever topic the bytes came from.
        let on_payments =
            decode(Input::Payments, Some(b"po-1"), value, None, LIMITS).expect_err(expected);
        assert_eq!(err, on_payments);
    }
    assert_reason(
        decode_announcement(Some(b"po-1"), Some(b"[1,2]"), None, LIMITS),
        "not_object",
        "value is JSON but not an object",
    );
    assert_reason(
        decode_announcement(Some(b"po-1"), Some(big.as_bytes()), None, LIMITS),
        "too_large",
        &format!("value is {} bytes, over the 65536-byte maximum", big.len()),
    );
}

#[test]
fn an_announcement_must_have_type_payout_announced() {
    assert_reason(
        announce("po-1", &announcement_with("type", Value::Null)),
        "missing_field",
        "missing field `type`",
    );
    assert_reason(
        announce("po-1", &announcement_with("type", json!(7))),
        "wrong_type",
        "field `type` must be a string",
    );
    // Near misses are unknown types, not wrong-topic ones.
    for found in ["payout_announce", "Payout_Announced", "payout_settled", ""] {
        assert_reason(
            announce("po-1", &announcement_with("type", json!(found))),
            "unknown_type",
            &format!("unknown event type {found:?}"),
        );
    }
}

#[test]
fn payments_and_settlements_types_on_the_payouts_topic_are_wrong_topic() {
    for found in ["payment_captured", "refund_requested", "settlement_line"] {
        assert_reason(
            announce("po-1", &announcement_with("type", json!(found))),
            "wrong_topic_type",
            &format!(
                "event type \"{found}\" does not belong on this topic (expected \"payout_announced\")"
            ),
        );
    }
    // A whole payment produced to the payouts topic: the type is read first.
    assert_reason(
        announce("pay-1", &payment()),
        "wrong_topic_type",
        "event type \"payment_captured\" does not belong on this topic (expected \"payout_announced\")",
    );
}

#[test]
fn payout_announced_on_the_payments_or_settlements_topic_is_wrong_topic() {
    assert_reason(
        run(Input::Payments, "po-1", &announcement()),
        "wrong_topic_type",
        "event type \"payout_announced\" does not belong on this topic (expected \"payment_captured\" or \"refund_requested\")",
    );
    assert_reason(
        run(Input::Settlements, "po-1", &announcement()),
        "wrong_topic_type",
        "event type \"payout_announced\" does not belong on this topic (expected \"settlement_line\")",
    );
    // The texts of the cases that existed before payouts are unchanged.
    assert_reason(
        run(Input::Payments, "pay-1", &settlement()),
        "wrong_topic_type",
        "event type \"settlement_line\" does not belong on this topic (expected \"payment_captured\" or \"refund_requested\")",
    );
    assert_reason(
        run(Input::Settlements, "pay-1", &payment()),
        "wrong_topic_type",
        "event type \"payment_captured\" does not belong on this topic (expected \"settlement_line\")",
    );
    assert_reason(
        run(
            Input::Settlements,
            "pay-1",
            &with(settlement(), "type", json!("payout")),
        ),
        "unknown_type",
        "unknown event type \"payout\"",
    );
}

#[test]
fn announcement_ids_follow_the_id_rules() {
    for field in ["event_id", "payout_id"] {
        // The key follows the payout_id, so only the rule under test can fail.
        let key_for = |id: &str| {
            if field == "payout_id" {
                id.to_owned()
            } else {
                "po-1".to_owned()
            }
        };
        let longest = "i".repeat(128);
        let value = announcement_with(field, json!(longest));
        let a = announce(&key_for(&longest), &value).expect("128 characters");
        assert_eq!(
            if field == "payout_id" {
                a.payout_id
            } else {
                a.event_id
            },
            longest
        );
        assert_reason(
            announce("po-1", &announcement_with(field, Value::Null)),
            "missing_field",
            &format!("missing field `{field}`"),
        );
        assert_reason(
            announce("po-1", &announcement_with(field, json!(42))),
            "wrong_type",
            &format!("field `{field}` must be a string"),
        );
        assert_reason(
            announce(&key_for(""), &announcement_with(field, json!(""))),
            "out_of_range",
            &format!("field `{field}` is out of range: 0 characters, expected 1..=128"),
        );
        let too_long = "\u{e9}".repeat(129);
        assert_reason(
            announce(
                &key_for(&too_long),
                &announcement_with(field, json!(too_long)),
            ),
            "out_of_range",
            &format!("field `{field}` is out of range: 129 characters, expected 1..=128"),
        );
        for (c, code) in [('\0', "U+0000"), ('\n', "U+000A"), ('\u{7f}', "U+007F")] {
            let id = format!("po{c}1");
            assert_reason(
                announce(&key_for(&id), &announcement_with(field, json!(id))),
                "control_character",
                &format!("field `{field}` contains the control character {code} at character 3"),
            );
        }
    }
}

#[test]
fn an_announcement_currency_must_be_an_active_iso_4217_code() {
    for code in ["XYZ", "eur", "HRK", "EURO", "EU\u{0}R"] {
        let err = announce("po-1", &announcement_with("currency", json!(code)))
            .expect_err("unknown currency");
        assert_eq!(err.class(), "unknown_currency");
        assert_eq!(
            err.to_string(),
            format!("field `currency` is not an active ISO 4217 code: {code:?}")
        );
        assert!(!err.to_string().contains('\0'));
    }
    assert_reason(
        announce("po-1", &announcement_with("currency", Value::Null)),
        "missing_field",
        "missing field `currency`",
    );
    assert_reason(
        announce("po-1", &announcement_with("currency", json!(978))),
        "wrong_type",
        "field `currency` must be a string",
    );
    let jpy = announce("po-1", &announcement_with("currency", json!("JPY"))).expect("JPY");
    assert_eq!(jpy.currency.code(), "JPY");
}

#[test]
fn an_announcement_net_minor_is_a_required_i64() {
    assert_reason(
        announce("po-1", &announcement_with("net_minor", Value::Null)),
        "missing_field",
        "missing field `net_minor`",
    );
    for value in [json!("123456"), json!(12.5), json!(true)] {
        assert_reason(
            announce("po-1", &announcement_with("net_minor", value)),
            "wrong_type",
            "field `net_minor` must be an integer",
        );
    }
    assert_reason(
        announce("po-1", &announcement_with("net_minor", json!(u64::MAX))),
        "out_of_range",
        "field `net_minor` is out of range: 18446744073709551615, expected -9223372036854775808..=9223372036854775807",
    );
    // Beyond i64 written as a float: out of range, not silently rounded.
    let below = decode_announcement(
        Some(b"po-1"),
        Some(
            announcement()
                .to_string()
                .replace("123456", "-1e19")
                .as_bytes(),
        ),
        None,
        LIMITS,
    );
    assert_reason(
        below,
        "out_of_range",
        "field `net_minor` is out of range: -1e+19, expected -9223372036854775808..=9223372036854775807",
    );
}

#[test]
fn an_announcement_line_count_when_given_is_a_non_negative_integer() {
    assert_reason(
        announce("po-1", &announcement_with("line_count", json!(-1))),
        "out_of_range",
        "field `line_count` is out of range: -1, expected 0..=9223372036854775807",
    );
    assert_reason(
        announce("po-1", &announcement_with("line_count", json!(i64::MIN))),
        "out_of_range",
        "field `line_count` is out of range: -9223372036854775808, expected 0..=9223372036854775807",
    );
    assert_reason(
        announce("po-1", &announcement_with("line_count", json!(u64::MAX))),
        "out_of_range",
        "field `line_count` is out of range: 18446744073709551615, expected 0..=9223372036854775807",
    );
    for value in [json!(2.5), json!(3.0), json!("3"), json!(true), json!([3])] {
        assert_reason(
            announce("po-1", &announcement_with("line_count", value)),
            "wrong_type",
            "field `line_count` must be an integer",
        );
    }
}

#[test]
fn an_announcement_paid_at_must_be_rfc_3339_with_offset() {
    assert_reason(
        announce("po-1", &announcement_with("paid_at", Value::Null)),
        "missing_field",
        "missing field `paid_at`",
    );
    assert_reason(
        announce("po-1", &announcement_with("paid_at", json!(1_800_000_000))),
        "wrong_type",
        "field `paid_at` must be a string",
    );
    for text in [
        "2026-11-25T06:00:00",
        "2026-11-25 06:00",
        "2026-13-01T00:00:00Z",
    ] {
        assert_reason(
            announce("po-1", &announcement_with("paid_at", json!(text))),
            "bad_timestamp",
            &format!("field `paid_at` is not an RFC 3339 timestamp with offset: {text:?}"),
        );
    }
}

#[test]
fn an_announcement_paid_before_1970_is_rejected() {
    assert_reason(
        announce_at(
            "po-1",
            &announcement_with("paid_at", json!("1969-12-31T23:59:59.999999Z")),
            Some(i64::MAX),
        ),
        "event_time_out_of_range",
        "field `paid_at` is 1969-12-31T23:59:59.999999Z: before 1970-01-01T00:00:00Z",
    );
    assert_reason(
        announce(
            "po-1",
            &announcement_with("paid_at", json!("0001-01-01T00:00:00Z")),
        ),
        "event_time_out_of_range",
        "field `paid_at` is 0001-01-01T00:00:00Z: before 1970-01-01T00:00:00Z",
    );
    let epoch = announcement_with("paid_at", json!("1970-01-01T00:00:00Z"));
    assert_eq!(announce("po-1", &epoch).expect("the epoch").paid_at, 0);
}

#[test]
fn an_announcement_paid_after_the_year_9999_is_rejected() {
    let last = announcement_with("paid_at", json!("9999-12-31T23:59:59.999999Z"));
    assert_eq!(
        announce("po-1", &last)
            .expect("the last instant of 9999")
            .paid_at,
        recon_worker::event::MAX_EVENT_TIME
    );
    // Valid text for an instant in the year 10000, with or without a Kafka timestamp.
    let after = announcement_with("paid_at", json!("9999-12-31T23:59:59-23:59"));
    for timestamp_ms in [None, Some(i64::MAX)] {
        assert_reason(
            announce_at("po-1", &after, timestamp_ms),
            "event_time_out_of_range",
            "field `paid_at` is +10000-01-01T23:58:59Z: after 9999-12-31T23:59:59.999999Z, the latest time stored",
        );
    }
}

#[test]
fn an_announcement_paid_too_far_ahead_of_the_kafka_timestamp_is_rejected() {
    let kafka_ms = 1_800_000_000_000i64; // 2027-01-15T08:00:00Z
    let kafka_micros = kafka_ms * 1000;
    let at = |micros: i64| {
        announcement_with(
            "paid_at",
            json!(recon_worker::event::format_timestamp(micros)),
        )
    };
    assert!(
        announce_at("po-1", &at(kafka_micros + DAY_MICROS), Some(kafka_ms)).is_ok(),
        "exactly the skew ahead is accepted"
    );
    assert_reason(
        announce_at("po-1", &at(kafka_micros + DAY_MICROS + 1), Some(kafka_ms)),
        "event_time_out_of_range",
        "field `paid_at` is 2027-01-16T08:00:00.000001Z: more than 1day ahead of the message's Kafka timestamp 2027-01-15T08:00:00Z",
    );
    // Without a Kafka timestamp there is nothing to compare with; the past is ordinary.
    assert!(announce_at("po-1", &at(kafka_micros + 400 * DAY_MICROS), None).is_ok());
    assert!(announce_at("po-1", &at(kafka_micros - 400 * DAY_MICROS), Some(kafka_ms)).is_ok());
    // The bound is the configured one.
    let hour = Limits {
        max_future_skew: 3600 * 1_000_000,
        ..LIMITS
    };
    let two_hours = at(kafka_micros + 2 * 3600 * 1_000_000).to_string();
    assert_reason(
        decode_announcement(Some(b"po-1"), Some(two_hours.as_bytes()), Some(kafka_ms), hour),
        "event_time_out_of_range",
        "field `paid_at` is 2027-01-15T10:00:00Z: more than 1h ahead of the message's Kafka timestamp 2027-01-15T08:00:00Z",
    );
}

#[test]
fn the_kafka_key_of_an_announcement_must_be_its_payout_id() {
    assert_reason(
        announce("pay-1", &announcement()),
        "key_mismatch",
        "Kafka key \"pay-1\" differs from payout_id \"po-1\"",
    );
    // Keyed by the event id instead: still the wrong partition.
    assert_reason(
        announce("evt-po-1", &announcement()),
        "key_mismatch",
        "Kafka key \"evt-po-1\" differs from payout_id \"po-1\"",
    );
    assert_reason(
        decode_announcement(
            None,
            Some(announcement().to_string().as_bytes()),
            None,
            LIMITS,
        ),
        "key_mismatch",
        "Kafka key \"<none>\" differs from payout_id \"po-1\"",
    );
    // A key that is not UTF-8 is shown lossily, and a stored reason holds no NUL.
    let err = decode_announcement(
        Some(b"po-\xff\x001"),
        Some(announcement().to_string().as_bytes()),
        None,
        LIMITS,
    )
    .expect_err("key mismatch");
    assert_eq!(
        err.to_string(),
        "Kafka key \"po-\u{fffd}\\01\" differs from payout_id \"po-1\""
    );
}

/// Stored reasons of `key_mismatch` on the matching topics predate payouts: the
/// generalised rejection must keep their text byte for byte.
#[test]
fn the_key_mismatch_reason_for_payment_id_is_unchanged() {
    assert_reason(
        run(Input::Payments, "pay-2", &payment()),
        "key_mismatch",
        "Kafka key \"pay-2\" differs from payment_id \"pay-1\"",
    );
    assert_reason(
        run(Input::Settlements, "po-1", &settlement()),
        "key_mismatch",
        "Kafka key \"po-1\" differs from payment_id \"pay-1\"",
    );
    assert_reason(
        decode(
            Input::Payments,
            None,
            Some(refund().to_string().as_bytes()),
            None,
            LIMITS,
        ),
        "key_mismatch",
        "Kafka key \"<none>\" differs from payment_id \"pay-1\"",
    );
}

/// Ids made of characters the contract allows (no control characters), 1..=128 of them.
fn valid_id() -> impl Strategy<Value = String> {
    "[^\u{0}-\u{1f}\u{7f}]{1,128}"
}

/// A valid announcement, as the JSON a producer sends, with the Kafka timestamp it was
/// sent at and the [`Announcement`] it must decode to.
fn valid_announcement() -> impl Strategy<Value = (Value, Option<i64>, Announcement)> {
    (
        (valid_id(), valid_id()),
        prop::sample::select(vec!["EUR", "USD", "JPY", "GBP", "KWD", "CHF"]),
        any::<i64>(),
        prop::option::of(0..=i64::MAX),
        any::<bool>(),
        0..=recon_worker::event::MAX_EVENT_TIME,
        prop::option::of(-(DAY_MICROS / 1000) + 1..=1_000_000_000_000i64),
    )
        .prop_map(
            |((event_id, payout_id), currency, net, line_count, null_count, paid_at, delay_ms)| {
                let mut value = json!({
                    "event_id": event_id, "type": "payout_announced", "payout_id": payout_id,
                    "currency": currency, "net_minor": net,
                    "paid_at": recon_worker::event::format_timestamp(paid_at),
                });
                match (line_count, null_count) {
                    (Some(count), _) => value["line_count"] = json!(count),
                    (None, true) => value["line_count"] = Value::Null,
                    (None, false) => {}
                }
                // A Kafka timestamp at most the skew before paid_at (or none).
                let timestamp_ms = delay_ms.map(|d| paid_at.div_euclid(1000).saturating_add(d));
                let expected = Announcement {
                    event_id,
                    payout_id,
                    currency: recon_worker::money::Currency::from_code(currency)
                        .expect("active code"),
                    net,
                    line_count,
                    paid_at,
                };
                (value, timestamp_ms, expected)
            },
        )
}

fn mutated_announcement() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::sample::select(vec![
        "event_id",
        "type",
        "payout_id",
        "currency",
        "net_minor",
        "line_count",
        "paid_at",
    ]);
    let value = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "payout_announced",
            "payment_captured",
            "settlement_line",
            "EUR",
            "po-1",
            "1969-12-31T23:59:59Z",
            "9999-12-31T23:59:59-23:59",
        ])
        .prop_map(Value::from),
        id_with_controls().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(json!([])),
        Just(json!(true)),
    ];
    (
        prop::collection::vec((field, value), 0..4),
        any::<prop::sample::Index>(),
        any::<u8>(),
    )
        .prop_map(|(edits, at, byte)| {
            let mut base = announcement();
            for (field, value) in edits {
                base = with(base, field, value);
            }
            let mut bytes = base.to_string().into_bytes();
            if byte % 3 == 0 && !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    #[test]
    fn decode_announcement_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        timestamp_ms in prop::option::of(any::<i64>()),
    ) {
        let limits = Limits { max_bytes: 256, ..LIMITS };
        if let Err(rejection) = decode_announcement(key.as_deref(), Some(&bytes), timestamp_ms, limits) {
            prop_assert!(Rejection::CLASSES.contains(&rejection.class()));
        }
    }

    #[test]
    fn valid_announcements_round_trip((value, timestamp_ms, expected) in valid_announcement()) {
        let bytes = value.to_string();
        let decoded = decode_announcement(
            Some(expected.payout_id.as_bytes()),
            Some(bytes.as_bytes()),
            timestamp_ms,
            LIMITS,
        );
        prop_assert_eq!(decoded, Ok(expected));
    }

    /// Whatever an announcement is mutated into, decoding yields one within §7's rules
    /// or a rejection with a storable reason.
    #[test]
    fn mutated_announcements_are_decoded_within_the_rules_or_rejected(bytes in mutated_announcement()) {
        match decode_announcement(Some(b"po-1"), Some(&bytes), None, LIMITS) {
            Ok(a) => {
                prop_assert_eq!(a.payout_id.as_str(), "po-1");
                let chars = a.event_id.chars().count();
                prop_assert!((1..=128).contains(&chars));
                prop_assert!(!a.event_id.chars().any(is_forbidden), "{:?}", a.event_id);
                prop_assert!(a.line_count.is_none_or(|count| count >= 0));
                prop_assert!((0..=recon_worker::event::MAX_EVENT_TIME).contains(&a.paid_at));
            }
            Err(rejection) => {
                let reason = rejection.to_string();
                prop_assert!(!reason.is_empty());
                prop_assert!(!reason.contains('\0'), "{:?}", reason);
                prop_assert!(Rejection::CLASSES.contains(&rejection.class()));
            }
        }
    }
}
