//! Decoding one Kafka message into an [`Event`] (payments and settlements topics) or an
//! [`Announcement`] (payouts topic, contract §7), or the [`Rejection`] saying why not.
//! Total: every byte sequence yields one or the other, and nothing here panics.
//!
//! Both decoders share the byte-level steps (`object`), the field rules (`Fields`),
//! the §1 time rules (`check_time`) and the key rule (`check_key`), so a rule
//! tightened for one topic is tightened for all.

use serde_json::{Map, Value};

use super::{
    format_timestamp, parse_timestamp, Announcement, Event, Input, Limits, Line, Micros, Payment,
    Refund, Rejection, Settlement, Topic, MAX_EVENT_TIME, MAX_ID_CHARS, MIN_EVENT_TIME,
};
use crate::money::{Currency, MinorUnits, MAX_MINOR};

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
    let object = object(value, limits.max_bytes)?;
    let fields = Fields(&object);
    let event_type = fields.string("type")?;
    let event = match (input, event_type) {
        (Input::Payments, "payment_captured") => Event::Payment(payment(&fields)?),
        (Input::Payments, "refund_requested") => Event::Refund(refund(&fields)?),
        (Input::Settlements, "settlement_line") => Event::Settlement(settlement(&fields)?),
        (_, found) => return Err(type_rejection(Topic::from(input), found)),
    };
    check_time(
        event.event_time_field(),
        event.event_time(),
        timestamp_ms,
        limits.max_future_skew,
    )?;
    check_key(key, "payment_id", event.payment_id())?;
    Ok(event)
}

/// Decodes one message of the payouts topic (contract §7): a `payout_announced`, keyed
/// by its `payout_id`. Arguments as for [`decode`].
pub fn decode_announcement(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    limits: Limits,
) -> Result<Announcement, Rejection> {
    let object = object(value, limits.max_bytes)?;
    let fields = Fields(&object);
    match fields.string("type")? {
        "payout_announced" => {}
        found => return Err(type_rejection(Topic::Payouts, found)),
    }
    let announcement = Announcement {
        event_id: fields.id("event_id")?,
        payout_id: fields.id("payout_id")?,
        currency: fields.currency()?,
        // Signed and unbounded within i64, as a line's `net_minor`: a payout can be
        // negative (refunds and chargebacks exceeding captures) and is a sum of lines.
        net: fields.integer("net_minor", i64::MIN, i64::MAX)?,
        line_count: fields.optional_integer("line_count", 0, i64::MAX)?,
        paid_at: fields.timestamp("paid_at")?,
    };
    // `paid_at` is what the payout's deadline counts from: the same §1 bounds keep one
    // absurd announcement from sitting overdue or never due.
    check_time(
        "paid_at",
        announcement.paid_at,
        timestamp_ms,
        limits.max_future_skew,
    )?;
    check_key(key, "payout_id", &announcement.payout_id)?;
    Ok(announcement)
}

/// The byte-level rules every message shares: not empty (a tombstone), within the size
/// limit, UTF-8, JSON, an object.
fn object(value: Option<&[u8]>, max_bytes: usize) -> Result<Map<String, Value>, Rejection> {
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
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(Rejection::NotObject),
    }
}

/// Why `found` is not a type `topic` carries: another topic's type is a message
/// produced to the wrong topic (worth telling apart from a typo or a new type);
/// anything else is unknown.
fn type_rejection(topic: Topic, found: &str) -> Rejection {
    let elsewhere = Topic::ALL
        .into_iter()
        .filter(|other| *other != topic)
        .any(|other| other.types().contains(&found));
    if elsewhere {
        Rejection::WrongTopicType {
            found: found.to_owned(),
            expected: topic.types().join("\" or \""),
        }
    } else {
        Rejection::UnknownType {
            found: truncate_chars(found, MAX_ID_CHARS),
        }
    }
}

/// The Kafka key must be the id the message is partitioned by, `field`'s `value`:
/// otherwise the message may sit on another partition than its counterparts.
fn check_key(key: Option<&[u8]>, field: &'static str, value: &str) -> Result<(), Rejection> {
    if key == Some(value.as_bytes()) {
        return Ok(());
    }
    Err(Rejection::KeyMismatch {
        key: key
            .map(|k| truncate_chars(&String::from_utf8_lossy(k), MAX_ID_CHARS))
            .unwrap_or_else(|| "<none>".to_owned()),
        field,
        value: value.to_owned(),
    })
}

/// Contract §1: no event time (`field`, at `at`) before 1970, none more than the
/// configured skew ahead of the message's Kafka timestamp, none after the year 9999.
fn check_time(
    field: &'static str,
    at: Micros,
    timestamp_ms: Option<i64>,
    max_future_skew: Micros,
) -> Result<(), Rejection> {
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

fn payment(fields: &Fields<'_>) -> Result<Payment, Rejection> {
    Ok(Payment {
        event_id: fields.id("event_id")?,
        payment_id: fields.id("payment_id")?,
        merchant_id: fields.id("merchant_id")?,
        amount: MinorUnits::new(fields.integer("amount_minor", 1, MAX_MINOR)?),
        currency: fields.currency()?,
        occurred_at: fields.timestamp("occurred_at")?,
    })
}

/// `refund_requested` (contract §6).
fn refund(fields: &Fields<'_>) -> Result<Refund, Rejection> {
    Ok(Refund {
        event_id: fields.id("event_id")?,
        refund_id: fields.id("refund_id")?,
        payment_id: fields.id("payment_id")?,
        amount: MinorUnits::new(fields.integer("amount_minor", 1, MAX_MINOR)?),
        currency: fields.currency()?,
        requested_at: fields.timestamp("requested_at")?,
    })
}

/// `settlement_line`, version 1 or 2 (contract §1, §6). A line without `line_type` is
/// a capture and is read exactly as version 1 read it: positive gross, fee ≥ 0. The
/// other types carry signed amounts in the merchant's direction, a fee that may be
/// given back (negative), and the id their type requires.
fn settlement(fields: &Fields<'_>) -> Result<Settlement, Rejection> {
    let event_id = fields.id("event_id")?;
    let settlement_id = fields.id("settlement_id")?;
    let payment_id = fields.id("payment_id")?;
    let line = line(fields)?;
    let (gross, fee) = match line {
        Line::Capture => (
            fields.integer("gross_minor", 1, MAX_MINOR)?,
            fields.integer("fee_minor", 0, MAX_MINOR)?,
        ),
        _ => {
            let gross = fields.integer("gross_minor", -MAX_MINOR, MAX_MINOR)?;
            if gross == 0 || (gross > 0) != line.gross_is_positive() {
                return Err(Rejection::SignContradictsType {
                    line_type: line.line_type(),
                    gross,
                });
            }
            (gross, fields.integer("fee_minor", -MAX_MINOR, MAX_MINOR)?)
        }
    };
    Ok(Settlement {
        event_id,
        settlement_id,
        payment_id,
        gross: MinorUnits::new(gross),
        fee: MinorUnits::new(fee),
        net: fields.integer("net_minor", i64::MIN, i64::MAX)?,
        currency: fields.currency()?,
        settled_at: fields.timestamp("settled_at")?,
        payout_id: fields.optional_id("payout_id")?,
        line,
    })
}

/// `line_type` and the id it requires. Ids a type does not use are still checked
/// when present (every rule of §1 applies to them), then ignored.
fn line(fields: &Fields<'_>) -> Result<Line, Rejection> {
    let refund_id = fields.optional_id("refund_id")?;
    let dispute_id = fields.optional_id("dispute_id")?;
    let line_type = match fields.0.get("line_type") {
        None | Some(Value::Null) => return Ok(Line::Capture),
        Some(_) => fields.string("line_type")?,
    };
    let required =
        |id: Option<String>, field: &'static str| id.ok_or(Rejection::MissingField { field });
    Ok(match line_type {
        "capture" => Line::Capture,
        "refund" => Line::Refund {
            refund_id: required(refund_id, "refund_id")?,
        },
        "chargeback" => Line::Chargeback {
            dispute_id: required(dispute_id, "dispute_id")?,
        },
        "chargeback_reversal" => Line::ChargebackReversal {
            dispute_id: required(dispute_id, "dispute_id")?,
        },
        other => {
            return Err(Rejection::UnknownLineType {
                found: truncate_chars(other, MAX_ID_CHARS),
            })
        }
    })
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

    /// An id that may be absent (or null); when present, every rule of an id applies.
    fn optional_id(&self, field: &'static str) -> Result<Option<String>, Rejection> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.id(field).map(Some),
        }
    }

    /// An integer that may be absent (or null); when present, the rules of
    /// [`Fields::integer`] apply.
    fn optional_integer(
        &self,
        field: &'static str,
        min: i64,
        max: i64,
    ) -> Result<Option<i64>, Rejection> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.integer(field, min, max).map(Some),
        }
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
