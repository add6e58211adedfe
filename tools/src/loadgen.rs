//! Load and scenario generator: realistic co-partitioned payment and settlement
//! streams with every outcome kind and every class of bad input, deterministic by seed.
//!
//! It also writes down what each event's final outcome must be — computed from the
//! scenario it generated, not by the engine — so demos, end-to-end and chaos tests
//! compare the worker's tables with an independent ground truth.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use recon_worker::engine::Outcome;
use recon_worker::event::{format_timestamp, Input, Micros};

const MINUTE: Micros = 60_000_000;
const HOUR: Micros = 60 * MINUTE;

/// One Kafka record to produce.
#[derive(Debug, Clone)]
pub struct Record {
    pub input: Input,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Mix of scenarios; each field is a weight (0 disables it).
#[derive(Debug, Clone)]
pub struct Mix {
    pub matched: u32,
    pub matched_late: u32,
    pub currency_mismatch: u32,
    pub amount_mismatch: u32,
    pub fee_mismatch: u32,
    pub duplicate_payment: u32,
    pub duplicate_settlement: u32,
    pub missing_settlement: u32,
    pub orphan_settlement: u32,
    pub pending: u32,
    pub redelivery: u32,
    /// One bad message every this many scenarios (0: none).
    pub poison_every: usize,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            matched: 70,
            matched_late: 3,
            currency_mismatch: 2,
            amount_mismatch: 3,
            fee_mismatch: 2,
            duplicate_payment: 2,
            duplicate_settlement: 2,
            missing_settlement: 3,
            orphan_settlement: 3,
            pending: 0,
            redelivery: 5,
            poison_every: 50,
        }
    }
}

/// Parses `name=weight,…` over the defaults (names: matched, late, currency, amount,
/// fee, dup_payment, dup_settlement, missing, orphan, pending, redelivery).
pub fn parse_mix(text: &str) -> Result<Mix, String> {
    let mut mix = Mix::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("mix entry {part:?}: expected name=weight"))?;
        let weight: u32 = value
            .parse()
            .map_err(|_| format!("mix entry {part:?}: weight must be a whole number"))?;
        let slot = match name {
            "matched" => &mut mix.matched,
            "late" => &mut mix.matched_late,
            "currency" => &mut mix.currency_mismatch,
            "amount" => &mut mix.amount_mismatch,
            "fee" => &mut mix.fee_mismatch,
            "dup_payment" => &mut mix.duplicate_payment,
            "dup_settlement" => &mut mix.duplicate_settlement,
            "missing" => &mut mix.missing_settlement,
            "orphan" => &mut mix.orphan_settlement,
            "pending" => &mut mix.pending,
            "redelivery" => &mut mix.redelivery,
            other => return Err(format!("unknown mix entry {other:?}")),
        };
        *slot = weight;
    }
    Ok(mix)
}

/// Parameters of a generated stream.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Number of scenarios (payment ids).
    pub scenarios: usize,
    pub mix: Mix,
    /// "Now" of the stream, the time it is produced at: recent events are around it,
    /// stale ones days before (see [`Plan::event_now`]).
    pub base_time: Micros,
    /// D and O of the worker that will read the stream.
    pub deadline: Micros,
    pub orphan_timeout: Micros,
    /// The worker's RECON_MAX_MESSAGE_BYTES, to make a message just over it.
    pub max_message_bytes: usize,
    /// Prefix making ids unique across runs.
    pub id_prefix: String,
}

/// Most an event time of a generated stream is ahead of [`Plan::base_time`]. The
/// worker rejects events dated more than `RECON_MAX_FUTURE_SKEW` (default 24h) ahead
/// of their Kafka timestamp, and the records are produced at about `base_time`.
pub const MAX_EVENT_LEAD: Micros = 12 * HOUR;

impl Plan {
    /// The event time recent payments are around. A late settlement comes up to D + 1h
    /// after its payment, so with D = 72h a stream centred on `base_time` held
    /// settlements dated three days after they were produced (contract §1 rejects
    /// them). The whole timeline moves back by what exceeds [`MAX_EVENT_LEAD`]; every
    /// event keeps its place relative to the others, so outcomes and watermarks are
    /// unchanged, and a `pending` payment is still inside its deadline (by
    /// `MAX_EVENT_LEAD` − 1h) when the stream is read.
    pub fn event_now(&self) -> Micros {
        let latest_lead = self.deadline + HOUR;
        self.base_time - (latest_lead - MAX_EVENT_LEAD).max(0)
    }
}

/// The final state every accepted event must reach, and the count of rejects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroundTruth {
    /// (event_kind, event_id) → (payment_id, outcome, counterpart_event_id).
    pub outcomes: BTreeMap<(String, String), (String, Outcome, Option<String>)>,
    /// (topic input, reason class) of every bad message, in production order.
    pub rejected: Vec<(Input, &'static str)>,
}

impl GroundTruth {
    pub fn outcome_counts(&self) -> BTreeMap<Outcome, usize> {
        let mut counts = BTreeMap::new();
        for (_, outcome, _) in self.outcomes.values() {
            *counts.entry(*outcome).or_default() += 1;
        }
        counts
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    Matched,
    MatchedLate,
    CurrencyMismatch,
    AmountMismatch,
    FeeMismatch,
    DuplicatePayment,
    DuplicateSettlement,
    Missing,
    Orphan,
    Pending,
    Redelivery,
}

const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];

/// Generates the records (topic order within each payment id as a producer would send
/// them; the two topics interleaved at random, at most [`MAX_SKEW_SCENARIOS`] apart)
/// and their ground truth.
pub fn generate(plan: &Plan) -> (Vec<Record>, GroundTruth) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mix = &plan.mix;
    let weighted = [
        (mix.matched, Scenario::Matched),
        (mix.matched_late, Scenario::MatchedLate),
        (mix.currency_mismatch, Scenario::CurrencyMismatch),
        (mix.amount_mismatch, Scenario::AmountMismatch),
        (mix.fee_mismatch, Scenario::FeeMismatch),
        (mix.duplicate_payment, Scenario::DuplicatePayment),
        (mix.duplicate_settlement, Scenario::DuplicateSettlement),
        (mix.missing_settlement, Scenario::Missing),
        (mix.orphan_settlement, Scenario::Orphan),
        (mix.pending, Scenario::Pending),
        (mix.redelivery, Scenario::Redelivery),
    ];
    let total: u32 = weighted.iter().map(|(w, _)| w).sum::<u32>().max(1);
    let mut streams: [Vec<Record>; 2] = [Vec::new(), Vec::new()];
    let mut truth = GroundTruth::default();
    let mut poison_class = 0usize;
    // ends[k][i]: length of stream k once scenario i (and its bad message) is in it.
    let mut ends: [Vec<usize>; 2] = [
        Vec::with_capacity(plan.scenarios),
        Vec::with_capacity(plan.scenarios),
    ];
    for i in 0..plan.scenarios {
        let mut pick = rng.random_range(0..total);
        let scenario = weighted
            .iter()
            .find(|(w, _)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or(Scenario::Matched, |(_, s)| *s);
        generate_scenario(plan, &mut rng, i, scenario, &mut streams, &mut truth);
        if mix.poison_every > 0 && i % mix.poison_every == mix.poison_every - 1 {
            let (input, class, record) = poison(plan, &mut rng, poison_class);
            poison_class += 1;
            streams[input.index()].push(record);
            truth.rejected.push((input, class));
        }
        for (end, stream) in ends.iter_mut().zip(&streams) {
            end.push(stream.len());
        }
    }
    (interleave(&mut rng, streams, &ends), truth)
}

/// How far (in scenarios) one topic may run ahead of the other in the produced order.
/// Within it the topics interleave at random, so settlements arrive before and after
/// their payments, in the same batch or batches apart.
pub const MAX_SKEW_SCENARIOS: usize = 500;

/// Interleaves the two topics at random, but never more than [`MAX_SKEW_SCENARIOS`]
/// apart. A plain coin flip per record drifted without bound: the topics hold
/// different numbers of records per scenario (bad messages go mostly to payments), so
/// at 5M messages settlements ran about 100k records ahead of their payments and the
/// workload changed along the stream (from nearly all matches in memory to nearly all
/// lookups).
fn interleave(rng: &mut StdRng, streams: [Vec<Record>; 2], ends: &[Vec<usize>; 2]) -> Vec<Record> {
    let [payments, settlements] = streams;
    let mut out = Vec::with_capacity(payments.len() + settlements.len());
    let (mut p, mut s) = (payments.into_iter(), settlements.into_iter());
    // taken[k]: records of stream k emitted so far; scenario[k]: the scenario of the
    // next one.
    let (mut taken, mut scenario) = ([0usize; 2], [0usize; 2]);
    loop {
        for k in 0..2 {
            while scenario[k] < ends[k].len() && ends[k][scenario[k]] <= taken[k] {
                scenario[k] += 1;
            }
        }
        let left = [
            ends[0].last() > Some(&taken[0]),
            ends[1].last() > Some(&taken[1]),
        ];
        let take_payment = match left {
            [false, false] => break,
            [true, false] => true,
            [false, true] => false,
            [true, true] if scenario[0] > scenario[1] + MAX_SKEW_SCENARIOS => false,
            [true, true] if scenario[1] > scenario[0] + MAX_SKEW_SCENARIOS => true,
            [true, true] => rng.random_bool(0.5),
        };
        let next = if take_payment { p.next() } else { s.next() };
        taken[usize::from(!take_payment)] += 1;
        out.extend(next);
    }
    out
}

struct Ids {
    payment_id: String,
    prefix: String,
}

impl Ids {
    fn event(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }
}

fn generate_scenario(
    plan: &Plan,
    rng: &mut StdRng,
    i: usize,
    scenario: Scenario,
    streams: &mut [Vec<Record>; 2],
    truth: &mut GroundTruth,
) {
    let ids = Ids {
        payment_id: format!("{}pay-{i:08}", plan.id_prefix),
        prefix: format!("{}evt-{i:08}", plan.id_prefix),
    };
    let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
    let amount: i64 = rng.random_range(100..500_000);
    let fee = amount / 50;
    let now = plan.event_now();
    let occurred = now - rng.random_range(0..HOUR);
    let on_time = occurred + rng.random_range(MINUTE..plan.deadline.max(2 * MINUTE));
    let stale = now - plan.deadline.max(plan.orphan_timeout) - 24 * HOUR;
    let payment = |event_id: &str, at: Micros, amount: i64| Record {
        input: Input::Payments,
        key: Some(ids.payment_id.clone().into_bytes()),
        value: Some(payment_json(
            event_id,
            &ids.payment_id,
            amount,
            currency,
            at,
        )),
    };
    let settlement =
        |event_id: &str, at: Micros, gross: i64, fee: i64, net: i64, currency: &str| Record {
            input: Input::Settlements,
            key: Some(ids.payment_id.clone().into_bytes()),
            value: Some(settlement_json(
                event_id,
                &ids.payment_id,
                gross,
                fee,
                net,
                currency,
                at,
            )),
        };
    let (p, s) = (ids.event("p"), ids.event("s"));
    let mut expect = |kind: &str, event_id: &str, outcome: Outcome, counterpart: Option<&str>| {
        truth.outcomes.insert(
            (kind.to_owned(), event_id.to_owned()),
            (
                ids.payment_id.clone(),
                outcome,
                counterpart.map(str::to_owned),
            ),
        );
    };
    let mut pair = |outcome: Outcome, settled: Micros, gross: i64, net: i64, currency: &str| {
        streams[0].push(payment(&p, occurred, amount));
        streams[1].push(settlement(&s, settled, gross, fee, net, currency));
        expect("payment", &p, outcome, Some(&s));
        expect("settlement", &s, outcome, Some(&p));
    };
    match scenario {
        Scenario::Matched => pair(Outcome::Matched, on_time, amount, amount - fee, currency),
        Scenario::MatchedLate => pair(
            Outcome::MatchedLate,
            occurred + plan.deadline + HOUR,
            amount,
            amount - fee,
            currency,
        ),
        Scenario::CurrencyMismatch => {
            let other = CURRENCIES
                .iter()
                .find(|c| **c != currency)
                .copied()
                .unwrap_or("CHF");
            pair(
                Outcome::CurrencyMismatch,
                on_time,
                amount,
                amount - fee,
                other,
            )
        }
        Scenario::AmountMismatch => pair(
            Outcome::AmountMismatch,
            on_time,
            amount + 1 + amount / 10,
            amount + 1 + amount / 10 - fee,
            currency,
        ),
        Scenario::FeeMismatch => pair(
            Outcome::FeeMismatch,
            on_time,
            amount,
            amount - fee - 1,
            currency,
        ),
        Scenario::DuplicatePayment => {
            pair(Outcome::Matched, on_time, amount, amount - fee, currency);
            let dup = ids.event("p2");
            streams[0].push(payment(&dup, occurred + MINUTE, amount));
            expect("payment", &dup, Outcome::DuplicatePayment, Some(&p));
        }
        Scenario::DuplicateSettlement => {
            pair(Outcome::Matched, on_time, amount, amount - fee, currency);
            let dup = ids.event("s2");
            streams[1].push(settlement(
                &dup,
                on_time + MINUTE,
                amount,
                fee,
                amount - fee,
                currency,
            ));
            expect("settlement", &dup, Outcome::DuplicateSettlement, Some(&s));
        }
        Scenario::Missing => {
            streams[0].push(payment(&p, stale, amount));
            expect("payment", &p, Outcome::MissingSettlement, None);
        }
        Scenario::Orphan => {
            streams[1].push(settlement(&s, stale, amount, fee, amount - fee, currency));
            expect("settlement", &s, Outcome::OrphanSettlement, None);
        }
        Scenario::Pending => {
            // Recent and unanswered: still inside its deadline when the stream ends,
            // whatever the watermark. Dated after the latest settlement minus D (a late
            // one comes D + 1h after a payment at most `now`): once the payments topic
            // is idle, the pair's watermark is the settlements' high mark, and a pending
            // payment dated `now` turned `missing_settlement` whenever the settlements
            // topic was still being read (seen with Apache Kafka: 53 of 2,903 outcomes).
            streams[0].push(payment(&p, now + HOUR + MINUTE, amount));
            expect("payment", &p, Outcome::Pending, None);
        }
        Scenario::Redelivery => {
            pair(Outcome::Matched, on_time, amount, amount - fee, currency);
            // The same messages again, as an at-least-once producer would resend them.
            streams[0].push(payment(&p, occurred, amount));
            streams[1].push(settlement(&s, on_time, amount, fee, amount - fee, currency));
        }
    }
}

/// Every this many duplicates of a storm, one earlier duplicate is sent again.
const STORM_REDELIVERY_EVERY: usize = 1000;
/// How many duplicates later it comes again: long committed by then.
const STORM_REDELIVERY_LAG: usize = 5000;

/// A duplicate storm (issue 19): one payment id, `{id_prefix}storm`, whose producer
/// mints a fresh event id for every resend. Its payment and settlement line (matched),
/// then `duplicates` further payments with new event ids (`duplicate_payment`); every
/// [`STORM_REDELIVERY_EVERY`]th of them is also sent once more with its own event id,
/// [`STORM_REDELIVERY_LAG`] duplicates later (a redelivery: no row). In production
/// order; the ground truth holds one outcome per event id.
pub fn duplicate_storm(plan: &Plan, duplicates: usize) -> (Vec<Record>, GroundTruth) {
    let payment_id = format!("{}storm", plan.id_prefix);
    let first = format!("{}storm-payment-event-first", plan.id_prefix);
    let line = format!("{}storm-settlement-line", plan.id_prefix);
    let occurred = plan.event_now() - HOUR;
    let record = |input: Input, value: Vec<u8>| Record {
        input,
        key: Some(payment_id.clone().into_bytes()),
        value: Some(value),
    };
    let payment = |event_id: &str, at: Micros| {
        record(
            Input::Payments,
            payment_json(event_id, &payment_id, 10_000, "EUR", at),
        )
    };
    let mut records = vec![
        payment(&first, occurred),
        record(
            Input::Settlements,
            settlement_json(
                &line,
                &payment_id,
                10_000,
                200,
                9_800,
                "EUR",
                occurred + HOUR,
            ),
        ),
    ];
    let mut truth = GroundTruth::default();
    let mut expect = |kind: &str, event_id: &str, outcome: Outcome, counterpart: &str| {
        truth.outcomes.insert(
            (kind.to_owned(), event_id.to_owned()),
            (payment_id.clone(), outcome, Some(counterpart.to_owned())),
        );
    };
    expect("payment", &first, Outcome::Matched, &line);
    expect("settlement", &line, Outcome::Matched, &first);
    // Ids as long as a UUID: past 24 bytes, so the window would hold them on the heap.
    let dup = |j: usize| format!("{}storm-payment-event-{j:010}", plan.id_prefix);
    for j in 0..duplicates {
        let event_id = dup(j);
        records.push(payment(&event_id, occurred + j as Micros));
        expect("payment", &event_id, Outcome::DuplicatePayment, &first);
        if j % STORM_REDELIVERY_EVERY == STORM_REDELIVERY_EVERY - 1 && j >= STORM_REDELIVERY_LAG {
            let again = j - STORM_REDELIVERY_LAG;
            records.push(payment(&dup(again), occurred + again as Micros));
        }
    }
    (records, truth)
}

fn payment_json(
    event_id: &str,
    payment_id: &str,
    amount: i64,
    currency: &str,
    at: Micros,
) -> Vec<u8> {
    json!({
        "event_id": event_id,
        "type": "payment_captured",
        "payment_id": payment_id,
        "merchant_id": "merchant-42",
        "amount_minor": amount,
        "currency": currency,
        "occurred_at": format_timestamp(at),
        "schema_version": 3
    })
    .to_string()
    .into_bytes()
}

fn settlement_json(
    event_id: &str,
    payment_id: &str,
    gross: i64,
    fee: i64,
    net: i64,
    currency: &str,
    at: Micros,
) -> Vec<u8> {
    json!({
        "event_id": event_id,
        "type": "settlement_line",
        "settlement_id": "payout-2026-11-23",
        "payment_id": payment_id,
        "gross_minor": gross,
        "fee_minor": fee,
        "net_minor": net,
        "currency": currency,
        "settled_at": format_timestamp(at)
    })
    .to_string()
    .into_bytes()
}

/// Number of distinct bad-input classes [`poison`] cycles through.
pub const POISON_CLASSES: usize = 16;

/// The `n`-th bad message (cycling through every rejection class).
fn poison(plan: &Plan, rng: &mut StdRng, n: usize) -> (Input, &'static str, Record) {
    let key = format!("{}bad-{n}", plan.id_prefix);
    let at = format_timestamp(plan.base_time);
    let payment = |fields: serde_json::Value| {
        let mut base = json!({
            "event_id": format!("{key}-e"), "type": "payment_captured", "payment_id": key.clone(),
            "merchant_id": "m", "amount_minor": 100, "currency": "EUR", "occurred_at": at.clone()
        });
        if let (Some(base), Some(fields)) = (base.as_object_mut(), fields.as_object()) {
            for (k, v) in fields {
                if v.is_null() {
                    base.remove(k);
                } else {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
        base.to_string().into_bytes()
    };
    let class_index = n % POISON_CLASSES;
    // Only the classes whose value is no event may go to either topic.
    let coin = rng.random_bool(0.5);
    let input = if coin && matches!(class_index, 12 | 13) {
        Input::Settlements
    } else {
        Input::Payments
    };
    let (class, key_bytes, value): (&'static str, Option<Vec<u8>>, Option<Vec<u8>>) =
        match class_index {
            0 => (
                "not_utf8",
                Some(key.clone().into_bytes()),
                Some(vec![0xff, 0xfe, b'{', 0x80]),
            ),
            1 => (
                "not_json",
                Some(key.clone().into_bytes()),
                Some(b"{\"event_id\": ".to_vec()),
            ),
            2 => (
                "not_object",
                Some(key.clone().into_bytes()),
                Some(b"[1, 2, 3]".to_vec()),
            ),
            3 => (
                "missing_field",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"amount_minor": null}))),
            ),
            4 => (
                "wrong_type",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"amount_minor": "100"}))),
            ),
            5 => (
                "out_of_range",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"amount_minor": 0}))),
            ),
            6 => (
                "unknown_currency",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"currency": "XYZ"}))),
            ),
            7 => (
                "bad_timestamp",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"occurred_at": "yesterday"}))),
            ),
            8 => (
                "unknown_type",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"type": "refund_issued"}))),
            ),
            9 => (
                "wrong_topic_type",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"type": "settlement_line"}))),
            ),
            10 => (
                "key_mismatch",
                Some(b"someone-else".to_vec()),
                Some(payment(json!({}))),
            ),
            11 => (
                "too_large",
                Some(key.clone().into_bytes()),
                Some(payment(
                    json!({"padding": "x".repeat(plan.max_message_bytes)}),
                )),
            ),
            12 => ("empty", Some(key.clone().into_bytes()), None),
            13 => (
                "not_json",
                Some(key.clone().into_bytes()),
                Some(b"\"just a string".to_vec()),
            ),
            14 => {
                // The Kafka key is the payment id, NUL included: only the control
                // character itself is wrong (PostgreSQL cannot store it).
                let payment_id = format!("{key}\u{0}x");
                (
                    "control_character",
                    Some(payment_id.clone().into_bytes()),
                    Some(payment(json!({ "payment_id": payment_id }))),
                )
            }
            // Before 1970 rather than far in the future: rejected whatever the Kafka
            // timestamp, so the class is the same where there is none (benchmarks).
            _ => (
                "event_time_out_of_range",
                Some(key.clone().into_bytes()),
                Some(payment(json!({"occurred_at": "1969-07-20T20:17:40Z"}))),
            ),
        };
    (
        input,
        class,
        Record {
            input,
            key: key_bytes,
            value,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let (records, _) = generate(&plan);
        let mut latest = [0usize; 2];
        let (mut widest, mut settlement_first) = (0usize, 0usize);
        let mut payments_seen = std::collections::HashSet::new();
        for record in &records {
            let Some(scenario) = scenario_of(record) else {
                continue;
            };
            let k = record.input.index();
            latest[k] = latest[k].max(scenario);
            widest = widest.max(latest[0].abs_diff(latest[1]));
            match record.input {
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
        assert!(settlement_first > records.len() / 20, "{settlement_first}");
    }
}
