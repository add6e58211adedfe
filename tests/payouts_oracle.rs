//! Payouts against an oracle (issue 22, item 5): random streams of settlement lines
//! spread over partition pairs, payout announcements before, after or without their
//! lines, lines in the wrong currency, announced line counts right and wrong, payouts
//! announced twice, redeliveries and rejected messages (by the decoder, or, in a LATIN1
//! database, by PostgreSQL for a payout id it cannot hold: a data error, traced to its
//! message and its pair re-read) go through the worker's own code — the poll thread's
//! decoding, the real `Pipeline` (several of them, on one database), its checkpoints
//! and `Store::evaluate_payouts` — and every payout must end as an oracle written from
//! contract §7 alone says.
//!
//! The oracle shares no code with the worker: its sums and status rules are its own,
//! with the readings of docs/payouts-design.md section 9: lines are summed by their
//! reported `net_minor`; only lines in the announced currency count towards
//! `lines_net_minor` (every line counts towards `line_count`); a line in another
//! currency makes `currency_mismatch`, which wins over a wrong total; the right sum
//! with the wrong line count is `total_mismatch`; the first announcement in partition
//! order counts; a redelivered line never counts, a `duplicate_settlement` line does;
//! an unannounced payout's currency and sum are NULL when its lines span several
//! currencies.
//!
//! The driver is `fuzz_path`'s stand-in for the poll thread, for three topics and two or
//! three pipelines ("workers"): messages are produced into an in-memory log per
//! (topic, partition) and each worker reads the partitions of the pairs it owns, in a
//! random interleaving (partitions are fetched independently), serving its pipeline's
//! rewinds from the log. Between productions a script moves pairs between workers
//! (revoke, then assign: the new owner resumes from the stored offsets), steals them
//! (assign elsewhere first: the old owner is a zombie for a while, which fencing must
//! stop), crashes a worker (its task aborted with a batch in flight; its pairs taken
//! over) and runs the evaluator, sometimes from two tasks at once. Batch sizes are
//! random per worker.
//!
//! Event times are in March 2024, within an hour, so no payout deadline (a day after
//! `paid_at`, three days after an unannounced payout's last line) can pass while the
//! stream runs; then one payment and its line a month later on every pair (sentinels)
//! move every pair's watermark, and so the global one, past every deadline. In a fifth
//! of the cases every partition is reported caught up instead, so every pair goes idle
//! and its watermark follows the clock (contract §2); in half of those the payouts
//! partitions are not read until then, and nothing may fall due while they are unread
//! (a pair with unread announcements is not idle). Checks:
//! - after every evaluation, no payout has two open discrepancies; before the global
//!   watermark may pass, no payout discrepancy exists at all; after that, only the
//!   final ones;
//! - once every message is committed and the evaluator has run, every payout's row of
//!   `recon_payouts` (status, currency, expected and summed net, expected and counted
//!   lines, `paid_at`) and the kind of its open discrepancy equal the oracle's, and
//!   nothing was ever resolved;
//! - then, in cases with late messages (lines and announcements produced after the
//!   sentinels, when every deadline has passed), discrepancies open, resolve and
//!   reopen as the late messages are evaluated; at the end, rows and open kinds equal
//!   the oracle's over the whole stream, a resolved `payout_mismatch` (`balanced`) only
//!   for a payout that ends balanced, a resolved `unannounced_payout` (`announced`)
//!   only for one that ends announced;
//! - one more evaluation changes nothing; every accepted announcement is stored once,
//!   at its first offset; every rejected message has its one `rejected_events` row;
//!   the status counts equal the states.
//!
//! `RECON_PAYOUT_ORACLE_CASES` sets the case count (default 56, about a minute in a
//! debug build).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{
    Config as ProptestConfig, FileFailurePersistence, TestCaseError, TestError, TestRunner,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recon_worker::config::Config;
use recon_worker::consumer::{
    decode_announcement_message, decode_message, Command, ConsumerHandle, Control, Data, Delivery,
    PartitionProgress, ReadAnnouncement, ReadMessage,
};
use recon_worker::event::{Limits, Topic};
use recon_worker::pair::PerTopic;
use recon_worker::pipeline::{Pipeline, PipelineError};
use recon_worker::rejection::{MessageAt, DATA_ERROR_CLASS};
use recon_worker::store::{PayoutRules, Store};
use recon_worker::telemetry::Health;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};

/// 2024-03-01T00:00:00Z: every event of a case but the sentinels is within the hour
/// after it.
const T0: i64 = 1_709_251_200;
const SPAN: u32 = 3600;
/// The sentinels' event time: past every deadline of the stream.
const SENTINEL_AT: i64 = T0 + 30 * 86_400;
const GRACE: Duration = Duration::from_secs(24 * 3600);
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(72 * 3600);
const CURRENCIES: [&str; 3] = ["EUR", "USD", "JPY"];
/// Longest the stream may take to be committed: far above what a case takes, so only
/// a stalled pair reaches it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// What a case is made of

/// A line's `net_minor`: gross − fee, off by a little (a `fee_mismatch`, still summed
/// as reported), or near the ends of i64 (sums beyond any bigint).
#[derive(Clone, Debug)]
enum Net {
    Consistent,
    Off(i64),
    Huge { positive: bool, by: u16 },
}

#[derive(Clone, Debug)]
struct LineSpec {
    /// Taken modulo the pair count.
    pair: u8,
    /// A refund line (negative gross) rather than a capture.
    refund: bool,
    /// 0: the payout's currency; else another.
    currency_shift: u8,
    gross: i64,
    fee: i64,
    net: Net,
    /// Seconds after `T0`.
    settled: u32,
    /// Where it goes in the stream (sorted by slot).
    slot: u16,
    /// The slot of its payment, or `None`: the payment never comes.
    payment: Option<u16>,
    /// Copies (same event id) this much later, on the same pair or the next one.
    redeliveries: Vec<(u16, bool)>,
    /// A second line (another event id) for the same payment: `duplicate_settlement`.
    duplicate: Option<u16>,
    /// Produced after the sentinels, when every deadline has passed.
    late: bool,
    /// Invalid (`gross_minor` 0): rejected, never counted; its duplicate is valid.
    bad: bool,
}

#[derive(Clone, Debug)]
enum Expect {
    /// The value the payout's lines (all of them, late ones included) make.
    Right,
    /// Off by this much.
    Off(i64),
}

#[derive(Clone, Debug)]
enum Placement {
    /// Before every line of the stream.
    Before,
    Among,
    /// After every line of the stream (before the sentinels).
    After,
    /// After the sentinels.
    Late,
}

#[derive(Clone, Debug)]
struct AnnouncementSpec {
    net: Expect,
    line_count: Option<Expect>,
    /// Announced in another currency than the payout's lines.
    other_currency: bool,
    placement: Placement,
    slot: u16,
    /// `paid_at`, seconds after `T0`.
    paid: u32,
    /// Copies (same event id) this much later on the same partition.
    redeliveries: Vec<u16>,
}

/// An announcement the decoder must reject; it names the payout and would change it
/// if taken.
#[derive(Clone, Debug)]
enum BadAnnouncement {
    KeyMismatch,
    NegativeLineCount,
    NoPaidAt,
    NetAsText,
}

#[derive(Clone, Debug)]
struct PayoutSpec {
    currency: usize,
    /// The payouts partition its announcements are on (keyed by `payout_id`), modulo
    /// the pair count.
    partition: u8,
    lines: Vec<LineSpec>,
    /// None: unannounced; two: announced twice, the first counts.
    announcements: Vec<AnnouncementSpec>,
    bad: Option<(BadAnnouncement, u16)>,
    /// Its id has a character LATIN1 cannot hold: in a LATIN1 database PostgreSQL
    /// refuses its lines and announcements (a data error), which are then rejected.
    unstorable: bool,
}

#[derive(Clone, Debug)]
enum Step {
    /// Produce this many messages and let every worker read them.
    Produce(u8),
    /// Revoke the pair from its owner, then assign it to worker `to`.
    Move {
        pair: u8,
        to: u8,
    },
    /// Assign the pair to worker `to` first; its old owner goes on reading it until
    /// the step after next (a zombie, fenced by the new epoch).
    Steal {
        pair: u8,
        to: u8,
    },
    /// Abort the worker's pipeline (a crash); another worker takes its pairs.
    Crash {
        worker: u8,
    },
    Evaluate {
        twice: bool,
    },
}

/// How every pair's watermark passes every deadline once the main stream is in.
#[derive(Clone, Debug)]
enum Ending {
    /// A payment and its line a month later on every pair.
    Sentinels,
    /// Progress reports: every partition caught up, so every pair idle (contract §2)
    /// and its watermark follows the clock. With `hold_announcements`, the payouts
    /// partitions are not read until the inputs have been idle a while: a pair with
    /// unread announcements is not idle, so nothing may fall due meanwhile.
    Idle { hold_announcements: bool },
}

#[derive(Clone, Debug)]
struct Spec {
    /// Run against the LATIN1 database (see `PayoutSpec::unstorable`).
    latin1: bool,
    ending: Ending,
    pairs: i32,
    workers: usize,
    /// `RECON_BATCH_MAX_MESSAGES` of each worker (the first `workers`).
    batch_max: Vec<usize>,
    /// `PayoutRules::max_touched`: small ones make runs take the touched set in parts.
    max_touched: usize,
    payouts: Vec<PayoutSpec>,
    /// Payments and lines with no payout: (pair, payment slot, line slot).
    plain: Vec<(u8, u16, u16)>,
    steps: Vec<Step>,
    /// Seeds the workers' read interleaving.
    seed: u64,
}

fn small_delta() -> impl Strategy<Value = i64> {
    (1i64..=50, any::<bool>()).prop_map(|(d, negative)| if negative { -d } else { d })
}

fn net() -> impl Strategy<Value = Net> {
    prop_oneof![
        8 => Just(Net::Consistent),
        1 => small_delta().prop_map(Net::Off),
        1 => (any::<bool>(), 0u16..1000).prop_map(|(positive, by)| Net::Huge { positive, by }),
    ]
}

fn weighted(true_in: u32, of: u32) -> impl Strategy<Value = bool> {
    prop_oneof![of - true_in => Just(false), true_in => Just(true)]
}

fn line_spec() -> impl Strategy<Value = LineSpec> {
    (
        (
            any::<u8>(),
            weighted(1, 8),
            prop_oneof![14 => Just(0u8), 1 => Just(1), 1 => Just(2)],
        ),
        (1i64..=1000, 0i64..=50, net()),
        (0u32..SPAN, 100u16..900),
        prop_oneof![9 => (0u16..1000).prop_map(Some), 1 => Just(None)],
        prop_oneof![
            4 => Just(Vec::new()),
            1 => proptest::collection::vec((1u16..300, weighted(1, 6)), 1..=2),
        ],
        prop_oneof![9 => Just(None), 1 => (0u16..1000).prop_map(Some)],
        (weighted(1, 10), weighted(1, 20)),
    )
        .prop_map(
            |(
                (pair, refund, currency_shift),
                (gross, fee, net),
                (settled, slot),
                payment,
                redeliveries,
                duplicate,
                (late, bad),
            )| LineSpec {
                pair,
                refund,
                currency_shift,
                gross,
                fee,
                net,
                settled,
                slot,
                payment,
                redeliveries,
                duplicate,
                late,
                bad,
            },
        )
}

fn expect() -> impl Strategy<Value = Expect> {
    prop_oneof![3 => Just(Expect::Right), 1 => small_delta().prop_map(Expect::Off)]
}

fn announcement_spec() -> impl Strategy<Value = AnnouncementSpec> {
    (
        expect(),
        prop_oneof![2 => Just(None), 3 => expect().prop_map(Some)],
        weighted(1, 10),
        prop_oneof![
            3 => Just(Placement::Before),
            3 => Just(Placement::Among),
            3 => Just(Placement::After),
            1 => Just(Placement::Late),
        ],
        0u16..1000,
        0u32..SPAN,
        prop_oneof![4 => Just(Vec::new()), 1 => proptest::collection::vec(1u16..300, 1..=2)],
    )
        .prop_map(
            |(net, line_count, other_currency, placement, slot, paid, redeliveries)| {
                AnnouncementSpec {
                    net,
                    line_count,
                    other_currency,
                    placement,
                    slot,
                    paid,
                    redeliveries,
                }
            },
        )
}

fn payout_spec() -> impl Strategy<Value = PayoutSpec> {
    (
        0usize..CURRENCIES.len(),
        any::<u8>(),
        proptest::collection::vec(line_spec(), 0..=6),
        prop_oneof![1 => Just(0usize), 3 => Just(1), 1 => Just(2)]
            .prop_flat_map(|n| proptest::collection::vec(announcement_spec(), n)),
        prop_oneof![
            6 => Just(None),
            1 => (
                prop_oneof![
                    Just(BadAnnouncement::KeyMismatch),
                    Just(BadAnnouncement::NegativeLineCount),
                    Just(BadAnnouncement::NoPaidAt),
                    Just(BadAnnouncement::NetAsText),
                ],
                0u16..1000,
            )
                .prop_map(Some),
        ],
        weighted(1, 6),
    )
        .prop_map(
            |(currency, partition, lines, announcements, bad, unstorable)| PayoutSpec {
                currency,
                partition,
                lines,
                announcements,
                bad,
                unstorable,
            },
        )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1u8..12).prop_map(Step::Produce),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(pair, to)| Step::Move { pair, to }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(pair, to)| Step::Steal { pair, to }),
        1 => any::<u8>().prop_map(|worker| Step::Crash { worker }),
        2 => any::<bool>().prop_map(|twice| Step::Evaluate { twice }),
    ]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        8 => Just(Ending::Sentinels),
        1 => Just(Ending::Idle { hold_announcements: false }),
        1 => Just(Ending::Idle { hold_announcements: true }),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (weighted(1, 4), ending()),
        2i32..=4,
        2usize..=3,
        proptest::collection::vec(prop_oneof![1 => 1usize..=3, 2 => 4usize..=50], 3),
        prop_oneof![4 => Just(PayoutRules::MAX_TOUCHED), 1 => 1usize..=2],
        proptest::collection::vec(payout_spec(), 2..=6),
        proptest::collection::vec((any::<u8>(), 0u16..1000, 0u16..1000), 0..=3),
        proptest::collection::vec(step(), 4..=24),
        any::<u64>(),
    )
        .prop_map(
            |(
                (latin1, ending),
                pairs,
                workers,
                batch_max,
                max_touched,
                payouts,
                plain,
                steps,
                seed,
            )| Spec {
                latin1,
                ending,
                pairs,
                workers,
                batch_max,
                max_touched,
                payouts,
                plain,
                steps,
                seed,
            },
        )
}

// ---------------------------------------------------------------------------------
// The stream a spec makes, and what the oracle needs to know of each message

/// An accepted settlement line that names a payout.
#[derive(Clone, Debug)]
struct LineTruth {
    event_id: String,
    payout_id: String,
    currency: &'static str,
    net: i64,
}

/// An accepted announcement.
#[derive(Clone, Debug)]
struct AnnouncementTruth {
    event_id: String,
    payout_id: String,
    currency: &'static str,
    net: i64,
    line_count: Option<i64>,
    /// Seconds since the epoch.
    paid_at: i64,
}

#[derive(Clone, Debug)]
enum Truth {
    Line(LineTruth),
    Announcement(AnnouncementTruth),
    /// Must be rejected: by PostgreSQL (a data error), by the decoder, or (`None`)
    /// either: a decoder's reason that quotes a value the database cannot hold is
    /// refused in turn, and the message stored with PostgreSQL's reason instead.
    Rejected {
        by_database: Option<bool>,
    },
    /// Accepted, in no payout: payments, lines without a payout id.
    Plain,
}

#[derive(Clone, Debug)]
struct Item {
    topic: Topic,
    pair: i32,
    key: Vec<u8>,
    value: Vec<u8>,
    truth: Truth,
    label: String,
    /// A sentinel: read only once its pair's payouts partition is read to its end
    /// (see `Harness::pump`).
    sentinel: bool,
}

struct Built {
    /// Before the sentinels, in slot order.
    main: Vec<Item>,
    /// A payment and its line a month later on every pair.
    sentinels: Vec<Item>,
    /// After the sentinels, in slot order.
    late: Vec<Item>,
}

fn timestamp(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .expect("a time of the test")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn payment_value(
    event_id: &str,
    payment_id: &str,
    amount: i64,
    currency: &str,
    at: i64,
) -> Vec<u8> {
    serde_json::json!({
        "event_id": event_id, "type": "payment_captured", "payment_id": payment_id,
        "merchant_id": "m1", "amount_minor": amount, "currency": currency,
        "occurred_at": timestamp(at),
    })
    .to_string()
    .into_bytes()
}

struct LineValues<'a> {
    event_id: &'a str,
    payment_id: &'a str,
    refund_id: Option<&'a str>,
    gross: i64,
    fee: i64,
    net: i64,
    currency: &'a str,
    at: i64,
    payout_id: Option<&'a str>,
}

fn line_value(line: &LineValues<'_>) -> Vec<u8> {
    let mut value = serde_json::json!({
        "event_id": line.event_id, "type": "settlement_line", "settlement_id": "s1",
        "payment_id": line.payment_id, "gross_minor": line.gross, "fee_minor": line.fee,
        "net_minor": line.net, "currency": line.currency, "settled_at": timestamp(line.at),
    });
    if let Some(payout_id) = line.payout_id {
        value["payout_id"] = payout_id.into();
    }
    if let Some(refund_id) = line.refund_id {
        value["line_type"] = "refund".into();
        value["refund_id"] = refund_id.into();
    }
    value.to_string().into_bytes()
}

/// Orders one phase's items by slot, ties in the order they were made.
fn in_slot_order(mut items: Vec<(u32, Item)>) -> Vec<Item> {
    items.sort_by_key(|(slot, _)| *slot);
    items.into_iter().map(|(_, item)| item).collect()
}

fn build(spec: &Spec) -> Built {
    let pairs = spec.pairs;
    let mut main: Vec<(u32, Item)> = Vec::new();
    let mut late: Vec<(u32, Item)> = Vec::new();
    let mut push = |is_late: bool, slot: u32, item: Item| {
        if is_late {
            late.push((slot, item));
        } else {
            main.push((slot, item));
        }
    };
    for (k, payout) in spec.payouts.iter().enumerate() {
        let payout_id = if payout.unstorable {
            format!("po{k}€")
        } else {
            format!("po{k}")
        };
        let refused = spec.latin1 && payout.unstorable;
        // (currency, net) of each line that will be accepted, for the right values.
        let mut accepted: Vec<(&'static str, i64)> = Vec::new();
        for (j, line) in payout.lines.iter().enumerate() {
            let pair = i32::from(line.pair) % pairs;
            let currency =
                CURRENCIES[(payout.currency + usize::from(line.currency_shift)) % CURRENCIES.len()];
            let payment_id = format!("p{k}.{j}");
            let refund_id = format!("r{k}.{j}");
            let gross = if line.refund { -line.gross } else { line.gross };
            let net = match line.net {
                Net::Consistent => gross - line.fee,
                Net::Off(d) => gross - line.fee + d,
                Net::Huge { positive: true, by } => i64::MAX - i64::from(by),
                Net::Huge {
                    positive: false,
                    by,
                } => i64::MIN + i64::from(by),
            };
            let at = T0 + i64::from(line.settled);
            let make = |event_id: &str, bad: bool| {
                let values = LineValues {
                    event_id,
                    payment_id: &payment_id,
                    refund_id: line.refund.then_some(refund_id.as_str()),
                    gross: if bad { 0 } else { gross },
                    fee: line.fee,
                    net,
                    currency,
                    at,
                    payout_id: Some(&payout_id),
                };
                let truth = if bad || refused {
                    Truth::Rejected {
                        by_database: if refused && bad { None } else { Some(refused) },
                    }
                } else {
                    Truth::Line(LineTruth {
                        event_id: event_id.to_owned(),
                        payout_id: payout_id.clone(),
                        currency,
                        net,
                    })
                };
                let kind = if line.refund { "refund" } else { "capture" };
                Item {
                    sentinel: false,
                    topic: Topic::Settlements,
                    pair,
                    key: payment_id.clone().into_bytes(),
                    value: line_value(&values),
                    truth,
                    label: format!(
                        "{kind} line {event_id} of {payout_id}: {currency} net {net}{}{}",
                        if bad { " (invalid: gross 0)" } else { "" },
                        if refused { " (refused by LATIN1)" } else { "" }
                    ),
                }
            };
            let event_id = format!("l{k}.{j}");
            let original = make(&event_id, line.bad);
            for &(delay, other_pair) in &line.redeliveries {
                let mut copy = original.clone();
                if other_pair {
                    copy.pair = (pair + 1) % pairs;
                }
                copy.label.push_str(" (redelivered)");
                push(line.late, u32::from(line.slot) + u32::from(delay), copy);
            }
            push(line.late, u32::from(line.slot), original);
            if !line.bad && !refused {
                accepted.push((currency, net));
            }
            if let Some(slot) = line.duplicate {
                let mut duplicate = make(&format!("{event_id}d"), false);
                duplicate.label.push_str(" (a second line of the payment)");
                push(line.late, u32::from(slot), duplicate);
                if !refused {
                    accepted.push((currency, net));
                }
            }
            if let Some(slot) = line.payment {
                let amount = line.gross;
                push(
                    line.late,
                    u32::from(slot),
                    Item {
                        sentinel: false,
                        topic: Topic::Payments,
                        pair,
                        key: payment_id.clone().into_bytes(),
                        value: payment_value(
                            &format!("e{k}.{j}"),
                            &payment_id,
                            amount,
                            currency,
                            at,
                        ),
                        truth: Truth::Plain,
                        label: format!("payment {payment_id}"),
                    },
                );
            }
        }
        let partition = i32::from(payout.partition) % pairs;
        let count = accepted.len() as i64;
        for (i, a) in payout.announcements.iter().enumerate() {
            let currency =
                CURRENCIES[(payout.currency + usize::from(a.other_currency)) % CURRENCIES.len()];
            let right: i128 = accepted
                .iter()
                .filter(|(c, _)| *c == currency)
                .map(|(_, net)| i128::from(*net))
                .sum();
            let clamp =
                |n: i128| i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX });
            let net = match a.net {
                Expect::Right => clamp(right),
                Expect::Off(d) => clamp(right + i128::from(d)),
            };
            let line_count = a.line_count.as_ref().map(|e| match e {
                Expect::Right => count,
                Expect::Off(d) => match (count + d).max(0) {
                    same if same == count => count + 1,
                    other => other,
                },
            });
            let event_id = format!("a{k}.{i}");
            let mut value = serde_json::json!({
                "event_id": event_id, "type": "payout_announced", "payout_id": payout_id,
                "currency": currency, "net_minor": net,
                "paid_at": timestamp(T0 + i64::from(a.paid)),
            });
            if let Some(n) = line_count {
                value["line_count"] = n.into();
            }
            let item = Item {
                sentinel: false,
                topic: Topic::Payouts,
                pair: partition,
                key: payout_id.clone().into_bytes(),
                value: value.to_string().into_bytes(),
                truth: if refused {
                    Truth::Rejected {
                        by_database: Some(true),
                    }
                } else {
                    Truth::Announcement(AnnouncementTruth {
                        event_id: event_id.clone(),
                        payout_id: payout_id.clone(),
                        currency,
                        net,
                        line_count,
                        paid_at: T0 + i64::from(a.paid),
                    })
                },
                label: format!(
                    "announcement {event_id} of {payout_id}: {currency} net {net}, {} lines{}",
                    line_count.map_or("?".to_owned(), |n| n.to_string()),
                    if refused { " (refused by LATIN1)" } else { "" }
                ),
            };
            let slot = u32::from(a.slot);
            let (is_late, slot) = match a.placement {
                Placement::Before => (false, slot % 100),
                Placement::Among => (false, 100 + slot % 800),
                Placement::After => (false, 2000 + slot % 100),
                Placement::Late => (true, slot),
            };
            for &delay in &a.redeliveries {
                let mut copy = item.clone();
                copy.label.push_str(" (redelivered)");
                push(is_late, slot + u32::from(delay), copy);
            }
            push(is_late, slot, item);
        }
        if let Some((bad, slot)) = &payout.bad {
            let event_id = format!("a{k}.bad");
            let mut value = serde_json::json!({
                "event_id": event_id, "type": "payout_announced", "payout_id": payout_id,
                "currency": CURRENCIES[payout.currency], "net_minor": 0, "line_count": 0,
                "paid_at": timestamp(T0),
            });
            let mut key = payout_id.clone().into_bytes();
            match bad {
                BadAnnouncement::KeyMismatch => key = b"another-payout".to_vec(),
                BadAnnouncement::NegativeLineCount => value["line_count"] = (-1i64).into(),
                BadAnnouncement::NoPaidAt => {
                    if let Some(fields) = value.as_object_mut() {
                        fields.remove("paid_at");
                    }
                }
                BadAnnouncement::NetAsText => value["net_minor"] = "0".into(),
            }
            push(
                false,
                u32::from(*slot),
                Item {
                    sentinel: false,
                    topic: Topic::Payouts,
                    pair: partition,
                    key,
                    value: value.to_string().into_bytes(),
                    truth: Truth::Rejected {
                        by_database: if refused { None } else { Some(false) },
                    },
                    label: format!("invalid announcement {event_id} of {payout_id} ({bad:?})"),
                },
            );
        }
    }
    for (i, &(pair, payment_slot, line_slot)) in spec.plain.iter().enumerate() {
        let pair = i32::from(pair) % pairs;
        let payment_id = format!("x{i}");
        let at = T0 + i64::from(line_slot);
        push(
            false,
            u32::from(payment_slot),
            Item {
                sentinel: false,
                topic: Topic::Payments,
                pair,
                key: payment_id.clone().into_bytes(),
                value: payment_value(&format!("xe{i}"), &payment_id, 100, "EUR", at),
                truth: Truth::Plain,
                label: format!("payment {payment_id}"),
            },
        );
        let values = LineValues {
            event_id: &format!("xl{i}"),
            payment_id: &payment_id,
            refund_id: None,
            gross: 100,
            fee: 1,
            net: 99,
            currency: "EUR",
            at,
            payout_id: None,
        };
        push(
            false,
            u32::from(line_slot),
            Item {
                sentinel: false,
                topic: Topic::Settlements,
                pair,
                key: payment_id.clone().into_bytes(),
                value: line_value(&values),
                truth: Truth::Plain,
                label: format!("line xl{i} in no payout"),
            },
        );
    }
    let mut sentinels = Vec::new();
    let sentinel_pairs = match spec.ending {
        Ending::Sentinels => 0..pairs,
        Ending::Idle { .. } => 0..0,
    };
    for pair in sentinel_pairs {
        let payment_id = format!("z{pair}");
        sentinels.push(Item {
            sentinel: true,
            topic: Topic::Payments,
            pair,
            key: payment_id.clone().into_bytes(),
            value: payment_value(&format!("ze{pair}"), &payment_id, 100, "EUR", SENTINEL_AT),
            truth: Truth::Plain,
            label: format!("sentinel payment {payment_id}"),
        });
        let values = LineValues {
            event_id: &format!("zl{pair}"),
            payment_id: &payment_id,
            refund_id: None,
            gross: 100,
            fee: 1,
            net: 99,
            currency: "EUR",
            at: SENTINEL_AT,
            payout_id: None,
        };
        sentinels.push(Item {
            sentinel: true,
            topic: Topic::Settlements,
            pair,
            key: payment_id.clone().into_bytes(),
            value: line_value(&values),
            truth: Truth::Plain,
            label: format!("sentinel line zl{pair}"),
        });
    }
    Built {
        main: in_slot_order(main),
        sentinels,
        late: in_slot_order(late),
    }
}

// ---------------------------------------------------------------------------------
// The oracle: contract §7 over the messages, in production order

/// What `recon_payouts` and the open payout discrepancy say of one payout once every
/// deadline has passed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PayoutView {
    currency: Option<String>,
    expected_net: Option<i64>,
    lines_net: Option<i128>,
    expected_count: Option<i64>,
    line_count: i64,
    /// Seconds since the epoch.
    paid_at: Option<i64>,
    status: String,
    /// The kind of its open discrepancy.
    open: Option<String>,
}

/// Each payout's final view, from the messages in the order they were produced (which
/// is each partition's order).
fn oracle<'a>(messages: impl IntoIterator<Item = &'a Truth>) -> BTreeMap<String, PayoutView> {
    // A redelivery repeats an event id, with the same content: the first one counts.
    let mut lines: BTreeMap<&str, &LineTruth> = BTreeMap::new();
    let mut seen_announcements: BTreeSet<&str> = BTreeSet::new();
    let mut first_announcement: BTreeMap<&str, &AnnouncementTruth> = BTreeMap::new();
    for truth in messages {
        match truth {
            Truth::Line(line) => {
                lines.entry(line.event_id.as_str()).or_insert(line);
            }
            Truth::Announcement(a) => {
                if seen_announcements.insert(a.event_id.as_str()) {
                    first_announcement.entry(a.payout_id.as_str()).or_insert(a);
                }
            }
            Truth::Rejected { .. } | Truth::Plain => {}
        }
    }
    let mut by_payout: BTreeMap<&str, Vec<&LineTruth>> = BTreeMap::new();
    for line in lines.values() {
        by_payout
            .entry(line.payout_id.as_str())
            .or_default()
            .push(line);
    }
    let payouts: BTreeSet<&str> = by_payout
        .keys()
        .chain(first_announcement.keys())
        .copied()
        .collect();
    let mut views = BTreeMap::new();
    for payout in payouts {
        let lines = by_payout.get(payout).map(Vec::as_slice).unwrap_or_default();
        let line_count = lines.len() as i64;
        let view = match first_announcement.get(payout) {
            Some(a) => {
                let in_currency: i128 = lines
                    .iter()
                    .filter(|l| l.currency == a.currency)
                    .map(|l| i128::from(l.net))
                    .sum();
                let other_currency = lines.iter().any(|l| l.currency != a.currency);
                let count_ok = a.line_count.is_none_or(|n| n == line_count);
                let status = if !other_currency && in_currency == i128::from(a.net) && count_ok {
                    "balanced"
                } else if other_currency {
                    "currency_mismatch"
                } else {
                    "total_mismatch"
                };
                PayoutView {
                    currency: Some(a.currency.to_owned()),
                    expected_net: Some(a.net),
                    lines_net: Some(in_currency),
                    expected_count: a.line_count,
                    line_count,
                    paid_at: Some(a.paid_at),
                    status: status.to_owned(),
                    open: (status != "balanced").then(|| "payout_mismatch".to_owned()),
                }
            }
            None => {
                let currencies: BTreeSet<&str> = lines.iter().map(|l| l.currency).collect();
                let single = currencies.len() == 1;
                PayoutView {
                    currency: currencies
                        .iter()
                        .next()
                        .filter(|_| single)
                        .map(|c| (*c).to_owned()),
                    expected_net: None,
                    lines_net: single.then(|| lines.iter().map(|l| i128::from(l.net)).sum()),
                    expected_count: None,
                    line_count,
                    paid_at: None,
                    status: "unannounced".to_owned(),
                    open: Some("unannounced_payout".to_owned()),
                }
            }
        };
        views.insert(payout.to_owned(), view);
    }
    views
}

// ---------------------------------------------------------------------------------
// The harness: real pipelines, a stand-in for each one's poll thread, a real PostgreSQL

struct Database {
    pool: PgPool,
    url: String,
    name: String,
    admin_options: PgConnectOptions,
}

/// Creates (or re-creates) one of this test's databases, used by every case of its
/// encoding (emptied between them).
async fn database(encoding: &str) -> Database {
    let name = format!(
        "recon_payouts_oracle_{}_{}",
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
    // Durability is not under test.
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
        .max_connections(16)
        .connect_with(options)
        .await
        .expect("connect");
    Store::with_pool(pool.clone(), "payments", "settlements")
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

fn fail(message: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(message.into())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where the stream stands, for what may exist after an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The global watermark cannot pass any deadline yet: not every sentinel is
    /// produced (or, in the idle ending, partitions are not all reported caught up,
    /// or announcements are held).
    Main,
    /// The main stream is in, not yet checked: the global watermark may pass the
    /// deadlines, and only once every message is committed, so any discrepancy that
    /// opens is a final one.
    Ending,
    /// The main stream checked; late messages.
    Late,
}

/// What the poll thread of a worker knows of one pair it reads.
#[derive(Default)]
struct Reading {
    next: PerTopic<i64>,
    /// Messages PostgreSQL refused, handed over as rejections when read again.
    refused: HashMap<(Topic, i64), String>,
}

struct Worker {
    deliveries: mpsc::Sender<Delivery>,
    commands: std::sync::mpsc::Receiver<Command>,
    task: tokio::task::JoinHandle<Result<(), PipelineError>>,
    reading: BTreeMap<i32, Reading>,
}

#[derive(Debug, Default)]
struct Tally {
    cases: u64,
    messages: u64,
    evaluations: u64,
    concurrent_evaluations: u64,
    moves: u64,
    steals: u64,
    crashes: u64,
    rewinds: u64,
    late_cases: u64,
    idle_endings: u64,
    /// Messages PostgreSQL refused (LATIN1).
    refused: u64,
    statuses: BTreeMap<String, u64>,
    resolved: u64,
}

/// Unique topic names per case: the rows of a case's pairs are its own, so a zombie
/// commit of an earlier case (an aborted pipeline's transaction still in flight) is
/// fenced by finding no row of its topics.
static CASE: AtomicU64 = AtomicU64::new(0);

struct Harness {
    pool: PgPool,
    store: Store,
    names: PerTopic<String>,
    configs: Vec<Config>,
    limits: Limits,
    rules: PayoutRules,
    pairs: i32,
    logs: HashMap<(Topic, i32), Vec<Item>>,
    workers: Vec<Worker>,
    owner: BTreeMap<i32, usize>,
    /// (worker, pair, steps left): pairs a worker still reads after they were stolen.
    zombies: Vec<(usize, i32, u8)>,
    /// Payouts partitions are not read (the idle ending's held announcements).
    hold_payouts: bool,
    rng: StdRng,
    phase: Phase,
    /// The oracle over the main stream and the sentinels.
    main_view: BTreeMap<String, PayoutView>,
    /// What was produced, for the report of a failing case.
    produced: Vec<String>,
    tally: Tally,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A failed case must not leave its pipelines writing into the next case's
        // tables (while shrinking, say).
        for worker in &self.workers {
            worker.task.abort();
        }
    }
}

impl Harness {
    fn spawn_worker(&self, w: usize) -> Worker {
        let (commands, receiver) = std::sync::mpsc::channel();
        let pipeline = Pipeline::new(
            &self.configs[w],
            self.store.clone(),
            Some(ConsumerHandle { commands }),
            Arc::new(Health::default()),
        );
        let (deliveries, channel) = mpsc::channel(64);
        Worker {
            deliveries,
            commands: receiver,
            task: tokio::spawn(pipeline.run(channel)),
            reading: BTreeMap::new(),
        }
    }

    fn log_len(&self, topic: Topic, pair: i32) -> i64 {
        self.logs
            .get(&(topic, pair))
            .map_or(0, |log| log.len() as i64)
    }

    fn produce(&mut self, item: Item) {
        let log = self.logs.entry((item.topic, item.pair)).or_default();
        self.produced.push(format!(
            "{:?} {}/{}@{}: {}",
            self.phase,
            item.topic,
            item.pair,
            log.len(),
            item.label
        ));
        log.push(item);
        self.tally.messages += 1;
    }

    /// What the poll thread hands over for one message.
    fn delivery(&self, topic: Topic, pair: i32, offset: i64, refused: Option<String>) -> Delivery {
        let item = &self.logs[&(topic, pair)][offset as usize];
        let at = MessageAt {
            topic,
            partition: pair,
            offset,
        };
        let timestamp_ms = Some(now_ms());
        let (key, value) = (Some(item.key.as_slice()), Some(item.value.as_slice()));
        match topic.input() {
            Some(input) => Delivery::from(ReadMessage {
                input,
                partition: pair,
                offset,
                timestamp_ms,
                decoded: decode_message(at, key, value, timestamp_ms, self.limits, refused),
                reset: None,
            }),
            None => Delivery::Data(Data::Announcement(ReadAnnouncement {
                partition: pair,
                offset,
                timestamp_ms,
                decoded: decode_announcement_message(
                    at,
                    key,
                    value,
                    timestamp_ms,
                    self.limits,
                    refused,
                ),
                reset: None,
            })),
        }
    }

    async fn send(&mut self, w: usize, delivery: Delivery) -> Result<(), TestCaseError> {
        let worker = &mut self.workers[w];
        if worker.task.is_finished() {
            let result = (&mut worker.task).await;
            return Err(fail(format!("worker {w}'s pipeline stopped: {result:?}")));
        }
        tokio::select! {
            sent = tokio::time::timeout(SETTLE_TIMEOUT, worker.deliveries.send(delivery)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(fail(format!("worker {w}'s pipeline is gone"))),
                Err(_) => Err(fail(format!("worker {w}'s pipeline takes no delivery (stalled)"))),
            },
            joined = &mut worker.task => Err(fail(format!("worker {w}'s pipeline stopped: {joined:?}"))),
        }
    }

    async fn answer<T>(
        &mut self,
        w: usize,
        answer: oneshot::Receiver<T>,
    ) -> Result<T, TestCaseError> {
        let worker = &mut self.workers[w];
        tokio::select! {
            answered = tokio::time::timeout(SETTLE_TIMEOUT, answer) => match answered {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(_)) => Err(fail(format!("worker {w}'s pipeline dropped a control unanswered"))),
                Err(_) => Err(fail(format!("worker {w}'s pipeline answers no control (stalled)"))),
            },
            joined = &mut worker.task => Err(fail(format!("worker {w}'s pipeline stopped: {joined:?}"))),
        }
    }

    /// Serves the worker's rewinds as its poll thread would: the marker, then the
    /// pair read again from the requested offsets. A pair no longer read is skipped.
    async fn serve_rewinds(&mut self, w: usize) -> Result<u64, TestCaseError> {
        let rewinds: Vec<_> = self.workers[w]
            .commands
            .try_iter()
            .filter_map(|command| match command {
                Command::Rewind(rewind) => Some(rewind),
                // Advisory: they need a broker.
                Command::Commit(_) => None,
            })
            .collect();
        let mut served = 0;
        for rewind in rewinds {
            let Some(reading) = self.workers[w].reading.get_mut(&rewind.pair) else {
                continue;
            };
            reading.next = PerTopic::from_fn(|topic| rewind.next_offsets[topic].unwrap_or(0));
            reading.refused = rewind
                .refused
                .iter()
                .map(|r| ((r.topic, r.offset), r.reason.clone()))
                .collect();
            self.send(w, Delivery::Data(Data::Rewound { pair: rewind.pair }))
                .await?;
            served += 1;
        }
        self.tally.rewinds += served;
        Ok(served)
    }

    /// Hands the worker everything it has not read of its pairs, partitions in a
    /// random interleaving, serving rewinds as they come. Returns how many rewinds
    /// and messages it handed over.
    async fn pump(&mut self, w: usize) -> Result<u64, TestCaseError> {
        let mut handed = 0;
        loop {
            handed += self.serve_rewinds(w).await?;
            let mut unread: Vec<(i32, Topic)> = Vec::new();
            for (&pair, reading) in &self.workers[w].reading {
                // The payouts partition feeds no watermark (design 2.3): read behind a
                // sentinel, its announcements would come after the global watermark
                // passed their deadlines, and a discrepancy would open and resolve
                // itself, the documented cost of a payouts backlog. These streams have
                // no such backlog: a sentinel waits for its pair's announcements.
                let payouts_read =
                    reading.next[Topic::Payouts] >= self.log_len(Topic::Payouts, pair);
                for topic in Topic::ALL {
                    let next = reading.next[topic];
                    if next >= self.log_len(topic, pair)
                        || (topic == Topic::Payouts && self.hold_payouts)
                    {
                        continue;
                    }
                    if self.logs[&(topic, pair)][next as usize].sentinel && !payouts_read {
                        continue;
                    }
                    unread.push((pair, topic));
                }
            }
            if unread.is_empty() {
                return Ok(handed);
            }
            let (pair, topic) = unread[self.rng.random_range(0..unread.len())];
            let Some(reading) = self.workers[w].reading.get_mut(&pair) else {
                continue;
            };
            let offset = reading.next[topic];
            reading.next[topic] += 1;
            let refused = reading.refused.remove(&(topic, offset));
            let delivery = self.delivery(topic, pair, offset, refused);
            self.send(w, delivery).await?;
            handed += 1;
        }
    }

    async fn pump_all(&mut self) -> Result<u64, TestCaseError> {
        let mut handed = 0;
        for w in 0..self.workers.len() {
            handed += self.pump(w).await?;
        }
        Ok(handed)
    }

    async fn assign(&mut self, w: usize, pairs: Vec<i32>) -> Result<(), TestCaseError> {
        if pairs.is_empty() {
            return Ok(());
        }
        self.zombies
            .retain(|&(z, pair, _)| !(z == w && pairs.contains(&pair)));
        let (reply, answer) = oneshot::channel();
        self.send(w, Control::Assign { pairs, reply }.into())
            .await?;
        let positions = self
            .answer(w, answer)
            .await?
            .map_err(|e| fail(format!("worker {w}: assignment failed: {e}")))?;
        for position in positions {
            let next = PerTopic::from_fn(|topic| position.next_offsets[topic].unwrap_or(0));
            self.workers[w].reading.insert(
                position.pair,
                Reading {
                    next,
                    refused: HashMap::new(),
                },
            );
            self.owner.insert(position.pair, w);
        }
        Ok(())
    }

    async fn revoke(&mut self, w: usize, pairs: Vec<i32>) -> Result<(), TestCaseError> {
        let (done, answer) = oneshot::channel();
        self.send(
            w,
            Control::Revoke {
                pairs: pairs.clone(),
                done,
            }
            .into(),
        )
        .await?;
        self.answer(w, answer).await?;
        for pair in pairs {
            self.workers[w].reading.remove(&pair);
        }
        Ok(())
    }

    /// Revokes stolen pairs from their zombies once their time is up (all of them
    /// when `all`).
    async fn end_zombies(&mut self, all: bool) -> Result<(), TestCaseError> {
        let mut ending = Vec::new();
        self.zombies.retain_mut(|(w, pair, left)| {
            if all || *left == 0 {
                ending.push((*w, *pair));
                false
            } else {
                *left -= 1;
                true
            }
        });
        for (w, pair) in ending {
            self.revoke(w, vec![pair]).await?;
        }
        Ok(())
    }

    async fn move_pair(&mut self, pair: i32, to: usize) -> Result<(), TestCaseError> {
        let from = self.owner[&pair];
        if from == to {
            return Ok(());
        }
        self.revoke(from, vec![pair]).await?;
        self.assign(to, vec![pair]).await?;
        self.tally.moves += 1;
        Ok(())
    }

    async fn steal(&mut self, pair: i32, to: usize) -> Result<(), TestCaseError> {
        let from = self.owner[&pair];
        if from == to {
            return Ok(());
        }
        self.assign(to, vec![pair]).await?;
        self.zombies.push((from, pair, 1));
        self.tally.steals += 1;
        Ok(())
    }

    /// Aborts the worker's pipeline where it is (its commit in flight, if any, goes on
    /// as a zombie's would), gives its pairs to the next worker and starts it again
    /// with none.
    async fn crash(&mut self, w: usize) -> Result<(), TestCaseError> {
        self.workers[w].task.abort();
        match (&mut self.workers[w].task).await {
            Err(error) if error.is_cancelled() => {}
            other => return Err(fail(format!("worker {w}'s pipeline had ended: {other:?}"))),
        }
        self.workers[w] = self.spawn_worker(w);
        self.zombies.retain(|&(z, _, _)| z != w);
        let orphaned: Vec<i32> = self
            .owner
            .iter()
            .filter(|&(_, &o)| o == w)
            .map(|(&pair, _)| pair)
            .collect();
        let to = (w + 1) % self.workers.len();
        self.assign(to, orphaned).await?;
        self.tally.crashes += 1;
        Ok(())
    }

    /// One evaluation, or two at once; then what may exist at this point.
    async fn evaluate(&mut self, twice: bool) -> Result<(), TestCaseError> {
        let results = if twice {
            let (a, b) = tokio::join!(
                self.store.evaluate_payouts(&self.rules),
                self.store.evaluate_payouts(&self.rules)
            );
            self.tally.concurrent_evaluations += 1;
            vec![a, b]
        } else {
            vec![self.store.evaluate_payouts(&self.rules).await]
        };
        for result in results {
            result.map_err(|e| fail(format!("evaluation failed: {e}")))?;
            self.tally.evaluations += 1;
        }
        self.check_discrepancies().await
    }

    /// After any evaluation: at most one open discrepancy per payout; none at all
    /// before the last sentinel; after it, only the final ones, open.
    async fn check_discrepancies(&self) -> Result<(), TestCaseError> {
        let rows = discrepancies(&self.pool).await?;
        let mut open: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for row in &rows {
            if row.open {
                open.entry(row.payout_id.as_str())
                    .or_default()
                    .push(row.kind.as_str());
            }
        }
        if let Some((payout, kinds)) = open.iter().find(|(_, kinds)| kinds.len() > 1) {
            return Err(fail(format!(
                "{payout} has {} open discrepancies: {kinds:?}",
                kinds.len()
            )));
        }
        match self.phase {
            Phase::Main if !rows.is_empty() => Err(fail(format!(
                "payout discrepancies before any deadline could pass: {rows:?}"
            ))),
            Phase::Ending => {
                for row in &rows {
                    let wanted = self
                        .main_view
                        .get(&row.payout_id)
                        .and_then(|v| v.open.as_deref());
                    if !row.open || wanted != Some(row.kind.as_str()) {
                        return Err(fail(format!(
                            "{row:?} after the sentinels; the oracle's open one: {wanted:?}"
                        )));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Every pair's stored offsets, per topic.
    async fn stored_offsets(&self) -> Result<BTreeMap<i32, [Option<i64>; 3]>, TestCaseError> {
        let rows = sqlx::query(
            "SELECT kafka_partition, payments_next_offset, settlements_next_offset, payouts_next_offset
             FROM recon_partition_pairs WHERE payments_topic = $1 AND settlements_topic = $2",
        )
        .bind(&self.names.payments)
        .bind(&self.names.settlements)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| fail(format!("reading stored offsets: {e}")))?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), [row.get(1), row.get(2), row.get(3)]))
            .collect())
    }

    /// Lets every worker read everything produced until every offset is stored.
    async fn drain(&mut self) -> Result<(), TestCaseError> {
        self.end_zombies(true).await?;
        let expected: BTreeMap<i32, [Option<i64>; 3]> = (0..self.pairs)
            .map(|pair| {
                let next = |topic| {
                    let held = topic == Topic::Payouts && self.hold_payouts;
                    Some(self.log_len(topic, pair)).filter(|&n| n > 0 && !held)
                };
                (
                    pair,
                    [
                        next(Topic::Payments),
                        next(Topic::Settlements),
                        next(Topic::Payouts),
                    ],
                )
            })
            .collect();
        let started = Instant::now();
        loop {
            // Evaluations racing the last commits: none may open a discrepancy on a
            // payout whose lines are not all in.
            if self.phase != Phase::Main {
                self.evaluate(false).await?;
            }
            let handed = self.pump_all().await?;
            let stored = self.stored_offsets().await?;
            // A rewind asked for after the offsets were read is served next turn.
            if stored == expected && handed == 0 && self.pump_all().await? == 0 {
                return Ok(());
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                return Err(fail(format!(
                    "stalled: stored offsets {stored:?}, expected {expected:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Tells every worker which of its partitions are caught up, as the poll thread
    /// does every 250 ms.
    async fn report_progress(&mut self) -> Result<(), TestCaseError> {
        for w in 0..self.workers.len() {
            let mut progress = Vec::new();
            for (&pair, reading) in &self.workers[w].reading {
                for topic in Topic::ALL {
                    let end = self.log_len(topic, pair);
                    progress.push(PartitionProgress {
                        topic,
                        partition: pair,
                        caught_up: reading.next[topic] >= end,
                        high_watermark: end,
                    });
                }
            }
            if !progress.is_empty() {
                self.send(w, Delivery::Data(Data::Progress(progress)))
                    .await?;
            }
        }
        Ok(())
    }

    /// The global watermark the evaluator last stored, in seconds.
    async fn global_watermark(&self) -> Result<Option<i64>, TestCaseError> {
        let g: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT extract(epoch FROM global_watermark)::bigint FROM recon_payout_clock",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| fail(format!("reading the global watermark: {e}")))?;
        Ok(g.flatten())
    }

    /// The idle ending: everything produced is read (but held announcements), then
    /// every partition is reported caught up until the inputs are idle and their
    /// watermarks stored. While announcements are held nothing may fall due: their
    /// pairs are not idle. Then they are read, and the global watermark follows the
    /// clock past every deadline.
    async fn idle_ending(&mut self) -> Result<(), TestCaseError> {
        self.tally.idle_endings += 1;
        self.drain().await?;
        let held =
            self.hold_payouts && (0..self.pairs).any(|pair| self.log_len(Topic::Payouts, pair) > 0);
        if !held {
            // Everything is in: the watermarks may pass every deadline from now on.
            self.phase = Phase::Ending;
        }
        // The idle timeout, then a watermark checkpoint (at most every second).
        let until = Instant::now() + Duration::from_millis(1_600);
        while Instant::now() < until {
            self.report_progress().await?;
            self.evaluate(false).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if held {
            if let Some(g) = self.global_watermark().await?.filter(|&g| g > T0 + 86_400) {
                return Err(fail(format!(
                    "the global watermark passed {} while announcements were unread",
                    timestamp(g)
                )));
            }
        }
        self.hold_payouts = false;
        self.phase = Phase::Ending;
        self.drain().await?;
        let started = Instant::now();
        loop {
            self.report_progress().await?;
            self.evaluate(false).await?;
            if self
                .global_watermark()
                .await?
                .is_some_and(|g| g > SENTINEL_AT)
            {
                return Ok(());
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                return Err(fail("idle pairs' watermarks never passed the deadlines"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates until a run has nothing left over, then checks that one more run
    /// changes nothing.
    async fn evaluate_to_the_end(&mut self) -> Result<(), TestCaseError> {
        let mut runs = 0;
        loop {
            runs += 1;
            if runs > 200 {
                return Err(fail("the evaluator always has more to do"));
            }
            match self.store.evaluate_payouts(&self.rules).await {
                Ok(Some(evaluation)) => {
                    self.tally.evaluations += 1;
                    self.check_discrepancies().await?;
                    if !evaluation.more {
                        break;
                    }
                }
                Ok(None) => continue,
                Err(e) => return Err(fail(format!("evaluation failed: {e}"))),
            }
        }
        let again = self
            .store
            .evaluate_payouts(&self.rules)
            .await
            .map_err(|e| fail(format!("evaluation failed: {e}")))?
            .ok_or_else(|| fail("the evaluator's lock is taken with nobody evaluating"))?;
        if again.changed + again.opened + again.reopened + again.resolved > 0 || again.more {
            return Err(fail(format!(
                "an evaluation with nothing new changed something: {again:?}"
            )));
        }
        Ok(())
    }

    /// `recon_payouts` and the open discrepancies equal the oracle's view.
    async fn compare(
        &self,
        oracle: &BTreeMap<String, PayoutView>,
        when: &str,
    ) -> Result<(), TestCaseError> {
        let actual = payout_views(&self.pool).await?;
        if &actual == oracle {
            return Ok(());
        }
        let mut differences = Vec::new();
        let ids: BTreeSet<&String> = actual.keys().chain(oracle.keys()).collect();
        for id in ids {
            match (actual.get(id), oracle.get(id)) {
                (a, o) if a == o => {}
                (a, o) => differences.push(format!("  {id}:\n    stored {a:?}\n    oracle {o:?}")),
            }
        }
        Err(fail(format!(
            "{when}, payouts differ from the oracle:\n{}",
            differences.join("\n")
        )))
    }
}

#[derive(Debug)]
struct DiscrepancyRow {
    payout_id: String,
    kind: String,
    open: bool,
    resolution: Option<String>,
}

async fn discrepancies(pool: &PgPool) -> Result<Vec<DiscrepancyRow>, TestCaseError> {
    let rows = sqlx::query(
        "SELECT payout_id, kind, resolved_at IS NULL, resolution FROM recon_discrepancies
         WHERE payout_id IS NOT NULL ORDER BY payout_id, kind",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| fail(format!("reading discrepancies: {e}")))?;
    Ok(rows
        .iter()
        .map(|row| DiscrepancyRow {
            payout_id: row.get(0),
            kind: row.get(1),
            open: row.get(2),
            resolution: row.get(3),
        })
        .collect())
}

async fn payout_views(pool: &PgPool) -> Result<BTreeMap<String, PayoutView>, TestCaseError> {
    let open: BTreeMap<String, String> = discrepancies(pool)
        .await?
        .into_iter()
        .filter(|row| row.open)
        .map(|row| (row.payout_id, row.kind))
        .collect();
    let rows = sqlx::query(
        "SELECT payout_id, currency, expected_net_minor, lines_net_minor::text, expected_line_count,
                line_count, status, extract(epoch FROM paid_at)::bigint
         FROM recon_payouts",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| fail(format!("reading recon_payouts: {e}")))?;
    let mut views = BTreeMap::new();
    for row in rows {
        let payout_id: String = row.get(0);
        let lines_net: Option<String> = row.get(3);
        let lines_net = match lines_net {
            None => None,
            Some(text) => Some(
                text.parse::<i128>()
                    .map_err(|e| fail(format!("lines_net_minor {text:?}: {e}")))?,
            ),
        };
        views.insert(
            payout_id.clone(),
            PayoutView {
                currency: row.get(1),
                expected_net: row.get(2),
                lines_net,
                expected_count: row.get(4),
                line_count: row.get(5),
                status: row.get(6),
                paid_at: row.get(7),
                open: open.get(&payout_id).cloned(),
            },
        );
    }
    Ok(views)
}

fn config(db: &Database, names: &PerTopic<String>, batch_max: usize) -> Config {
    let vars = [
        ("DATABASE_URL", db.url.clone()),
        ("RECON_PAYMENTS_TOPIC", names.payments.clone()),
        ("RECON_SETTLEMENTS_TOPIC", names.settlements.clone()),
        ("RECON_PAYOUTS_TOPIC", names.payouts.clone()),
        ("RECON_PAYOUT_GRACE", "24h".into()),
        ("RECON_SETTLEMENT_DEADLINE", "72h".into()),
        ("RECON_ORPHAN_TIMEOUT", "72h".into()),
        // Only the idle ending reports partitions caught up.
        ("RECON_IDLE_TIMEOUT", "200ms".into()),
        ("RECON_BATCH_MAX_MESSAGES", batch_max.to_string()),
        ("RECON_BATCH_MAX_WAIT", "5ms".into()),
    ];
    Config::from_vars(vars.map(|(k, v)| (k.to_owned(), v))).expect("valid configuration")
}

async fn run_case(db: &Database, spec: &Spec) -> Result<Tally, TestCaseError> {
    let result = run(db, spec).await;
    result.map_err(|(error, produced)| {
        fail(format!(
            "{error}\nproduced, in order ({{phase}} {{topic}}/{{partition}}@{{offset}}):\n  {}",
            produced.join("\n  ")
        ))
    })
}

async fn run(db: &Database, spec: &Spec) -> Result<Tally, (TestCaseError, Vec<String>)> {
    let built = build(spec);
    // Emptied first: ACCESS EXCLUSIVE waits for any transaction of an earlier case's
    // aborted pipeline still in flight.
    sqlx::raw_sql(
        "TRUNCATE recon_events, rejected_events, recon_discrepancies, recon_partition_pairs,
                  recon_payout_announcements, recon_payout_parts, recon_payout_cursor,
                  recon_payout_clock, recon_payout_state, recon_payout_status_counts",
    )
    .execute(&db.pool)
    .await
    .map_err(|e| (fail(format!("emptying the database: {e}")), Vec::new()))?;
    let n = CASE.fetch_add(1, Ordering::Relaxed);
    let names = PerTopic {
        payments: format!("payments-{n}"),
        settlements: format!("settlements-{n}"),
        payouts: format!("payouts-{n}"),
    };
    let configs: Vec<Config> = (0..spec.workers)
        .map(|w| config(db, &names, spec.batch_max[w]))
        .collect();
    let store = Store::with_pool(db.pool.clone(), &names.payments, &names.settlements)
        .with_payouts_topic(Some(&names.payouts));
    let main_view = oracle(built.main.iter().chain(&built.sentinels).map(|i| &i.truth));
    let mut harness = Harness {
        pool: db.pool.clone(),
        store,
        limits: configs[0].decode_limits(),
        names,
        configs,
        rules: PayoutRules {
            partitions: spec.pairs,
            grace: GRACE,
            orphan_timeout: ORPHAN_TIMEOUT,
            max_touched: spec.max_touched,
        },
        pairs: spec.pairs,
        logs: HashMap::new(),
        workers: Vec::new(),
        owner: BTreeMap::new(),
        zombies: Vec::new(),
        hold_payouts: matches!(
            spec.ending,
            Ending::Idle {
                hold_announcements: true
            }
        ),
        rng: StdRng::seed_from_u64(spec.seed),
        phase: Phase::Main,
        main_view,
        produced: Vec::new(),
        tally: Tally::default(),
    };
    match drive(&mut harness, spec, built).await {
        Ok(()) => Ok(std::mem::take(&mut harness.tally)),
        Err(error) => Err((error, std::mem::take(&mut harness.produced))),
    }
}

/// What the queue of messages to produce holds.
enum Next {
    Message(Item),
    /// The main stream and its sentinels are produced: with sentinels, the global
    /// watermark may pass the deadlines from here on.
    StreamIn,
    /// Let everything be committed (and, in the idle ending, the pairs go idle),
    /// evaluate, and compare with the oracle over the main stream.
    CheckMain,
}

async fn drive(h: &mut Harness, spec: &Spec, built: Built) -> Result<(), TestCaseError> {
    let final_view = oracle(
        built
            .main
            .iter()
            .chain(&built.sentinels)
            .chain(&built.late)
            .map(|i| &i.truth),
    );
    let has_late = !built.late.is_empty();
    let mut queue: VecDeque<Next> = built
        .main
        .into_iter()
        .chain(built.sentinels)
        .map(Next::Message)
        .collect();
    queue.push_back(Next::StreamIn);
    queue.push_back(Next::CheckMain);
    queue.extend(built.late.into_iter().map(Next::Message));

    for w in 0..spec.workers {
        let worker = h.spawn_worker(w);
        h.workers.push(worker);
    }
    for w in 0..spec.workers {
        let pairs: Vec<i32> = (0..spec.pairs)
            .filter(|p| *p as usize % spec.workers == w)
            .collect();
        h.assign(w, pairs).await?;
    }

    let mut steps = spec.steps.iter();
    loop {
        let step = steps.next();
        h.end_zombies(false).await?;
        let count = match step {
            Some(Step::Produce(n)) => usize::from(*n),
            None => usize::MAX,
            Some(Step::Move { pair, to }) => {
                h.move_pair(i32::from(*pair) % h.pairs, usize::from(*to) % spec.workers)
                    .await?;
                0
            }
            Some(Step::Steal { pair, to }) => {
                h.steal(i32::from(*pair) % h.pairs, usize::from(*to) % spec.workers)
                    .await?;
                0
            }
            Some(Step::Crash { worker }) => {
                h.crash(usize::from(*worker) % spec.workers).await?;
                0
            }
            Some(Step::Evaluate { twice }) => {
                h.evaluate(*twice).await?;
                0
            }
        };
        let mut produced = 0;
        // Markers are taken as soon as they are next: the phase changes with the
        // last sentinel, not at the next step (an evaluation then would find what
        // the sentinels let open).
        while produced < count || matches!(queue.front(), Some(Next::StreamIn | Next::CheckMain)) {
            let Some(next) = queue.pop_front() else { break };
            match next {
                Next::Message(item) => {
                    h.produce(item);
                    produced += 1;
                }
                Next::StreamIn => {
                    if matches!(spec.ending, Ending::Sentinels) {
                        h.phase = Phase::Ending;
                    }
                }
                Next::CheckMain => {
                    match spec.ending {
                        Ending::Sentinels => h.drain().await?,
                        Ending::Idle { .. } => h.idle_ending().await?,
                    }
                    h.evaluate_to_the_end().await?;
                    let view = h.main_view.clone();
                    h.compare(
                        &view,
                        "once the main stream was in and every deadline passed",
                    )
                    .await?;
                    let rows = discrepancies(&h.pool).await?;
                    if let Some(row) = rows.iter().find(|row| !row.open) {
                        return Err(fail(format!(
                            "a payout discrepancy was resolved, so one opened before its time: {row:?}"
                        )));
                    }
                    h.phase = Phase::Late;
                }
            }
        }
        h.pump_all().await?;
        if step.is_none() {
            break;
        }
    }
    if has_late {
        h.drain().await?;
        h.evaluate_to_the_end().await?;
        h.compare(&final_view, "after the late messages").await?;
        h.tally.late_cases += 1;
    }
    // Resolutions agree with how each payout ends.
    for row in discrepancies(&h.pool).await? {
        if row.open {
            continue;
        }
        h.tally.resolved += 1;
        let view = &final_view[&row.payout_id];
        let consistent = match row.kind.as_str() {
            "payout_mismatch" => {
                row.resolution.as_deref() == Some("balanced") && view.status == "balanced"
            }
            "unannounced_payout" => {
                row.resolution.as_deref() == Some("announced") && view.status != "unannounced"
            }
            _ => false,
        };
        if !consistent {
            return Err(fail(format!("{row:?}, but the payout ends {view:?}")));
        }
    }
    check_announcements(h).await?;
    h.tally.refused += check_rejected(h).await?;
    check_status_counts(&h.pool).await?;
    for view in final_view.values() {
        *h.tally.statuses.entry(view.status.clone()).or_default() += 1;
    }
    // A clean stop of every worker: no pipeline failed.
    for w in 0..h.workers.len() {
        let (done, mut answer) = oneshot::channel();
        h.send(w, Control::Stop { done }.into()).await?;
        match tokio::time::timeout(SETTLE_TIMEOUT, &mut h.workers[w].task).await {
            Ok(Ok(Ok(()))) if answer.try_recv().is_ok() => {}
            other => return Err(fail(format!("worker {w} did not stop cleanly: {other:?}"))),
        }
    }
    h.tally.cases += 1;
    Ok(())
}

/// Every accepted announcement stored once, at the offset it was first read at.
async fn check_announcements(h: &Harness) -> Result<(), TestCaseError> {
    let mut expected: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    for pair in 0..h.pairs {
        for (offset, item) in h
            .logs
            .get(&(Topic::Payouts, pair))
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Truth::Announcement(a) = &item.truth {
                expected
                    .entry(a.event_id.clone())
                    .or_insert((pair, offset as i64));
            }
        }
    }
    let rows = sqlx::query(
        "SELECT event_id, kafka_partition, kafka_offset FROM recon_payout_announcements",
    )
    .fetch_all(&h.pool)
    .await
    .map_err(|e| fail(format!("reading announcements: {e}")))?;
    let stored: BTreeMap<String, (i32, i64)> = rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    if rows.len() != stored.len() || stored != expected {
        return Err(fail(format!(
            "announcements stored {stored:?} ({} rows), expected {expected:?}",
            rows.len()
        )));
    }
    Ok(())
}

/// One `rejected_events` row per message that must be rejected, and no other, with a
/// data error's class for those PostgreSQL refused. Returns how many it refused.
async fn check_rejected(h: &Harness) -> Result<u64, TestCaseError> {
    let mut expected: Vec<(String, i32, i64, Option<bool>)> = Vec::new();
    for (&(topic, pair), log) in &h.logs {
        for (offset, item) in log.iter().enumerate() {
            if let Truth::Rejected { by_database } = item.truth {
                expected.push((h.names[topic].clone(), pair, offset as i64, by_database));
            }
        }
    }
    expected.sort();
    let rows = sqlx::query(
        "SELECT topic, kafka_partition, kafka_offset, reason_class = $1 FROM rejected_events
         ORDER BY 1, 2, 3",
    )
    .bind(DATA_ERROR_CLASS)
    .fetch_all(&h.pool)
    .await
    .map_err(|e| fail(format!("reading rejections: {e}")))?;
    let stored: Vec<(String, i32, i64, bool)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let agree = stored.len() == expected.len()
        && stored.iter().zip(&expected).all(|(s, e)| {
            (&s.0, s.1, s.2) == (&e.0, e.1, e.2) && e.3.is_none_or(|by_database| by_database == s.3)
        });
    if !agree {
        return Err(fail(format!(
            "rejected (topic, partition, offset, a data error) {stored:?}, expected {expected:?}"
        )));
    }
    Ok(stored
        .iter()
        .filter(|(.., by_database)| *by_database)
        .count() as u64)
}

/// The per-status counts behind the gauge equal the states.
async fn check_status_counts(pool: &PgPool) -> Result<(), TestCaseError> {
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, payouts FROM recon_payout_status_counts WHERE payouts <> 0 ORDER BY status",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| fail(format!("reading status counts: {e}")))?;
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM recon_payout_state GROUP BY status ORDER BY status",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| fail(format!("reading states: {e}")))?;
    if counted != states {
        return Err(fail(format!(
            "status counts {counted:?}, states {states:?}"
        )));
    }
    Ok(())
}

fn env_number(name: &str) -> Option<u32> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: a number"))
    })
}

#[test]
fn payouts_end_as_the_oracle_says_whatever_the_workers_batches_and_crashes() {
    let cases = env_number("RECON_PAYOUT_ORACLE_CASES").unwrap_or(56);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (utf8, latin1) =
        runtime.block_on(async { (database("UTF8").await, database("LATIN1").await) });
    let tally = std::cell::RefCell::new(Tally::default());
    let started = Instant::now();
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        // Shrinking costs a whole run of pipelines per step: bounded.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    });
    let result = runner.run(&spec(), |spec| {
        let db = if spec.latin1 { &latin1 } else { &utf8 };
        let one = runtime.block_on(run_case(db, &spec))?;
        let mut tally = tally.borrow_mut();
        tally.cases += one.cases;
        tally.messages += one.messages;
        tally.evaluations += one.evaluations;
        tally.concurrent_evaluations += one.concurrent_evaluations;
        tally.moves += one.moves;
        tally.steals += one.steals;
        tally.crashes += one.crashes;
        tally.rewinds += one.rewinds;
        tally.late_cases += one.late_cases;
        tally.idle_endings += one.idle_endings;
        tally.refused += one.refused;
        tally.resolved += one.resolved;
        for (status, n) in one.statuses {
            *tally.statuses.entry(status).or_default() += n;
        }
        Ok(())
    });
    eprintln!(
        "payouts_oracle: {:?} in {:.0?}",
        tally.borrow(),
        started.elapsed()
    );
    runtime.block_on(async {
        utf8.drop_database().await;
        latin1.drop_database().await;
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, spec)) => panic!("{reason}\nminimal failing case: {spec:#?}"),
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
}
