//! The scenario mix: which scenarios a stream is made of, by weight, and the `--mix`
//! names and presets that set it.

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
    /// Contract §6 from here on: a captured payment (payment and capture line,
    /// matched) with a refund request and its refund line, matched.
    pub refund_matched: u32,
    /// The refund line settled more than D after `requested_at`.
    pub refund_late: u32,
    pub refund_currency_mismatch: u32,
    pub refund_amount_mismatch: u32,
    pub refund_fee_mismatch: u32,
    /// A stale refund request and no line (no capture either).
    pub refund_missing: u32,
    /// A stale refund line and no request (no capture either).
    pub refund_orphan: u32,
    /// A matched refund, then a second request with its `refund_id` (`duplicate_refund`).
    pub duplicate_refund: u32,
    /// A matched refund, then a second line with its `refund_id` (`duplicate_settlement`).
    pub duplicate_refund_line: u32,
    /// A captured payment and a chargeback line for its whole amount (`chargeback_open`).
    pub chargeback_open: u32,
    /// A captured payment, a chargeback and its reversal (both `chargeback_reversed`).
    pub chargeback_reversed: u32,
    /// A stale reversal and no chargeback (`orphan_settlement`).
    pub orphan_reversal: u32,
    /// A captured payment refunded and charged back: paid back twice (`over_refunded`, open).
    pub over_refunded: u32,
    /// The same, then the chargeback reversed: the position is back at zero
    /// (`over_refunded` resolved `recovered`).
    pub over_refunded_recovered: u32,
    /// Contract §7 from here on, each a payout of 3 to 50 capture lines of fresh
    /// payments (matched, on every partition), all with its `payout_id`. Announced
    /// after its lines, and balanced.
    pub payout_balanced: u32,
    /// The announcement counts one line more than the stream has (`total_mismatch`).
    pub payout_short: u32,
    /// One line (and its payment) in another currency (`currency_mismatch`).
    pub payout_currency: u32,
    /// The right sum, a wrong `line_count` (`total_mismatch`).
    pub payout_count: u32,
    /// Lines with a `payout_id` that is never announced (`unannounced`).
    pub payout_unannounced: u32,
    /// Balanced, but announced before its first line.
    pub payout_announced_first: u32,
    /// Announced twice with different event ids, one right and one wrong: the first
    /// counts (`balanced` or `total_mismatch`).
    pub payout_reannounced: u32,
    /// One bad message every this many scenarios (0: none).
    pub poison_every: usize,
}

impl Default for Mix {
    /// The version-1 stream (95 parts) plus the refund and chargeback scenarios at one
    /// or two parts each (16 parts: about one scenario in seven). No payouts: a stream
    /// for the two topics of contract §1.
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
            refund_matched: 3,
            refund_late: 1,
            refund_currency_mismatch: 1,
            refund_amount_mismatch: 1,
            refund_fee_mismatch: 1,
            refund_missing: 1,
            refund_orphan: 1,
            duplicate_refund: 1,
            duplicate_refund_line: 1,
            chargeback_open: 1,
            chargeback_reversed: 1,
            orphan_reversal: 1,
            over_refunded: 1,
            over_refunded_recovered: 1,
            payout_balanced: 0,
            payout_short: 0,
            payout_currency: 0,
            payout_count: 0,
            payout_unannounced: 0,
            payout_announced_first: 0,
            payout_reannounced: 0,
            poison_every: 50,
        }
    }
}

impl Mix {
    /// Every scenario of the two input topics (contract §1–§6) at `weight`, no bad
    /// messages and no payouts.
    pub fn uniform(weight: u32) -> Self {
        let mut mix = Mix {
            poison_every: 0,
            ..Mix::default()
        };
        for (name, scenario) in SCENARIOS {
            if let (false, Some(slot)) = (scenario.is_payout(), mix.weight_mut(name)) {
                *slot = weight;
            }
        }
        mix
    }

    /// Only the refund and chargeback scenarios (contract §6), each at `weight`, no
    /// bad messages.
    pub fn version_2_only(weight: u32) -> Self {
        let mut mix = Mix::uniform(0);
        for (name, scenario) in SCENARIOS {
            if let (true, Some(slot)) = (scenario.is_version_2(), mix.weight_mut(name)) {
                *slot = weight;
            }
        }
        mix
    }

    /// Only the payout scenarios (contract §7), each at `weight`, no bad messages.
    pub fn payouts_only(weight: u32) -> Self {
        Mix::uniform(0).with_payouts(weight)
    }

    /// This mix with every payout scenario (contract §7) at `weight`: the `payouts`
    /// preset of `--mix` at 1.
    pub fn with_payouts(mut self, weight: u32) -> Self {
        for (name, scenario) in SCENARIOS {
            if let (true, Some(slot)) = (scenario.is_payout(), self.weight_mut(name)) {
                *slot = weight;
            }
        }
        self
    }

    /// The default mix without the refund and chargeback scenarios (contract §6): the
    /// version-1 stream, bad messages included.
    pub fn version_1_only() -> Self {
        let mut mix = Mix::default();
        for (name, scenario) in SCENARIOS {
            if let (true, Some(slot)) = (scenario.is_version_2(), mix.weight_mut(name)) {
                *slot = 0;
            }
        }
        mix
    }

    /// The weight of the scenario named `name` (its `--mix` name).
    pub fn weight_mut(&mut self, name: &str) -> Option<&mut u32> {
        Some(match name {
            "matched" => &mut self.matched,
            "late" => &mut self.matched_late,
            "currency" => &mut self.currency_mismatch,
            "amount" => &mut self.amount_mismatch,
            "fee" => &mut self.fee_mismatch,
            "dup_payment" => &mut self.duplicate_payment,
            "dup_settlement" => &mut self.duplicate_settlement,
            "missing" => &mut self.missing_settlement,
            "orphan" => &mut self.orphan_settlement,
            "pending" => &mut self.pending,
            "redelivery" => &mut self.redelivery,
            "refund" => &mut self.refund_matched,
            "refund_late" => &mut self.refund_late,
            "refund_currency" => &mut self.refund_currency_mismatch,
            "refund_amount" => &mut self.refund_amount_mismatch,
            "refund_fee" => &mut self.refund_fee_mismatch,
            "refund_missing" => &mut self.refund_missing,
            "refund_orphan" => &mut self.refund_orphan,
            "dup_refund" => &mut self.duplicate_refund,
            "dup_refund_line" => &mut self.duplicate_refund_line,
            "chargeback" => &mut self.chargeback_open,
            "chargeback_reversed" => &mut self.chargeback_reversed,
            "orphan_reversal" => &mut self.orphan_reversal,
            "over_refunded" => &mut self.over_refunded,
            "over_refunded_recovered" => &mut self.over_refunded_recovered,
            "payout_balanced" => &mut self.payout_balanced,
            "payout_short" => &mut self.payout_short,
            "payout_currency" => &mut self.payout_currency,
            "payout_count" => &mut self.payout_count,
            "payout_unannounced" => &mut self.payout_unannounced,
            "payout_announced_first" => &mut self.payout_announced_first,
            "payout_reannounced" => &mut self.payout_reannounced,
            _ => return None,
        })
    }

    pub(super) fn weight(&self, name: &str) -> u32 {
        self.clone().weight_mut(name).map_or(0, |w| *w)
    }
}

/// Parses `name=weight,…` over the defaults. Names: matched, late, currency, amount,
/// fee, dup_payment, dup_settlement, missing, orphan, pending, redelivery; and for
/// contract §6 refund, refund_late, refund_currency, refund_amount, refund_fee,
/// refund_missing, refund_orphan, dup_refund, dup_refund_line, chargeback,
/// chargeback_reversed, orphan_reversal, over_refunded, over_refunded_recovered; and
/// for contract §7 payout_balanced, payout_short, payout_currency, payout_count,
/// payout_unannounced, payout_announced_first, payout_reannounced.
///
/// Presets, applied where they stand (later entries override them): `v1`, the
/// version-1 stream (every refund, chargeback and payout scenario off); `payouts`,
/// every payout scenario at weight 1 over what came before (alone: the default mix
/// plus payouts, one scenario in about seventeen a payout; with 3 to 50 payments
/// each, payouts then hold about three payments in five).
pub fn parse_mix(text: &str) -> Result<Mix, String> {
    let mut mix = Mix::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // `v1`: the version-1 stream, every refund and chargeback scenario off (the
        // entries after it may turn some on again).
        if part == "v1" {
            mix = Mix::version_1_only();
            continue;
        }
        if part == "payouts" {
            mix = mix.with_payouts(1);
            continue;
        }
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("mix entry {part:?}: expected name=weight"))?;
        let weight: u32 = value
            .parse()
            .map_err(|_| format!("mix entry {part:?}: weight must be a whole number"))?;
        let slot = mix
            .weight_mut(name)
            .ok_or_else(|| format!("unknown mix entry {name:?}"))?;
        *slot = weight;
    }
    Ok(mix)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Scenario {
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
    RefundMatched,
    RefundLate,
    RefundCurrencyMismatch,
    RefundAmountMismatch,
    RefundFeeMismatch,
    RefundMissing,
    RefundOrphan,
    DuplicateRefund,
    DuplicateRefundLine,
    ChargebackOpen,
    ChargebackReversed,
    OrphanReversal,
    OverRefunded,
    OverRefundedRecovered,
    PayoutBalanced,
    PayoutShort,
    PayoutCurrency,
    PayoutCount,
    PayoutUnannounced,
    PayoutAnnouncedFirst,
    PayoutReannounced,
}

impl Scenario {
    /// A refund or chargeback scenario (contract §6).
    pub(super) fn is_version_2(self) -> bool {
        !self.is_payout()
            && !matches!(
                self,
                Scenario::Matched
                    | Scenario::MatchedLate
                    | Scenario::CurrencyMismatch
                    | Scenario::AmountMismatch
                    | Scenario::FeeMismatch
                    | Scenario::DuplicatePayment
                    | Scenario::DuplicateSettlement
                    | Scenario::Missing
                    | Scenario::Orphan
                    | Scenario::Pending
                    | Scenario::Redelivery
            )
    }

    /// A payout scenario (contract §7): the only ones writing to the payouts topic.
    pub(super) fn is_payout(self) -> bool {
        matches!(
            self,
            Scenario::PayoutBalanced
                | Scenario::PayoutShort
                | Scenario::PayoutCurrency
                | Scenario::PayoutCount
                | Scenario::PayoutUnannounced
                | Scenario::PayoutAnnouncedFirst
                | Scenario::PayoutReannounced
        )
    }
}

/// Every scenario by its `--mix` name, in the order weights are drawn from (the
/// version-1 ones first, as they always were; new ones are only ever added at the end,
/// so a mix without them draws what it always drew from a seed).
pub(super) const SCENARIOS: [(&str, Scenario); 32] = [
    ("matched", Scenario::Matched),
    ("late", Scenario::MatchedLate),
    ("currency", Scenario::CurrencyMismatch),
    ("amount", Scenario::AmountMismatch),
    ("fee", Scenario::FeeMismatch),
    ("dup_payment", Scenario::DuplicatePayment),
    ("dup_settlement", Scenario::DuplicateSettlement),
    ("missing", Scenario::Missing),
    ("orphan", Scenario::Orphan),
    ("pending", Scenario::Pending),
    ("redelivery", Scenario::Redelivery),
    ("refund", Scenario::RefundMatched),
    ("refund_late", Scenario::RefundLate),
    ("refund_currency", Scenario::RefundCurrencyMismatch),
    ("refund_amount", Scenario::RefundAmountMismatch),
    ("refund_fee", Scenario::RefundFeeMismatch),
    ("refund_missing", Scenario::RefundMissing),
    ("refund_orphan", Scenario::RefundOrphan),
    ("dup_refund", Scenario::DuplicateRefund),
    ("dup_refund_line", Scenario::DuplicateRefundLine),
    ("chargeback", Scenario::ChargebackOpen),
    ("chargeback_reversed", Scenario::ChargebackReversed),
    ("orphan_reversal", Scenario::OrphanReversal),
    ("over_refunded", Scenario::OverRefunded),
    ("over_refunded_recovered", Scenario::OverRefundedRecovered),
    ("payout_balanced", Scenario::PayoutBalanced),
    ("payout_short", Scenario::PayoutShort),
    ("payout_currency", Scenario::PayoutCurrency),
    ("payout_count", Scenario::PayoutCount),
    ("payout_unannounced", Scenario::PayoutUnannounced),
    ("payout_announced_first", Scenario::PayoutAnnouncedFirst),
    ("payout_reannounced", Scenario::PayoutReannounced),
];

/// The `--mix` names of every scenario.
pub fn scenario_names() -> impl Iterator<Item = &'static str> {
    SCENARIOS.into_iter().map(|(name, _)| name)
}

/// The `--mix` names of the refund and chargeback scenarios (contract §6).
pub fn version_2_scenario_names() -> impl Iterator<Item = &'static str> {
    SCENARIOS
        .into_iter()
        .filter(|(_, s)| s.is_version_2())
        .map(|(name, _)| name)
}

/// The `--mix` names of the payout scenarios (contract §7).
pub fn payout_scenario_names() -> impl Iterator<Item = &'static str> {
    SCENARIOS
        .into_iter()
        .filter(|(_, s)| s.is_payout())
        .map(|(name, _)| name)
}
