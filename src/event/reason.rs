//! Why a message is rejected: the `reason` stored in `rejected_events` and the
//! low-cardinality class used as a metric label.

/// Why a message was rejected. `Display` is the human-readable `reason` stored in
/// `rejected_events`; [`Rejection::class`] is the low-cardinality metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("empty value (tombstone)")]
    Empty,
    #[error("value is {size} bytes, over the {max}-byte maximum")]
    TooLarge { size: usize, max: usize },
    #[error("value is not valid UTF-8 (at byte {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("value is not JSON: {detail}")]
    NotJson { detail: String },
    #[error("value is JSON but not an object")]
    NotObject,
    #[error("missing field `{field}`")]
    MissingField { field: &'static str },
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field `{field}` is out of range: {detail}")]
    OutOfRange { field: &'static str, detail: String },
    #[error("field `currency` is not an active ISO 4217 code: {code:?}")]
    UnknownCurrency { code: String },
    #[error("field `{field}` is not an RFC 3339 timestamp with offset: {value:?}")]
    BadTimestamp { field: &'static str, value: String },
    #[error("unknown event type {found:?}")]
    UnknownType { found: String },
    #[error("event type {found:?} does not belong on this topic (expected \"{expected}\")")]
    WrongTopicType { found: String, expected: String },
    #[error("unknown line_type {found:?}")]
    UnknownLineType { found: String },
    /// Contract §6: amounts are signed in the merchant's direction.
    #[error("gross_minor {gross} contradicts line_type {line_type:?} (positive for capture and chargeback_reversal, negative for refund and chargeback)")]
    SignContradictsType { line_type: &'static str, gross: i64 },
    /// The Kafka key is not the id the message is partitioned by (`payment_id`, or
    /// `payout_id` on the payouts topic), so the message may sit on the wrong partition.
    /// For `payment_id` the text is the one stored before payouts existed, so stored
    /// reasons read alike.
    #[error("Kafka key {key:?} differs from {field} {value:?}")]
    KeyMismatch {
        key: String,
        /// The field the key must equal.
        field: &'static str,
        value: String,
    },
    /// PostgreSQL cannot store U+0000 in text at all, and the other control characters
    /// make ids that no operator can read or type (contract §1).
    #[error("field `{field}` contains the control character {code} at character {position}")]
    ControlCharacter {
        field: &'static str,
        /// Like `U+0000`.
        code: String,
        /// 1-based, in characters.
        position: usize,
    },
    /// An event time the watermark must not follow: one such event would drag its
    /// pair's watermark decades ahead and fire every deadline of the pair at once.
    #[error("field `{field}` is {value}: {detail}")]
    EventTimeOutOfRange {
        field: &'static str,
        value: String,
        detail: String,
    },
}

impl Rejection {
    /// Stable, low-cardinality class for metrics labels.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::NotUtf8 { .. } => "not_utf8",
            Rejection::NotJson { .. } => "not_json",
            Rejection::NotObject => "not_object",
            Rejection::MissingField { .. } => "missing_field",
            Rejection::WrongType { .. } => "wrong_type",
            Rejection::OutOfRange { .. } => "out_of_range",
            Rejection::UnknownCurrency { .. } => "unknown_currency",
            Rejection::BadTimestamp { .. } => "bad_timestamp",
            Rejection::UnknownType { .. } => "unknown_type",
            Rejection::WrongTopicType { .. } => "wrong_topic_type",
            Rejection::UnknownLineType { .. } => "unknown_line_type",
            Rejection::SignContradictsType { .. } => "sign_contradicts_type",
            Rejection::KeyMismatch { .. } => "key_mismatch",
            Rejection::ControlCharacter { .. } => "control_character",
            Rejection::EventTimeOutOfRange { .. } => "event_time_out_of_range",
        }
    }

    pub const CLASSES: [&'static str; 17] = [
        "empty",
        "too_large",
        "not_utf8",
        "not_json",
        "not_object",
        "missing_field",
        "wrong_type",
        "out_of_range",
        "unknown_currency",
        "bad_timestamp",
        "unknown_type",
        "wrong_topic_type",
        "unknown_line_type",
        "sign_contradicts_type",
        "key_mismatch",
        "control_character",
        "event_time_out_of_range",
    ];
}
