//! What the window lacks for a batch, loaded from storage before the batch is applied,
//! and the deadline sweeps after it.
//!
//! One lookup brings every key the batch needs that is not in memory and, for pairs
//! replaying after a clash, one probe tells which of their event ids are already
//! stored (redeliveries under any payment id); both run concurrently. Events that
//! would be duplicates of a key (see [`PairEngine::needs_event_id_check`]: the window
//! does not hold duplicates, so a duplicate sent again is only known by its stored
//! event id) are probed too: those of resident keys in the same round trip, those of
//! keys just looked up in a second one, which only batches with such events pay.
//!
//! [`PairEngine::needs_event_id_check`]: crate::engine::PairEngine::needs_event_id_check

use hashbrown::{HashMap, HashSet};

use super::{Pipeline, PipelineError};
use crate::consumer::{Data, ReadMessage};
use crate::engine::StoredEvent;
use crate::event::{Event, Input, Micros};
use crate::retry::{retry, Operation};

/// Most stored items due per turn that the deadline sweeps load, over all pairs.
const SWEEP_KEYS_PER_TURN: usize = 5_000;

/// What a batch needs from storage before it is applied.
#[derive(Default)]
struct LookupPlan<'a> {
    /// Keys not in memory, and the pair of each: looked up in one query.
    pairs: Vec<i32>,
    ids: Vec<String>,
    seen: HashSet<(i32, &'a str)>,
    /// Event ids to check against storage in the same round trip.
    probe: EventIdProbe<'a>,
    /// Events of keys being looked up, to be checked once their keys are loaded.
    after_load: Vec<(i32, &'a Event)>,
}

impl<'a> LookupPlan<'a> {
    fn look_up(&mut self, pair: i32, event: &'a Event) {
        if self.seen.insert((pair, event.payment_id())) {
            self.pairs.push(pair);
            self.ids.push(event.payment_id().to_owned());
        }
    }
}

impl Pipeline {
    /// Loads what the batch needs and the window lacks (see the module doc).
    pub(super) async fn load_misses(&mut self, items: &[Data]) -> Result<(), PipelineError> {
        let plan = self.plan_lookups(items);
        if plan.ids.is_empty() && plan.probe.is_empty() {
            return Ok(());
        }
        let (store, health) = (&self.store, &self.health);
        let (probe_inputs, probe_ids) = (&plan.probe.inputs, &plan.probe.event_ids);
        let (rows, stored) = tokio::try_join!(
            retry(Operation::Lookup, health, || store
                .lookup(&plan.pairs, &plan.ids)),
            retry(Operation::LookupEventIds, health, || store
                .stored_event_ids(probe_inputs, probe_ids)),
        )?;
        let mut stored_by_pair = plan.probe.by_pair(stored);
        let mut rows_by_pair = by_pair(rows);
        let mut keys_by_pair: HashMap<i32, Vec<String>> = HashMap::new();
        for (pair, id) in plan.pairs.into_iter().zip(plan.ids) {
            keys_by_pair.entry(pair).or_default().push(id);
        }
        for (pair, owned) in self.pairs.iter_mut() {
            if let Some(keys) = keys_by_pair.remove(&pair) {
                let rows = rows_by_pair.remove(&pair).unwrap_or_default();
                owned.engine.load(keys, rows);
            }
            if let Some(stored) = stored_by_pair.remove(&pair) {
                owned.engine.load_stored_event_ids(stored);
            }
        }
        self.probe_after_load(plan.after_load).await
    }

    /// Which keys to look up and which event ids to probe for a batch's events.
    fn plan_lookups<'a>(&self, items: &'a [Data]) -> LookupPlan<'a> {
        let mut plan = LookupPlan::default();
        let mut rewound = HashSet::new();
        for item in items {
            let (partition, event) = match item {
                Data::Message(ReadMessage {
                    partition,
                    decoded: Ok(event),
                    ..
                }) => (*partition, event),
                Data::Rewound { pair } => {
                    rewound.insert(*pair);
                    continue;
                }
                _ => continue,
            };
            let Some(owned) = self.pairs.get(partition) else {
                continue;
            };
            if owned.rewinding && !rewound.contains(&partition) {
                continue;
            }
            let resident = owned.engine.is_resident(event.payment_id());
            if owned.probe_until.is_some() {
                plan.probe.add(partition, event);
                if !resident {
                    plan.look_up(partition, event);
                }
            } else if !resident {
                plan.after_load.push((partition, event));
                plan.look_up(partition, event);
            } else if owned.engine.needs_event_id_check(event) {
                plan.probe.add(partition, event);
            }
        }
        plan
    }

    /// The keys just loaded may have a first event that makes some of this batch's
    /// events duplicates (say a payment sent again long after its key was evicted):
    /// their event ids are checked against storage in a second round trip.
    async fn probe_after_load(
        &mut self,
        after_load: Vec<(i32, &Event)>,
    ) -> Result<(), PipelineError> {
        let mut probe = EventIdProbe::default();
        for (partition, event) in after_load {
            if self
                .pairs
                .get(partition)
                .is_some_and(|owned| owned.engine.needs_event_id_check(event))
            {
                probe.add(partition, event);
            }
        }
        if probe.is_empty() {
            return Ok(());
        }
        let store = &self.store;
        let stored = retry(Operation::LookupEventIds, &self.health, || {
            store.stored_event_ids(&probe.inputs, &probe.event_ids)
        })
        .await?;
        for (pair, stored) in probe.by_pair(stored) {
            if let Some(owned) = self.pairs.get_mut(pair) {
                owned.engine.load_stored_event_ids(stored);
            }
        }
        Ok(())
    }

    /// Advances every pair's watermark to `now` and fires the deadlines it passed:
    /// over the keys in memory, and the stored pending items a sweep finds due (their
    /// keys loaded first when not resident).
    pub(super) async fn fire_deadlines(&mut self, now: Micros) -> Result<(), PipelineError> {
        let mut requests = Vec::new();
        for (pair, owned) in self.pairs.iter_mut() {
            match owned.engine.advance(now) {
                Some(request) => requests.push((pair, request)),
                None => owned.engine.fire_deadlines(Vec::new(), Vec::new(), false),
            }
        }
        if requests.is_empty() {
            return Ok(());
        }
        // A turn's sweeps load about as many keys as a batch of 5,000 messages would: a
        // long-idle worker catching up on deadlines must not hold more (5,000 per pair
        // raised a drain's peak memory by 10 MB). The rest is swept next turn.
        let sweep_limit = (SWEEP_KEYS_PER_TURN / self.pairs.len().max(1)).max(100) as i64;
        let (store, health) = (&self.store, &self.health);
        // Every pair's sweep at once, then one lookup of the due keys not in memory.
        let dues = futures_util::future::try_join_all(requests.iter().map(|&(pair, request)| {
            retry(Operation::Sweep, health, move || {
                store.due_keys(pair, request, sweep_limit)
            })
        }))
        .await?;
        let (mut lookup_pairs, mut missing) = (Vec::new(), Vec::new());
        for (&(pair, _), due) in requests.iter().zip(&dues) {
            let Some(owned) = self.pairs.get(pair) else {
                continue;
            };
            for id in due
                .payment_ids
                .iter()
                .filter(|id| !owned.engine.is_resident(id))
            {
                lookup_pairs.push(pair);
                missing.push(id.clone());
            }
        }
        let mut rows_by_pair = HashMap::new();
        if !missing.is_empty() {
            let rows = retry(Operation::SweepLookup, health, || {
                store.lookup(&lookup_pairs, &missing)
            })
            .await?;
            rows_by_pair = by_pair(rows);
        }
        for ((pair, _), due) in requests.into_iter().zip(dues) {
            if let Some(owned) = self.pairs.get_mut(pair) {
                let rows = rows_by_pair.remove(&pair).unwrap_or_default();
                owned
                    .engine
                    .fire_deadlines(due.payment_ids, rows, due.complete);
            }
        }
        Ok(())
    }
}

/// Looked-up rows grouped by the pair they were looked up for.
fn by_pair(rows: Vec<(i32, StoredEvent)>) -> HashMap<i32, Vec<StoredEvent>> {
    let mut by_pair: HashMap<i32, Vec<StoredEvent>> = HashMap::new();
    for (pair, row) in rows {
        by_pair.entry(pair).or_default().push(row);
    }
    by_pair
}

/// Event ids to check against storage, and every pair that carries each: one id can
/// come under several payment ids, on several partitions, in one batch.
#[derive(Default)]
struct EventIdProbe<'a> {
    inputs: Vec<Input>,
    event_ids: Vec<&'a str>,
    carriers: HashMap<(Input, &'a str), Vec<i32>>,
}

impl<'a> EventIdProbe<'a> {
    fn add(&mut self, pair: i32, event: &'a Event) {
        let carriers = self
            .carriers
            .entry((event.input(), event.event_id()))
            .or_default();
        if carriers.is_empty() {
            self.inputs.push(event.input());
            self.event_ids.push(event.event_id());
        }
        if !carriers.contains(&pair) {
            carriers.push(pair);
        }
    }

    fn is_empty(&self) -> bool {
        self.event_ids.is_empty()
    }

    /// The stored ones among them, by the pairs that carry them.
    fn by_pair(&self, stored: Vec<(Input, String)>) -> HashMap<i32, Vec<(Input, String)>> {
        let mut by_pair: HashMap<i32, Vec<(Input, String)>> = HashMap::new();
        for (input, event_id) in stored {
            for &pair in self
                .carriers
                .get(&(input, event_id.as_str()))
                .into_iter()
                .flatten()
            {
                by_pair
                    .entry(pair)
                    .or_default()
                    .push((input, event_id.clone()));
            }
        }
        by_pair
    }
}
