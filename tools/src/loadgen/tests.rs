//! The generator's own checks: every record decodes as its truth says, the contract's
//! shapes, the net position, mix names, and the interleaving's skew bound.

use super::refunds::over_refund;
use super::*;
use recon_worker::engine::{DiscrepancyKind, Outcome, RECOVERED, REVERSED};
use recon_worker::event::{decode, Event, EventKind, Limits, Topic};

pub(super) fn plan(seed: u64, scenarios: usize, mix: Mix) -> Plan {
    Plan {
        seed,
        scenarios,
        mix,
        base_time: 1_800_000_000_000_000,
        deadline: 72 * HOUR,
        orphan_timeout: 72 * HOUR,
        max_message_bytes: 64 * 1024,
        id_prefix: "t-".into(),
        payout_every_line: 0,
    }
}

/// A payments or settlements record decoded as the worker decodes it.
pub(super) fn decoded(plan: &Plan, record: &Record) -> Result<Event, &'static str> {
    let limits = Limits {
        max_bytes: plan.max_message_bytes,
        max_future_skew: 24 * HOUR,
    };
    let input = record.input().expect("a payments or settlements record");
    // Produced at `base_time`, as the Kafka timestamp says.
    decode(
        input,
        record.key.as_deref(),
        record.value.as_deref(),
        Some(plan.base_time / 1000),
        limits,
    )
    .map_err(|rejection| rejection.class())
}

#[test]
fn every_record_decodes_as_its_truth_says() {
    // (Payouts too: their lines are ordinary settlement lines.)
    let plan = plan(3, 2_000, Mix::uniform(1).with_payouts(1));
    let mix = Mix {
        poison_every: 7,
        ..plan.mix.clone()
    };
    let plan = Plan { mix, ..plan };
    let (records, truth) = generate(&plan);
    for name in scenario_names() {
        assert!(truth.scenarios.contains_key(name), "{name} generated");
    }
    let mut rejected = Vec::new();
    let mut accepted = std::collections::BTreeSet::new();
    // Announcements: see `payouts_tests`.
    for record in records.iter().filter(|r| r.input().is_some()) {
        match decoded(&plan, record) {
            Ok(event) => {
                let kind = event.kind();
                let key = (kind, event.event_id().to_owned());
                assert!(
                    truth.outcomes.contains_key(&key) || accepted.contains(&key),
                    "{key:?} accepted but in no truth"
                );
                if let Some((payment_id, _, _)) = truth.outcomes.get(&key) {
                    assert_eq!(payment_id, event.payment_id());
                }
                accepted.insert(key);
            }
            Err(class) => rejected.push((record.input().expect("an input"), class)),
        }
    }
    // (The truth lists them in generation order, the records are interleaved.)
    let mut expected = truth.rejected.clone();
    expected.sort();
    rejected.sort();
    assert_eq!(rejected, expected, "bad messages rejected for their class");
    let classes: std::collections::BTreeSet<_> = rejected.iter().map(|(_, c)| *c).collect();
    assert_eq!(
        classes.len(),
        recon_worker::event::Rejection::CLASSES.len(),
        "every class of bad message"
    );
    let truth_keys: std::collections::BTreeSet<_> = truth.outcomes.keys().cloned().collect();
    assert_eq!(accepted, truth_keys, "every event of the truth is produced");
}

#[test]
fn version_2_lines_follow_the_contract() {
    let plan = plan(5, 500, Mix::version_2_only(1));
    let (records, truth) = generate(&plan);
    assert_eq!(truth.scenarios.len(), version_2_scenario_names().count());
    let mut line_types = std::collections::BTreeSet::new();
    for record in &records {
        let value: serde_json::Value =
            serde_json::from_slice(record.value.as_deref().unwrap_or_default()).expect("json");
        match decoded(&plan, record).expect("no bad messages") {
            Event::Settlement(line) => {
                // Written out, also for captures, and signed by type.
                assert_eq!(value["line_type"], line.line.line_type());
                assert_eq!(
                    line.gross.get() > 0,
                    line.line.gross_is_positive(),
                    "{value}"
                );
                line_types.insert(line.line.line_type());
                // Every line of these scenarios adds up except a fee mismatch.
                let outcome = truth.outcomes[&(EventKind::Settlement, line.event_id.clone())].1;
                assert_eq!(
                    line.gross.get() - line.fee.get() == line.net,
                    outcome != Outcome::FeeMismatch,
                    "{value}"
                );
            }
            Event::Refund(refund) => {
                assert_eq!(value["type"], "refund_requested");
                assert!(value.get("requested_at").is_some());
                assert!(!refund.refund_id.is_empty());
            }
            Event::Payment(_) => {}
        }
    }
    assert_eq!(line_types.len(), 4, "{line_types:?}");
    let kinds: std::collections::BTreeSet<_> = truth
        .discrepancies
        .keys()
        .map(|(kind, _, _)| *kind)
        .collect();
    assert!(kinds.contains(&DiscrepancyKind::Chargeback));
    assert!(kinds.contains(&DiscrepancyKind::OverRefunded));
    let resolved = truth.discrepancy_counts();
    for state in [
        (DiscrepancyKind::Chargeback, None),
        (DiscrepancyKind::Chargeback, Some(REVERSED.to_owned())),
        (DiscrepancyKind::OverRefunded, None),
        (DiscrepancyKind::OverRefunded, Some(RECOVERED.to_owned())),
    ] {
        assert!(resolved.contains_key(&state), "{state:?}");
    }
    for outcome in [
        Outcome::DuplicateRefund,
        Outcome::ChargebackOpen,
        Outcome::ChargebackReversed,
    ] {
        assert!(truth.outcome_counts().contains_key(&outcome), "{outcome}");
    }
}

#[test]
fn a_mix_without_version_2_scenarios_writes_version_1_messages_only() {
    // (The refund and chargeback scenarios come after the version-1 ones in the
    // draw, so such a mix also picks what it always picked from a seed.)
    let v1 = Mix {
        refund_matched: 0,
        refund_late: 0,
        refund_currency_mismatch: 0,
        refund_amount_mismatch: 0,
        refund_fee_mismatch: 0,
        refund_missing: 0,
        refund_orphan: 0,
        duplicate_refund: 0,
        duplicate_refund_line: 0,
        chargeback_open: 0,
        chargeback_reversed: 0,
        orphan_reversal: 0,
        over_refunded: 0,
        over_refunded_recovered: 0,
        ..Mix::default()
    };
    let (records, truth) = generate(&plan(9, 300, v1));
    assert!(records.iter().all(|r| {
        let text = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
        !text.contains("line_type") || text.contains("-bad-")
    }));
    assert!(truth
        .outcomes
        .keys()
        .all(|(kind, _)| *kind != EventKind::Refund));
}

#[test]
fn the_net_position_is_taken_in_settlement_order() {
    // Refund first: 100 − 60 = 40, then the chargeback −100 takes it below zero.
    assert_eq!(
        over_refund(100, &[(2, "cb", -100), (1, "l", -60)]),
        Some(("cb".to_owned(), true))
    );
    // Same time: by event id.
    assert_eq!(
        over_refund(100, &[(1, "b", -100), (1, "a", -100)]),
        Some(("b".to_owned(), true))
    );
    // A reversal after both: back to 40, resolved.
    assert_eq!(
        over_refund(100, &[(1, "l", -60), (2, "cb", -100), (3, "cr", 100)]),
        Some(("cb".to_owned(), false))
    );
    // A reversal settled before the chargeback: never below zero.
    assert_eq!(
        over_refund(100, &[(1, "l", -60), (3, "cb", -100), (2, "cr", 100)]),
        None
    );
    // Exactly zero is not below.
    assert_eq!(over_refund(100, &[(1, "cb", -100)]), None);
}

#[test]
fn mix_names_parse() {
    for name in scenario_names() {
        let mix = parse_mix(&format!("{name}=17")).expect("known name");
        assert_eq!(mix.weight(name), 17, "{name}");
    }
    assert!(parse_mix("refunds=1").is_err());
}

/// The scenario number in an id like `…pay-00001234` or `…evt-00001234-p`.
fn scenario_of(record: &Record) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_slice(record.value.as_deref()?).ok()?;
    let payment_id = value.get("payment_id")?.as_str()?;
    payment_id.strip_prefix("t-pay-")?.parse().ok()
}

#[test]
fn the_topics_never_drift_further_apart_than_the_skew_bound() {
    let plan = Plan {
        seed: 7,
        scenarios: 80 * MAX_SKEW_SCENARIOS,
        mix: Mix::default(),
        base_time: 1_800_000_000_000_000,
        deadline: 72 * HOUR,
        orphan_timeout: 72 * HOUR,
        max_message_bytes: 1 << 20,
        id_prefix: "t-".into(),
        payout_every_line: 0,
    };
    let (records, _) = generate(&plan);
    let mut latest = [0usize; 2];
    let (mut widest, mut settlement_first) = (0usize, 0usize);
    let mut payments_seen = std::collections::HashSet::new();
    for record in &records {
        let (Some(scenario), Some(input)) = (scenario_of(record), record.input()) else {
            continue;
        };
        let k = input.index();
        latest[k] = latest[k].max(scenario);
        widest = widest.max(latest[0].abs_diff(latest[1]));
        match input {
            Input::Payments => {
                payments_seen.insert(scenario);
            }
            Input::Settlements => {
                settlement_first += usize::from(!payments_seen.contains(&scenario));
            }
        }
    }
    // Bad messages add records to one topic only: unbounded, this grew with the
    // stream's length (about 2% of it: 800 scenarios here, 100k at 5M messages).
    // (+2: the bound applies to the next records, this measures the last ones.)
    assert!(
        widest <= MAX_SKEW_SCENARIOS + 2,
        "topics drifted {widest} scenarios apart"
    );
    assert!(
        widest >= MAX_SKEW_SCENARIOS / 4,
        "topics hardly interleave: {widest}"
    );
    // Both orders still occur.
    eprintln!(
        "widest {widest}, settlement first {settlement_first} of {}",
        records.len()
    );
    assert!(settlement_first > records.len() / 20, "{settlement_first}");
}

/// FNV-1a over length-prefixed fields: a digest that stays the same across Rust
/// versions and platforms (std's hasher promises neither).
pub(super) fn fnv(hash: &mut u64, bytes: &[u8]) {
    for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
        *hash ^= u64::from(*byte);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Digests of a stream's records (topic, key, value, in order) and of its truth
/// (outcomes, discrepancies, rejects, scenario counts), and its length.
pub(super) fn digest(records: &[Record], truth: &GroundTruth) -> (u64, u64, usize) {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    let mut produced = OFFSET_BASIS;
    for record in records {
        // (The two input topics as `Input::index` numbered them.)
        let topic = match record.topic {
            Topic::Payments => 0u8,
            Topic::Settlements => 1,
            Topic::Payouts => 2,
        };
        fnv(&mut produced, &[topic]);
        fnv(&mut produced, record.key.as_deref().unwrap_or(b"<none>"));
        fnv(&mut produced, record.value.as_deref().unwrap_or(b"<none>"));
    }
    let mut expected = OFFSET_BASIS;
    for ((kind, event_id), (payment_id, outcome, counterpart)) in &truth.outcomes {
        let text = format!(
            "{}|{event_id}|{payment_id}|{}|{counterpart:?}",
            kind.as_str(),
            outcome.as_str()
        );
        fnv(&mut expected, text.as_bytes());
    }
    for ((kind, payment, settlement), (payment_id, resolution)) in &truth.discrepancies {
        let text = format!(
            "{}|{payment:?}|{settlement:?}|{payment_id}|{resolution:?}",
            kind.as_str()
        );
        fnv(&mut expected, text.as_bytes());
    }
    for (input, class) in &truth.rejected {
        fnv(
            &mut expected,
            format!("{}|{class}", input.index()).as_bytes(),
        );
    }
    for (name, count) in &truth.scenarios {
        fnv(&mut expected, format!("{name}|{count}").as_bytes());
    }
    (produced, expected, records.len())
}

#[test]
fn the_two_topic_mixes_produce_what_they_always_did() {
    // Digests of the streams the generator wrote before payouts (contract §7) were
    // added, at a031569: the default mix, `--mix v1`, and the two presets the
    // integration tests use must stay byte for byte the same, truth included, so
    // every earlier measurement and test keeps meaning what it meant.
    let cases = [
        (
            "default",
            Mix::default(),
            2026,
            (5302206112238844926, 15490554580323171907, 7026),
        ),
        (
            "v1",
            parse_mix("v1").expect("preset"),
            2027,
            (2175047428889403855, 3433163080843092414, 6339),
        ),
        (
            "uniform",
            Mix::uniform(3),
            2028,
            (3932599228475945000, 10172422049036226548, 8931),
        ),
        (
            "v2",
            Mix::version_2_only(2),
            2029,
            (13609614105030901148, 3915399127912944140, 10911),
        ),
    ];
    for (label, mix, seed, before) in cases {
        let plan = Plan {
            id_prefix: "h-".into(),
            ..plan(seed, 3_000, mix)
        };
        let (records, truth) = generate(&plan);
        assert_eq!(digest(&records, &truth), before, "{label} mix");
        assert!(records.iter().all(|r| r.topic != Topic::Payouts), "{label}");
        // Refund lines have carried a `payout_id` of their scenario's own since
        // contract §6, never announced: version-1 streams have no payouts at all.
        assert!(
            truth
                .payouts
                .iter()
                .all(|(id, payout)| id.ends_with("-payout")
                    && payout.status == PayoutStatus::Unannounced),
            "{label}"
        );
        assert_eq!(truth.payouts.is_empty(), label == "v1", "{label}");
    }
    let plan = Plan {
        id_prefix: "h-".into(),
        ..plan(2026, 0, Mix::default())
    };
    let (storm, storm_truth) = duplicate_storm(&plan, 7_000);
    assert_eq!(
        digest(&storm, &storm_truth),
        (5492343674936339545, 16969019096760654157, 7004)
    );
}
