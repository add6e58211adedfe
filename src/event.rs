//! The input contract (contract §1): decoding and validating Kafka messages into
//! events, and the reasons a message is rejected.
//!
//! Decoding is total: every byte sequence yields either an [`Event`] or a
//! [`Rejection`]; nothing here panics, so a poison message can never stop a partition.
//! Times are kept as microseconds since the Unix epoch, PostgreSQL's resolution, so a
//! value read back from the database compares equal to the one decoded.

use std::fmt;

use serde_json::{Map, Value};

use crate::money::{Currency, MinorUnits, MAX_MINOR};

/// Microseconds since the Unix epoch (UTC).
pub type Micros = i64;

/// Longest string field the contract allows, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// At most this many bytes of a rejected message are kept in `rejected_events.payload`;
/// `payload_size` keeps the original length.
pub const REJECTED_PAYLOAD_CAP: usize = 64 * 1024;

/// Which of the two input topics a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Input {
    Payments,
    Settlements,
}

impl Input {
    pub const ALL: [Input; 2] = [Input::Payments, Input::Settlements];

    pub fn index(self) -> usize {
        match self {
            Input::Payments => 0,
            Input::Settlements => 1,
        }
    }

    /// The co-partitioned topic.
    pub fn other(self) -> Input {
        match self {
            Input::Payments => Input::Settlements,
            Input::Settlements => Input::Payments,
        }
    }

    /// The `event_kind` of the events this topic carries.
    pub fn event_kind(self) -> &'static str {
        match self {
            Input::Payments => "payment",
            Input::Settlements => "settlement",
        }
    }

    fn expected_type(self) -> &'static str {
        match self {
            Input::Payments => "payment_captured",
            Input::Settlements => "settlement_line",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub event_id: String,
    pub payment_id: String,
    pub merchant_id: String,
    pub amount: MinorUnits,
    pub currency: Currency,
    pub occurred_at: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub event_id: String,
    pub settlement_id: String,
    pub payment_id: String,
    pub gross: MinorUnits,
    pub fee: MinorUnits,
    pub net: i64,
    pub currency: Currency,
    pub settled_at: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Payment(Payment),
    Settlement(Settlement),
}

impl Event {
    pub fn input(&self) -> Input {
        match self {
            Event::Payment(_) => Input::Payments,
            Event::Settlement(_) => Input::Settlements,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Event::Payment(p) => &p.event_id,
            Event::Settlement(s) => &s.event_id,
        }
    }

    pub fn payment_id(&self) -> &str {
        match self {
            Event::Payment(p) => &p.payment_id,
            Event::Settlement(s) => &s.payment_id,
        }
    }

    /// `occurred_at` or `settled_at`: the time the watermark is made of.
    pub fn event_time(&self) -> Micros {
        match self {
            Event::Payment(p) => p.occurred_at,
            Event::Settlement(s) => s.settled_at,
        }
    }
}

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
    #[error("event type {found:?} does not belong on this topic (expected {expected:?})")]
    WrongTopicType {
        found: String,
        expected: &'static str,
    },
    #[error("Kafka key {key:?} differs from payment_id {payment_id:?}")]
    KeyMismatch { key: String, payment_id: String },
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
            Rejection::KeyMismatch { .. } => "key_mismatch",
        }
    }

    pub const CLASSES: [&'static str; 13] = [
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
        "key_mismatch",
    ];
}

/// Decodes one Kafka message from `input`. `key` is the Kafka key; `max_bytes` the
/// configured largest accepted value.
pub fn decode(
    input: Input,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Event, Rejection> {
    let bytes = match value {
        None | Some([]) => return Err(Rejection::Empty),
        Some(bytes) => bytes,
    };
    if bytes.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: bytes.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| Rejection::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| Rejection::NotJson {
        detail: e.to_string(),
    })?;
    let Value::Object(object) = value else {
        return Err(Rejection::NotObject);
    };
    let fields = Fields(&object);
    let event_type = fields.string("type")?;
    if event_type != input.expected_type() {
        let other = match input {
            Input::Payments => Input::Settlements,
            Input::Settlements => Input::Payments,
        };
        return Err(if event_type == other.expected_type() {
            Rejection::WrongTopicType {
                found: event_type.to_owned(),
                expected: input.expected_type(),
            }
        } else {
            Rejection::UnknownType {
                found: truncate_chars(event_type, MAX_ID_CHARS),
            }
        });
    }
    let event = match input {
        Input::Payments => Event::Payment(Payment {
            event_id: fields.id("event_id")?,
            payment_id: fields.id("payment_id")?,
            merchant_id: fields.id("merchant_id")?,
            amount: MinorUnits::new(fields.integer("amount_minor", 1, MAX_MINOR)?),
            currency: fields.currency()?,
            occurred_at: fields.timestamp("occurred_at")?,
        }),
        Input::Settlements => Event::Settlement(Settlement {
            event_id: fields.id("event_id")?,
            settlement_id: fields.id("settlement_id")?,
            payment_id: fields.id("payment_id")?,
            gross: MinorUnits::new(fields.integer("gross_minor", 1, MAX_MINOR)?),
            fee: MinorUnits::new(fields.integer("fee_minor", 0, MAX_MINOR)?),
            net: fields.integer("net_minor", i64::MIN, i64::MAX)?,
            currency: fields.currency()?,
            settled_at: fields.timestamp("settled_at")?,
        }),
    };
    if key != Some(event.payment_id().as_bytes()) {
        return Err(Rejection::KeyMismatch {
            key: key
                .map(|k| truncate_chars(&String::from_utf8_lossy(k), MAX_ID_CHARS))
                .unwrap_or_else(|| "<none>".to_owned()),
            payment_id: event.payment_id().to_owned(),
        });
    }
    Ok(event)
}

fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Typed access to the fields of a JSON object, each failure a [`Rejection`].
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, field: &'static str) -> Result<&'a Value, Rejection> {
        match self.0.get(field) {
            None | Some(Value::Null) => Err(Rejection::MissingField { field }),
            Some(value) => Ok(value),
        }
    }

    fn string(&self, field: &'static str) -> Result<&'a str, Rejection> {
        self.get(field)?.as_str().ok_or(Rejection::WrongType {
            field,
            expected: "a string",
        })
    }

    fn id(&self, field: &'static str) -> Result<String, Rejection> {
        let text = self.string(field)?;
        let chars = text.chars().count();
        if chars == 0 || chars > MAX_ID_CHARS {
            return Err(Rejection::OutOfRange {
                field,
                detail: format!("{chars} characters, expected 1..={MAX_ID_CHARS}"),
            });
        }
        Ok(text.to_owned())
    }

    fn integer(&self, field: &'static str, min: i64, max: i64) -> Result<i64, Rejection> {
        let number = match self.get(field)? {
            Value::Number(number) => number,
            _ => {
                return Err(Rejection::WrongType {
                    field,
                    expected: "an integer",
                })
            }
        };
        let out_of_range = |shown: String| Rejection::OutOfRange {
            field,
            detail: format!("{shown}, expected {min}..={max}"),
        };
        if let Some(value) = number.as_i64() {
            return if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(out_of_range(value.to_string()))
            };
        }
        if number.is_u64() {
            return Err(out_of_range(number.to_string()));
        }
        // A float: an integer too large for i64 written with an exponent or digits
        // is out of range; anything with a fraction is the wrong type.
        match number.as_f64() {
            Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() >= 9.2e18 => {
                Err(out_of_range(number.to_string()))
            }
            _ => Err(Rejection::WrongType {
                field,
                expected: "an integer",
            }),
        }
    }

    fn currency(&self) -> Result<Currency, Rejection> {
        let code = self.string("currency")?;
        Currency::from_code(code).ok_or_else(|| Rejection::UnknownCurrency {
            code: truncate_chars(code, 16),
        })
    }

    fn timestamp(&self, field: &'static str) -> Result<Micros, Rejection> {
        let text = self.string(field)?;
        parse_timestamp(text).ok_or_else(|| Rejection::BadTimestamp {
            field,
            value: truncate_chars(text, 64),
        })
    }
}

/// RFC 3339 with an explicit offset, to microseconds (sub-microsecond digits are
/// truncated, as PostgreSQL would).
pub fn parse_timestamp(text: &str) -> Option<Micros> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(parsed.timestamp_micros())
}

/// Formats microseconds as RFC 3339 UTC, for producers and tests.
pub fn format_timestamp(micros: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| micros.to_string())
}

impl Input {
    /// The `topic` label of metrics: the input's role, whatever the topic is named.
    pub fn label(self) -> &'static str {
        match self {
            Input::Payments => "payments",
            Input::Settlements => "settlements",
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
