//! The input contract (contract §1, §6 for version 2, §7 for payout announcements): the
//! events, decoding and validating Kafka messages into them (`decode`), and the reasons
//! a message is rejected (`reason`).
//!
//! Decoding is total: every byte sequence yields either an [`Event`] or a
//! [`Rejection`]; nothing here panics, so a poison message can never stop a partition.
//! Times are kept as microseconds since the Unix epoch, PostgreSQL's resolution, so a
//! value read back from the database compares equal to the one decoded.

use std::fmt;

use crate::money::{Currency, MinorUnits};

mod decode;
mod reason;

pub use decode::{decode, decode_announcement};
pub use reason::Rejection;

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

    /// The event types this topic carries.
    fn types(self) -> &'static [&'static str] {
        match self {
            Input::Payments => &["payment_captured", "refund_requested"],
            Input::Settlements => &["settlement_line"],
        }
    }
}

/// Every topic the worker reads: the two inputs of matching and, when configured, the
/// payouts topic (contract §7). Positions, rewinds and rejects are per topic; matching
/// and the watermark are per [`Input`] (announcements never reach the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    Payments,
    Settlements,
    Payouts,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Payments, Topic::Settlements, Topic::Payouts];

    /// The `topic` label of metrics: the topic's role, whatever it is named.
    pub const fn label(self) -> &'static str {
        match self {
            Topic::Payments => "payments",
            Topic::Settlements => "settlements",
            Topic::Payouts => "payouts",
        }
    }

    /// The matching input this topic is, if it is one.
    pub const fn input(self) -> Option<Input> {
        match self {
            Topic::Payments => Some(Input::Payments),
            Topic::Settlements => Some(Input::Settlements),
            Topic::Payouts => None,
        }
    }

    /// The event types this topic carries.
    pub fn types(self) -> &'static [&'static str] {
        match self {
            Topic::Payments => Input::Payments.types(),
            Topic::Settlements => Input::Settlements.types(),
            Topic::Payouts => &["payout_announced"],
        }
    }
}

impl From<Input> for Topic {
    fn from(input: Input) -> Self {
        match input {
            Input::Payments => Topic::Payments,
            Input::Settlements => Topic::Settlements,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// `payout_announced` (contract §7): a PSP paid these lines out as one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub event_id: String,
    pub payout_id: String,
    pub currency: Currency,
    /// What reaches the merchant's bank; signed.
    pub net: i64,
    /// How many lines the payout has, when the PSP says.
    pub line_count: Option<i64>,
    pub paid_at: Micros,
}

/// What an accepted event is stored as: `recon_outcomes.event_kind`. The payments
/// topic carries two kinds (a payment, or a refund we requested), the settlements
/// topic one (a settlement line of any [`LineType`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Payment,
    Refund,
    Settlement,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Payment, EventKind::Refund, EventKind::Settlement];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Payment => "payment",
            EventKind::Refund => "refund",
            EventKind::Settlement => "settlement",
        }
    }

    /// The topic that carries events of this kind.
    pub const fn input(self) -> Input {
        match self {
            EventKind::Payment | EventKind::Refund => Input::Payments,
            EventKind::Settlement => Input::Settlements,
        }
    }

    /// The kind named `text`, if any.
    pub fn parse(text: &str) -> Option<EventKind> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// `refund_requested` (contract §6): a refund we issued, keyed by the refunded
/// payment's `payment_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub event_id: String,
    pub refund_id: String,
    pub payment_id: String,
    pub amount: MinorUnits,
    pub currency: Currency,
    pub requested_at: Micros,
}

/// `line_type` of a settlement line (contract §6), with the id its type requires.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Line {
    /// `capture`, also what a line without `line_type` is (version 1).
    #[default]
    Capture,
    Refund {
        refund_id: String,
    },
    Chargeback {
        dispute_id: String,
    },
    ChargebackReversal {
        dispute_id: String,
    },
}

impl Line {
    /// The `line_type` text.
    pub const fn line_type(&self) -> &'static str {
        match self {
            Line::Capture => "capture",
            Line::Refund { .. } => "refund",
            Line::Chargeback { .. } => "chargeback",
            Line::ChargebackReversal { .. } => "chargeback_reversal",
        }
    }

    /// Whether `gross_minor` of this type is positive (money to the merchant):
    /// captures and reversals; refunds and chargebacks are negative.
    pub const fn gross_is_positive(&self) -> bool {
        matches!(self, Line::Capture | Line::ChargebackReversal { .. })
    }

    pub fn refund_id(&self) -> Option<&str> {
        match self {
            Line::Refund { refund_id } => Some(refund_id),
            _ => None,
        }
    }

    pub fn dispute_id(&self) -> Option<&str> {
        match self {
            Line::Chargeback { dispute_id } | Line::ChargebackReversal { dispute_id } => {
                Some(dispute_id)
            }
            _ => None,
        }
    }
}

/// `settlement_line`. Amounts are signed in the merchant's direction (contract §6):
/// `gross` is positive for captures and reversals, negative for refunds and
/// chargebacks; `fee` may be negative.
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
    pub line: Line,
    /// The payout this line is paid out in (contract §7), when the PSP says.
    pub payout_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Payment(Payment),
    Refund(Refund),
    Settlement(Settlement),
}

impl Event {
    pub fn input(&self) -> Input {
        self.kind().input()
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::Payment(_) => EventKind::Payment,
            Event::Refund(_) => EventKind::Refund,
            Event::Settlement(_) => EventKind::Settlement,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Event::Payment(p) => &p.event_id,
            Event::Refund(r) => &r.event_id,
            Event::Settlement(s) => &s.event_id,
        }
    }

    pub fn payment_id(&self) -> &str {
        match self {
            Event::Payment(p) => &p.payment_id,
            Event::Refund(r) => &r.payment_id,
            Event::Settlement(s) => &s.payment_id,
        }
    }

    /// `occurred_at`, `requested_at` or `settled_at`: the time the watermark is made of.
    pub fn event_time(&self) -> Micros {
        match self {
            Event::Payment(p) => p.occurred_at,
            Event::Refund(r) => r.requested_at,
            Event::Settlement(s) => s.settled_at,
        }
    }

    /// The name of [`Event::event_time`]'s field.
    pub fn event_time_field(&self) -> &'static str {
        match self {
            Event::Payment(_) => "occurred_at",
            Event::Refund(_) => "requested_at",
            Event::Settlement(_) => "settled_at",
        }
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
