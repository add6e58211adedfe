//! Payouts (contract §7): the payout scenarios, the announcements on the payouts
//! topic, and the ledger that writes each payout's truth.
//!
//! A payout scenario pays out the capture lines of 3 to 50 fresh payments. Each
//! payment has its own id, so the lines spread over every partition, and the payout's
//! total really is a sum across partition pairs. Every payment is matched, so no
//! payout line changes any outcome of contract §2. The scenarios differ only in their
//! lines and announcements.
//!
//! The [`Ledger`] sees every line that carries a `payout_id` as it is written, from any
//! scenario (refund lines have carried one since contract §6), and every announcement.
//! From them it writes [`PayoutTruth`]. The status is what the scenario was made to
//! be; the sums and counts come from the lines actually written. So a test that
//! recomputes §7 from the produced records checks the one against the other.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::Rng;

use recon_worker::event::{Micros, Topic};

use super::interleave::{Anchor, Placed};
use super::messages::announcement_json;
use super::mix::Scenario;
use super::scenarios::{Ids, Streams, Writer, CURRENCIES};
use super::truth::{PayoutStatus, PayoutTruth};
use super::{GroundTruth, Plan, Record, HOUR, MINUTE};

/// Capture lines of a payout scenario, announced or not (the short payout's missing
/// line aside).
const LINES: std::ops::RangeInclusive<usize> = 3..=50;

/// One announcement, as written to the payouts topic.
#[derive(Debug, Clone)]
struct Announced {
    event_id: String,
    currency: String,
    net: i64,
    line_count: Option<i64>,
    paid_at: Micros,
}

/// What a payout was made to be: the status it must end in, the announcement that
/// counts (the first), and how many it had.
#[derive(Debug, Clone)]
struct Intent {
    status: PayoutStatus,
    counting: Announced,
    announcements: usize,
}

/// The lines written with one `payout_id` that count (accepted, not redelivered).
#[derive(Debug, Clone, Default)]
struct Lines {
    /// currency → (lines, Σ net_minor).
    per_currency: BTreeMap<String, (i64, i64)>,
    last_settled_at: Option<Micros>,
}

impl Lines {
    fn count(&self) -> i64 {
        self.per_currency.values().map(|(count, _)| count).sum()
    }
}

/// Every payout line and announcement of a stream being generated.
pub(super) struct Ledger {
    /// [`Plan::payout_every_line`].
    every_line: usize,
    id_prefix: String,
    lines: BTreeMap<String, Lines>,
    announced: BTreeMap<String, Intent>,
    /// Under `every_line`: the payout each currency's next capture line goes into.
    open: BTreeMap<String, String>,
    /// Under `every_line`: payouts opened so far (their ids' number).
    opened: usize,
}

impl Ledger {
    pub(super) fn new(plan: &Plan) -> Self {
        Ledger {
            every_line: plan.payout_every_line,
            id_prefix: plan.id_prefix.clone(),
            lines: BTreeMap::new(),
            announced: BTreeMap::new(),
            open: BTreeMap::new(),
            opened: 0,
        }
    }

    /// Under [`Plan::payout_every_line`], the payout a capture line in `currency` that
    /// is in no payout yet goes into; `None` when the option is off. A payout takes
    /// the lines of one currency only, so each announcement can balance. It uses no
    /// draw, so the stream is the same with and without the option.
    pub(super) fn every_line_payout(&mut self, currency: &str) -> Option<String> {
        if self.every_line == 0 {
            return None;
        }
        let opened = &mut self.opened;
        let prefix = &self.id_prefix;
        let id = self.open.entry(currency.to_owned()).or_insert_with(|| {
            *opened += 1;
            format!("{prefix}payout-every-{:08}", *opened - 1)
        });
        Some(id.clone())
    }

    /// A line of `payout_id` just written as the last settlements record: it counts.
    /// Under `every_line`, the K-th line of a payout closes it, announced right after.
    pub(super) fn line(
        &mut self,
        streams: &mut Streams,
        payout_id: &str,
        currency: &str,
        net: i64,
        settled_at: Micros,
    ) {
        let lines = self.lines.entry(payout_id.to_owned()).or_default();
        let (count, sum) = lines.per_currency.entry(currency.to_owned()).or_default();
        *count += 1;
        *sum += net;
        lines.last_settled_at = lines.last_settled_at.max(Some(settled_at));
        let full = lines.count() >= self.every_line as i64;
        if self.every_line > 0
            && full
            && self.open.get(currency).map(String::as_str) == Some(payout_id)
        {
            self.open.remove(currency);
            self.announce_balanced(streams, payout_id, currency);
        }
    }

    /// Announces every payout `every_line` still has open (fewer than K lines: the
    /// stream's last ones of their currency).
    pub(super) fn close(&mut self, streams: &mut Streams) {
        for (currency, payout_id) in std::mem::take(&mut self.open) {
            self.announce_balanced(streams, &payout_id, &currency);
        }
    }

    /// An `every_line` payout's announcement, after its last line (the one just
    /// written, or the last of the stream): its lines' sum and count, paid when the
    /// last was settled.
    fn announce_balanced(&mut self, streams: &mut Streams, payout_id: &str, currency: &str) {
        let Some(lines) = self.lines.get(payout_id) else {
            return;
        };
        let (count, net) = lines
            .per_currency
            .get(currency)
            .copied()
            .unwrap_or_default();
        let announced = Announced {
            event_id: format!("{payout_id}-a"),
            currency: currency.to_owned(),
            net,
            line_count: Some(count),
            paid_at: lines.last_settled_at.unwrap_or_default(),
        };
        let anchor = Anchor::After(streams.lines().saturating_sub(1));
        self.announce(
            streams,
            payout_id,
            anchor,
            vec![announced],
            PayoutStatus::Balanced,
        );
    }

    /// Writes `announcements` of `payout_id` (the first is the one that counts),
    /// placed against `anchor`, and the status the payout was made to end in.
    fn announce(
        &mut self,
        streams: &mut Streams,
        payout_id: &str,
        anchor: Anchor,
        announcements: Vec<Announced>,
        status: PayoutStatus,
    ) {
        let records = announcements
            .iter()
            .map(|a| Record {
                topic: Topic::Payouts,
                key: Some(payout_id.as_bytes().to_vec()),
                value: Some(announcement_json(
                    &a.event_id,
                    payout_id,
                    &a.currency,
                    a.net,
                    a.line_count,
                    a.paid_at,
                )),
            })
            .collect();
        streams.payouts.push(Placed { anchor, records });
        let count = announcements.len();
        if let Some(counting) = announcements.into_iter().next() {
            let intent = Intent {
                status,
                counting,
                announcements: count,
            };
            self.announced.insert(payout_id.to_owned(), intent);
        }
    }

    /// Every payout's final state: as made (status, announcement) and as written
    /// (its lines). A payout no scenario announced is `unannounced`.
    pub(super) fn truth(&self) -> BTreeMap<String, PayoutTruth> {
        let empty = Lines::default();
        let ids = self.lines.keys().chain(self.announced.keys());
        let mut payouts = BTreeMap::new();
        for payout_id in ids {
            if payouts.contains_key(payout_id) {
                continue;
            }
            let lines = self.lines.get(payout_id).unwrap_or(&empty);
            let line_count = lines.count();
            let truth = match self.announced.get(payout_id) {
                Some(intent) => {
                    let a = &intent.counting;
                    let (in_currency, net) = lines
                        .per_currency
                        .get(&a.currency)
                        .copied()
                        .unwrap_or_default();
                    PayoutTruth {
                        status: intent.status,
                        discrepancy: intent.status.discrepancy(),
                        currency: Some(a.currency.clone()),
                        expected_net_minor: Some(a.net),
                        lines_net_minor: Some(net),
                        expected_line_count: a.line_count,
                        line_count,
                        other_currency_lines: line_count - in_currency,
                        paid_at: Some(a.paid_at),
                        announcement_event_id: Some(a.event_id.clone()),
                        announcements: intent.announcements,
                        last_settled_at: lines.last_settled_at,
                    }
                }
                None => {
                    let single = match lines.per_currency.iter().collect::<Vec<_>>()[..] {
                        [(currency, (_, net))] => Some((currency.clone(), *net)),
                        _ => None,
                    };
                    let status = PayoutStatus::Unannounced;
                    PayoutTruth {
                        status,
                        discrepancy: status.discrepancy(),
                        currency: single.as_ref().map(|(c, _)| c.clone()),
                        expected_net_minor: None,
                        lines_net_minor: single.map(|(_, net)| net),
                        expected_line_count: None,
                        line_count,
                        other_currency_lines: 0,
                        paid_at: None,
                        announcement_event_id: None,
                        announcements: 0,
                        last_settled_at: lines.last_settled_at,
                    }
                }
            };
            payouts.insert(payout_id.clone(), truth);
        }
        payouts
    }
}

/// One payout scenario, number `i`: its payments and capture lines (each payment an
/// id of its own, `{prefix}pay-{i}-{j}`), and its announcements.
///
/// Dated like the other scenarios' recent payments: occurred within the hour before
/// `now` ([`Plan::event_now`]), settled within the hour after, paid out within the
/// hour after the last line. While the stream is read, the global watermark is about
/// `now`; once the inputs go idle it follows the wall clock, `base_time` and later.
/// So with a grace between about 2h and `base_time − now` (61h with D = 72h, the
/// default 24h among them), every announced payout falls due once the stream has been
/// read, and none while it is.
#[allow(clippy::too_many_arguments)]
pub(super) fn generate_payout(
    plan: &Plan,
    rng: &mut StdRng,
    i: usize,
    scenario: Scenario,
    streams: &mut Streams,
    truth: &mut GroundTruth,
    ledger: &mut Ledger,
) {
    let payout_id = format!("{}payout-{i:08}", plan.id_prefix);
    let event = |tag: &str| format!("{}evt-{i:08}-{tag}", plan.id_prefix);
    let n = rng.random_range(LINES);
    let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
    let other_currency = CURRENCIES
        .iter()
        .find(|c| **c != currency)
        .copied()
        .unwrap_or("CHF");
    // The currency scenario's line in another currency: its payment is in that
    // currency too, so the line itself matches.
    let foreign = (scenario == Scenario::PayoutCurrency).then(|| rng.random_range(0..n));
    let now = plan.event_now();
    let first_line = streams.lines();
    // Σ net of the lines in the payout's currency, and of the foreign one.
    let (mut net, mut foreign_net) = (0i64, 0i64);
    let mut last_settled = Micros::MIN;
    for j in 0..n {
        let line_currency = if foreign == Some(j) {
            other_currency
        } else {
            currency
        };
        let amount: i64 = rng.random_range(100..500_000);
        let mut w = Writer {
            ids: Ids {
                payment_id: format!("{}pay-{i:08}-{j:02}", plan.id_prefix),
                prefix: format!("{}evt-{i:08}-{j:02}", plan.id_prefix),
            },
            currency: line_currency,
            amount,
            fee: amount / 50,
            occurred: now - rng.random_range(0..HOUR),
            streams: &mut *streams,
            truth: &mut *truth,
            ledger: &mut *ledger,
        };
        let (line_net, settled) = w.capture_in_payout(rng, &payout_id);
        if foreign == Some(j) {
            foreign_net += line_net;
        } else {
            net += line_net;
        }
        last_settled = last_settled.max(settled);
    }
    let last_line = streams.lines() - 1;
    let paid_at = last_settled + rng.random_range(MINUTE..HOUR);
    let count = n as i64;
    let announced = |tag: &str, net: i64, line_count: Option<i64>| Announced {
        event_id: event(tag),
        currency: currency.to_owned(),
        net,
        line_count,
        paid_at,
    };
    let after = Anchor::After(last_line);
    let (anchor, announcements, status) = match scenario {
        Scenario::PayoutBalanced => (
            after,
            vec![announced("a", net, given(rng, count))],
            PayoutStatus::Balanced,
        ),
        Scenario::PayoutAnnouncedFirst => (
            Anchor::Before(first_line),
            vec![announced("a", net, given(rng, count))],
            PayoutStatus::Balanced,
        ),
        Scenario::PayoutShort => {
            // A line the PSP paid out and never reported: in the announcement's sum
            // and count, in no stream.
            let missing = rng.random_range(100..500_000);
            let missing_net = missing - missing / 50;
            let a = announced("a", net + missing_net, given(rng, count + 1));
            (after, vec![a], PayoutStatus::TotalMismatch)
        }
        Scenario::PayoutCurrency => {
            // Half of them also have the total wrong (the foreign line's amount added
            // as if it were in the payout's currency): the currency wins either way.
            let total = if rng.random_bool(0.5) {
                net + foreign_net
            } else {
                net
            };
            let a = announced("a", total, given(rng, count));
            (after, vec![a], PayoutStatus::CurrencyMismatch)
        }
        Scenario::PayoutCount => {
            // The right sum, one line too many or too few counted.
            let wrong = if rng.random_bool(0.5) {
                count + 1
            } else {
                count - 1
            };
            let a = announced("a", net, Some(wrong));
            (after, vec![a], PayoutStatus::TotalMismatch)
        }
        Scenario::PayoutReannounced => {
            // One right and one wrong (by up to 1% of the total, at least 1), in
            // either order: the first decides.
            let off = rng.random_range(1..=(net.abs() / 100).max(1));
            let line_count = given(rng, count);
            let right = |tag: &str| announced(tag, net, line_count);
            let wrong = |tag: &str| announced(tag, net + off, line_count);
            if rng.random_bool(0.5) {
                (
                    after,
                    vec![right("a1"), wrong("a2")],
                    PayoutStatus::Balanced,
                )
            } else {
                (
                    after,
                    vec![wrong("a1"), right("a2")],
                    PayoutStatus::TotalMismatch,
                )
            }
        }
        // The lines alone: the ledger makes it unannounced.
        _ => return,
    };
    ledger.announce(streams, &payout_id, anchor, announcements, status);
}

/// `line_count` is optional in an announcement: half of them give it.
fn given(rng: &mut StdRng, count: i64) -> Option<i64> {
    rng.random_bool(0.5).then_some(count)
}
