//! The whole path under hostile input (issue 19 item 11): generated messages — arbitrary
//! bytes, and JSON objects of the right shape with hostile values (control characters,
//! escaped lone surrogates, 128/129-character ids of 4-byte characters, huge exponents,
//! `-0`, 2^53, duplicate keys, wrong types, nested objects, BOMs, keys that differ from
//! `payment_id`, timestamps at the edges, currencies in odd case), plus redeliveries of
//! earlier messages on either partition — go through the worker's own code: the poll
//! thread's decoding (`consumer::decode_message`), the real `Pipeline` (lookups, engine,
//! deadline sweeps, checkpoints, the data-error bisection and the replays it asks for)
//! and the checkpoint SQL on a real PostgreSQL. Only Kafka is replaced, by a stand-in
//! for the poll thread that hands over the messages in order and serves the pipeline's
//! rewinds from the same in-memory log.
//!
//! Every case asserts contract §1: no panic, no pipeline error (the worker would exit),
//! no stalled pair, and every message accounted for exactly once — accepted (its
//! `recon_outcomes` row), a redelivery (no row; its event id stored from another
//! message) or rejected (a `rejected_events` row with a reason and the raw bytes) —
//! with the stored offsets past every message.
//!
//! A third of the cases then re-drive every reject (contract §8): asked for through
//! the operator's command or by hand, once, twice in a row or again once settled; by
//! the pipeline that read the messages or by a new one with other limits (a size limit
//! raised or lowered, a larger future skew allowed). Once no request is pending, every
//! reject must still have its one row, and have gone where the contract's decoder,
//! given the new limits and the message's own Kafka timestamp, says: valid now, it was
//! processed exactly once (its outcome row at the reject's own offset) or is a
//! redelivery of an event id stored from another message; still invalid, it stays
//! rejected with its new class and the request cleared; cut at 65,536 bytes, it was
//! not decoded and says so (`truncated`). On LATIN1 PostgreSQL may refuse a valid
//! one's values: a data error, rejected again.
//!
//! One database per encoding, reused across cases (emptied between them): UTF-8, and
//! LATIN1, whose encoding cannot hold most characters, so values the decoder accepts
//! but PostgreSQL refuses (SQLSTATE class 22) are common there.
//!
//! `RECON_FUZZ_CASES` sets the case count (default 150, about half a minute);
//! `RECON_FUZZ_SECONDS` runs cases until that much time has passed instead.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{
    Config as ProptestConfig, FileFailurePersistence, TestCaseError, TestError, TestRunner,
};
use recon_worker::config::Config;
use recon_worker::consumer::{
    decode_message, Command, ConsumerHandle, Control, Data, Delivery, PartitionProgress,
    ReadMessage, Rewind,
};
use recon_worker::event::{decode, Event, Input, Limits};
use recon_worker::operations::rejects::{request, Selection};
use recon_worker::pair::PairPosition;
use recon_worker::pipeline::{Pipeline, PipelineError};
use recon_worker::rejection::{MessageAt, DATA_ERROR_CLASS, REJECTED_PAYLOAD_CAP};
use recon_worker::store::Store;
use recon_worker::telemetry::Health;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool, Row};
use tokio::sync::mpsc;

const PAYMENTS_TOPIC: &str = "fuzz-payments";
const SETTLEMENTS_TOPIC: &str = "fuzz-settlements";
const PAIRS: i32 = 2;
/// Longest a case may take to store every offset: far above the ~50 ms a case takes,
/// so only a stalled pair reaches it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// Generated messages

type Bytes = Vec<u8>;

/// Where a message sits: (input, pair, offset).
type Place = (Input, i32, i64);

#[derive(Clone)]
struct Message {
    input: Input,
    pair: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
}

/// Readable when a case fails: bytes shown as escaped text, not as numbers.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |b: &Option<Vec<u8>>| match b {
            None => "<none>".to_owned(),
            // A padded message is tens of kilobytes of one byte: its ends say what it is.
            Some(b) if b.len() > 400 => format!(
                "{}...[{} bytes]...{}",
                b[..200].escape_ascii(),
                b.len(),
                b[b.len() - 40..].escape_ascii()
            ),
            Some(b) => b.escape_ascii().to_string(),
        };
        write!(
            f,
            "{}/{} ts={:?} key={} value={}",
            self.input,
            self.pair,
            self.timestamp_ms,
            show(&self.key),
            show(&self.value)
        )
    }
}

#[derive(Clone, Debug)]
struct Case {
    /// Run against the LATIN1 database instead of the UTF-8 one.
    latin1: bool,
    batch_max_messages: usize,
    /// Settlement deadline and orphan timeout: short ones fire deadlines within a case.
    deadline: &'static str,
    max_message_bytes: usize,
    messages: Vec<Message>,
    /// A re-drive of every reject (contract §8), once the messages are all stored.
    redrive: Option<Redrive>,
}

/// How a case asks for its rejects to be re-driven.
#[derive(Clone, Debug)]
struct Redrive {
    /// `None`: the pipeline that read the messages re-drives them; else a new one, over
    /// the same database and log, with these limits (a size limit raised, say).
    restart: Option<Restart>,
    /// Asked for by hand (an `UPDATE` that asks for every reject not redriven, cut
    /// payloads included), else through `recon-worker rejects redrive --all`'s
    /// function (which skips cut payloads).
    by_hand: bool,
    twice: Twice,
}

#[derive(Clone, Debug)]
struct Restart {
    max_message_bytes: usize,
    max_future_skew: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Twice {
    Once,
    /// Asked for twice in a row, before the worker can settle the first request.
    AtOnce,
    /// Asked for again once the first request is settled: the rejects still invalid
    /// are decoded once more.
    AfterSettled,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A JSON string literal.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// Characters worth meeting in ids and other strings.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => Just('\u{0}'),
        1 => Just('\u{1f}'),
        1 => Just('\u{7f}'),
        1 => Just('\u{80}'),
        1 => Just('\u{9f}'),
        1 => Just('é'),
        1 => Just('ÿ'),
        1 => Just('€'),
        1 => Just('\u{feff}'),
        1 => Just('\u{2028}'),
        1 => Just('\u{202e}'),
        1 => Just('\u{301}'),
        1 => Just('\u{fffd}'),
        1 => Just('\u{fffe}'),
        1 => Just('\u{ffff}'),
        1 => Just('\u{10ffff}'),
        1 => Just('𝄞'),
        1 => Just('\''),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just(' '),
        1 => any::<char>(),
    ]
}

/// An id the contract allows: mostly from a small pool (so events meet, repeat and
/// collide), else odd but valid — characters LATIN1 cannot hold, 128 of 4 bytes each.
fn tame_id(pool: &'static [&'static str]) -> BoxedStrategy<String> {
    let odd = proptest::sample::select(vec![
        'é',
        'ÿ',
        '€',
        '𝄞',
        '\u{feff}',
        '\u{2028}',
        '\u{202e}',
        '\u{301}',
        '\u{fffe}',
        '\u{ffff}',
        '\u{10ffff}',
        '\'',
        '"',
        '\\',
        ' ',
        '\u{80}',
        '\u{9f}',
    ]);
    prop_oneof![
        12 => proptest::sample::select(pool).prop_map(str::to_owned),
        2 => (proptest::sample::select(pool), odd).prop_map(|(id, c)| format!("{id}{c}")),
        1 => Just("𝄞".repeat(128)),
        1 => Just("é".repeat(128)),
    ]
    .boxed()
}

/// An id, valid or not: control characters, empty, 129 characters.
fn wild_id(pool: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        2 => tame_id(pool),
        3 => proptest::collection::vec(hostile_char(), 1..6).prop_map(String::from_iter),
        1 => Just(String::new()),
        1 => Just("𝄞".repeat(129)),
        1 => Just("a".repeat(129)),
    ]
    .boxed()
}

fn id(pool: &'static [&'static str], wild: bool) -> BoxedStrategy<String> {
    if wild {
        wild_id(pool)
    } else {
        tame_id(pool)
    }
}

/// A JSON value text for a field that wants a string; when `wild`, also raw escapes
/// that no `String` can hold (lone surrogates) and wrong types.
fn string_field(good: BoxedStrategy<String>, wild: bool) -> BoxedStrategy<String> {
    if !wild {
        return good.prop_map(|s| quoted(&s)).boxed();
    }
    prop_oneof![
        3 => good.prop_map(|s| quoted(&s)),
        2 => proptest::sample::select(vec![
            r#""\ud800""#, r#""a\udfff""#, r#""\ud83d\ude00""#, r#""\u0000""#, r#""\u001f""#,
            r#""\ufeff""#, r#""\u00e9""#, "null", "true", "12", "[]", "{}",
            r#"{"a":{"b":[1,{"c":null}]}}"#, r#"["p1"]"#,
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

/// A JSON value text for an integer field: valid amounts, with valid edge spellings
/// (`-0`, the largest amount); when `wild`, also out of range, fractions, exponents,
/// huge numbers and wrong types.
fn number_field(low: i64, high: i64, wild: bool) -> BoxedStrategy<String> {
    let mut edges = vec!["9007199254740991", "-0", "0", "1", "-1", "9007199254740992"];
    edges.retain(|e| e.parse::<i64>().is_ok_and(|n| (low..=high).contains(&n)));
    let tame = prop_oneof![
        8 => (low..=high.min(1000)).prop_map(|n| n.to_string()),
        1 => proptest::sample::select(edges).prop_map(str::to_owned),
    ];
    if !wild {
        return tame.boxed();
    }
    prop_oneof![
        1 => tame,
        3 => proptest::sample::select(vec![
            "1e400", "-1e400", "-0", "-0.0", "0", "1", "9007199254740991", "9007199254740992",
            "9223372036854775807", "9223372036854775808", "-9223372036854775808",
            "-9223372036854775809", "18446744073709551616", "1.5", "1e2", "100.0", "1E18",
            "9.2e18", "-1", r#""100""#, "null", "true", "[]", "{}", r#"{"n":1}"#,
            "100000000000000000000000000000000000000000000000000000000000000000000000",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

/// A JSON value text for a timestamp: near now with any offset and precision, and
/// valid edges (a leap second, 1970, the year 9999); when `wild`, also invalid ones.
fn timestamp_field(wild: bool) -> BoxedStrategy<String> {
    let near_now = (
        0i64..10 * 86_400,
        proptest::sample::select(vec!["Z", "+00:00", "+05:30", "-23:59", "+23:59", "-00:00"]),
        0usize..10,
    )
        .prop_map(|(ago, offset, digits)| {
            let at = chrono::Utc::now() - chrono::Duration::seconds(ago);
            let fixed =
                chrono::FixedOffset::from_str(if offset == "Z" { "+00:00" } else { offset })
                    .expect("offset");
            let mut text = at
                .with_timezone(&fixed)
                .format("%Y-%m-%dT%H:%M:%S")
                .to_string();
            if digits > 0 {
                text.push('.');
                text.push_str(&"123456789"[..digits.min(9)]);
            }
            text.push_str(offset);
            quoted(&text)
        });
    let edges = proptest::sample::select(vec![
        "9999-12-31T23:59:59.999999999Z",
        "9999-12-31T23:59:59-23:59",
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00+00:01",
        "1970-01-01T00:00:00-23:59",
        "2016-12-31T23:59:60Z",
        "2016-12-31T23:59:60.999999+00:00",
    ])
    .prop_map(quoted);
    let tame = prop_oneof![8 => near_now, 2 => edges];
    if !wild {
        return tame.boxed();
    }
    prop_oneof![
        1 => tame,
        3 => proptest::sample::select(vec![
            "0000-01-01T00:00:00Z", "0001-01-01T00:00:00+23:59", "1969-12-31T23:59:59.999999Z",
            "2024-02-30T00:00:00Z", "2024-01-01 00:00:00Z", "2024-01-01t00:00:00z",
            "2024-01-01T00:00:00", "+002024-01-01T00:00:00Z", "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00+24:00", "",
        ])
        .prop_map(quoted),
        1 => Just("1700000000".to_owned()),
        1 => Just(r#""2024-01-01T00:00:00\u0000Z""#.to_owned()),
    ]
    .boxed()
}

fn currency_field(wild: bool) -> BoxedStrategy<String> {
    let codes = if wild {
        vec![
            "EUR", "eur", "Eur", "eUR", "XXX", "XTS", "XAU", "BOV", "ZWL", "EURO", "", "€",
            "E\u{0}R", "EU",
        ]
    } else {
        vec!["EUR", "EUR", "EUR", "USD", "JPY", "BOV", "XAU"]
    };
    string_field(
        proptest::sample::select(codes)
            .prop_map(str::to_owned)
            .boxed(),
        wild,
    )
}

const EVENT_IDS: &[&str] = &["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"];
const PAYMENT_IDS: &[&str] = &["p0", "p1", "p2", "p3"];
const REFERENCES: &[&str] = &["m0", "m1", "s0"];
/// Refund and dispute ids (contract §6); also used as payout ids.
const UNIT_IDS: &[&str] = &["r0", "r1", "d0"];
/// `line_type` values: the four of contract §6 and one it does not know.
const LINE_TYPES: &[&str] = &[
    "capture",
    "refund",
    "chargeback",
    "chargeback_reversal",
    "adjustment",
];

/// A JSON object of the right shape for `input`, with hostile values and hostile
/// syntax around them; and the Kafka key that goes with it.
fn json_message(input: Input) -> BoxedStrategy<(Vec<u8>, Option<Vec<u8>>)> {
    // Half the messages are valid but for odd values; the others have one wild field
    // (or syntax mutations, or another key), so most break one rule at a time.
    prop_oneof![1 => Just(None), 1 => (0usize..12).prop_map(Some)]
        .prop_flat_map(move |wild| json_message_with(input, wild))
        .boxed()
}

/// What turns a message into a version-2 one (contract §6): a variant (0: none; on
/// payments odd ones make a `refund_requested`, on settlements 1..=5 pick a
/// `line_type`), the id of its refund or dispute (also its payout id), and whether a
/// line's gross is negated (refunds and chargebacks are negative).
type Version2 = (u8, String, bool);

fn version_2(wild: bool) -> BoxedStrategy<Version2> {
    (
        0u8..6,
        string_field(id(UNIT_IDS, wild), wild),
        any::<bool>(),
    )
        .boxed()
}

/// Rewrites a version-1 message's fields into the version-2 one `version_2` says. The
/// type is left alone when it is the wild field.
fn add_version_2(
    input: Input,
    fields: &mut Vec<(String, String)>,
    (variant, unit_id, negative): Version2,
    wild_type: bool,
) {
    match input {
        Input::Payments if variant % 2 == 1 => {
            for (name, value) in fields.iter_mut() {
                match name.as_str() {
                    "type" if !wild_type => *value = quoted("refund_requested"),
                    "occurred_at" => *name = "requested_at".into(),
                    _ => {}
                }
            }
            fields.push(("refund_id".into(), unit_id));
        }
        Input::Settlements if variant > 0 => {
            let line_type = LINE_TYPES[usize::from(variant - 1) % LINE_TYPES.len()];
            fields.push(("line_type".into(), quoted(line_type)));
            for name in ["refund_id", "dispute_id", "payout_id"] {
                fields.push((name.into(), unit_id.clone()));
            }
            if negative {
                for (name, value) in fields.iter_mut() {
                    if name == "gross_minor" && value.parse::<i64>().is_ok_and(|n| n > 0) {
                        *value = format!("-{value}");
                    }
                }
            }
        }
        _ => {}
    }
}

fn json_message_with(
    input: Input,
    wild_field: Option<usize>,
) -> BoxedStrategy<(Vec<u8>, Option<Vec<u8>>)> {
    let wild = move |i: usize| wild_field == Some(i);
    let (type_good, amount_names): (&str, &'static [&'static str]) = match input {
        Input::Payments => ("payment_captured", &["amount_minor"]),
        Input::Settlements => (
            "settlement_line",
            &["gross_minor", "fee_minor", "net_minor"],
        ),
    };
    let type_field = if wild(0) {
        proptest::sample::select(vec![
            quoted(type_good),
            quoted("payment_captured"),
            quoted("settlement_line"),
            quoted("Payment_Captured"),
            quoted(""),
            quoted("payment_captured\u{0}"),
            r#""\ud800""#.to_owned(),
            "7".to_owned(),
        ])
        .boxed()
    } else {
        Just(quoted(type_good)).boxed()
    };
    let amounts: Vec<BoxedStrategy<String>> = amount_names
        .iter()
        .enumerate()
        .map(|(i, name)| match *name {
            "fee_minor" => number_field(0, 50, wild(7 + i)),
            "net_minor" => number_field(-10, 1000, wild(7 + i)),
            _ => number_field(1, i64::MAX, wild(7 + i)),
        })
        .collect();
    let payment_id = id(PAYMENT_IDS, wild(2));
    let mutations = if wild(10) {
        proptest::collection::vec((0usize..10, any::<u8>()), 1..3).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    let key = if wild(11) {
        key_choice().boxed()
    } else {
        Just(KeyChoice::PaymentId).boxed()
    };
    (
        type_field,
        string_field(id(EVENT_IDS, wild(1)), wild(1)),
        payment_id,
        string_field(id(REFERENCES, wild(3)), wild(3)),
        amounts,
        currency_field(wild(4)),
        timestamp_field(wild(5)),
        (Just(wild(2)), any::<bool>().prop_map(move |b| b && wild(6))),
        (mutations, version_2(wild(3))),
        key,
    )
        .prop_map(
            move |(
                kind,
                event_id,
                payment_id,
                reference,
                amounts,
                currency,
                at,
                (pid_raw, bom),
                (mutations, version_2),
                key,
            )| {
                let reference_name = match input {
                    Input::Payments => "merchant_id",
                    Input::Settlements => "settlement_id",
                };
                let time_name = match input {
                    Input::Payments => "occurred_at",
                    Input::Settlements => "settled_at",
                };
                let pid_text = if pid_raw && payment_id == "p1" {
                    // An escaped form of an id: decodes to the same string.
                    r#""\u0070\u0031""#.to_owned()
                } else {
                    quoted(&payment_id)
                };
                let mut fields: Vec<(String, String)> = vec![
                    ("event_id".into(), event_id),
                    ("type".into(), kind),
                    ("payment_id".into(), pid_text.clone()),
                    (reference_name.into(), reference),
                    ("currency".into(), currency),
                    (time_name.into(), at),
                ];
                for (name, value) in amount_names.iter().zip(amounts) {
                    fields.push(((*name).to_owned(), value));
                }
                add_version_2(input, &mut fields, version_2, wild(0));
                for (what, n) in mutations {
                    let i = usize::from(n) % fields.len();
                    match what {
                        // A duplicate key, first or last (serde_json keeps the last).
                        0 => {
                            let (name, _) = fields[i].clone();
                            fields.insert(0, (name, r#""dup""#.into()));
                        }
                        1 => {
                            let (name, _) = fields[i].clone();
                            fields.push((name, "12".into()));
                        }
                        2 => {
                            fields.remove(i);
                        }
                        3 => fields[i].0 = fields[i].0.to_uppercase(),
                        4 => fields.push((
                            "extra".into(),
                            r#"{"nested":{"deep":[1,2,{"x":"\u0000"}]},"n":1e400}"#.into(),
                        )),
                        5 => fields[i].1 = "null".into(),
                        6 => fields.swap(0, i),
                        _ => fields.push((format!("unknown_{n}"), quoted("\u{0}\u{ffff}"))),
                    }
                }
                let mut text = String::new();
                if bom {
                    text.push('\u{feff}');
                }
                text.push('{');
                for (i, (name, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        text.push(',');
                    }
                    text.push_str(&quoted(name));
                    text.push(':');
                    text.push_str(value);
                }
                text.push('}');
                let key = match key {
                    KeyChoice::PaymentId => Some(payment_id.into_bytes()),
                    KeyChoice::None => None,
                    KeyChoice::Other(bytes) => Some(bytes),
                    KeyChoice::Upper => Some(payment_id.to_uppercase().into_bytes()),
                };
                (text.into_bytes(), key)
            },
        )
        .boxed()
}

#[derive(Clone, Debug)]
enum KeyChoice {
    PaymentId,
    None,
    Other(Vec<u8>),
    Upper,
}

fn key_choice() -> impl Strategy<Value = KeyChoice> {
    prop_oneof![
        12 => Just(KeyChoice::PaymentId),
        1 => Just(KeyChoice::None),
        1 => Just(KeyChoice::Upper),
        1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(KeyChoice::Other),
    ]
}

/// Kafka timestamps: now mostly; none (no future bound) and nonsense sometimes.
fn timestamp_ms() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        8 => Just(()).prop_map(|_| Some(now_ms())),
        // Five days ago: recent events are then more than a day ahead of it, rejected
        // unless the skew allowed is raised.
        1 => Just(()).prop_map(|_| Some(now_ms() - 5 * 86_400_000)),
        2 => Just(None),
        1 => Just(Some(-1)),
        1 => Just(Some(0)),
        1 => Just(Some(i64::MAX)),
        1 => Just(Some(i64::MIN)),
    ]
}

/// One generated message, or a copy of an earlier one (a redelivery, maybe on the
/// other partition: an event id under a payment id the pair never saw).
#[derive(Clone, Debug)]
enum Generated {
    Fresh(Message),
    Copy { of: usize, other_pair: bool },
}

fn fresh_message() -> impl Strategy<Value = Message> {
    let input = prop_oneof![Just(Input::Payments), Just(Input::Settlements)];
    (input, 0..PAIRS, timestamp_ms(), any::<u8>()).prop_flat_map(
        |(input, pair, timestamp_ms, shape)| {
            let value: BoxedStrategy<(Option<Bytes>, Option<Bytes>)> = match shape % 10 {
                // Arbitrary bytes, with or without an object's opening.
                0 => (
                    proptest::collection::vec(any::<u8>(), 0..48),
                    any::<bool>(),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
                )
                    .prop_map(|(mut bytes, brace, key)| {
                        if brace {
                            bytes.insert(0, b'{');
                        }
                        (Some(bytes), key)
                    })
                    .boxed(),
                // A tombstone, or nothing at all.
                1 if shape < 128 => Just((Some(Vec::new()), Some(b"p0".to_vec()))).boxed(),
                1 => Just((None, None)).boxed(),
                // The other topic's shape on this topic, sometimes.
                2 => json_message(input.other())
                    .prop_map(|(v, k)| (Some(v), k))
                    .boxed(),
                // Rarely, one padded to about the size limits: too large for a first
                // reading, or cut when stored as a reject (a re-drive cannot use it).
                9 if shape >= 200 => (
                    json_message(input),
                    proptest::sample::select(vec![1_000usize, 65_535, 65_536, 65_537, 70_000]),
                )
                    .prop_map(|((v, k), size)| (Some(padded(v, size)), k))
                    .boxed(),
                _ => json_message(input).prop_map(|(v, k)| (Some(v), k)).boxed(),
            };
            value.prop_map(move |(value, key)| Message {
                input,
                pair,
                key,
                value,
                timestamp_ms,
            })
        },
    )
}

/// `value` made `target` bytes long by an unknown field (ignored, contract §1) before
/// its closing brace, so that a valid message stays valid; left alone when it does not
/// end in a brace or is longer already.
fn padded(mut value: Vec<u8>, target: usize) -> Vec<u8> {
    const FIELD: &[u8] = br#","pad":""#;
    if value.last() != Some(&b'}') || value.len() + FIELD.len() + 2 > target {
        return value;
    }
    value.pop();
    let fill = target - value.len() - FIELD.len() - 2;
    value.extend_from_slice(FIELD);
    value.resize(value.len() + fill, b'x');
    value.extend_from_slice(b"\"}");
    value
}

fn generated() -> impl Strategy<Value = Generated> {
    prop_oneof![
        6 => fresh_message().prop_map(Generated::Fresh),
        1 => (any::<usize>(), any::<bool>())
            .prop_map(|(of, other_pair)| Generated::Copy { of, other_pair }),
    ]
}

/// A third of the cases re-drive their rejects: with the first reading's limits or
/// others (a size limit raised or lowered, a larger future skew allowed).
fn redrive() -> impl Strategy<Value = Option<Redrive>> {
    let restart = (
        prop_oneof![Just(64 * 1024usize), Just(300), Just(1024 * 1024)],
        prop_oneof![Just("24h"), Just("3650d")],
    )
        .prop_map(|(max_message_bytes, max_future_skew)| Restart {
            max_message_bytes,
            max_future_skew,
        });
    let redrive = (
        prop_oneof![1 => Just(None), 2 => restart.prop_map(Some)],
        any::<bool>(),
        prop_oneof![
            2 => Just(Twice::Once),
            1 => Just(Twice::AtOnce),
            1 => Just(Twice::AfterSettled),
        ],
    )
        .prop_map(|(restart, by_hand, twice)| Redrive {
            restart,
            by_hand,
            twice,
        });
    prop_oneof![2 => Just(None), 1 => redrive.prop_map(Some)]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![3 => Just(false), 2 => Just(true)],
        prop_oneof![1 => Just(1usize), 2 => Just(3), 3 => Just(5_000)],
        prop_oneof![Just("1s"), Just("72h")],
        prop_oneof![3 => Just(64 * 1024usize), 1 => Just(300)],
        proptest::collection::vec(generated(), 1..40),
        (redrive(), any::<bool>()),
    )
        .prop_map(
            |(
                latin1,
                batch_max_messages,
                deadline,
                max_message_bytes,
                generated,
                (redrive, tight),
            )| {
                // Half the re-drive cases read with the small size limit first: most
                // of their messages are rejects a raised limit makes valid.
                let max_message_bytes = if redrive.is_some() && tight {
                    300
                } else {
                    max_message_bytes
                };
                let mut messages: Vec<Message> = Vec::with_capacity(generated.len());
                for g in generated {
                    match g {
                        Generated::Fresh(m) => messages.push(m),
                        Generated::Copy { .. } if messages.is_empty() => {}
                        Generated::Copy { of, other_pair } => {
                            let mut copy = messages[of % messages.len()].clone();
                            if other_pair {
                                copy.pair = (copy.pair + 1) % PAIRS;
                            }
                            messages.push(copy);
                        }
                    }
                }
                Case {
                    latin1,
                    batch_max_messages,
                    deadline,
                    max_message_bytes,
                    messages,
                    redrive,
                }
            },
        )
}

// ---------------------------------------------------------------------------------
// The harness: the real pipeline, a stand-in for the poll thread, a real PostgreSQL

struct Database {
    pool: PgPool,
    url: String,
    name: String,
    admin_options: PgConnectOptions,
}

/// Creates (or re-creates) a database for the fuzz test on the test server.
async fn database(test: &str, encoding: &str) -> Database {
    // One per test and process: the tests of this file run at once, and a long run
    // and a CI run may share the server.
    let name = format!(
        "recon_fuzz_{test}_{}_{}",
        encoding.to_lowercase(),
        std::process::id()
    );
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin_options = PgConnectOptions::from_str(&admin_url).expect("DATABASE_URL");
    let mut admin = sqlx::PgConnection::connect_with(&admin_options)
        .await
        .expect("connect to the test server");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop");
    // template0: the only template another encoding may be copied from; the C locale
    // goes with any encoding.
    sqlx::query(&format!(
        "CREATE DATABASE {name} TEMPLATE template0 ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
    ))
    .execute(&mut admin)
    .await
    .expect("create");
    // Durability is not under test: commits that wait for no fsync make a case several
    // times faster.
    sqlx::query(&format!(
        "ALTER DATABASE {name} SET synchronous_commit = off"
    ))
    .execute(&mut admin)
    .await
    .expect("alter");
    let options = admin_options.clone().database(&name);
    let url = format!(
        "postgres://{}@{}:{}/{name}",
        options.get_username(),
        options.get_host(),
        options.get_port()
    );
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect");
    Store::with_pool(pool.clone(), PAYMENTS_TOPIC, SETTLEMENTS_TOPIC)
        .migrate()
        .await
        .expect("migrate");
    Database {
        pool,
        url,
        name,
        admin_options,
    }
}

impl Database {
    async fn drop_database(self) {
        self.pool.close().await;
        if let Ok(mut admin) = sqlx::PgConnection::connect_with(&self.admin_options).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    cases: u64,
    messages: u64,
    accepted: u64,
    redeliveries: u64,
    rejected: u64,
    data_errors: u64,
    rewinds: u64,
    redrive: RedriveTally,
}

/// What one case did, for the tally.
#[derive(Debug, Default)]
struct CaseTally {
    accepted: u64,
    redeliveries: u64,
    rejected: u64,
    data_errors: u64,
    rewinds: u64,
    redrive: RedriveTally,
}

/// What the re-drives did, so that a run shows it met each result.
#[derive(Debug, Default, Clone, Copy)]
struct RedriveTally {
    cases: u64,
    accepted: u64,
    redeliveries: u64,
    rejected: u64,
    data_errors: u64,
    truncated: u64,
    /// Cut payloads the operator's command did not ask for.
    skipped: u64,
}

impl std::ops::AddAssign for RedriveTally {
    fn add_assign(&mut self, other: Self) {
        self.cases += other.cases;
        self.accepted += other.accepted;
        self.redeliveries += other.redeliveries;
        self.rejected += other.rejected;
        self.data_errors += other.data_errors;
        self.truncated += other.truncated;
        self.skipped += other.skipped;
    }
}

fn worker_config(
    db: &Database,
    case: &Case,
    max_message_bytes: usize,
    max_future_skew: &str,
) -> Config {
    let vars = [
        ("DATABASE_URL", db.url.clone()),
        ("RECON_PAYMENTS_TOPIC", PAYMENTS_TOPIC.into()),
        ("RECON_SETTLEMENTS_TOPIC", SETTLEMENTS_TOPIC.into()),
        (
            "RECON_BATCH_MAX_MESSAGES",
            case.batch_max_messages.to_string(),
        ),
        ("RECON_BATCH_MAX_WAIT", "5ms".into()),
        ("RECON_SETTLEMENT_DEADLINE", case.deadline.into()),
        ("RECON_ORPHAN_TIMEOUT", case.deadline.into()),
        ("RECON_MAX_MESSAGE_BYTES", max_message_bytes.to_string()),
        ("RECON_MAX_FUTURE_SKEW", max_future_skew.into()),
    ];
    Config::from_vars(vars.map(|(k, v)| (k.to_owned(), v))).expect("valid configuration")
}

fn read(message: &Message, offset: i64, limits: Limits, refused: Option<String>) -> Delivery {
    let at = MessageAt {
        topic: message.input.into(),
        partition: message.pair,
        offset,
    };
    Delivery::from(ReadMessage {
        input: message.input,
        partition: message.pair,
        offset,
        timestamp_ms: message.timestamp_ms,
        decoded: decode_message(
            at,
            message.key.as_deref(),
            message.value.as_deref(),
            message.timestamp_ms,
            limits,
            refused,
        ),
        reset: None,
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn fail(message: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(message.into())
}

/// The stand-in's Kafka log: the case's messages at the offsets Kafka would give them.
struct Log<'a> {
    messages: &'a [Message],
    offsets: Vec<i64>,
    /// Next offset per (input, pair): the high watermarks.
    next: HashMap<(Input, i32), i64>,
}

impl<'a> Log<'a> {
    fn new(messages: &'a [Message]) -> Self {
        let mut next: HashMap<(Input, i32), i64> = HashMap::new();
        let offsets = messages
            .iter()
            .map(|m| {
                let slot = next.entry((m.input, m.pair)).or_insert(0);
                *slot += 1;
                *slot - 1
            })
            .collect();
        Self {
            messages,
            offsets,
            next,
        }
    }

    /// The offsets a pipeline that stored everything has stored.
    fn expected_offsets(&self) -> BTreeMap<i32, [Option<i64>; 2]> {
        (0..PAIRS)
            .map(|pair| (pair, Input::ALL.map(|i| self.next.get(&(i, pair)).copied())))
            .collect()
    }

    /// Like the poll thread: the messages of the pairs `from` names, in log order, from
    /// the offset it gives; those PostgreSQL refused handed over as rejections with its
    /// reason.
    fn read(
        &self,
        from: impl Fn(i32, Input) -> Option<i64>,
        refused: impl Fn(i32, Input, i64) -> Option<String>,
        limits: Limits,
    ) -> Vec<Delivery> {
        self.messages
            .iter()
            .zip(&self.offsets)
            .filter(|(m, &offset)| from(m.pair, m.input).is_some_and(|from| offset >= from))
            .map(|(m, &offset)| read(m, offset, limits, refused(m.pair, m.input, offset)))
            .collect()
    }

    /// Like the poll thread's progress reports: everything read, nothing left.
    fn progress(&self) -> Delivery {
        Delivery::Data(Data::Progress(
            (0..PAIRS)
                .flat_map(|pair| {
                    Input::ALL.map(|input| PartitionProgress {
                        topic: input.into(),
                        partition: pair,
                        caught_up: true,
                        high_watermark: self.next.get(&(input, pair)).copied().unwrap_or(0),
                    })
                })
                .collect(),
        ))
    }
}

/// How often the pipelines of re-drive cases poll for requests (2 s in production):
/// a case then waits tens of milliseconds for its re-drive, not seconds.
const TEST_REDRIVE_POLL: Duration = Duration::from_millis(20);

/// A pipeline running on its own task, and the stand-in's ends of its channels.
struct Running {
    deliveries: mpsc::Sender<Delivery>,
    task: tokio::task::JoinHandle<Result<(), PipelineError>>,
    // A failed case must not leave its pipeline writing into the next one's tables
    // (while shrinking, say).
    _abort: AbortOnDrop,
    commands: std::sync::mpsc::Receiver<Command>,
    /// Where the pipeline said to resume each pair when it took them.
    positions: Vec<PairPosition>,
    /// Rewinds asked for and not served yet.
    requested: Vec<Rewind>,
}

impl Running {
    /// Starts a pipeline with `config` and assigns it every pair.
    async fn start(
        config: &Config,
        store: &Store,
        redrive_poll: Option<Duration>,
    ) -> Result<Self, TestCaseError> {
        let (commands, command_receiver) = std::sync::mpsc::channel::<Command>();
        let mut pipeline = Pipeline::new(
            config,
            store.clone(),
            Some(ConsumerHandle { commands }),
            Arc::new(Health::default()),
        );
        if let Some(every) = redrive_poll {
            pipeline.set_redrive_poll(every);
        }
        let (deliveries, receiver) = mpsc::channel(64);
        let task = tokio::spawn(pipeline.run(receiver));
        let abort = AbortOnDrop(task.abort_handle());
        let (reply, answer) = tokio::sync::oneshot::channel();
        let assign = Control::Assign {
            pairs: (0..PAIRS).collect(),
            reply,
        };
        deliveries
            .send(assign.into())
            .await
            .map_err(|_| fail("pipeline gone before the assignment"))?;
        let positions = answer
            .await
            .map_err(|_| fail("no answer to the assignment"))?
            .map_err(|e| fail(format!("assignment failed: {e}")))?;
        Ok(Self {
            deliveries,
            task,
            _abort: abort,
            commands: command_receiver,
            positions,
            requested: Vec::new(),
        })
    }

    /// What the poll thread would read after the assignment: each pair from where the
    /// pipeline said, then a progress report.
    fn first_reading(&self, log: &Log<'_>, limits: Limits) -> VecDeque<Delivery> {
        let mut queue: VecDeque<Delivery> = log
            .read(
                |pair, input| {
                    self.positions
                        .iter()
                        .find(|position| position.pair == pair)
                        .map(|position| position.next_offsets[input].unwrap_or(0))
                },
                |_, _, _| None,
                limits,
            )
            .into();
        queue.push_back(log.progress());
        queue
    }

    /// The stand-in for the poll thread serves the rewinds; advisory commits need a
    /// broker and are dropped.
    fn rewinds(&self) -> Vec<Rewind> {
        self.commands
            .try_iter()
            .filter_map(|command| match command {
                Command::Rewind(rewind) => Some(rewind),
                Command::Commit(_) => None,
            })
            .collect()
    }

    /// Turns the pipeline's loop (it polls for re-drive requests as it turns) without
    /// telling it anything new: an empty progress report.
    fn wake(&self) {
        // Full: it has deliveries to turn on already.
        let _ = self
            .deliveries
            .try_send(Delivery::Data(Data::Progress(Vec::new())));
    }

    /// Nothing new to hand over: runs until every pending re-drive request is settled
    /// and stored.
    async fn settle_redrives(
        &mut self,
        db: &Database,
        store: &Store,
        log: &Log<'_>,
        limits: Limits,
        tally: &mut CaseTally,
    ) -> Result<(), TestCaseError> {
        self.drive(db, store, log, limits, VecDeque::new(), true, tally)
            .await
    }

    /// Hands over `queue`, serving the pipeline's rewinds from the log as the poll
    /// thread would, until every offset is stored with no rewind asked for and, when
    /// `redrives`, no re-drive request is pending.
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &mut self,
        db: &Database,
        store: &Store,
        log: &Log<'_>,
        limits: Limits,
        mut queue: VecDeque<Delivery>,
        redrives: bool,
        tally: &mut CaseTally,
    ) -> Result<(), TestCaseError> {
        let expected_offsets = log.expected_offsets();
        let started = Instant::now();
        loop {
            // Hand over what is queued while the pipeline takes it, serving rewinds
            // between.
            while let Some(delivery) = queue.pop_front() {
                tokio::select! {
                    sent = self.deliveries.send(delivery) => {
                        if sent.is_err() {
                            break;
                        }
                    }
                    _ = &mut self.task => return Err(fail("the pipeline stopped while reading")),
                }
                let rewinds = self.rewinds();
                self.requested.extend(rewinds);
                if !self.requested.is_empty() {
                    break;
                }
            }
            let rewinds = self.rewinds();
            self.requested.extend(rewinds);
            for rewind in std::mem::take(&mut self.requested) {
                tally.rewinds += 1;
                // Like the poll thread: the marker, then the pair from the stored
                // offsets.
                queue.retain(
                    |d| !matches!(d, Delivery::Data(Data::Message(m)) if m.partition == rewind.pair),
                );
                queue.push_front(Delivery::Data(Data::Rewound { pair: rewind.pair }));
                queue.extend(log.read(
                    |pair, input| {
                        (pair == rewind.pair).then(|| rewind.next_offsets[input].unwrap_or(0))
                    },
                    |_, input, offset| {
                        rewind
                            .refused
                            .iter()
                            .find(|r| r.topic == input.into() && r.offset == offset)
                            .map(|r| r.reason.clone())
                    },
                    limits,
                ));
                // Read to the end again: caught up (the poll thread reports progress
                // as it goes).
                queue.push_back(log.progress());
            }
            if !queue.is_empty() {
                continue;
            }
            if self.task.is_finished() {
                let result = (&mut self.task).await.expect("join");
                return Err(fail(format!("the pipeline stopped: {result:?}")));
            }
            let stored: BTreeMap<i32, [Option<i64>; 2]> = store
                .stored_offsets()
                .await
                .map_err(|e| fail(format!("stored offsets: {e}")))?
                .into_iter()
                .collect();
            let pending = if redrives {
                pending_requests(db).await?
            } else {
                Vec::new()
            };
            let rewinds = self.rewinds();
            self.requested.extend(rewinds);
            if stored == expected_offsets && pending.is_empty() && self.requested.is_empty() {
                return Ok(());
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                return Err(fail(format!(
                    "stalled: stored offsets {stored:?}, expected {expected_offsets:?}; \
                     re-drive requests pending (topic, partition, offset): {pending:?}"
                )));
            }
            if redrives {
                self.wake();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets the pipeline poll for re-drive requests a few more times once none is
    /// pending: a request read again after it was settled shows in what those polls
    /// write. (A settled request is held until its checkpoint is acknowledged, a turn
    /// or two later: six turns a poll apart leave room for a read after that.)
    async fn linger(&self) {
        for _ in 0..6 {
            self.wake();
            tokio::time::sleep(TEST_REDRIVE_POLL + Duration::from_millis(10)).await;
        }
    }

    /// Stops the pipeline: it must stop cleanly, with no rewind left to serve.
    async fn stop(mut self) -> Result<(), TestCaseError> {
        let (done, _stopped) = tokio::sync::oneshot::channel();
        self.deliveries
            .send(Control::Stop { done }.into())
            .await
            .map_err(|_| fail("pipeline gone before the stop"))?;
        match tokio::time::timeout(SETTLE_TIMEOUT, &mut self.task).await {
            Err(_) => return Err(fail("the pipeline did not stop")),
            Ok(joined) => joined
                .map_err(|e| fail(format!("the pipeline panicked: {e}")))?
                .map_err(|e| fail(format!("the pipeline failed (the worker would exit): {e}")))?,
        }
        if let Some(rewind) = self.rewinds().into_iter().next() {
            return Err(fail(format!(
                "a rewind asked for after every offset was stored: {rewind:?}"
            )));
        }
        Ok(())
    }
}

/// The re-drive requests not settled yet (contract §8, migration 0011).
async fn pending_requests(db: &Database) -> Result<Vec<(String, i32, i64)>, TestCaseError> {
    sqlx::query_as(
        "SELECT topic, kafka_partition, kafka_offset FROM rejected_events
         WHERE redrive_requested_at IS NOT NULL AND redriven_at IS NULL",
    )
    .fetch_all(&db.pool)
    .await
    .map_err(|e| fail(format!("reading the re-drive requests: {e}")))
}

/// Asks for every reject not redriven yet to be re-driven. Through the operator's
/// command, the first request of a case must count what it asked for right: every
/// reject but the cut ones, which it skips and counts apart.
async fn ask(db: &Database, by_hand: bool, first: bool) -> Result<(), TestCaseError> {
    if by_hand {
        sqlx::query(
            "UPDATE rejected_events SET redrive_requested_at = now(), redrive_requested_by = 'fuzz'
             WHERE redriven_at IS NULL",
        )
        .execute(&db.pool)
        .await
        .map_err(|e| fail(format!("asking for a re-drive: {e}")))?;
        return Ok(());
    }
    let mut connection = db
        .pool
        .acquire()
        .await
        .map_err(|e| fail(format!("connecting: {e}")))?;
    let asked = request(&mut connection, &Selection::All, "fuzz")
        .await
        .map_err(|e| fail(format!("recon-worker rejects redrive --all: {e}")))?;
    if first {
        let (cut, whole): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE payload_size > COALESCE(octet_length(payload), 0)),
                    count(*) FILTER (WHERE payload_size <= COALESCE(octet_length(payload), 0))
             FROM rejected_events",
        )
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| fail(format!("counting rejects: {e}")))?;
        let counted = (asked.requested, asked.already_requested, asked.truncated);
        if counted != (whole as u64, 0, cut as u64) {
            return Err(fail(format!(
                "rejects redrive --all counted (asked, already asked, cut) {counted:?}, \
                 but there are {whole} whole rejects and {cut} cut ones, none asked for before"
            )));
        }
    }
    Ok(())
}

/// The limits a case's re-drive decodes with, and how it asked.
#[derive(Clone, Copy)]
struct RedriveAsked {
    limits: Limits,
    by_hand: bool,
}

async fn run_case(db: &Database, case: &Case) -> Result<CaseTally, TestCaseError> {
    // The action log refuses DELETE to everyone (migration 0010); a test database is
    // emptied with its owner's DDL, in the one implicit transaction of these statements.
    sqlx::raw_sql(
        "ALTER TABLE recon_discrepancy_actions DISABLE TRIGGER recon_discrepancy_actions_no_update_or_delete; \
         DELETE FROM recon_discrepancy_actions; \
         ALTER TABLE recon_discrepancy_actions ENABLE TRIGGER recon_discrepancy_actions_no_update_or_delete; \
         DELETE FROM recon_events; DELETE FROM rejected_events; \
         DELETE FROM recon_discrepancies; DELETE FROM recon_partition_pairs;",
    )
    .execute(&db.pool)
    .await
    .map_err(|e| fail(format!("emptying the database: {e}")))?;
    let config = worker_config(db, case, case.max_message_bytes, "24h");
    let limits = config.decode_limits();
    let log = Log::new(&case.messages);
    let store = Store::with_pool(db.pool.clone(), PAYMENTS_TOPIC, SETTLEMENTS_TOPIC);
    let mut tally = CaseTally::default();

    let poll = case.redrive.as_ref().map(|_| TEST_REDRIVE_POLL);
    let mut running = Running::start(&config, &store, poll).await?;
    let queue = running.first_reading(&log, limits);
    running
        .drive(db, &store, &log, limits, queue, false, &mut tally)
        .await?;
    let asked = match &case.redrive {
        None => None,
        Some(redrive) => {
            tally.redrive.cases = 1;
            // Another worker's configuration: this one stops, and the new one takes
            // the pairs from what is stored (and re-reads nothing).
            let redrive_limits = match &redrive.restart {
                None => limits,
                Some(restart) => {
                    running.stop().await?;
                    let restarted =
                        worker_config(db, case, restart.max_message_bytes, restart.max_future_skew);
                    running = Running::start(&restarted, &store, poll).await?;
                    let queue = running.first_reading(&log, restarted.decode_limits());
                    running
                        .drive(
                            db,
                            &store,
                            &log,
                            restarted.decode_limits(),
                            queue,
                            false,
                            &mut tally,
                        )
                        .await?;
                    restarted.decode_limits()
                }
            };
            ask(db, redrive.by_hand, true).await?;
            if redrive.twice == Twice::AtOnce {
                ask(db, redrive.by_hand, false).await?;
            }
            running
                .settle_redrives(db, &store, &log, redrive_limits, &mut tally)
                .await?;
            if redrive.twice == Twice::AfterSettled {
                ask(db, redrive.by_hand, false).await?;
                running
                    .settle_redrives(db, &store, &log, redrive_limits, &mut tally)
                    .await?;
            }
            running.linger().await;
            running
                .settle_redrives(db, &store, &log, redrive_limits, &mut tally)
                .await?;
            Some(RedriveAsked {
                limits: redrive_limits,
                by_hand: redrive.by_hand,
            })
        }
    };
    running.stop().await?;
    account(db, case, &log, limits, asked, &mut tally).await?;
    Ok(tally)
}

/// A `rejected_events` row as read.
struct RejectRow {
    reason: String,
    class: String,
    payload: Option<Bytes>,
    payload_size: i32,
    redriven: bool,
    result: Option<String>,
    requested: bool,
}

/// Every message exactly once: accepted (its row, at its offset, with its values),
/// a redelivery (no row; its event id stored from another message of the topic) or
/// rejected (one row with a reason and the raw bytes); no row without a message. Where
/// the case re-drove its rejects, each reject also went where contract §8 says (see
/// [`check_redriven`]).
async fn account(
    db: &Database,
    case: &Case,
    log: &Log<'_>,
    limits: Limits,
    asked: Option<RedriveAsked>,
    tally: &mut CaseTally,
) -> Result<(), TestCaseError> {
    let events = sqlx::query(
        "SELECT event_kind, event_id, payment_id, kafka_partition, kafka_offset, amount_minor, \
                currency, (extract(epoch FROM event_time) * 1000000)::bigint FROM recon_outcomes",
    )
    .fetch_all(&db.pool)
    .await
    .map_err(|e| fail(format!("reading outcomes: {e}")))?;
    let rejected = sqlx::query(
        "SELECT topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size, \
                redriven_at IS NOT NULL, redrive_result, redrive_requested_at IS NOT NULL \
         FROM rejected_events",
    )
    .fetch_all(&db.pool)
    .await
    .map_err(|e| fail(format!("reading rejections: {e}")))?;
    let input_of_kind = |kind: &str| match kind {
        "payment" | "refund" => Input::Payments,
        _ => Input::Settlements,
    };
    let input_of_topic = |topic: &str| match topic {
        PAYMENTS_TOPIC => Input::Payments,
        _ => Input::Settlements,
    };
    // Per message (input, pair, offset): event id, payment id, amount, currency, time.
    let mut accepted: HashMap<Place, (String, String, i64, String, i64)> = HashMap::new();
    let mut stored_ids: HashSet<(Input, String)> = HashSet::new();
    for row in &events {
        let input = input_of_kind(row.get::<&str, _>(0));
        let event_id: String = row.get(1);
        // Event ids are unique per topic for all time (contract §1): one row each.
        if !stored_ids.insert((input, event_id.clone())) {
            return Err(fail(format!(
                "two outcome rows for event id {event_id:?} of {input}"
            )));
        }
        let place = (input, row.get::<i32, _>(3), row.get::<i64, _>(4));
        let values = (
            event_id,
            row.get::<String, _>(2),
            row.get::<i64, _>(5),
            row.get::<String, _>(6),
            row.get::<i64, _>(7),
        );
        if accepted.insert(place, values).is_some() {
            return Err(fail(format!("two outcome rows for message {place:?}")));
        }
    }
    let mut rejections: HashMap<Place, RejectRow> = HashMap::new();
    for row in &rejected {
        let place = (
            input_of_topic(row.get::<&str, _>(0)),
            row.get::<i32, _>(1),
            row.get::<i64, _>(2),
        );
        let values = RejectRow {
            reason: row.get(3),
            class: row.get(4),
            payload: row.get(5),
            payload_size: row.get(6),
            redriven: row.get(7),
            result: row.get(8),
            requested: row.get(9),
        };
        if rejections.insert(place, values).is_some() {
            return Err(fail(format!("two rejection rows for message {place:?}")));
        }
    }
    let mut seen = HashSet::new();
    for (message, &offset) in case.messages.iter().zip(&log.offsets) {
        let place = (message.input, message.pair, offset);
        seen.insert(place);
        let decoded = decode(
            message.input,
            message.key.as_deref(),
            message.value.as_deref(),
            message.timestamp_ms,
            limits,
        );
        match (accepted.get(&place), rejections.get(&place)) {
            (Some(values), Some(reject)) => {
                // Rejected when read, accepted when re-driven: both rows stay.
                check_rejected(message, offset, reject, &decoded, tally)?;
                if !(reject.redriven && reject.result.as_deref() == Some("accepted")) {
                    return Err(fail(format!(
                        "{message:?} at {offset}: both accepted and rejected, and not re-driven \
                         as accepted (redriven {}, result {:?})",
                        reject.redriven, reject.result
                    )));
                }
                let Some(asked) = asked else {
                    return Err(fail(format!(
                        "{message:?} at {offset}: re-driven, but the case asked for no re-drive"
                    )));
                };
                let again = decode(
                    message.input,
                    message.key.as_deref(),
                    message.value.as_deref(),
                    message.timestamp_ms,
                    asked.limits,
                );
                check_values(message, offset, values, &again)
                    .map_err(|e| fail(format!("re-driven: {e}")))?;
                tally.rejected += 1;
                tally.redrive.accepted += 1;
            }
            (Some(values), None) => {
                check_values(message, offset, values, &decoded).map_err(fail)?;
                tally.accepted += 1;
            }
            (None, Some(reject)) => {
                match asked {
                    // A reject whose first reading's class is checked against the
                    // decoder's: never asked for, or still as it was (cut).
                    None => {
                        check_rejected(message, offset, reject, &decoded, tally)?;
                        if reject.redriven || reject.requested || reject.result.is_some() {
                            return Err(fail(format!(
                                "{message:?} at {offset}: no re-drive asked for, yet redriven {}, \
                                 requested {}, result {:?}",
                                reject.redriven, reject.requested, reject.result
                            )));
                        }
                    }
                    Some(asked) => {
                        check_kept(message, offset, reject)?;
                        check_redriven(
                            message,
                            offset,
                            reject,
                            &decoded,
                            asked,
                            case.latin1,
                            &stored_ids,
                            tally,
                        )?;
                    }
                }
                tally.rejected += 1;
            }
            (None, None) => match &decoded {
                Ok(event) if stored_ids.contains(&(event.input(), event.event_id().to_owned())) => {
                    tally.redeliveries += 1;
                }
                _ => {
                    return Err(fail(format!(
                        "{message:?} at {offset}: unaccounted (no row, and not a redelivery of a stored event; decoded {decoded:?})"
                    )))
                }
            },
        }
    }
    if let Some(extra) = accepted
        .keys()
        .chain(rejections.keys())
        .find(|p| !seen.contains(p))
    {
        return Err(fail(format!("a row for no message: {extra:?}")));
    }
    let stored: BTreeMap<i32, [Option<i64>; 2]> =
        Store::with_pool(db.pool.clone(), PAYMENTS_TOPIC, SETTLEMENTS_TOPIC)
            .stored_offsets()
            .await
            .map_err(|e| fail(format!("stored offsets: {e}")))?
            .into_iter()
            .collect();
    let expected_offsets = log.expected_offsets();
    if stored != expected_offsets {
        return Err(fail(format!(
            "stored offsets {stored:?}, expected {expected_offsets:?}"
        )));
    }
    Ok(())
}

/// A stored event's values are the ones `decoded` gives.
fn check_values(
    message: &Message,
    offset: i64,
    (event_id, payment_id, amount, currency, at): &(String, String, i64, String, i64),
    decoded: &Result<Event, recon_worker::event::Rejection>,
) -> Result<(), String> {
    let Ok(event) = decoded else {
        return Err(format!(
            "{message:?} at {offset}: stored, but the decoder rejects it: {decoded:?}"
        ));
    };
    let (want_amount, want_currency) = match event {
        Event::Payment(p) => (p.amount.get(), p.currency.code()),
        Event::Refund(r) => (r.amount.get(), r.currency.code()),
        Event::Settlement(s) => (s.gross.get(), s.currency.code()),
    };
    let stored = (
        event_id.as_str(),
        payment_id.as_str(),
        *amount,
        currency.as_str(),
        *at,
    );
    let want = (
        event.event_id(),
        event.payment_id(),
        want_amount,
        want_currency,
        event.event_time(),
    );
    if stored != want {
        return Err(format!(
            "{message:?} at {offset}: stored {stored:?}, decoded {want:?}"
        ));
    }
    Ok(())
}

/// A reject keeps a reason and the raw bytes (cut at the cap) with their size.
fn check_kept(message: &Message, offset: i64, reject: &RejectRow) -> Result<(), TestCaseError> {
    if reject.reason.is_empty() {
        return Err(fail(format!(
            "{message:?} at {offset}: rejected without a reason"
        )));
    }
    let raw = message.value.as_deref();
    let kept = raw.map(|v| &v[..v.len().min(REJECTED_PAYLOAD_CAP)]);
    if reject.payload.as_deref() != kept || reject.payload_size != raw.map_or(0, |v| v.len() as i32)
    {
        return Err(fail(format!(
            "{message:?} at {offset}: raw bytes not kept ({:?}, {})",
            reject.payload, reject.payload_size
        )));
    }
    Ok(())
}

/// A reject as its first reading left it: its bytes kept, and its class the decoder's
/// (or a data error, PostgreSQL's to decide).
fn check_rejected(
    message: &Message,
    offset: i64,
    reject: &RejectRow,
    decoded: &Result<Event, recon_worker::event::Rejection>,
    tally: &mut CaseTally,
) -> Result<(), TestCaseError> {
    check_kept(message, offset, reject)?;
    if reject.class == DATA_ERROR_CLASS {
        tally.data_errors += 1;
        return Ok(());
    }
    match decoded {
        Err(rejection) if rejection.class() == reject.class => Ok(()),
        other => Err(fail(format!(
            "{message:?} at {offset}: rejected as {} ({}), the decoder says {other:?}",
            reject.class, reject.reason
        ))),
    }
}

/// Whether a LATIN1 database can store `text`: characters up to U+00FF, but U+0000,
/// which no PostgreSQL text holds.
fn latin1_holds(text: &str) -> bool {
    text.chars().all(|c| ('\u{1}'..='\u{ff}').contains(&c))
}

/// Contract §8, for a reject with no outcome row at its place after a re-drive of
/// every reject: a payload cut at the cap is not decoded (`truncated`, the request
/// cleared; the operator's command does not even ask); one the decoder accepts now,
/// with the re-drive's limits and the message's own Kafka timestamp, is redriven — a
/// redelivery, its event id stored from another message (accepted ones have their
/// row here, see [`account`]) — unless PostgreSQL refuses its values (LATIN1: a data
/// error, the request cleared); one it still rejects stays rejected with its new
/// class, the request cleared (a data error on LATIN1 when the new reason quotes what
/// LATIN1 cannot hold).
#[allow(clippy::too_many_arguments)]
fn check_redriven(
    message: &Message,
    offset: i64,
    reject: &RejectRow,
    decoded: &Result<Event, recon_worker::event::Rejection>,
    asked: RedriveAsked,
    latin1: bool,
    stored_ids: &HashSet<(Input, String)>,
    tally: &mut CaseTally,
) -> Result<(), TestCaseError> {
    let state = (
        reject.redriven,
        reject.requested,
        reject.result.as_deref(),
        reject.class.as_str(),
    );
    let wrong = |want: &str| {
        fail(format!(
            "{message:?} at {offset}: after a re-drive (limits {:?}, by hand {}), \
             (redriven, requested, result, class) = {state:?}; the contract wants {want} \
             (reason now: {})",
            asked.limits, asked.by_hand, reject.reason
        ))
    };
    let cut = message
        .value
        .as_ref()
        .is_some_and(|v| v.len() > REJECTED_PAYLOAD_CAP);
    if cut {
        // Its reason stays the first reading's.
        check_rejected(message, offset, reject, decoded, tally)?;
        if asked.by_hand {
            tally.redrive.truncated += 1;
            return match state {
                (false, false, Some("truncated"), _) => Ok(()),
                _ => Err(wrong("`truncated`, not redriven, the request cleared")),
            };
        }
        tally.redrive.skipped += 1;
        return match state {
            (false, false, None, _) => Ok(()),
            _ => Err(wrong("nothing: the command does not ask for a cut payload")),
        };
    }
    let again = decode(
        message.input,
        message.key.as_deref(),
        message.value.as_deref(),
        message.timestamp_ms,
        asked.limits,
    );
    match &again {
        Ok(event) => match state {
            (true, _, Some("redelivery"), _)
                if stored_ids.contains(&(event.input(), event.event_id().to_owned())) =>
            {
                // Its reason stays the first reading's.
                check_rejected(message, offset, reject, decoded, tally)?;
                tally.redrive.redeliveries += 1;
                Ok(())
            }
            (false, false, Some("rejected"), DATA_ERROR_CLASS) if latin1 => {
                tally.redrive.data_errors += 1;
                Ok(())
            }
            _ => Err(wrong(&format!(
                "it redriven (valid now: {event:?}): accepted, its outcome row at this \
                 offset, or a redelivery of an event id stored from another message"
            ))),
        },
        Err(rejection) => match state {
            (false, false, Some("rejected"), class) if class == rejection.class() => {
                tally.redrive.rejected += 1;
                Ok(())
            }
            // Its new reason quotes a value LATIN1 cannot hold: PostgreSQL refuses the
            // reason itself, as it did at the first reading.
            (false, false, Some("rejected"), DATA_ERROR_CLASS)
                if latin1 && !latin1_holds(&rejection.to_string()) =>
            {
                tally.redrive.data_errors += 1;
                Ok(())
            }
            _ => Err(wrong(&format!(
                "it still rejected, the request cleared, as {} ({rejection})",
                rejection.class()
            ))),
        },
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: a number"))
    })
}

/// Runs cases until the count or the time is spent; panics with the (shrunk) failing
/// case, which proptest also saves under `proptest-regressions/` to replay first.
fn fuzz(cases: u32, duration: Option<Duration>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (utf8, latin1) = runtime.block_on(async {
        (
            database("random", "UTF8").await,
            database("random", "LATIN1").await,
        )
    });
    let tally = std::cell::RefCell::new(Tally::default());
    let started = Instant::now();
    // A timed run goes in rounds of CHUNK cases, each from a fresh random seed, until
    // the time is spent (proptest has no way to stop a run early but failing).
    const CHUNK: u32 = 100;
    let mut result = Ok(());
    let mut left = cases;
    while result.is_ok() && left > 0 {
        let round = match duration {
            Some(d) if started.elapsed() >= d => break,
            Some(_) => CHUNK,
            None => left,
        };
        left = left.saturating_sub(round);
        let mut runner = TestRunner::new(ProptestConfig {
            cases: round,
            source_file: Some(file!()),
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
                "proptest-regressions",
            ))),
            // Shrinking a case costs a pipeline run per step: bound it.
            max_shrink_iters: 512,
            ..ProptestConfig::default()
        });
        result = runner.run(&case(), |case| {
            let db = if case.latin1 { &latin1 } else { &utf8 };
            let one = runtime.block_on(run_case(db, &case))?;
            let mut tally = tally.borrow_mut();
            tally.cases += 1;
            tally.messages += case.messages.len() as u64;
            tally.accepted += one.accepted;
            tally.redeliveries += one.redeliveries;
            tally.rejected += one.rejected;
            tally.data_errors += one.data_errors;
            tally.rewinds += one.rewinds;
            tally.redrive += one.redrive;
            Ok(())
        });
        if duration.is_some() {
            eprintln!(
                "fuzz_path: {:?} after {:.0?}",
                tally.borrow(),
                started.elapsed()
            );
        }
    }
    eprintln!(
        "fuzz_path: {:?} in {:.0?}",
        tally.borrow(),
        started.elapsed()
    );
    runtime.block_on(async {
        utf8.drop_database().await;
        latin1.drop_database().await;
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => panic!("{reason}\nminimal failing case: {case:#?}"),
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
}

/// The CI run: `RECON_FUZZ_CASES` cases (150 by default, about 30 s), or as many as
/// `RECON_FUZZ_SECONDS` allow.
#[test]
fn hostile_messages_through_the_whole_path_are_each_accounted_for() {
    let cases = env_number("RECON_FUZZ_CASES").unwrap_or(
        if std::env::var_os("RECON_FUZZ_SECONDS").is_some() {
            u64::from(u32::MAX)
        } else {
            150
        },
    );
    let seconds = env_number("RECON_FUZZ_SECONDS");
    fuzz(
        u32::try_from(cases).unwrap_or(u32::MAX),
        seconds.map(Duration::from_secs),
    );
}

fn payment(event_id: &str, payment_id: &str, occurred_at: &str) -> Option<Vec<u8>> {
    let value = serde_json::json!({
        "event_id": event_id, "type": "payment_captured", "payment_id": payment_id,
        "merchant_id": "m", "amount_minor": 100, "currency": "EUR", "occurred_at": occurred_at,
    });
    Some(value.to_string().into_bytes())
}

fn message(
    pair: i32,
    payment_id: &str,
    value: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
) -> Message {
    Message {
        input: Input::Payments,
        pair,
        key: Some(payment_id.as_bytes().to_vec()),
        value,
        timestamp_ms,
    }
}

/// The cases the fuzzing found, kept as plain cases so they run whatever the seeds.
#[test]
fn cases_found_by_fuzzing_stay_fixed() {
    let now = chrono::Utc::now();
    let recent = (now - chrono::Duration::hours(1)).to_rfc3339();
    let base = |latin1, messages| Case {
        latin1,
        batch_max_messages: 1,
        deadline: "72h",
        max_message_bytes: 64 * 1024,
        messages,
        redrive: None,
    };
    let cases = [
        // A Kafka timestamp of i64::MIN overflowed the latency metric (a panic).
        base(
            false,
            vec![message(
                0,
                "p0",
                payment("e0", "p0", &recent),
                Some(i64::MIN),
            )],
        ),
        // An instant in the year 10000 was stored clamped to the end of 9999.
        base(
            false,
            vec![message(
                0,
                "p0",
                payment("e0", "p0", "9999-12-31T23:59:59-23:59"),
                Some(i64::MAX),
            )],
        ),
        // A payment id LATIN1 cannot hold failed the window lookup: the worker exited.
        base(
            true,
            vec![
                message(0, "p0", payment("e0", "p0", &recent), Some(now_ms())),
                message(0, "p0€", payment("e1", "p0€", &recent), Some(now_ms())),
                message(0, "p1", payment("e2", "p1", &recent), Some(now_ms())),
            ],
        ),
        // The same for an event id in a pair replaying after a clash, whose event ids
        // are all probed in storage.
        base(
            true,
            vec![
                message(1, "p0", payment("e0", "p0", &recent), Some(now_ms())),
                message(0, "p0", payment("e0", "p0", &recent), Some(now_ms())),
                message(0, "p1", payment("e1€", "p1", &recent), Some(now_ms())),
                message(0, "p1", payment("e2", "p1", &recent), Some(now_ms())),
            ],
        ),
        // Two copies of a message whose payment id LATIN1 cannot hold, both rejected
        // (data errors), re-driven in one poll: the copy is a redelivery of the first
        // until PostgreSQL refuses the first; then it is applied and refused in turn,
        // while the first, rejected as remembered, is dropped with the refused
        // checkpoint and decoded afresh next time: neither ever settled (a stall).
        Case {
            redrive: Some(Redrive {
                restart: None,
                by_hand: false,
                twice: Twice::Once,
            }),
            ..base(
                true,
                vec![
                    message(0, "p0€", payment("e0", "p0€", &recent), Some(now_ms())),
                    message(0, "p0€", payment("e0", "p0€", &recent), Some(now_ms())),
                ],
            )
        },
        // One message on each pair (a redelivery on the other partition), too large
        // when read, valid once the limit is raised: both re-driven in one poll, each
        // pair accepts it, and the pair whose transaction commits second clashes. Its
        // replay re-read nothing (stored as far as it had read), yet it was left
        // probing until its next commit, which a quiet pair makes only when its
        // watermark follows the clock (`idle_timeout`, 30 s): the re-drive poll skips
        // a probing pair, so the request waited that long.
        Case {
            max_message_bytes: 300,
            redrive: Some(Redrive {
                restart: Some(Restart {
                    max_message_bytes: 64 * 1024,
                    max_future_skew: "24h",
                }),
                by_hand: false,
                twice: Twice::Once,
            }),
            ..base(
                false,
                vec![
                    message(
                        0,
                        "p0",
                        payment("e0", "p0", &recent).map(|v| padded(v, 400)),
                        Some(now_ms()),
                    ),
                    message(
                        1,
                        "p0",
                        payment("e0", "p0", &recent).map(|v| padded(v, 400)),
                        Some(now_ms()),
                    ),
                ],
            )
        },
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (utf8, latin1) = (
            database("found", "UTF8").await,
            database("found", "LATIN1").await,
        );
        let mut failures = Vec::new();
        for case in &cases {
            let db = if case.latin1 { &latin1 } else { &utf8 };
            match run_case(db, case).await {
                Ok(tally) => assert_eq!(
                    tally.accepted + tally.redeliveries + tally.rejected,
                    case.messages.len() as u64
                ),
                Err(error) => failures.push(format!("{case:#?}: {error}")),
            }
        }
        utf8.drop_database().await;
        latin1.drop_database().await;
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}
