//! Load and scenario generator: realistic co-partitioned payment and settlement
//! streams with every outcome kind and every class of bad input, deterministic by seed;
//! since contract §6 also refund requests and settlement lines of every type (refunds,
//! chargebacks, their reversals), each scenario on a payment id of its own.
//!
//! It also writes down what each event's final outcome must be, and every discrepancy
//! the worker must record (kind, the events it is about, open or resolved and how) —
//! computed from the scenario it generated, not by the engine — so demos, end-to-end
//! and chaos tests compare the worker's tables with an independent ground truth. Where
//! contract §6 is silent it follows the semantics settled for issue 21 (v2-spec): a
//! duplicate's counterpart is the first event of its side, the net position adds the
//! gross of every non-duplicate refund, chargeback and reversal line to the capture
//! line's in `(settled_at, event_id)` order, and an `over_refunded` discrepancy names
//! the first line below zero.
//!
//! Contract §7 adds a third topic: payout scenarios put the capture lines of many
//! fresh payments (spread over every partition) in one payout and announce it on the
//! payouts topic, balanced or wrong in each way §7 names, and the truth holds each
//! payout's final status and the payout discrepancy that must be open
//! (`payouts`). [`Plan::payout_every_line`] instead puts every capture line of any
//! stream in a balanced payout, so benchmarks compare one stream with and without
//! payouts. Payouts are off unless a mix weighs them in or that option is set: the
//! default and `v1` mixes write the two-topic streams they always wrote.
//!
//! One module per concern: `mix` (scenarios and their weights), `scenarios` and
//! `refunds` (contract §1–§2 and §6 scenarios), `payouts` (§7), `messages` (the JSON
//! of each message), `poison` (bad input), `storm` (duplicate storms), `interleave`
//! (produced order) and `truth`.

mod interleave;
mod messages;
mod mix;
mod payouts;
mod poison;
mod refunds;
mod scenarios;
mod storm;
mod truth;

#[cfg(test)]
mod payouts_tests;
#[cfg(test)]
mod tests;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use recon_worker::event::{Input, Micros, Topic};

pub use interleave::MAX_SKEW_SCENARIOS;
pub use mix::{parse_mix, payout_scenario_names, scenario_names, version_2_scenario_names, Mix};
pub use poison::POISON_CLASSES;
pub use storm::duplicate_storm;
pub use truth::{DiscrepancyKey, GroundTruth, PayoutDiscrepancy, PayoutStatus, PayoutTruth};

use interleave::{interleave, place};
use mix::{Scenario, SCENARIOS};
use payouts::Ledger;
use poison::poison;
use scenarios::{generate_scenario, Streams};

const MINUTE: Micros = 60_000_000;
const HOUR: Micros = 60 * MINUTE;

/// One Kafka record to produce, and the topic it goes to (by its role: producers map
/// roles to topic names).
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Topic,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl Record {
    /// The matching input its topic is; `None` for a payout announcement.
    pub fn input(&self) -> Option<Input> {
        self.topic.input()
    }
}

/// Parameters of a generated stream.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Number of scenarios: payment ids, except that a payout scenario has 3 to 50
    /// payments of its own.
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
    /// K > 0: every capture line not already in a payout goes into one of K
    /// consecutive capture lines of its currency, each payout announced (balanced)
    /// after its last line. Nothing else about the stream changes: the same seed gives
    /// the same payments and lines, with `payout_id` added, and the announcements.
    /// 0: off.
    pub payout_every_line: usize,
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

/// Generates the records (topic order within each payment id as a producer would send
/// them; the two input topics interleaved at random, at most [`MAX_SKEW_SCENARIOS`]
/// apart; announcements after their payout's last line, or before its first one when
/// a scenario says so) and their ground truth.
pub fn generate(plan: &Plan) -> (Vec<Record>, GroundTruth) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mix = &plan.mix;
    let weighted: Vec<(u32, &'static str, Scenario)> = SCENARIOS
        .iter()
        .map(|&(name, scenario)| (mix.weight(name), name, scenario))
        .collect();
    let total: u32 = weighted.iter().map(|(w, _, _)| w).sum::<u32>().max(1);
    let mut streams = Streams::default();
    let mut truth = GroundTruth::default();
    let mut ledger = Ledger::new(plan);
    let mut poison_class = 0usize;
    // ends[k][i]: length of stream k once scenario i (and its bad message) is in it.
    let mut ends: [Vec<usize>; 2] = [
        Vec::with_capacity(plan.scenarios),
        Vec::with_capacity(plan.scenarios),
    ];
    for i in 0..plan.scenarios {
        let mut pick = rng.random_range(0..total);
        let (name, scenario) = weighted
            .iter()
            .find(|(w, _, _)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or(("matched", Scenario::Matched), |(_, n, s)| (*n, *s));
        if scenario.is_payout() {
            payouts::generate_payout(
                plan,
                &mut rng,
                i,
                scenario,
                &mut streams,
                &mut truth,
                &mut ledger,
            );
        } else {
            generate_scenario(
                plan,
                &mut rng,
                i,
                scenario,
                &mut streams,
                &mut truth,
                &mut ledger,
            );
        }
        *truth.scenarios.entry(name).or_default() += 1;
        if mix.poison_every > 0 && i % mix.poison_every == mix.poison_every - 1 {
            let (input, class, record) = poison(plan, &mut rng, poison_class);
            poison_class += 1;
            streams.inputs[input.index()].push(record);
            truth.rejected.push((input, class));
        }
        for (end, stream) in ends.iter_mut().zip(&streams.inputs) {
            end.push(stream.len());
        }
    }
    ledger.close(&mut streams);
    truth.payouts = ledger.truth();
    // Every draw of the two-topic stream comes before the announcements are placed, so
    // a stream without them is what it always was, and `payout_every_line` changes
    // nothing of the stream it adds payouts to.
    let (merged, settlements_at) =
        interleave(&mut rng, streams.inputs, &ends, !streams.payouts.is_empty());
    (
        place(&mut rng, merged, &settlements_at, streams.payouts),
        truth,
    )
}
