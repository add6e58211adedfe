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
//! One database per encoding, reused across cases (emptied between them): UTF-8, and
//! LATIN1, whose encoding cannot hold most characters, so values the decoder accepts
//! but PostgreSQL refuses (SQLSTATE class 22) are common there.
//!
//! `RECON_FUZZ_CASES` sets the case count (default 150, about half a minute);
//! `RECON_FUZZ_SECONDS` runs cases until that much time has passed instead.

use std::collections::{BTreeMap, HashMap, HashSet};
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
use recon_worker::pipeline::Pipeline;
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
        let show = |b: &Option<Vec<u8>>| {
            b.as_ref()
                .map_or("<none>".to_owned(), |b| b.escape_ascii().to_string())
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

fn generated() -> impl Strategy<Value = Generated> {
    prop_oneof![
        6 => fresh_message().prop_map(Generated::Fresh),
        1 => (any::<usize>(), any::<bool>())
            .prop_map(|(of, other_pair)| Generated::Copy { of, other_pair }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![3 => Just(false), 2 => Just(true)],
        prop_oneof![1 => Just(1usize), 2 => Just(3), 3 => Just(5_000)],
        prop_oneof![Just("1s"), Just("72h")],
        prop_oneof![3 => Just(64 * 1024usize), 1 => Just(300)],
        proptest::collection::vec(generated(), 1..40),
    )
        .prop_map(
            |(latin1, batch_max_messages, deadline, max_message_bytes, generated)| {
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
}

/// What one case did, for the tally.
#[derive(Debug, Default)]
struct CaseTally {
    accepted: u64,
    redeliveries: u64,
    rejected: u64,
    data_errors: u64,
    rewinds: u64,
}

fn config(db: &Database, case: &Case) -> Config {
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
        (
            "RECON_MAX_MESSAGE_BYTES",
            case.max_message_bytes.to_string(),
        ),
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
    let config = config(db, case);
    let limits = config.decode_limits();
    // Offsets as Kafka would give them: per (input, pair), in order.
    let mut next: HashMap<(Input, i32), i64> = HashMap::new();
    let offsets: Vec<i64> = case
        .messages
        .iter()
        .map(|m| {
            let slot = next.entry((m.input, m.pair)).or_insert(0);
            *slot += 1;
            *slot - 1
        })
        .collect();

    let store = Store::with_pool(db.pool.clone(), PAYMENTS_TOPIC, SETTLEMENTS_TOPIC);
    let (commands, command_receiver) = std::sync::mpsc::channel::<Command>();
    // The stand-in for the poll thread serves the rewinds; advisory commits need a
    // broker and are dropped.
    let rewind_requests = || -> Vec<Rewind> {
        command_receiver
            .try_iter()
            .filter_map(|command| match command {
                Command::Rewind(rewind) => Some(rewind),
                Command::Commit(_) => None,
            })
            .collect()
    };
    let mut requested: Vec<Rewind> = Vec::new();
    let handle = ConsumerHandle { commands };
    let pipeline = Pipeline::new(
        &config,
        store.clone(),
        Some(handle),
        Arc::new(Health::default()),
    );
    let (deliveries, receiver) = mpsc::channel(64);
    let mut task = tokio::spawn(pipeline.run(receiver));
    // A failed case must not leave its pipeline writing into the next one's tables
    // (while shrinking, say).
    let _abort = AbortOnDrop(task.abort_handle());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let assign = Control::Assign {
        pairs: (0..PAIRS).collect(),
        reply,
    };
    deliveries
        .send(assign.into())
        .await
        .map_err(|_| fail("pipeline gone before the assignment"))?;
    answer
        .await
        .map_err(|_| fail("no answer to the assignment"))?
        .map_err(|e| fail(format!("assignment failed: {e}")))?;

    let mut tally = CaseTally::default();
    let mut pending: Vec<Delivery> = case
        .messages
        .iter()
        .zip(&offsets)
        .map(|(m, &offset)| read(m, offset, limits, None))
        .collect();
    // Like the poll thread's progress reports: everything read, nothing left.
    pending.push(Delivery::Data(Data::Progress(
        (0..PAIRS)
            .flat_map(|pair| {
                Input::ALL.map(|input| PartitionProgress {
                    topic: input.into(),
                    partition: pair,
                    caught_up: true,
                    high_watermark: next.get(&(input, pair)).copied().unwrap_or(0),
                })
            })
            .collect(),
    )));
    let expected_offsets: BTreeMap<i32, [Option<i64>; 2]> = (0..PAIRS)
        .map(|pair| (pair, Input::ALL.map(|i| next.get(&(i, pair)).copied())))
        .collect();

    let started = Instant::now();
    let mut queue: std::collections::VecDeque<Delivery> = pending.into();
    loop {
        // Hand over what is queued while the pipeline takes it, serving rewinds between.
        while let Some(delivery) = queue.pop_front() {
            tokio::select! {
                sent = deliveries.send(delivery) => {
                    if sent.is_err() {
                        break;
                    }
                }
                _ = &mut task => return Err(fail("the pipeline stopped while reading")),
            }
            requested.extend(rewind_requests());
            if !requested.is_empty() {
                break;
            }
        }
        requested.extend(rewind_requests());
        for rewind in std::mem::take(&mut requested) {
            tally.rewinds += 1;
            // Like the poll thread: the marker, then the pair from the stored offsets,
            // refused messages handed over as rejections with PostgreSQL's reason.
            queue.retain(
                |d| !matches!(d, Delivery::Data(Data::Message(m)) if m.partition == rewind.pair),
            );
            queue.push_front(Delivery::Data(Data::Rewound { pair: rewind.pair }));
            for (m, &offset) in case.messages.iter().zip(&offsets) {
                let from = rewind.next_offsets[m.input].unwrap_or(0);
                if m.pair != rewind.pair || offset < from {
                    continue;
                }
                let refused = rewind
                    .refused
                    .iter()
                    .find(|r| r.topic == m.input.into() && r.offset == offset)
                    .map(|r| r.reason.clone());
                queue.push_back(read(m, offset, limits, refused));
            }
        }
        if !queue.is_empty() {
            continue;
        }
        if task.is_finished() {
            let result = (&mut task).await.expect("join");
            return Err(fail(format!("the pipeline stopped: {result:?}")));
        }
        let stored: BTreeMap<i32, [Option<i64>; 2]> = store
            .stored_offsets()
            .await
            .map_err(|e| fail(format!("stored offsets: {e}")))?
            .into_iter()
            .collect();
        requested.extend(rewind_requests());
        if stored == expected_offsets && requested.is_empty() {
            break;
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            return Err(fail(format!(
                "stalled: stored offsets {stored:?}, expected {expected_offsets:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (done, _stopped) = tokio::sync::oneshot::channel();
    deliveries
        .send(Control::Stop { done }.into())
        .await
        .map_err(|_| fail("pipeline gone before the stop"))?;
    match tokio::time::timeout(SETTLE_TIMEOUT, task).await {
        Err(_) => return Err(fail("the pipeline did not stop")),
        Ok(joined) => joined
            .map_err(|e| fail(format!("the pipeline panicked: {e}")))?
            .map_err(|e| fail(format!("the pipeline failed (the worker would exit): {e}")))?,
    }
    if let Some(rewind) = rewind_requests().into_iter().next() {
        return Err(fail(format!(
            "a rewind asked for after every offset was stored: {rewind:?}"
        )));
    }
    account(db, case, &offsets, limits, &expected_offsets, &mut tally).await?;
    Ok(tally)
}

/// Every message exactly once: accepted (its row, at its offset, with its values),
/// a redelivery (no row; its event id stored from another message of the topic) or
/// rejected (one row with a reason and the raw bytes); no row without a message.
async fn account(
    db: &Database,
    case: &Case,
    offsets: &[i64],
    limits: Limits,
    expected_offsets: &BTreeMap<i32, [Option<i64>; 2]>,
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
        "SELECT topic, kafka_partition, kafka_offset, reason, reason_class, payload, payload_size \
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
    // (input, pair, offset) -> row
    // Per message (input, pair, offset): event id, payment id, amount, currency, time.
    let mut accepted: HashMap<Place, (String, String, i64, String, i64)> = HashMap::new();
    let mut stored_ids: HashSet<(Input, String)> = HashSet::new();
    for row in &events {
        let input = input_of_kind(row.get::<&str, _>(0));
        let event_id: String = row.get(1);
        stored_ids.insert((input, event_id.clone()));
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
    // Per message: reason, class, payload, payload size.
    let mut rejections: HashMap<Place, (String, String, Option<Bytes>, i32)> = HashMap::new();
    for row in &rejected {
        let place = (
            input_of_topic(row.get::<&str, _>(0)),
            row.get::<i32, _>(1),
            row.get::<i64, _>(2),
        );
        let values = (row.get(3), row.get(4), row.get(5), row.get(6));
        if rejections.insert(place, values).is_some() {
            return Err(fail(format!("two rejection rows for message {place:?}")));
        }
    }
    let mut seen = HashSet::new();
    for (message, &offset) in case.messages.iter().zip(offsets) {
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
            (Some(_), Some(_)) => {
                return Err(fail(format!("{message:?} at {offset}: both accepted and rejected")))
            }
            (Some((event_id, payment_id, amount, currency, at)), None) => {
                let Ok(event) = &decoded else {
                    return Err(fail(format!("{message:?} at {offset}: stored, but the decoder rejects it: {decoded:?}")));
                };
                let (want_amount, want_currency) = match event {
                    Event::Payment(p) => (p.amount.get(), p.currency.code()),
                    Event::Refund(r) => (r.amount.get(), r.currency.code()),
                    Event::Settlement(s) => (s.gross.get(), s.currency.code()),
                };
                let stored = (event_id.as_str(), payment_id.as_str(), *amount, currency.as_str(), *at);
                let want = (event.event_id(), event.payment_id(), want_amount, want_currency, event.event_time());
                if stored != want {
                    return Err(fail(format!("{message:?} at {offset}: stored {stored:?}, decoded {want:?}")));
                }
                tally.accepted += 1;
            }
            (None, Some((reason, class, payload, size))) => {
                if reason.is_empty() {
                    return Err(fail(format!("{message:?} at {offset}: rejected without a reason")));
                }
                let raw = message.value.as_deref();
                let kept = raw.map(|v| &v[..v.len().min(REJECTED_PAYLOAD_CAP)]);
                if payload.as_deref() != kept || *size != raw.map_or(0, |v| v.len() as i32) {
                    return Err(fail(format!("{message:?} at {offset}: raw bytes not kept ({payload:?}, {size})")));
                }
                if class == DATA_ERROR_CLASS {
                    tally.data_errors += 1;
                } else {
                    match &decoded {
                        Err(rejection) if rejection.class() == class => {}
                        other => return Err(fail(format!("{message:?} at {offset}: rejected as {class} ({reason}), the decoder says {other:?}"))),
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
    if &stored != expected_offsets {
        return Err(fail(format!(
            "stored offsets {stored:?}, expected {expected_offsets:?}"
        )));
    }
    Ok(())
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
