//! What the poll thread and the pipeline say to each other, and nothing else.
//!
//! Poll thread → pipeline, on one bounded channel and in the order it happened:
//! [`Delivery::Data`] (messages, progress reports, rewind markers), which the pipeline
//! batches, and [`Delivery::Control`] (assign, revoke, stop), which ends a batch and is
//! answered on a `oneshot` the poll thread waits on inside librdkafka's callback.
//!
//! Pipeline → poll thread, on an unbounded channel the poll thread drains every turn:
//! [`Command`]s, the offsets committed to PostgreSQL (to commit to Kafka too) and
//! rewinds. The poll thread is the consumer's only owner, so this is the pipeline's
//! only way to it.

use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

use crate::event::{decode, decode_announcement, Announcement, Event, Input, Limits, Topic};
use crate::pair::{PairPosition, PerTopic};
use crate::rejection::{MessageAt, RejectedMessage, DATA_ERROR_CLASS};

/// One message as read, decoded or rejected.
#[derive(Debug)]
pub struct ReadMessage {
    pub input: Input,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp in milliseconds, when the producer or broker set one.
    pub timestamp_ms: Option<i64>,
    pub decoded: Result<Event, RejectedMessage>,
    /// Set when this message's offset is below the position the poll thread expected
    /// next (and it did not seek there): the partition was reset under the consumer.
    pub reset: Option<OffsetReset>,
}

/// One message of the payouts topic (contract §7) as read, decoded or rejected.
/// Announcements never reach the engine: the pair's checkpoint stores them.
#[derive(Debug)]
pub struct ReadAnnouncement {
    /// The pair whose payouts partition this is.
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub decoded: Result<Announcement, RejectedMessage>,
    pub reset: Option<OffsetReset>,
}

/// A partition read from below where the consumer stood, without a seek of ours: the
/// topic was recreated, an unclean leader election truncated the log, or the broker
/// answered "offset out of range" and `auto.offset.reset` moved the consumer. What
/// comes from here on may be new, so it is processed, not skipped; event ids tell
/// redeliveries apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetReset {
    /// The offset the consumer expected to read next.
    pub expected: i64,
    /// The partition's high watermark when the reset was seen (−1 when unknown).
    pub high_watermark: i64,
}

/// Whether one partition has nothing left to read.
#[derive(Debug, Clone, Copy)]
pub struct PartitionProgress {
    pub topic: Topic,
    pub partition: i32,
    pub caught_up: bool,
    /// High watermark last seen by the client (−1 when unknown).
    pub high_watermark: i64,
}

/// What the poll thread hands to the pipeline, in order.
#[derive(Debug)]
pub enum Delivery {
    Data(Data),
    Control(Control),
}

/// What the pipeline batches.
#[derive(Debug)]
pub enum Data {
    Message(ReadMessage),
    Announcement(ReadAnnouncement),
    Progress(Vec<PartitionProgress>),
    /// A [`Rewind`] of this pair took effect: its messages from here on are read from
    /// the requested offsets; any of its messages before this were read before.
    Rewound {
        pair: i32,
    },
}

/// What ends a batch and needs the pipeline's answer before the consumer goes on.
#[derive(Debug)]
pub enum Control {
    /// New partition pairs: the pipeline takes ownership in PostgreSQL and replies
    /// with where to resume.
    Assign {
        pairs: Vec<i32>,
        reply: oneshot::Sender<Result<Vec<PairPosition>, String>>,
    },
    /// The pairs are going away: the pipeline finishes the batch in hand, drops their
    /// state and replies with their committed offsets, which the poll thread commits
    /// to Kafka before it lets them go.
    Revoke {
        pairs: Vec<i32>,
        done: oneshot::Sender<Vec<StoredOffset>>,
    },
    /// Shutdown: the pipeline commits what it holds and replies with every pair's
    /// committed offsets before the consumer leaves the group.
    Stop {
        done: oneshot::Sender<Vec<StoredOffset>>,
    },
}

impl From<ReadMessage> for Delivery {
    fn from(message: ReadMessage) -> Self {
        Delivery::Data(Data::Message(message))
    }
}

impl From<Control> for Delivery {
    fn from(control: Control) -> Self {
        Delivery::Control(control)
    }
}

/// The next offset to read of one partition, as committed to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredOffset {
    pub topic: Topic,
    pub partition: i32,
    pub next_offset: i64,
}

/// What the pipeline asks of the poll thread.
#[derive(Debug)]
pub enum Command {
    /// Commit these offsets to Kafka, after PostgreSQL committed them: advisory, for
    /// lag tools; PostgreSQL stays the source of truth.
    Commit(Vec<StoredOffset>),
    Rewind(Rewind),
}

/// The pipeline's request to read a partition pair again from these offsets (the
/// beginning where `None`): every topic's partition of the pair is sought there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    pub pair: i32,
    pub next_offsets: PerTopic<Option<i64>>,
    /// Messages PostgreSQL refused (a data error): when read again they are handed
    /// over as rejections with this reason, raw bytes and all, instead of decoded.
    pub refused: Vec<Refused>,
}

/// A message whose values PostgreSQL refused, and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub topic: Topic,
    pub offset: i64,
    pub reason: String,
}

/// The pipeline's end of the command channel. A test driving the pipeline without a
/// broker holds the other end and serves the rewinds itself.
#[derive(Debug, Clone)]
pub struct ConsumerHandle {
    pub commands: std_mpsc::Sender<Command>,
}

impl ConsumerHandle {
    /// Sends a command; false when the poll thread is gone (the worker is stopping).
    pub fn send(&self, command: Command) -> bool {
        self.commands.send(command).is_ok()
    }
}

/// What the poll thread makes of one message: its event, or the rejection to store
/// (raw bytes and key kept). `refused` is PostgreSQL's reason when this message's
/// values were refused before (a data error): it is rejected with that reason, not
/// decoded again. Public so that a test driving the pipeline without a broker (the
/// whole-path fuzz test) hands it exactly what the poll thread would.
pub fn decode_message(
    at: MessageAt,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    limits: Limits,
    refused: Option<String>,
) -> Result<Event, RejectedMessage> {
    // The payouts topic's messages go to `decode_announcement_message`.
    debug_assert!(at.topic.input().is_some(), "{at:?}");
    let input = at.topic.input().unwrap_or(Input::Payments);
    decode_or_refuse(at, key, payload, timestamp_ms, refused, || {
        decode(input, key, payload, timestamp_ms, limits)
    })
}

/// [`decode_message`] for the payouts topic.
pub fn decode_announcement_message(
    at: MessageAt,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    limits: Limits,
    refused: Option<String>,
) -> Result<Announcement, RejectedMessage> {
    decode_or_refuse(at, key, payload, timestamp_ms, refused, || {
        decode_announcement(key, payload, timestamp_ms, limits)
    })
}

fn decode_or_refuse<T>(
    at: MessageAt,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    refused: Option<String>,
    decode: impl FnOnce() -> Result<T, crate::event::Rejection>,
) -> Result<T, RejectedMessage> {
    let rejected = |reason: String, class: &'static str| {
        RejectedMessage::new(at, reason, class, key, payload, timestamp_ms)
    };
    match refused {
        Some(reason) => Err(rejected(reason, DATA_ERROR_CLASS)),
        None => decode().map_err(|rejection| rejected(rejection.to_string(), rejection.class())),
    }
}
