//! Payout scenarios (contract §7) against the contract itself: every record decodes as
//! the worker decodes it (lines) or carries the fields §7 lists (announcements), and
//! the truth the generator wrote is what §7, read as design section 9 reads it, makes
//! of the produced records. The expected statuses are recomputed here from the records
//! alone, sharing no code with the generator.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use recon_worker::event::{parse_timestamp, Event, Line, Micros, Topic};
use recon_worker::money::Currency;

use super::tests::{decoded, digest, plan};
use super::*;

/// A payout as §7 sees it in a produced stream.
#[derive(Debug, Default)]
struct Seen {
    /// Accepted lines (first of each event id): (currency, net_minor, settled_at).
    lines: Vec<(String, i64, Micros)>,
    /// Its announcements, each once, in produced order (one key, one partition: the
    /// order the worker reads them in).
    announcements: Vec<Value>,
    /// Positions in the produced stream of its first and last line and of each
    /// announcement.
    first_line_at: Option<usize>,
    last_line_at: Option<usize>,
    announced_at: Vec<usize>,
    /// The payments of its lines.
    payments: BTreeSet<String>,
}

/// Every payout of a stream, from its records alone: lines decoded as the worker
/// decodes them (a redelivery, the same event id again, is dropped as the worker
/// drops it), announcements read as §7 lists their fields.
fn seen(plan: &Plan, records: &[Record]) -> BTreeMap<String, Seen> {
    let mut payouts: BTreeMap<String, Seen> = BTreeMap::new();
    let mut lines_seen = BTreeSet::new();
    let mut announcements_seen = BTreeSet::new();
    for (at, record) in records.iter().enumerate() {
        if record.topic == Topic::Payouts {
            let value: Value =
                serde_json::from_slice(record.value.as_deref().expect("a value")).expect("json");
            let payout_id = checked_announcement(plan, record, &value);
            let event_id = value["event_id"].as_str().expect("event_id").to_owned();
            if announcements_seen.insert(event_id) {
                let payout = payouts.entry(payout_id).or_default();
                payout.announcements.push(value);
                payout.announced_at.push(at);
            }
            continue;
        }
        let Ok(Event::Settlement(line)) = decoded(plan, record) else {
            continue;
        };
        let Some(payout_id) = line.payout_id.clone() else {
            continue;
        };
        if !lines_seen.insert(line.event_id.clone()) {
            continue;
        }
        let payout = payouts.entry(payout_id).or_default();
        payout
            .lines
            .push((line.currency.code().to_owned(), line.net, line.settled_at));
        payout.first_line_at.get_or_insert(at);
        payout.last_line_at = Some(at);
        payout.payments.insert(line.payment_id.clone());
    }
    payouts
}

/// Checks an announcement against contract §7 (the worker's decoder for it is not
/// written yet): its fields, types and key. Returns its payout id.
fn checked_announcement(plan: &Plan, record: &Record, value: &Value) -> String {
    assert_eq!(value["type"], "payout_announced", "{value}");
    let id = |field: &str| {
        let text = value[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {value}"));
        assert!(
            (1..=128).contains(&text.chars().count()),
            "{field}: {value}"
        );
        assert!(!text.chars().any(char::is_control), "{field}: {value}");
        text.to_owned()
    };
    id("event_id");
    let payout_id = id("payout_id");
    assert_eq!(
        record.key.as_deref(),
        Some(payout_id.as_bytes()),
        "keyed by payout_id"
    );
    let currency = value["currency"].as_str().expect("currency");
    assert!(Currency::from_code(currency).is_some(), "{value}");
    assert!(value["net_minor"].is_i64(), "{value}");
    match value.get("line_count") {
        None => {}
        Some(count) => assert!(count.as_i64().is_some_and(|c| c >= 0), "{value}"),
    }
    let paid_at = parse_timestamp(value["paid_at"].as_str().expect("paid_at")).expect("RFC 3339");
    // Inside the worker's skew bound when produced at `base_time`.
    assert!(paid_at <= plan.base_time + MAX_EVENT_LEAD, "{value}");
    payout_id
}

/// What contract §7 makes of a payout, read as design section 9 reads it, computed
/// here from what was produced: (status, discrepancy, currency, expected net, lines
/// net, expected count, count, lines in another currency).
type Reading = (
    &'static str,
    Option<&'static str>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
);

fn section_7(payout: &Seen) -> Reading {
    let count = payout.lines.len() as i64;
    let Some(first) = payout.announcements.first() else {
        // Unannounced: its lines' currency and sum when they have only one.
        let currencies: BTreeSet<&str> = payout.lines.iter().map(|(c, _, _)| c.as_str()).collect();
        let single = (currencies.len() == 1).then(|| currencies.first().map(|c| c.to_string()));
        let net = single
            .is_some()
            .then(|| payout.lines.iter().map(|(_, n, _)| n).sum());
        return (
            "unannounced",
            Some("unannounced_payout"),
            single.flatten(),
            None,
            net,
            None,
            count,
            0,
        );
    };
    let currency = first["currency"].as_str().expect("currency").to_owned();
    let expected = first["net_minor"].as_i64().expect("net_minor");
    let expected_count = first.get("line_count").and_then(Value::as_i64);
    let in_currency: Vec<i64> = payout
        .lines
        .iter()
        .filter(|(c, _, _)| *c == currency)
        .map(|(_, n, _)| *n)
        .collect();
    let other = count - in_currency.len() as i64;
    let lines_net: i64 = in_currency.iter().sum();
    let balanced = other == 0 && lines_net == expected && expected_count.is_none_or(|c| c == count);
    let (status, discrepancy) = match (balanced, other > 0) {
        (true, _) => ("balanced", None),
        (false, true) => ("currency_mismatch", Some("payout_mismatch")),
        (false, false) => ("total_mismatch", Some("payout_mismatch")),
    };
    (
        status,
        discrepancy,
        Some(currency),
        Some(expected),
        Some(lines_net),
        expected_count,
        count,
        other,
    )
}

fn reading_of(truth: &PayoutTruth) -> Reading {
    (
        truth.status.as_str(),
        truth.discrepancy.map(PayoutDiscrepancy::as_str),
        truth.currency.clone(),
        truth.expected_net_minor,
        truth.lines_net_minor,
        truth.expected_line_count,
        truth.line_count,
        truth.other_currency_lines,
    )
}

/// The truth of every payout equals §7's reading of the produced records, field by
/// field; returns what was seen.
fn assert_truth_follows_section_7(
    plan: &Plan,
    records: &[Record],
    truth: &GroundTruth,
) -> BTreeMap<String, Seen> {
    let seen = seen(plan, records);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        truth.payouts.keys().collect::<Vec<_>>(),
        "the same payouts"
    );
    for (payout_id, payout) in &seen {
        let expected = &truth.payouts[payout_id];
        assert_eq!(reading_of(expected), section_7(payout), "{payout_id}");
        let first = payout.announcements.first();
        assert_eq!(
            expected.announcement_event_id.as_deref(),
            first.map(|a| a["event_id"].as_str().expect("event_id")),
            "{payout_id}"
        );
        assert_eq!(
            expected.paid_at,
            first.map(|a| parse_timestamp(a["paid_at"].as_str().expect("paid_at")).expect("time")),
            "{payout_id}"
        );
        assert_eq!(
            expected.announcements,
            payout.announcements.len(),
            "{payout_id}"
        );
        assert_eq!(
            expected.last_settled_at,
            payout.lines.iter().map(|(_, _, at)| *at).max(),
            "{payout_id}"
        );
    }
    seen
}

fn payouts_plan(seed: u64, scenarios: usize) -> Plan {
    plan(seed, scenarios, Mix::payouts_only(1))
}

#[test]
fn payout_scenarios_decode_and_their_truth_is_what_section_7_makes_of_them() {
    let plan = payouts_plan(21, 420);
    let (records, truth) = generate(&plan);
    for name in payout_scenario_names() {
        assert!(truth.scenarios[name] > 30, "{name}: {:?}", truth.scenarios);
    }
    // Every line decodes, is a matched capture of a payment of its own, in a payout.
    let mut payments = 0;
    for record in records.iter().filter(|r| r.topic != Topic::Payouts) {
        let event = decoded(&plan, record).expect("no bad messages");
        let key = (event.kind(), event.event_id().to_owned());
        let (_, outcome, _) = &truth.outcomes[&key];
        assert_eq!(*outcome, recon_worker::engine::Outcome::Matched, "{key:?}");
        match event {
            Event::Settlement(line) => {
                assert_eq!(line.line, Line::Capture);
                assert!(line.payout_id.is_some(), "{}", line.event_id);
            }
            Event::Payment(_) => payments += 1,
            Event::Refund(_) => panic!("no refunds in payout scenarios"),
        }
    }
    assert!(
        truth.discrepancies.is_empty(),
        "payout lines open no discrepancy of §2"
    );
    assert_eq!(truth.outcomes.len(), 2 * payments);

    let seen = assert_truth_follows_section_7(&plan, &records, &truth);
    let statuses = truth.payout_counts();
    let scenarios = |name: &str| truth.scenarios[name];
    assert_eq!(
        truth.payouts.len(),
        plan.scenarios,
        "one payout per scenario"
    );
    assert_eq!(
        statuses[&PayoutStatus::Unannounced],
        scenarios("payout_unannounced")
    );
    assert_eq!(
        statuses[&PayoutStatus::CurrencyMismatch],
        scenarios("payout_currency")
    );
    let reannounced = seen.values().filter(|p| p.announcements.len() == 2).count();
    assert_eq!(reannounced, scenarios("payout_reannounced"));
    assert_eq!(
        statuses[&PayoutStatus::Balanced] + statuses[&PayoutStatus::TotalMismatch],
        scenarios("payout_balanced")
            + scenarios("payout_announced_first")
            + scenarios("payout_reannounced")
            + scenarios("payout_short")
            + scenarios("payout_count")
    );
    let mut cases = BTreeMap::<&str, usize>::new();
    for (payout_id, payout) in &seen {
        let truth = &truth.payouts[payout_id];
        // 3 to 50 lines, each of a payment of its own (keys spread over partitions).
        assert!((3..=50).contains(&payout.lines.len()), "{payout_id}");
        assert_eq!(payout.payments.len(), payout.lines.len(), "{payout_id}");
        let (first_line, last_line) = (
            payout.first_line_at.unwrap_or(0),
            payout.last_line_at.unwrap_or(0),
        );
        let before = payout.announced_at.iter().all(|at| *at < first_line);
        let after = payout.announced_at.iter().all(|at| *at > last_line);
        assert!(
            before || after,
            "{payout_id}: announcements with the lines, not around them"
        );
        if let Some(paid_at) = truth.paid_at {
            // About the last line's settled_at: within the hour after it.
            let last = truth.last_settled_at.unwrap_or_default();
            assert!(paid_at > last && paid_at <= last + HOUR, "{payout_id}");
        }
        let case = match (truth.status, payout.announcements.len()) {
            (PayoutStatus::Unannounced, _) => "unannounced",
            (_, 2) => match truth.status {
                PayoutStatus::Balanced => "reannounced, the right one first",
                _ => "reannounced, the wrong one first",
            },
            (PayoutStatus::Balanced, _) if before => "announced first",
            (PayoutStatus::Balanced, _) => "balanced",
            (PayoutStatus::CurrencyMismatch, _)
                if truth.lines_net_minor == truth.expected_net_minor =>
            {
                "currency wrong, total right"
            }
            (PayoutStatus::CurrencyMismatch, _) => "currency and total wrong",
            (PayoutStatus::TotalMismatch, _)
                if truth.lines_net_minor == truth.expected_net_minor =>
            {
                "right sum, wrong line_count"
            }
            (PayoutStatus::TotalMismatch, _) => {
                // A line short: counted in the announcement, never produced.
                let lines_net = truth.lines_net_minor.unwrap_or_default();
                assert!(truth.expected_net_minor > Some(lines_net), "{payout_id}");
                if let Some(count) = truth.expected_line_count {
                    assert_eq!(count, truth.line_count + 1, "{payout_id}");
                }
                "a line short"
            }
        };
        *cases.entry(case).or_default() += 1;
        if !matches!(case, "announced first") {
            assert!(
                after || truth.announcements == 0,
                "{payout_id}: announced after its lines"
            );
        }
    }
    assert_eq!(cases.len(), 9, "every way a payout can go: {cases:?}");
    assert_eq!(cases["balanced"], scenarios("payout_balanced"));
    assert_eq!(
        cases["announced first"],
        scenarios("payout_announced_first")
    );
    assert_eq!(cases["a line short"], scenarios("payout_short"));
    assert_eq!(
        cases["right sum, wrong line_count"],
        scenarios("payout_count")
    );
    assert_eq!(
        cases["reannounced, the right one first"] + cases["reannounced, the wrong one first"],
        scenarios("payout_reannounced")
    );
    let line_counts: BTreeSet<bool> = truth
        .payouts
        .values()
        .filter(|p| p.announcements > 0)
        .map(|p| p.expected_line_count.is_some())
        .collect();
    assert_eq!(
        line_counts.len(),
        2,
        "line_count sometimes given, sometimes not"
    );
}

#[test]
fn payouts_alongside_refund_lines_count_duplicates_and_follow_section_7() {
    // The default mix's refund lines carry unannounced payout ids (a duplicate refund
    // line, `duplicate_settlement`, in its original's payout: it counts); with every
    // payout scenario besides, and bad messages.
    let plan = plan(22, 1_500, Mix::default().with_payouts(1));
    let (records, truth) = generate(&plan);
    let seen = assert_truth_follows_section_7(&plan, &records, &truth);
    assert!(
        seen.values()
            .any(|p| p.announcements.is_empty() && p.lines.len() == 2),
        "a refund line and its duplicate in one payout"
    );
    for status in PayoutStatus::ALL {
        assert!(truth.payout_counts()[&status] > 0, "{status:?}");
    }
}

#[test]
fn payout_generation_is_deterministic_per_seed() {
    let (a, truth_a) = generate(&payouts_plan(5, 200));
    let (b, truth_b) = generate(&payouts_plan(5, 200));
    assert_eq!(digest(&a, &truth_a), digest(&b, &truth_b));
    assert_eq!(truth_a, truth_b);
    let (c, truth_c) = generate(&payouts_plan(6, 200));
    assert_ne!(digest(&a, &truth_a), digest(&c, &truth_c));
}

/// A record without its `payout_id` when it is one of `every_line`'s.
fn without_every_line_payout(record: &Record) -> Option<Value> {
    let mut value: Value = serde_json::from_slice(record.value.as_deref()?).ok()?;
    if let Some(fields) = value.as_object_mut() {
        let ours = fields
            .get("payout_id")
            .and_then(Value::as_str)
            .is_some_and(|id| id.starts_with("t-payout-every-"));
        if ours {
            fields.remove("payout_id");
        }
    }
    Some(value)
}

#[test]
fn payouts_every_line_puts_each_capture_line_in_a_balanced_payout_of_the_same_stream() {
    const K: usize = 7;
    let without = plan(23, 2_000, Mix::default());
    let with = Plan {
        payout_every_line: K,
        ..without.clone()
    };
    let (records, truth) = generate(&with);
    let seen = assert_truth_follows_section_7(&with, &records, &truth);

    // Every accepted capture line is in a payout of K lines (fewer for the last one of
    // each currency), all of one currency.
    let mut capture_lines = 0;
    for record in records.iter().filter(|r| r.topic == Topic::Settlements) {
        if let Ok(Event::Settlement(line)) = decoded(&with, record) {
            if line.line == Line::Capture {
                capture_lines += 1;
                let payout_id = line.payout_id.as_deref().unwrap_or_default();
                assert!(
                    payout_id.starts_with("t-payout-every-"),
                    "{}",
                    line.event_id
                );
            }
        }
    }
    let every: Vec<(&String, &Seen)> = seen
        .iter()
        .filter(|(id, _)| id.starts_with("t-payout-every-"))
        .collect();
    let counted: usize = every.iter().map(|(_, p)| p.lines.len()).sum();
    let redeliveries = truth.scenarios["redelivery"];
    assert_eq!(
        counted + redeliveries,
        capture_lines,
        "each line once, redeliveries never"
    );
    let mut short = BTreeMap::<&str, usize>::new();
    for (payout_id, payout) in &every {
        let truth = &truth.payouts[*payout_id];
        assert_eq!(truth.status, PayoutStatus::Balanced, "{payout_id}");
        assert_eq!(truth.announcements, 1, "{payout_id}");
        assert!(payout.lines.len() <= K, "{payout_id}");
        assert!(
            payout.announced_at[0] > payout.last_line_at.unwrap_or(0),
            "{payout_id}"
        );
        if payout.lines.len() < K {
            *short.entry(payout.lines[0].0.as_str()).or_default() += 1;
        }
    }
    assert!(
        short.values().all(|n| *n == 1),
        "only the last of a currency is short: {short:?}"
    );
    assert!(every.len() >= counted / K);

    // The stream is the one without payouts: the same records, in the same order,
    // but for the `payout_id`s and the announcements; the same outcomes.
    let (plain, plain_truth) = generate(&without);
    let stripped: Vec<(Topic, Option<Vec<u8>>, Option<Value>)> = records
        .iter()
        .filter(|r| r.topic != Topic::Payouts)
        .map(|r| (r.topic, r.key.clone(), without_every_line_payout(r)))
        .collect();
    let original: Vec<(Topic, Option<Vec<u8>>, Option<Value>)> = plain
        .iter()
        .map(|r| (r.topic, r.key.clone(), without_every_line_payout(r)))
        .collect();
    assert!(stripped == original, "the same stream underneath");
    assert_eq!(
        records.len() - plain.len(),
        every.len(),
        "one announcement per payout"
    );
    assert_eq!(truth.outcomes, plain_truth.outcomes);
    assert_eq!(truth.discrepancies, plain_truth.discrepancies);
    assert_eq!(truth.rejected, plain_truth.rejected);
}

#[test]
fn the_payouts_preset_adds_payouts_to_what_comes_before() {
    let default = parse_mix("payouts").expect("preset");
    let v1 = parse_mix("v1,payouts,payout_short=4").expect("preset");
    for name in payout_scenario_names() {
        assert_eq!(default.weight(name), 1, "{name}");
        assert_eq!(Mix::default().weight(name), 0, "{name}: off by default");
        assert_eq!(parse_mix("v1").expect("preset").weight(name), 0, "{name}");
        let expected = if name == "payout_short" { 4 } else { 1 };
        assert_eq!(v1.weight(name), expected, "{name}");
    }
    for name in scenario_names().filter(|n| !n.starts_with("payout_")) {
        assert_eq!(default.weight(name), Mix::default().weight(name), "{name}");
        assert_eq!(
            v1.weight(name),
            Mix::version_1_only().weight(name),
            "{name}"
        );
    }
    assert_eq!(payout_scenario_names().count(), 7);
}

#[test]
fn payout_records_need_a_payouts_topic_to_go_to() {
    use crate::admin::TopicNames;
    let two = ["p", "s"];
    let three = ["p", "s", "po"];
    assert_eq!(two.name(Topic::Settlements), Some("s"));
    assert_eq!(two.name(Topic::Payouts), None);
    assert_eq!(three.name(Topic::Payouts), Some("po"));
}
