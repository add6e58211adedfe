//! The produced order of a stream: the two input topics merged at random within a
//! bound, as independent producers would write them, then the payout announcements
//! (contract §7) put in next to the lines they are about.

use rand::rngs::StdRng;
use rand::Rng;

use super::Record;

/// How far (in scenarios) one topic may run ahead of the other in the produced order.
/// Within it the topics interleave at random, so settlements arrive before and after
/// their payments, in the same batch or batches apart.
pub const MAX_SKEW_SCENARIOS: usize = 500;

/// How hard the interleaving pulls the topics back towards level: at the skew bound,
/// the topic ahead is taken this much less often.
const PULL: f64 = 0.02;

/// Interleaves the two topics at random, but never more than [`MAX_SKEW_SCENARIOS`]
/// apart. A plain coin flip per record drifted without bound: the topics hold
/// different numbers of records per scenario (bad messages go mostly to payments), so
/// at 5M messages settlements ran about 100k records ahead of their payments and the
/// workload changed along the stream (from nearly all matches in memory to nearly all
/// lookups).
///
/// With `track`, also returns where each settlements record went: the `n`-th
/// settlements record is at `out[at[n]]` (empty without it).
pub(super) fn interleave(
    rng: &mut StdRng,
    streams: [Vec<Record>; 2],
    ends: &[Vec<usize>; 2],
    track: bool,
) -> (Vec<Record>, Vec<usize>) {
    let [payments, settlements] = streams;
    let mut out = Vec::with_capacity(payments.len() + settlements.len());
    let mut settlements_at = Vec::with_capacity(if track { settlements.len() } else { 0 });
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
            // In proportion to what is left of each (a uniformly random merge, level
            // on average whatever each scenario puts on either topic: a refund or a
            // chargeback puts more on settlements, a bad message on payments), pulled
            // gently back towards level. A fair coin let the lighter topic run ahead to
            // the bound and stay there, where the other one's records never come first;
            // a plain random merge wanders to one side for most of a stream (the
            // arcsine law) with the same effect.
            [true, true] => {
                let left = |k: usize| ends[k].last().map_or(0, |end| end - taken[k]) as f64;
                let ahead = scenario[0] as f64 - scenario[1] as f64;
                let share =
                    left(0) / (left(0) + left(1)) - PULL * ahead / MAX_SKEW_SCENARIOS as f64;
                rng.random_bool(share.clamp(0.05, 0.95))
            }
        };
        let next = if take_payment { p.next() } else { s.next() };
        taken[usize::from(!take_payment)] += 1;
        if track && !take_payment {
            settlements_at.push(out.len());
        }
        out.extend(next);
    }
    (out, settlements_at)
}

/// Where a payout's announcements go, by the settlements record (its index in the
/// settlements stream as generated) they are placed against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Anchor {
    /// After this line (the payout's last), as a PSP announces a payout it has paid.
    After(usize),
    /// Before this line (the payout's first): announced ahead of its lines.
    Before(usize),
}

/// Announcements of one payout, in the order they are produced, and their anchor.
#[derive(Debug, Clone)]
pub(super) struct Placed {
    pub(super) anchor: Anchor,
    pub(super) records: Vec<Record>,
}

/// At most how many records of the merged stream come between an announcement and
/// its anchor line: producers of different topics are not in lockstep, but a payout
/// file follows its settlement lines closely.
const PLACE_SPREAD: usize = 64;

/// Puts each payout's announcements into the merged two-topic stream next to their
/// anchor, a random few records away from it (on the anchor's side), the records of
/// one payout together and in order (the first announced is the first produced: one
/// key, one partition, so the first read). No payouts: the stream as it is, and no
/// draw.
pub(super) fn place(
    rng: &mut StdRng,
    merged: Vec<Record>,
    settlements_at: &[usize],
    payouts: Vec<Placed>,
) -> Vec<Record> {
    if payouts.is_empty() {
        return merged;
    }
    // (position in `merged` to go before, generation order) for each payout.
    let mut targets: Vec<(usize, usize, Placed)> = payouts
        .into_iter()
        .enumerate()
        .map(|(order, placed)| {
            let spread = rng.random_range(0..=PLACE_SPREAD);
            let target = match placed.anchor {
                Anchor::After(line) => {
                    let at = settlements_at.get(line).copied().unwrap_or(merged.len());
                    (at + 1 + spread).min(merged.len())
                }
                Anchor::Before(line) => {
                    let at = settlements_at.get(line).copied().unwrap_or(merged.len());
                    at.saturating_sub(spread)
                }
            };
            (target, order, placed)
        })
        .collect();
    targets.sort_by_key(|(target, order, _)| (*target, *order));
    let count: usize = targets.iter().map(|(_, _, p)| p.records.len()).sum();
    let mut out = Vec::with_capacity(merged.len() + count);
    let mut targets = targets.into_iter().peekable();
    for (position, record) in merged.into_iter().enumerate() {
        while let Some((_, _, placed)) = targets.next_if(|(target, _, _)| *target <= position) {
            out.extend(placed.records);
        }
        out.push(record);
    }
    for (_, _, placed) in targets {
        out.extend(placed.records);
    }
    out
}
