//! The JSON of each message type, as the contract defines it (§1, §6 and §7).

use serde_json::json;

use recon_worker::event::{format_timestamp, Line, Micros};

use super::scenarios::Amounts;

pub(super) fn payment_json(
    event_id: &str,
    payment_id: &str,
    amount: i64,
    currency: &str,
    at: Micros,
) -> Vec<u8> {
    json!({
        "event_id": event_id,
        "type": "payment_captured",
        "payment_id": payment_id,
        "merchant_id": "merchant-42",
        "amount_minor": amount,
        "currency": currency,
        "occurred_at": format_timestamp(at),
        "schema_version": 3
    })
    .to_string()
    .into_bytes()
}

/// A version-1 `settlement_line` (no `line_type`: a capture), with a `payout_id`
/// when given (an optional field of contract §6 on any line).
#[allow(clippy::too_many_arguments)]
pub(super) fn settlement_json(
    event_id: &str,
    payment_id: &str,
    gross: i64,
    fee: i64,
    net: i64,
    currency: &str,
    at: Micros,
    payout_id: Option<&str>,
) -> Vec<u8> {
    let mut value = json!({
        "event_id": event_id,
        "type": "settlement_line",
        "settlement_id": "payout-2026-11-23",
        "payment_id": payment_id,
        "gross_minor": gross,
        "fee_minor": fee,
        "net_minor": net,
        "currency": currency,
        "settled_at": format_timestamp(at)
    });
    if let (Some(fields), Some(payout_id)) = (value.as_object_mut(), payout_id) {
        fields.insert("payout_id".into(), payout_id.into());
    }
    value.to_string().into_bytes()
}

/// `refund_requested` (contract §6), with a field no version of the contract knows
/// (producers add fields over time; the worker ignores them).
pub(super) fn refund_json(
    event_id: &str,
    refund_id: &str,
    payment_id: &str,
    amount: i64,
    currency: &str,
    at: Micros,
) -> Vec<u8> {
    json!({
        "event_id": event_id,
        "type": "refund_requested",
        "refund_id": refund_id,
        "payment_id": payment_id,
        "amount_minor": amount,
        "currency": currency,
        "requested_at": format_timestamp(at),
        "reason": "requested_by_customer"
    })
    .to_string()
    .into_bytes()
}

/// A version-2 `settlement_line` (contract §6): `line_type` always written, the id its
/// type requires, `payout_id` when given. Amounts signed in the merchant's direction.
pub(super) fn line_json(
    event_id: &str,
    payment_id: &str,
    line: &Line,
    amounts: Amounts,
    currency: &str,
    at: Micros,
    payout_id: Option<&str>,
) -> Vec<u8> {
    let mut value = json!({
        "event_id": event_id,
        "type": "settlement_line",
        "settlement_id": "payout-2026-11-23",
        "payment_id": payment_id,
        "line_type": line.line_type(),
        "gross_minor": amounts.gross,
        "fee_minor": amounts.fee,
        "net_minor": amounts.net,
        "currency": currency,
        "settled_at": format_timestamp(at)
    });
    if let Some(fields) = value.as_object_mut() {
        if let Some(refund_id) = line.refund_id() {
            fields.insert("refund_id".into(), refund_id.into());
        }
        if let Some(dispute_id) = line.dispute_id() {
            fields.insert("dispute_id".into(), dispute_id.into());
        }
        if let Some(payout_id) = payout_id {
            fields.insert("payout_id".into(), payout_id.into());
        }
    }
    value.to_string().into_bytes()
}

/// `payout_announced` (contract §7), keyed by `payout_id`; `line_count` only when
/// given (it is optional).
pub(super) fn announcement_json(
    event_id: &str,
    payout_id: &str,
    currency: &str,
    net: i64,
    line_count: Option<i64>,
    paid_at: Micros,
) -> Vec<u8> {
    let mut value = json!({
        "type": "payout_announced",
        "event_id": event_id,
        "payout_id": payout_id,
        "currency": currency,
        "net_minor": net,
        "paid_at": format_timestamp(paid_at)
    });
    if let (Some(fields), Some(line_count)) = (value.as_object_mut(), line_count) {
        fields.insert("line_count".into(), line_count.into());
    }
    value.to_string().into_bytes()
}
