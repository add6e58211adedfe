//! Re-drive of rejected messages (contract §8): an operator asks for rejected messages
//! to be decoded again (`recon-worker rejects redrive`); the worker owning each one's
//! partition pair does it here, in a batch like any other.
//!
//! Every [`REDRIVE_POLL`] the pipeline reads its pairs' pending requests (one indexed
//! query, empty but for pending requests), decodes each stored payload again with this
//! worker's configuration, and applies what is now valid as a late event, read now:
//! after the batch's messages, its event time as it is (deadlines already passed fire
//! as for any late event). The result of each request goes into the pair's next
//! checkpoint, which commits it with the event's rows: exactly once, because the
//! checkpoint is fenced by the pair's epoch, and a request stays held (not read again)
//! from the moment it is settled until that checkpoint is acknowledged or the pair
//! is dropped (its next owner reads it again only if it did not commit).
//!
//! Pairs rewinding or replaying after a clash are skipped until they are past it: their
//! engine is being rebuilt from the log, and a late event can wait a poll.

use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};

use super::pairs::{HeldRedrive, Pairs};
use super::{Pipeline, PipelineError};
use crate::consumer::{decode_announcement_message, decode_message};
use crate::engine::Applied;
use crate::event::{Announcement, Event, Limits, Topic};
use crate::rejection::{MessageAt, RejectedMessage, DATA_ERROR_CLASS};
use crate::retry::{retry, Operation};
use crate::store::{
    AnnouncementAt, PairCheckpoint, RedriveRequest, RedriveResult, Redriven, RefusedMessage,
};

/// How often the pipeline reads its pairs' pending re-drive requests. An operator
/// waits at most this long (plus a batch) for a re-drive; an idle poll is one query on
/// an empty partial index.
pub(super) const REDRIVE_POLL: Duration = Duration::from_secs(2);

/// The pipeline's re-drive state: when to poll next, the decoding limits, and the
/// requests whose values PostgreSQL refused.
pub(super) struct Redrives {
    due: Instant,
    /// [`REDRIVE_POLL`], but for tests (see [`Pipeline::set_redrive_poll`]).
    every: Duration,
    limits: Limits,
    /// Requests whose event PostgreSQL refused (a data error), by id, with its reason:
    /// when read again they are rejected with it instead of being applied (their pair
    /// is replayed from the log meanwhile, which does not hold them). Kept until a
    /// commit writes that rejection: the checkpoint holding it may be refused for
    /// another message and dropped, and the request, read again, must be rejected
    /// again — applied again, it would be refused again, and two such requests of a
    /// pair (a message and its redelivery) would take turns for ever.
    refused: HashMap<i64, String>,
}

/// A request decoded into something to apply.
enum Valid {
    Event(Event),
    Announcement(Announcement),
}

impl Redrives {
    pub fn new(limits: Limits) -> Self {
        Self {
            due: Instant::now(),
            every: REDRIVE_POLL,
            limits,
            refused: HashMap::new(),
        }
    }

    /// Before a commit's refused pairs are dropped: the refused messages that were
    /// re-drives are remembered by request id.
    pub fn note_refused(&mut self, pairs: &Pairs, refused: &[RefusedMessage]) {
        for message in refused {
            let Some(owned) = pairs.get(message.pair) else {
                continue;
            };
            if let Some(held) = owned
                .redrives_held
                .iter()
                .find(|held| held.topic == message.topic && held.offset == message.offset)
            {
                self.refused.insert(held.id, message.reason.clone());
            }
        }
    }

    /// After a commit: the refused requests whose rejection it wrote are forgotten.
    pub fn acknowledged(&mut self, committed: &[PairCheckpoint]) {
        if self.refused.is_empty() {
            return;
        }
        for redriven in committed.iter().flat_map(|c| &c.redriven) {
            self.refused.remove(&redriven.id);
        }
    }

    /// Decodes a request again: what to apply, or its result already.
    fn decode(&mut self, request: &RedriveRequest) -> Result<Valid, RedriveResult> {
        if request.is_truncated() {
            return Err(RedriveResult::Truncated);
        }
        let at = MessageAt {
            topic: request.topic,
            partition: request.partition,
            offset: request.offset,
        };
        let (key, payload) = (request.key.as_deref(), request.payload.as_deref());
        if let Some(reason) = self.refused.get(&request.id).cloned() {
            return Err(RedriveResult::Rejected(RejectedMessage::new(
                at,
                reason,
                DATA_ERROR_CLASS,
                key,
                payload,
                request.timestamp_ms,
            )));
        }
        let (timestamp, limits) = (request.timestamp_ms, self.limits);
        match request.topic {
            Topic::Payouts => {
                decode_announcement_message(at, key, payload, timestamp, limits, None)
                    .map(Valid::Announcement)
            }
            _ => decode_message(at, key, payload, timestamp, limits, None).map(Valid::Event),
        }
        .map_err(RedriveResult::Rejected)
    }
}

impl Pipeline {
    /// Polls for re-drive requests every `every` instead of [`REDRIVE_POLL`]. For
    /// tests only: a whole-path test asks for re-drives in many cases, and waiting
    /// seconds for each poll would make it run for minutes.
    #[doc(hidden)]
    pub fn set_redrive_poll(&mut self, every: Duration) {
        self.redrives.every = every;
    }

    /// Settles the pending re-drive requests of the pairs this worker owns, when a
    /// poll is due (see the module doc). A failed read of the requests is retried at
    /// the next poll: a re-drive can wait, the batch cannot.
    pub(super) async fn redrive(&mut self) -> Result<(), PipelineError> {
        if Instant::now() < self.redrives.due {
            return Ok(());
        }
        self.redrives.due = Instant::now() + self.redrives.every;
        let pairs: Vec<i32> = self
            .pairs
            .iter()
            .filter(|(_, owned)| !owned.rewinding && owned.probe_until.is_none())
            .map(|(pair, _)| pair)
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let held: Vec<i64> = self
            .pairs
            .iter()
            .flat_map(|(_, owned)| owned.redrives_held.iter().map(|held| held.id))
            .collect();
        let requests = match self.store.redrive_requests(&pairs, &held).await {
            Ok(requests) => requests,
            Err(error) => {
                tracing::warn!(%error, "cannot read the re-drive requests; trying again at the next poll");
                return Ok(());
            }
        };
        if requests.is_empty() {
            return Ok(());
        }
        tracing::info!(
            requests = requests.len(),
            "re-driving rejected messages as late events"
        );
        let mut events = Vec::new();
        let mut announcements = Vec::new();
        for request in requests {
            match self.redrives.decode(&request) {
                Ok(Valid::Event(event)) => events.push((request, event)),
                Ok(Valid::Announcement(announcement)) => {
                    announcements.push((request, announcement))
                }
                Err(result) => self.settle_redrive(&request, result),
            }
        }
        self.redrive_events(events).await?;
        self.redrive_announcements(announcements).await
    }

    /// Applies re-driven events as late ones: their keys loaded where not resident,
    /// and every event id checked against storage first (a re-driven event is as
    /// likely as not to have been sent again since, under any payment id), so an
    /// event accepted meanwhile is a redelivery and the checkpoint never clashes.
    async fn redrive_events(
        &mut self,
        events: Vec<(RedriveRequest, Event)>,
    ) -> Result<(), PipelineError> {
        if events.is_empty() {
            return Ok(());
        }
        let (mut pairs, mut keys) = (Vec::new(), Vec::new());
        let mut seen = HashSet::new();
        for (request, event) in &events {
            let resident = self
                .pairs
                .get(request.partition)
                .is_some_and(|owned| owned.engine.is_resident(event.payment_id()));
            if !resident && seen.insert((request.partition, event.payment_id().to_owned())) {
                pairs.push(request.partition);
                keys.push(event.payment_id().to_owned());
            }
        }
        let (rows, stored) = {
            let inputs: Vec<_> = events.iter().map(|(_, event)| event.input()).collect();
            let ids: Vec<&str> = events.iter().map(|(_, event)| event.event_id()).collect();
            let (store, health) = (&self.store, &self.health);
            tokio::try_join!(
                retry(Operation::Lookup, health, || store.lookup(&pairs, &keys)),
                retry(Operation::LookupEventIds, health, || store
                    .stored_event_ids(&inputs, &ids)),
            )?
        };
        let mut keys_by_pair: HashMap<i32, Vec<String>> = HashMap::new();
        for (pair, key) in pairs.into_iter().zip(keys) {
            keys_by_pair.entry(pair).or_default().push(key);
        }
        let mut rows_by_pair: HashMap<i32, Vec<_>> = HashMap::new();
        for (pair, row) in rows {
            rows_by_pair.entry(pair).or_default().push(row);
        }
        for (pair, keys) in keys_by_pair {
            if let Some(owned) = self.pairs.get_mut(pair) {
                owned
                    .engine
                    .load(keys, rows_by_pair.remove(&pair).unwrap_or_default());
            }
        }
        // Stored under any pair's key: each pair's engine learns of all of them.
        if !stored.is_empty() {
            let event_pairs: HashSet<i32> = events.iter().map(|(r, _)| r.partition).collect();
            for pair in event_pairs {
                if let Some(owned) = self.pairs.get_mut(pair) {
                    owned.engine.load_stored_event_ids(stored.iter().cloned());
                }
            }
        }
        for (request, event) in events {
            let Some(owned) = self.pairs.get_mut(request.partition) else {
                continue;
            };
            let result = match owned.engine.apply(event, request.offset) {
                Applied::Accepted(_) => RedriveResult::Accepted,
                Applied::Redelivery => RedriveResult::Redelivery,
            };
            self.settle_redrive(&request, result);
        }
        Ok(())
    }

    /// Re-driven payout announcements go into their pair's next checkpoint after the
    /// ones read from the log (the first stored counts, contract §7: a late one counts
    /// only if none came before); one whose event id is stored or pending is a
    /// redelivery.
    async fn redrive_announcements(
        &mut self,
        announcements: Vec<(RedriveRequest, Announcement)>,
    ) -> Result<(), PipelineError> {
        if announcements.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = announcements
            .iter()
            .map(|(_, a)| a.event_id.as_str())
            .collect();
        let store = &self.store;
        let stored: HashSet<String> = retry(Operation::LookupEventIds, &self.health, || {
            store.stored_announcement_ids(&ids)
        })
        .await?
        .into_iter()
        .collect();
        for (request, announcement) in announcements {
            let Some(owned) = self.pairs.get_mut(request.partition) else {
                continue;
            };
            let pending = owned
                .announcements
                .iter()
                .any(|at| at.announcement.event_id == announcement.event_id);
            let result = if pending || stored.contains(&announcement.event_id) {
                RedriveResult::Redelivery
            } else {
                owned.announcements.push(AnnouncementAt {
                    offset: request.offset,
                    announcement,
                });
                RedriveResult::Accepted
            };
            self.settle_redrive(&request, result);
        }
        Ok(())
    }

    /// Hands a request's result to its pair's next checkpoint and holds the request
    /// until that is acknowledged.
    fn settle_redrive(&mut self, request: &RedriveRequest, result: RedriveResult) {
        let Some(owned) = self.pairs.get_mut(request.partition) else {
            return;
        };
        tracing::info!(
            id = request.id,
            topic = %request.topic,
            partition = request.partition,
            offset = request.offset,
            result = result.as_str(),
            "re-drive settled"
        );
        owned.redrives_held.push(HeldRedrive {
            id: request.id,
            topic: request.topic,
            offset: request.offset,
        });
        owned.redriven.push(Redriven {
            id: request.id,
            result,
        });
    }
}
