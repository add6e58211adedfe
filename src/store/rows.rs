//! How the crate's values look in PostgreSQL: the typed rows the store's queries
//! return, and the text mappings of the event kind, the outcome and the currency.
//!
//! Kept apart from the queries so that every column is read by name into a typed
//! field (never by position, which silently shifts when a select list changes) and
//! every text value is parsed in one place. A kind, outcome or currency read back that
//! the crate does not know is a decode error — a permanent [`super::StoreError`] —
//! never a default: a value this code did not write means the table holds something
//! it cannot reason about, and guessing (as an earlier parser did, mapping any unknown
//! kind to a settlement) would corrupt matching.
//!
//! The mappings live here rather than beside the types: the engine and the event
//! module stay free of sqlx, and implementing sqlx's traits for the crate's own types
//! from this module is what the orphan rules allow.

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

use crate::engine::{Outcome, StoredEvent};
use crate::event::{EventKind, Input, Line, Micros};
use crate::money::Currency;
use crate::pair::{PairPosition, PerInput, PerTopic};

/// An `event_kind` the crate does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown event kind {0:?}")]
pub struct UnknownEventKind(pub String);

/// A `line_type` the crate does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown line type {0:?}")]
pub struct UnknownLineType(pub String);

/// A `currency` that is not an active ISO 4217 code.
#[derive(Debug, thiserror::Error)]
#[error("unknown currency {0:?}")]
pub struct UnknownCurrency(pub String);

/// The event kind named `kind` (the inverse of [`EventKind::as_str`]).
pub fn kind_of_text(kind: &str) -> Result<EventKind, UnknownEventKind> {
    EventKind::parse(kind).ok_or_else(|| UnknownEventKind(kind.to_owned()))
}

/// The `event_kind` column of `recon_events`: the topic's kind, `payment` for every
/// event of the payments topic (payments and refund requests alike) and `settlement`
/// for lines. The table's key is (event_id, event_kind), so it is unique per topic,
/// which is what makes an event id sent again on its topic a redelivery whatever its
/// type (contract §1): a refund request under the id of a stored payment clashes, as
/// a payment sent again would. A refund request is told apart by its `refund_id`;
/// `recon_outcomes` shows it as `refund`.
pub const fn stored_kind(input: Input) -> &'static str {
    match input {
        Input::Payments => "payment",
        Input::Settlements => "settlement",
    }
}

/// The input whose events are stored with this `event_kind` (the inverse of
/// [`stored_kind`]).
pub fn input_of_stored_kind(kind: &str) -> Result<Input, UnknownEventKind> {
    Input::ALL
        .into_iter()
        .find(|&input| stored_kind(input) == kind)
        .ok_or_else(|| UnknownEventKind(kind.to_owned()))
}

/// Maps a `Copy` type to PostgreSQL `text` (and `text[]` for array binds) through a
/// pair of functions: to its text, and from text (an error for text it does not know). The type information is text's own, a built-in OID, so binding these
/// values costs what binding the strings did: no type lookup on the server.
macro_rules! text_mapping {
    ($type:ty, $to_text:expr, $from_text:expr) => {
        impl Type<Postgres> for $type {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $type {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <&str as PgHasArrayType>::array_compatible(ty)
            }
        }

        impl Encode<'_, Postgres> for $type {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                let to_text: fn($type) -> &'static str = $to_text;
                <&str as Encode<Postgres>>::encode(to_text(*self), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $type {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let from_text: fn(&str) -> Result<$type, BoxDynError> = $from_text;
                from_text(<&str as Decode<Postgres>>::decode(value)?)
            }
        }
    };
}

text_mapping!(Input, stored_kind, |text| Ok(input_of_stored_kind(text)?));
text_mapping!(EventKind, EventKind::as_str, |text| Ok(kind_of_text(text)?));
text_mapping!(
    Outcome,
    Outcome::as_str,
    |text| Ok(text.parse::<Outcome>()?)
);
text_mapping!(Currency, Currency::code, currency_of_code);

fn currency_of_code(code: &str) -> Result<Currency, BoxDynError> {
    Currency::from_code(code).ok_or_else(|| UnknownCurrency(code.to_owned()).into())
}

/// Microseconds to a timestamp, clamped to years 1..=9999: every event time the
/// decoder accepts is inside, and sweep bounds far outside stay valid for PostgreSQL.
pub fn to_time(micros: Micros) -> DateTime<Utc> {
    const YEAR_1: Micros = -62_135_596_800_000_000;
    const YEAR_9999_END: Micros = crate::event::MAX_EVENT_TIME;
    DateTime::from_timestamp_micros(micros.clamp(YEAR_1, YEAR_9999_END))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// A row of `recon_partition_pairs`: a pair's owner epoch and where it stands.
#[derive(sqlx::FromRow)]
pub struct PairRow {
    kafka_partition: i32,
    epoch: i64,
    payments_next_offset: Option<i64>,
    settlements_next_offset: Option<i64>,
    /// NULL unless stored for the payouts topic this worker reads.
    payouts_next_offset: Option<i64>,
    payments_high_mark: Option<DateTime<Utc>>,
    settlements_high_mark: Option<DateTime<Utc>>,
}

impl From<PairRow> for PairPosition {
    fn from(row: PairRow) -> Self {
        let micros = |mark: Option<DateTime<Utc>>| mark.map(|t| t.timestamp_micros());
        PairPosition {
            pair: row.kafka_partition,
            epoch: row.epoch,
            next_offsets: PerTopic {
                payments: row.payments_next_offset,
                settlements: row.settlements_next_offset,
                payouts: row.payouts_next_offset,
            },
            high_marks: PerInput::new(
                micros(row.payments_high_mark),
                micros(row.settlements_high_mark),
            ),
        }
    }
}

/// A pair's stored offsets, read without taking ownership.
#[derive(sqlx::FromRow)]
pub struct StoredOffsetsRow {
    pub kafka_partition: i32,
    pub payments_next_offset: Option<i64>,
    pub settlements_next_offset: Option<i64>,
}

/// What a window lookup reads of one stored event, with the pair it belongs to.
#[derive(sqlx::FromRow)]
pub struct LookupRow {
    pub kafka_partition: i32,
    #[sqlx(flatten)]
    pub event: StoredEventRow,
}

/// The columns of `recon_events` the engine's window is loaded from.
#[derive(sqlx::FromRow)]
pub struct StoredEventRow {
    event_kind: Input,
    line_type: Option<String>,
    refund_id: Option<String>,
    dispute_id: Option<String>,
    event_id: String,
    payment_id: String,
    outcome: Outcome,
    event_time: DateTime<Utc>,
    amount_minor: i64,
    fee_minor: Option<i64>,
    net_minor: Option<i64>,
    currency: Currency,
}

impl TryFrom<StoredEventRow> for StoredEvent {
    type Error = UnknownLineType;

    fn try_from(row: StoredEventRow) -> Result<Self, UnknownLineType> {
        let kind = match (row.event_kind, &row.refund_id) {
            (Input::Payments, None) => EventKind::Payment,
            (Input::Payments, Some(_)) => EventKind::Refund,
            (Input::Settlements, _) => EventKind::Settlement,
        };
        let line = stored_line(
            kind,
            row.line_type.as_deref(),
            row.refund_id,
            row.dispute_id,
        )?;
        Ok(StoredEvent {
            kind,
            line,
            event_id: row.event_id,
            payment_id: row.payment_id,
            outcome: row.outcome,
            event_time: row.event_time.timestamp_micros(),
            amount: row.amount_minor,
            // A payment has neither; the engine reads them of settlements only.
            fee: row.fee_minor.unwrap_or(0),
            net: row.net_minor.unwrap_or(0),
            currency: row.currency,
        })
    }
}

/// The stored line type and ids as the engine's [`Line`]. A settlement row without a
/// `line_type` is a capture (version 1 rows, and captures, which are stored without
/// one); a refund request's refund id is carried as `Line::Refund`. A line type this
/// code did not write is an error, never a guess.
fn stored_line(
    kind: EventKind,
    line_type: Option<&str>,
    refund_id: Option<String>,
    dispute_id: Option<String>,
) -> Result<Line, UnknownLineType> {
    let unknown = || UnknownLineType(line_type.unwrap_or("").to_owned());
    Ok(match (kind, line_type) {
        (EventKind::Payment, _) => Line::Capture,
        (EventKind::Refund, _) => Line::Refund {
            refund_id: refund_id.ok_or_else(unknown)?,
        },
        (EventKind::Settlement, None | Some("capture")) => Line::Capture,
        (EventKind::Settlement, Some("refund")) => Line::Refund {
            refund_id: refund_id.ok_or_else(unknown)?,
        },
        (EventKind::Settlement, Some("chargeback")) => Line::Chargeback {
            dispute_id: dispute_id.ok_or_else(unknown)?,
        },
        (EventKind::Settlement, Some("chargeback_reversal")) => Line::ChargebackReversal {
            dispute_id: dispute_id.ok_or_else(unknown)?,
        },
        (EventKind::Settlement, Some(_)) => return Err(unknown()),
    })
}

/// An event id found stored, with its kind.
#[derive(sqlx::FromRow)]
pub struct StoredEventId {
    pub event_kind: Input,
    pub event_id: String,
}

/// A payment id with an item a sweep found due, and the kind of that item.
#[derive(sqlx::FromRow)]
pub struct DueKeyRow {
    pub event_kind: Input,
    pub payment_id: String,
}

/// Open items of one (event kind, open outcome): how many, and the oldest event time.
#[derive(sqlx::FromRow)]
pub struct OpenItemsRow {
    pub event_kind: EventKind,
    pub outcome: Outcome,
    pub items: i64,
    pub oldest: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_round_trip_and_unknown_ones_are_errors() {
        for kind in EventKind::ALL {
            assert_eq!(kind_of_text(kind.as_str()).ok(), Some(kind));
        }
        for kind in ["refunds", "Payment", "payments", ""] {
            assert!(kind_of_text(kind).is_err(), "{kind}");
        }
        for input in Input::ALL {
            assert_eq!(input_of_stored_kind(stored_kind(input)).ok(), Some(input));
        }
        assert!(input_of_stored_kind("refund").is_err());
    }

    #[test]
    fn stored_line_types_round_trip_and_unknown_ones_are_errors() {
        let lines = [
            Line::Capture,
            Line::Refund {
                refund_id: "r".into(),
            },
            Line::Chargeback {
                dispute_id: "d".into(),
            },
            Line::ChargebackReversal {
                dispute_id: "d".into(),
            },
        ];
        for line in lines {
            let stored = stored_line(
                EventKind::Settlement,
                Some(line.line_type()),
                line.refund_id().map(str::to_owned),
                line.dispute_id().map(str::to_owned),
            );
            assert_eq!(stored.ok(), Some(line));
        }
        assert_eq!(
            stored_line(EventKind::Settlement, None, None, None).ok(),
            Some(Line::Capture)
        );
        assert!(stored_line(EventKind::Settlement, Some("fee"), None, None).is_err());
        assert!(stored_line(EventKind::Settlement, Some("refund"), None, None).is_err());
    }

    #[test]
    fn mapped_values_bind_as_text_of_a_built_in_oid() {
        // A type known by name only would cost a lookup on the server per connection.
        let text = sqlx::postgres::types::Oid(25);
        let text_array = sqlx::postgres::types::Oid(1009);
        assert_eq!(<EventKind as Type<Postgres>>::type_info().oid(), Some(text));
        assert_eq!(<Outcome as Type<Postgres>>::type_info().oid(), Some(text));
        assert_eq!(<Currency as Type<Postgres>>::type_info().oid(), Some(text));
        assert_eq!(
            <EventKind as PgHasArrayType>::array_type_info().oid(),
            Some(text_array)
        );
    }
}
