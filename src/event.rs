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

/// Earliest event time accepted: 1970-01-01T00:00:00Z. Nothing the worker reconciles
/// predates it, and such a time is a producer's default value, not a real event.
pub const MIN_EVENT_TIME: Micros = 0;

/// Latest event time accepted: 9999-12-31T23:59:59.999999Z, the last instant RFC 3339's
/// four-digit years can name in UTC. A timestamp such as `9999-12-31T23:59:59-23:59`
/// is valid text for an instant in the year 10000; without a Kafka timestamp to bound
/// it, it was accepted and then stored clamped to this instant (a time other than the
/// one the engine matched with). Found by the whole-path fuzz test.
pub const MAX_EVENT_TIME: Micros = 253_402_300_799_999_999;

/// What [`decode`] checks beyond the contract's fixed rules (contract §1, §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RECON_MAX_MESSAGE_BYTES`: largest accepted value.
    pub max_bytes: usize,
    /// `RECON_MAX_FUTURE_SKEW`: how far an event time may be ahead of its message's
    /// Kafka timestamp.
    pub max_future_skew: Micros,
}

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
    pub const fn event_kind(self) -> &'static str {
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
            Rejection::KeyMismatch { .. } => "key_mismatch",
            Rejection::ControlCharacter { .. } => "control_character",
            Rejection::EventTimeOutOfRange { .. } => "event_time_out_of_range",
        }
    }

    pub const CLASSES: [&'static str; 15] = [
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
        "control_character",
        "event_time_out_of_range",
    ];
}

/// Decodes one Kafka message from `input`. `key` is the Kafka key; `timestamp_ms` the
/// message's Kafka timestamp, when it has one (without it the future bound is not
/// checked: there is nothing trustworthy to compare with).
pub fn decode(
    input: Input,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    limits: Limits,
) -> Result<Event, Rejection> {
    let max_bytes = limits.max_bytes;
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
    check_event_time(&event, timestamp_ms, limits.max_future_skew)?;
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

/// Contract §1: no event time before 1970, none more than the configured skew ahead of
/// the message's Kafka timestamp, none after the year 9999.
fn check_event_time(
    event: &Event,
    timestamp_ms: Option<i64>,
    max_future_skew: Micros,
) -> Result<(), Rejection> {
    let (field, at) = match event {
        Event::Payment(p) => ("occurred_at", p.occurred_at),
        Event::Settlement(s) => ("settled_at", s.settled_at),
    };
    let out_of_range = |detail: String| Rejection::EventTimeOutOfRange {
        field,
        value: format_timestamp(at),
        detail,
    };
    if at < MIN_EVENT_TIME {
        return Err(out_of_range("before 1970-01-01T00:00:00Z".to_owned()));
    }
    if at > MAX_EVENT_TIME {
        return Err(out_of_range(
            "after 9999-12-31T23:59:59.999999Z, the latest time stored".to_owned(),
        ));
    }
    // A producer's clock may run a little ahead of the broker's; saturating, so an
    // absurd timestamp cannot overflow into acceptance.
    if let Some(kafka_ms) = timestamp_ms {
        let latest = kafka_ms
            .saturating_mul(1000)
            .saturating_add(max_future_skew);
        if at > latest {
            return Err(out_of_range(format!(
                "more than {} ahead of the message's Kafka timestamp {}",
                humantime::format_duration(std::time::Duration::from_micros(
                    u64::try_from(max_future_skew).unwrap_or(0)
                )),
                format_timestamp(kafka_ms.saturating_mul(1000))
            )));
        }
    }
    Ok(())
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
        if let Some((index, c)) = text.chars().enumerate().find(|(_, c)| is_forbidden(*c)) {
            return Err(Rejection::ControlCharacter {
                field,
                code: format!("U+{:04X}", u32::from(c)),
                position: index + 1,
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

/// The characters contract §1 forbids in ids: U+0000–U+001F and U+007F.
fn is_forbidden(c: char) -> bool {
    c <= '\u{1f}' || c == '\u{7f}'
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
