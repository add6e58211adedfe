//! Writing one scenario: its ids, its records on either topic and its truth; the
//! version-1 scenarios (contract §1–§2) here, the refund and chargeback ones in
//! `refunds`, the payout ones in `payouts`. Every settlement line goes through
//! [`Writer::line_in_payout`], which tells the payout ledger about the lines that
//! carry a `payout_id`, so no scenario can write a payout line the truth misses.

use rand::rngs::StdRng;
use rand::Rng;

use recon_worker::engine::{DiscrepancyKind, Outcome, REVERSED};
use recon_worker::event::{EventKind, Input, Line, Micros};

use super::interleave::Placed;
use super::messages::{line_json, payment_json, refund_json, settlement_json};
use super::mix::Scenario;
use super::payouts::Ledger;
use super::refunds::version_2;
use super::{GroundTruth, Plan, Record, HOUR, MINUTE};

pub(super) const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];

/// The records of a stream being generated, per topic, before they are put in
/// produced order.
#[derive(Default)]
pub(super) struct Streams {
    /// Payments and settlements, by [`Input::index`].
    pub(super) inputs: [Vec<Record>; 2],
    /// Payout announcements, each payout's with the line they go next to.
    pub(super) payouts: Vec<Placed>,
}

impl Streams {
    /// How many settlement lines (bad ones included) are written so far: the next
    /// line's index.
    pub(super) fn lines(&self) -> usize {
        self.inputs[Input::Settlements.index()].len()
    }
}

pub(super) struct Ids {
    pub(super) payment_id: String,
    pub(super) prefix: String,
}

impl Ids {
    pub(super) fn event(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }
}

/// One scenario being written: its ids, its common draws, and where its records and
/// truth go.
pub(super) struct Writer<'a> {
    pub(super) ids: Ids,
    pub(super) currency: &'static str,
    pub(super) amount: i64,
    pub(super) fee: i64,
    pub(super) occurred: Micros,
    pub(super) streams: &'a mut Streams,
    pub(super) truth: &'a mut GroundTruth,
    pub(super) ledger: &'a mut Ledger,
}

impl Writer<'_> {
    pub(super) fn push(&mut self, input: Input, value: Vec<u8>) {
        self.streams.inputs[input.index()].push(Record {
            topic: input.into(),
            key: Some(self.ids.payment_id.clone().into_bytes()),
            value: Some(value),
        });
    }

    /// The last record of `input` sent again, byte for byte, as an at-least-once
    /// producer resends it: a redelivery (it counts nowhere, payouts included).
    pub(super) fn again(&mut self, input: Input) {
        let stream = &mut self.streams.inputs[input.index()];
        if let Some(last) = stream.last().cloned() {
            stream.push(last);
        }
    }

    pub(super) fn payment(&mut self, event_id: &str, at: Micros, amount: i64) {
        let value = payment_json(event_id, &self.ids.payment_id, amount, self.currency, at);
        self.push(Input::Payments, value);
    }

    /// A version-1 settlement line (a capture without `line_type`; with a
    /// `payout_id` only under [`super::Plan::payout_every_line`]).
    pub(super) fn settlement(
        &mut self,
        event_id: &str,
        at: Micros,
        gross: i64,
        fee: i64,
        net: i64,
        currency: &str,
    ) {
        let payout_id = self.ledger.every_line_payout(currency);
        let value = settlement_json(
            event_id,
            &self.ids.payment_id,
            gross,
            fee,
            net,
            currency,
            at,
            payout_id.as_deref(),
        );
        self.push(Input::Settlements, value);
        if let Some(payout_id) = payout_id {
            self.ledger
                .line(self.streams, &payout_id, currency, net, at);
        }
    }

    pub(super) fn refund(&mut self, event_id: &str, refund_id: &str, at: Micros, amount: i64) {
        let value = refund_json(
            event_id,
            refund_id,
            &self.ids.payment_id,
            amount,
            self.currency,
            at,
        );
        self.push(Input::Payments, value);
    }

    /// The reversal `cr` of the chargeback `cb` (for `amount`, its fee given back):
    /// both lines `chargeback_reversed`, each the other's counterpart, and the
    /// chargeback's discrepancy resolved `reversed`.
    pub(super) fn reversal(
        &mut self,
        cb: &str,
        cr: &str,
        reversal: &Line,
        reversed_at: Micros,
        amount: i64,
        currency: &str,
    ) {
        let reversed = Outcome::ChargebackReversed;
        self.line(
            cr,
            reversal,
            reversed_at,
            Amounts::of(amount, -CHARGEBACK_FEE),
            currency,
        );
        self.expect(EventKind::Settlement, cb, reversed, Some(cr));
        self.expect(EventKind::Settlement, cr, reversed, Some(cb));
        self.discrepancy(DiscrepancyKind::Chargeback, None, Some(cb), Some(REVERSED));
    }

    /// A version-2 settlement line (`line_type` always written, also `capture`). A
    /// refund line is in a payout of its scenario's own that is never announced (as
    /// since contract §6: an `unannounced` payout in the truth); a capture line is in
    /// a payout only under [`super::Plan::payout_every_line`].
    pub(super) fn line(
        &mut self,
        event_id: &str,
        line: &Line,
        at: Micros,
        amounts: Amounts,
        currency: &str,
    ) {
        let payout_id = match line {
            Line::Refund { .. } => Some(format!("{}-payout", self.ids.prefix)),
            Line::Capture => self.ledger.every_line_payout(currency),
            _ => None,
        };
        self.line_in_payout(event_id, line, at, amounts, currency, payout_id.as_deref());
    }

    /// A version-2 settlement line in the payout `payout_id`, if any: the ledger
    /// counts it there (every line written this way is accepted: none is a
    /// redelivery, see [`Writer::again`]).
    pub(super) fn line_in_payout(
        &mut self,
        event_id: &str,
        line: &Line,
        at: Micros,
        amounts: Amounts,
        currency: &str,
        payout_id: Option<&str>,
    ) {
        let value = line_json(
            event_id,
            &self.ids.payment_id,
            line,
            amounts,
            currency,
            at,
            payout_id,
        );
        self.push(Input::Settlements, value);
        if let Some(payout_id) = payout_id {
            self.ledger
                .line(self.streams, payout_id, currency, amounts.net, at);
        }
    }

    pub(super) fn expect(
        &mut self,
        kind: EventKind,
        event_id: &str,
        outcome: Outcome,
        counterpart: Option<&str>,
    ) {
        self.truth.outcomes.insert(
            (kind, event_id.to_owned()),
            (
                self.ids.payment_id.clone(),
                outcome,
                counterpart.map(str::to_owned),
            ),
        );
    }

    /// A discrepancy about `payment_event` (a payment or refund request) and/or
    /// `settlement_event`; `resolution` `None` while it must stay open.
    pub(super) fn discrepancy(
        &mut self,
        kind: DiscrepancyKind,
        payment_event: Option<&str>,
        settlement_event: Option<&str>,
        resolution: Option<&str>,
    ) {
        self.truth.discrepancies.insert(
            (
                kind,
                payment_event.map(str::to_owned),
                settlement_event.map(str::to_owned),
            ),
            (self.ids.payment_id.clone(), resolution.map(str::to_owned)),
        );
    }

    /// The discrepancy an outcome opens (a mismatch, a duplicate, a deadline), open.
    pub(super) fn opened(
        &mut self,
        outcome: Outcome,
        payment_event: Option<&str>,
        settlement_event: Option<&str>,
    ) {
        self.discrepancy(
            DiscrepancyKind::Outcome(outcome),
            payment_event,
            settlement_event,
            None,
        );
    }

    /// Payment `p` and its version-1 line `s`, both `outcome`.
    pub(super) fn pair(
        &mut self,
        outcome: Outcome,
        settled: Micros,
        gross: i64,
        net: i64,
        currency: &str,
    ) {
        let (p, s) = (self.ids.event("p"), self.ids.event("s"));
        self.payment(&p, self.occurred, self.amount);
        self.settlement(&s, settled, gross, self.fee, net, currency);
        self.expect(EventKind::Payment, &p, outcome, Some(&s));
        self.expect(EventKind::Settlement, &s, outcome, Some(&p));
        if outcome.is_discrepancy() {
            self.opened(outcome, Some(&p), Some(&s));
        }
    }

    /// Payment `p` and its capture line `s` (version 2: `line_type` written), matched:
    /// what a refund or a chargeback is about. Settled within an hour.
    pub(super) fn capture(&mut self, rng: &mut StdRng) {
        let (p, s) = (self.ids.event("p"), self.ids.event("s"));
        let settled = self.occurred + rng.random_range(MINUTE..HOUR);
        self.payment(&p, self.occurred, self.amount);
        let amounts = Amounts::of(self.amount, self.fee);
        self.line(&s, &Line::Capture, settled, amounts, self.currency);
        self.expect(EventKind::Payment, &p, Outcome::Matched, Some(&s));
        self.expect(EventKind::Settlement, &s, Outcome::Matched, Some(&p));
    }

    /// [`Writer::capture`] with its line in the payout `payout_id`: the line's net
    /// and `settled_at`.
    pub(super) fn capture_in_payout(&mut self, rng: &mut StdRng, payout_id: &str) -> (i64, Micros) {
        let (p, s) = (self.ids.event("p"), self.ids.event("s"));
        let settled = self.occurred + rng.random_range(MINUTE..HOUR);
        self.payment(&p, self.occurred, self.amount);
        let amounts = Amounts::of(self.amount, self.fee);
        let currency = self.currency;
        self.line_in_payout(
            &s,
            &Line::Capture,
            settled,
            amounts,
            currency,
            Some(payout_id),
        );
        self.expect(EventKind::Payment, &p, Outcome::Matched, Some(&s));
        self.expect(EventKind::Settlement, &s, Outcome::Matched, Some(&p));
        (amounts.net, settled)
    }

    /// Refund request `r` of `amount` and its refund line `l` (gross, fee and net as
    /// given), both `outcome`; opens the outcome's discrepancy when it is one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refund_pair(
        &mut self,
        outcome: Outcome,
        refund_id: &str,
        requested: Micros,
        amount: i64,
        settled: Micros,
        line_amounts: Amounts,
        line_currency: &str,
    ) -> (String, String) {
        let (r, l) = (self.ids.event("r"), self.ids.event("l"));
        self.refund(&r, refund_id, requested, amount);
        let line = Line::Refund {
            refund_id: refund_id.to_owned(),
        };
        self.line(&l, &line, settled, line_amounts, line_currency);
        self.expect(EventKind::Refund, &r, outcome, Some(&l));
        self.expect(EventKind::Settlement, &l, outcome, Some(&r));
        if outcome.is_discrepancy() {
            self.opened(outcome, Some(&r), Some(&l));
        }
        (r, l)
    }
}

/// gross, fee and net of a settlement line.
/// A chargeback costs a fixed fee; a won dispute gives it back.
pub(super) const CHARGEBACK_FEE: i64 = 1_500;

#[derive(Debug, Clone, Copy)]
pub(super) struct Amounts {
    pub(super) gross: i64,
    pub(super) fee: i64,
    pub(super) net: i64,
}

impl Amounts {
    /// gross − fee = net (contract rule 3).
    pub(super) fn of(gross: i64, fee: i64) -> Self {
        Amounts {
            gross,
            fee,
            net: gross - fee,
        }
    }
}

pub(super) fn generate_scenario(
    plan: &Plan,
    rng: &mut StdRng,
    i: usize,
    scenario: Scenario,
    streams: &mut Streams,
    truth: &mut GroundTruth,
    ledger: &mut Ledger,
) {
    let ids = Ids {
        payment_id: format!("{}pay-{i:08}", plan.id_prefix),
        prefix: format!("{}evt-{i:08}", plan.id_prefix),
    };
    let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
    let other_currency = CURRENCIES
        .iter()
        .find(|c| **c != currency)
        .copied()
        .unwrap_or("CHF");
    let amount: i64 = rng.random_range(100..500_000);
    let fee = amount / 50;
    let now = plan.event_now();
    let occurred = now - rng.random_range(0..HOUR);
    let on_time = occurred + rng.random_range(MINUTE..plan.deadline.max(2 * MINUTE));
    let stale = now - plan.deadline.max(plan.orphan_timeout) - 24 * HOUR;
    let mut w = Writer {
        ids,
        currency,
        amount,
        fee,
        occurred,
        streams,
        truth,
        ledger,
    };
    let (p, s) = (w.ids.event("p"), w.ids.event("s"));
    match scenario {
        Scenario::Matched => w.pair(Outcome::Matched, on_time, amount, amount - fee, currency),
        Scenario::MatchedLate => w.pair(
            Outcome::MatchedLate,
            occurred + plan.deadline + HOUR,
            amount,
            amount - fee,
            currency,
        ),
        Scenario::CurrencyMismatch => w.pair(
            Outcome::CurrencyMismatch,
            on_time,
            amount,
            amount - fee,
            other_currency,
        ),
        Scenario::AmountMismatch => w.pair(
            Outcome::AmountMismatch,
            on_time,
            amount + 1 + amount / 10,
            amount + 1 + amount / 10 - fee,
            currency,
        ),
        Scenario::FeeMismatch => w.pair(
            Outcome::FeeMismatch,
            on_time,
            amount,
            amount - fee - 1,
            currency,
        ),
        Scenario::DuplicatePayment => {
            w.pair(Outcome::Matched, on_time, amount, amount - fee, currency);
            let dup = w.ids.event("p2");
            w.payment(&dup, occurred + MINUTE, amount);
            w.expect(
                EventKind::Payment,
                &dup,
                Outcome::DuplicatePayment,
                Some(&p),
            );
            w.opened(Outcome::DuplicatePayment, Some(&dup), None);
        }
        Scenario::DuplicateSettlement => {
            w.pair(Outcome::Matched, on_time, amount, amount - fee, currency);
            let dup = w.ids.event("s2");
            w.settlement(&dup, on_time + MINUTE, amount, fee, amount - fee, currency);
            w.expect(
                EventKind::Settlement,
                &dup,
                Outcome::DuplicateSettlement,
                Some(&s),
            );
            w.opened(Outcome::DuplicateSettlement, None, Some(&dup));
        }
        Scenario::Missing => {
            w.payment(&p, stale, amount);
            w.expect(EventKind::Payment, &p, Outcome::MissingSettlement, None);
            w.opened(Outcome::MissingSettlement, Some(&p), None);
        }
        Scenario::Orphan => {
            w.settlement(&s, stale, amount, fee, amount - fee, currency);
            w.expect(EventKind::Settlement, &s, Outcome::OrphanSettlement, None);
            w.opened(Outcome::OrphanSettlement, None, Some(&s));
        }
        Scenario::Pending => {
            // Recent and unanswered: still inside its deadline when the stream ends,
            // whatever the watermark. Dated after the latest settlement minus D (a late
            // one comes D + 1h after a payment at most `now`): once the payments topic
            // is idle, the pair's watermark is the settlements' high mark, and a pending
            // payment dated `now` turned `missing_settlement` whenever the settlements
            // topic was still being read (seen with Apache Kafka: 53 of 2,903 outcomes).
            w.payment(&p, now + HOUR + MINUTE, amount);
            w.expect(EventKind::Payment, &p, Outcome::Pending, None);
        }
        Scenario::Redelivery => {
            w.pair(Outcome::Matched, on_time, amount, amount - fee, currency);
            // The same messages again, as an at-least-once producer would resend them.
            w.again(Input::Payments);
            w.again(Input::Settlements);
        }
        _ => version_2(plan, rng, i, scenario, &mut w, now, stale, other_currency),
    }
}
