//! Bad messages, one of each rejection class in turn (contract §1, "Bad input").

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use recon_worker::event::{format_timestamp, Input};

use super::{Plan, Record};

/// Number of distinct bad-input classes [`poison`] cycles through.
pub const POISON_CLASSES: usize = 18;

/// The `n`-th bad message (cycling through every rejection class).
pub(super) fn poison(plan: &Plan, rng: &mut StdRng, n: usize) -> (Input, &'static str, Record) {
    let key = format!("{}bad-{n}", plan.id_prefix);
    let at = format_timestamp(plan.base_time);
    let payment = |fields: serde_json::Value| {
        let mut base = json!({
            "event_id": format!("{key}-e"), "type": "payment_captured", "payment_id": key.clone(),
            "merchant_id": "m", "amount_minor": 100, "currency": "EUR", "occurred_at": at.clone()
        });
        if let (Some(base), Some(fields)) = (base.as_object_mut(), fields.as_object()) {
            for (k, v) in fields {
                if v.is_null() {
                    base.remove(k);
                } else {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
        base.to_string().into_bytes()
    };
    // A settlement line of contract §6 with `fields` changed.
    let line = |fields: serde_json::Value| {
        let mut base = json!({
            "event_id": format!("{key}-e"), "type": "settlement_line", "settlement_id": "po",
            "payment_id": key.clone(), "line_type": "refund", "refund_id": format!("{key}-rf"),
            "gross_minor": -100, "fee_minor": 0, "net_minor": -100, "currency": "EUR",
            "settled_at": at.clone()
        });
        if let (Some(base), Some(fields)) = (base.as_object_mut(), fields.as_object()) {
            for (k, v) in fields {
                base.insert(k.clone(), v.clone());
            }
        }
        base.to_string().into_bytes()
    };
    let class_index = n % POISON_CLASSES;
    // Only the classes whose value is no event may go to either topic; the line types
    // belong to settlement lines.
    let coin = rng.random_bool(0.5);
    let input = if (coin && matches!(class_index, 12 | 13)) || matches!(class_index, 16 | 17) {
        Input::Settlements
    } else {
        Input::Payments
    };
    let (class, key_bytes, value): (&'static str, Option<Vec<u8>>, Option<Vec<u8>>) =
        match class_index {
            0 => (
                "not_utf8",
                Some(key.clone().into_bytes()),
                Some(vec![0xff, 0xfe, b'{', 0x80]),
            ),
            1 => (
                "not_json",
                Some(key.clone().into_bytes()),
                Some(b"{\"event_id\": ".to_vec()),
            ),
            2 => (
                "not_object",
                Some(key.clone().into_bytes()),
                Some(b"[1, 2, 3]".to_vec()),
            ),
            3 => (
                "missing_field",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"amount_minor": null}))),
            ),
            4 => (
                "wrong_type",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"amount_minor": "100"}))),
            ),
            5 => (
                "out_of_range",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"amount_minor": 0}))),
            ),
            6 => (
                "unknown_currency",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"currency": "XYZ"}))),
            ),
            7 => (
                "bad_timestamp",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"occurred_at": "yesterday"}))),
            ),
            8 => (
                "unknown_type",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"type": "refund_issued"}))),
            ),
            9 => (
                "wrong_topic_type",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"type": "settlement_line"}))),
            ),
            10 => (
                "key_mismatch",
                Some(b"someone-else".to_vec()),
                Some(payment(json!({}))),
            ),
            11 => (
                "too_large",
                Some(key.clone().into_bytes()),
                Some(payment(
                    json!({"padding": "x".repeat(plan.max_message_bytes)}),
                )),
            ),
            12 => ("empty", Some(key.clone().into_bytes()), None),
            13 => (
                "not_json",
                Some(key.clone().into_bytes()),
                Some(b"\"just a string".to_vec()),
            ),
            14 => {
                // The Kafka key is the payment id, NUL included: only the control
                // character itself is wrong (PostgreSQL cannot store it).
                let payment_id = format!("{key}\u{0}x");
                (
                    "control_character",
                    Some(payment_id.clone().into_bytes()),
                    Some(payment(json!({ "payment_id": payment_id }))),
                )
            }
            // Before 1970 rather than far in the future: rejected whatever the Kafka
            // timestamp, so the class is the same where there is none (benchmarks).
            15 => (
                "event_time_out_of_range",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"occurred_at": "1969-07-20T20:17:40Z"}))),
            ),
            // Contract §6: a line type no version knows.
            16 => (
                "unknown_line_type",
                Some(key.clone().into_bytes()),
                Some(line(json!({"line_type": "adjustment"}))),
            ),
            // A refund line paying the merchant: its sign contradicts its type.
            _ => (
                "sign_contradicts_type",
                Some(key.clone().into_bytes()),
                Some(line(json!({"gross_minor": 100, "net_minor": 100}))),
            ),
        };
    (
        input,
        class,
        Record {
            topic: input.into(),
            key: key_bytes,
            value,
        },
    )
}
