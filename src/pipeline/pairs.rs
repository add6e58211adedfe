//! The partition pairs this worker owns: each one's engine, how far it has read, handed
//! to a commit and committed, and its replay state; and the pairs dropped after a clash
//! or a data error, waiting to be replayed. Applying a batch's data to them is here
//! too: it touches nothing else.

use std::collections::BTreeMap;

use hashbrown::HashMap;

use std::time::Instant;

use crate::consumer::{Data, OffsetReset, ReadAnnouncement, ReadMessage, Refused, StoredOffset};
use crate::engine::{Applied, EngineConfig, PairEngine, WindowConfig};
use crate::event::{Input, Micros, Topic};
use crate::pair::{PairPosition, PerInput, PerTopic};
use crate::rejection::RejectedMessage;
use crate::store::{AnnouncementAt, Redriven, RefusedMessage};

pub(super) struct OwnedPair {
    pub epoch: i64,
    pub engine: PairEngine,
    /// Next offset to read per topic, as far as this pipeline has processed.
    pub read: PerTopic<Option<i64>>,
    /// Next offset per topic as last committed to PostgreSQL.
    pub committed: PerTopic<Option<i64>>,
    /// Next offset per topic as last handed to a commit (committed or in flight).
    pub sent: PerTopic<Option<i64>>,
    pub high_watermarks: PerTopic<i64>,
    /// Payout announcements read since the last checkpoint, in partition order, for
    /// the next one to store (contract §7: committed by the pair's owner).
    pub announcements: Vec<AnnouncementAt>,
    /// The pair's watermark as last handed to a checkpoint, and when: an idle pair's
    /// watermark moves with the clock, and the global watermark over all pairs is made
    /// of what the checkpoints stored.
    pub watermark_sent: (Option<Micros>, Instant),
    /// Rewound, and waiting for the poll thread's marker: the pair's messages before
    /// it were read before the rewind and are dropped.
    pub rewinding: bool,
    /// Replaying after an event id clash: every event id of the pair is checked
    /// against storage until the committed offsets reach these (how far the pair had
    /// read when it clashed).
    pub probe_until: Option<PerInput<Option<i64>>>,
    /// Messages PostgreSQL refused, to be rejected when read again; kept until a
    /// commit covers them (a replay before that must reject them too).
    pub refused: Vec<Refused>,
    /// What the batch being collected read from this pair, for the metrics.
    pub counts: ReadCounts,
    /// Re-drive requests settled since the last checkpoint, for the next one.
    pub redriven: Vec<Redriven>,
    /// Re-drive requests settled and not yet acknowledged (in `redriven` or in a
    /// checkpoint being committed): never read again meanwhile (exactly once).
    pub redrives_held: Vec<HeldRedrive>,
}

/// A re-drive request this pair settled and has not yet committed.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeldRedrive {
    /// `rejected_events.id`.
    pub id: i64,
    pub topic: Topic,
    pub offset: i64,
}

/// Messages a batch read from one pair, counted once the pair's part of the batch is
/// committed: a batch dropped (fenced, or replayed after a clash) is read again and
/// must not be counted twice.
#[derive(Debug, Default)]
pub(super) struct ReadCounts {
    pub consumed: PerTopic<u64>,
    pub redelivered: PerTopic<u64>,
}

/// A pair whose insert clashed, or whose values PostgreSQL refused, to be rebuilt
/// from storage and re-read.
pub(super) struct Replay {
    pub pair: i32,
    pub epoch: i64,
    /// How far the pair had read when it was dropped.
    pub read: PerTopic<Option<i64>>,
    /// Check every event id against storage until past `read` (after a clash).
    pub probe: bool,
    /// Messages to reject when read again.
    pub refused: Vec<Refused>,
}

/// What became of one message read.
enum Read {
    /// Read before a rewind (or again after one): not this pair's to apply.
    Stale,
    /// Applied to the engine: accepted, or a redelivery.
    Applied,
    /// Rejected, to be stored with the pair's checkpoint.
    Rejected(RejectedMessage),
}

/// What applying a batch's data left for its commit.
#[derive(Default)]
pub(super) struct AppliedBatch {
    /// Rejected messages per pair, stored with the pair's checkpoint.
    pub rejected: HashMap<i32, Vec<RejectedMessage>>,
    /// Kafka timestamps of the messages, for the latency histogram once committed.
    pub timestamps: Vec<i64>,
}

impl AppliedBatch {
    /// What became of one message of `partition`: a rejection kept for the pair's
    /// checkpoint, and the Kafka timestamp of any message not stale.
    fn take(&mut self, partition: i32, timestamp: Option<i64>, read: Read) {
        match read {
            Read::Stale => return,
            Read::Applied => {}
            Read::Rejected(rejection) => {
                self.rejected.entry(partition).or_default().push(rejection)
            }
        }
        if let Some(ts) = timestamp {
            self.timestamps.push(ts);
        }
    }
}

impl OwnedPair {
    /// Whether the committed offsets reach `probe_until`: nothing the pair had read
    /// when it clashed is left to check against storage.
    pub fn probed_through(&self) -> bool {
        self.probe_until.is_some_and(|until| {
            Input::ALL.into_iter().all(|input| {
                until[input].is_none_or(|u| self.committed[input].is_some_and(|c| c >= u))
            })
        })
    }

    fn new(position: &PairPosition, engine_config: EngineConfig) -> Self {
        Self {
            epoch: position.epoch,
            engine: PairEngine::new(engine_config, position.high_marks),
            read: position.next_offsets,
            committed: position.next_offsets,
            sent: position.next_offsets,
            high_watermarks: PerTopic::from_fn(|_| -1),
            announcements: Vec::new(),
            watermark_sent: (None, Instant::now()),
            rewinding: false,
            probe_until: None,
            refused: Vec::new(),
            counts: ReadCounts::default(),
            redriven: Vec::new(),
            redrives_held: Vec::new(),
        }
    }

    /// The consumer read `input` from `offset`, below where it stood (see
    /// [`OffsetReset`]): what comes from here is read as new, and every event id is
    /// checked against storage up to the log's end as it was then, so messages read
    /// before come out as redeliveries whatever their payment id.
    fn reset(&mut self, topic: Topic, offset: i64, reset: OffsetReset) {
        tracing::warn!(
            %topic,
            offset,
            expected = reset.expected,
            read = ?self.read[topic],
            "reading the partition again from below its position; checking every event id"
        );
        self.read[topic] = Some(offset);
        // Announcements need no probe: a redelivered one is skipped by its event id.
        let Some(input) = topic.input() else {
            return;
        };
        let until = if reset.high_watermark >= 0 {
            reset.high_watermark
        } else {
            reset.expected
        };
        let mut probe = self.probe_until.unwrap_or_default();
        probe[input] = Some(probe[input].map_or(until, |u| u.max(until)));
        self.probe_until = Some(probe);
    }

    /// Applies one message.
    fn apply(&mut self, message: ReadMessage) -> Read {
        let input = message.input;
        if self.rewinding {
            return Read::Stale;
        }
        if let Some(reset) = message.reset {
            self.reset(input.into(), message.offset, reset);
        }
        // Read again after a rewind that a reassignment overtook (a reset of the log
        // itself came flagged, and moved the read position).
        if self.read[input].is_some_and(|next| message.offset < next) {
            return Read::Stale;
        }
        self.read[input] = Some(message.offset + 1);
        self.counts.consumed[input] += 1;
        match message.decoded {
            Ok(event) => {
                if let Applied::Redelivery = self.engine.apply(event, message.offset) {
                    self.counts.redelivered[input] += 1;
                }
                Read::Applied
            }
            Err(rejection) => {
                self.engine.observe_activity(input);
                Read::Rejected(rejection)
            }
        }
    }

    /// Takes one message of the payouts topic: kept for the next checkpoint, or
    /// rejected. Stale ones are dropped as for the inputs.
    fn announce(&mut self, message: ReadAnnouncement) -> Read {
        if self.rewinding {
            return Read::Stale;
        }
        if let Some(reset) = message.reset {
            self.reset(Topic::Payouts, message.offset, reset);
        }
        if self.read[Topic::Payouts].is_some_and(|next| message.offset < next) {
            return Read::Stale;
        }
        self.read[Topic::Payouts] = Some(message.offset + 1);
        self.counts.consumed[Topic::Payouts] += 1;
        match message.decoded {
            Ok(announcement) => {
                self.announcements.push(AnnouncementAt {
                    offset: message.offset,
                    announcement,
                });
                Read::Applied
            }
            Err(rejection) => Read::Rejected(rejection),
        }
    }
}

/// The partition pairs this worker owns, by pair, and those waiting to be replayed.
pub(super) struct Pairs {
    owned: BTreeMap<i32, OwnedPair>,
    replays: Vec<Replay>,
    engine_config: EngineConfig,
}

impl Pairs {
    pub fn new(engine_config: EngineConfig) -> Self {
        Self {
            owned: BTreeMap::new(),
            replays: Vec::new(),
            engine_config,
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        self.engine_config
    }

    pub fn len(&self) -> usize {
        self.owned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owned.is_empty()
    }

    pub fn owns(&self, pair: i32) -> bool {
        self.owned.contains_key(&pair)
    }

    pub fn get(&self, pair: i32) -> Option<&OwnedPair> {
        self.owned.get(&pair)
    }

    pub fn get_mut(&mut self, pair: i32) -> Option<&mut OwnedPair> {
        self.owned.get_mut(&pair)
    }

    pub fn iter(&self) -> impl Iterator<Item = (i32, &OwnedPair)> {
        self.owned.iter().map(|(&pair, owned)| (pair, owned))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (i32, &mut OwnedPair)> {
        self.owned.iter_mut().map(|(&pair, owned)| (pair, owned))
    }

    pub fn numbers(&self) -> Vec<i32> {
        self.owned.keys().copied().collect()
    }

    /// Takes ownership as PostgreSQL granted it; a pending replay of such a pair is
    /// moot (it starts again from its stored offsets).
    pub fn take(&mut self, position: &PairPosition) {
        self.owned
            .insert(position.pair, OwnedPair::new(position, self.engine_config));
        self.replays.retain(|replay| replay.pair != position.pair);
    }

    /// A pair rebuilt from storage for a replay, dropping its messages until the poll
    /// thread's rewind marker.
    pub fn take_for_replay(&mut self, position: &PairPosition, replay: Replay) {
        let mut owned = OwnedPair::new(position, self.engine_config);
        owned.rewinding = true;
        owned.probe_until = replay.probe.then_some(replay.read.inputs());
        // Stored as far as the pair had read when it clashed (the clash was a re-driven
        // event's, not a message's): nothing is read again, so nothing is left to probe.
        // Left set, it would wait for the pair's next commit, which a quiet pair makes
        // only once its watermark follows the clock (`idle_timeout`), and the re-drive
        // poll skips a probing pair until then.
        if owned.probed_through() {
            owned.probe_until = None;
        }
        owned.refused = replay.refused;
        self.owned.insert(replay.pair, owned);
    }

    /// Drops a pair's state: revoked, or fenced by another owner.
    pub fn drop_pair(&mut self, pair: i32) -> Option<OwnedPair> {
        self.owned.remove(&pair)
    }

    /// Drops pairs whose inserts clashed with stored event ids, to be replayed with
    /// every event id checked.
    pub fn clash(&mut self, pairs: Vec<i32>) {
        for pair in pairs {
            if let Some(owned) = self.owned.remove(&pair) {
                self.replays.push(Replay {
                    pair,
                    epoch: owned.epoch,
                    read: owned.read,
                    probe: true,
                    refused: owned.refused,
                });
            }
        }
    }

    /// Drops the pairs of messages PostgreSQL refused, to be replayed with those
    /// messages rejected; returns how many pairs.
    pub fn refuse(&mut self, refused: Vec<RefusedMessage>) -> usize {
        let mut by_pair: BTreeMap<i32, Vec<Refused>> = BTreeMap::new();
        for message in refused {
            by_pair.entry(message.pair).or_default().push(Refused {
                topic: message.topic,
                offset: message.offset,
                reason: message.reason,
            });
        }
        let count = by_pair.len();
        for (pair, mut refused) in by_pair {
            let Some(owned) = self.owned.remove(&pair) else {
                continue;
            };
            refused.extend(owned.refused);
            self.replays.push(Replay {
                pair,
                epoch: owned.epoch,
                read: owned.read,
                probe: owned.probe_until.is_some(),
                refused,
            });
        }
        count
    }

    pub fn take_replays(&mut self) -> Vec<Replay> {
        std::mem::take(&mut self.replays)
    }

    /// Splits the worker's window bound evenly among the pairs it owns now.
    pub fn share_window(&mut self) {
        let owned = self.owned.len().max(1);
        let total = self.engine_config.window;
        let share = WindowConfig {
            max_items: (total.max_items / owned).max(1),
            max_bytes: (total.max_bytes / owned).max(1024),
        };
        for owned_pair in self.owned.values_mut() {
            owned_pair.engine.set_window(share);
        }
    }

    pub fn evict(&mut self) {
        for owned in self.owned.values_mut() {
            owned.engine.evict();
        }
    }

    /// Applies a batch's data in order: messages to their pairs' engines, progress to
    /// their watermarks, rewind markers end the dropping of a pair's stale messages.
    pub fn apply(&mut self, items: Vec<Data>, now: Micros) -> AppliedBatch {
        let mut applied = AppliedBatch::default();
        for item in items {
            match item {
                Data::Message(message) => {
                    let (partition, timestamp) = (message.partition, message.timestamp_ms);
                    let Some(owned) = self.owned.get_mut(&partition) else {
                        tracing::debug!(partition, "message for a pair not owned; dropped");
                        continue;
                    };
                    applied.take(partition, timestamp, owned.apply(message));
                }
                Data::Announcement(message) => {
                    let (partition, timestamp) = (message.partition, message.timestamp_ms);
                    let Some(owned) = self.owned.get_mut(&partition) else {
                        tracing::debug!(partition, "announcement for a pair not owned; dropped");
                        continue;
                    };
                    applied.take(partition, timestamp, owned.announce(message));
                }
                Data::Progress(progress) => {
                    // A pair whose payouts partition has messages left is not idle:
                    // the idle rule would move its watermark with the clock, and the
                    // global watermark past payout deadlines whose announcements are
                    // still unread. (Event times are the inputs' alone, contract §2.)
                    let payouts_behind: Vec<i32> = progress
                        .iter()
                        .filter(|p| p.topic == Topic::Payouts && !p.caught_up)
                        .map(|p| p.partition)
                        .collect();
                    for p in progress {
                        if let Some(owned) = self.owned.get_mut(&p.partition) {
                            if let Some(input) = p.topic.input() {
                                let idle = p.caught_up && !payouts_behind.contains(&p.partition);
                                owned.engine.observe_caught_up(input, idle, now);
                            }
                            owned.high_watermarks[p.topic] = p.high_watermark;
                        }
                    }
                }
                Data::Rewound { pair } => {
                    if let Some(owned) = self.owned.get_mut(&pair) {
                        owned.rewinding = false;
                    }
                }
            }
        }
        applied
    }

    /// The committed offsets of the pairs `which` selects, for Kafka.
    pub fn committed_offsets(&self, which: impl Fn(i32) -> bool) -> Vec<StoredOffset> {
        let mut offsets = Vec::new();
        for (&pair, owned) in self.owned.iter().filter(|(&pair, _)| which(pair)) {
            for (topic, committed) in owned.committed.iter() {
                if let Some(next_offset) = *committed {
                    offsets.push(StoredOffset {
                        topic,
                        partition: pair,
                        next_offset,
                    });
                }
            }
        }
        offsets
    }

    /// What each pair read since the last call, for the metrics of the commit.
    pub fn take_counts(&mut self) -> HashMap<i32, ReadCounts> {
        self.owned
            .iter_mut()
            .map(|(&pair, owned)| (pair, std::mem::take(&mut owned.counts)))
            .collect()
    }
}
