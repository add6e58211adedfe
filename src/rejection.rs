//! The rejection record: a message that will never become an event, kept in
//! `rejected_events` with its reason and its raw bytes (contract §1, §4).
//!
//! One constructor builds every record, so the caps on what is kept (payload and key)
//! apply whichever path rejected the message: the decoder, PostgreSQL refusing values,
//! or a tool replaying a plan.

use crate::event::Topic;

/// At most this many bytes of a rejected message are kept in `rejected_events.payload`;
/// `payload_size` keeps the original length.
pub const REJECTED_PAYLOAD_CAP: usize = 64 * 1024;

/// At most this many bytes of a rejected message's key are kept.
pub const REJECTED_KEY_CAP: usize = 1024;

/// The `reason_class` of a message PostgreSQL refused (SQLSTATE class 22).
pub const DATA_ERROR_CLASS: &str = "data_error";

/// A rejected message, ready to store.
#[derive(Debug, Clone)]
pub struct RejectedMessage {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub class: &'static str,
    /// At most [`REJECTED_PAYLOAD_CAP`] bytes. (Boxed slices: every decoded message's
    /// `Result` is as large as this record.)
    pub payload: Option<Box<[u8]>>,
    /// The original payload's length, saturating at `i32::MAX`.
    pub payload_size: i32,
    /// At most [`REJECTED_KEY_CAP`] bytes.
    pub key: Option<Box<[u8]>>,
    /// The message's Kafka timestamp (milliseconds), kept so a re-drive applies the
    /// future-skew rule as the first reading did.
    pub timestamp_ms: Option<i64>,
}

/// Where a rejected message was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageAt {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
}

impl RejectedMessage {
    /// The record of the message at `at`, keeping at most the capped prefix of its
    /// payload and key.
    pub fn new(
        at: MessageAt,
        reason: String,
        class: &'static str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        timestamp_ms: Option<i64>,
    ) -> Self {
        let prefix = |bytes: &[u8], cap: usize| Box::from(&bytes[..bytes.len().min(cap)]);
        Self {
            topic: at.topic,
            partition: at.partition,
            offset: at.offset,
            reason,
            class,
            payload: payload.map(|p| prefix(p, REJECTED_PAYLOAD_CAP)),
            payload_size: payload.map_or(0, |p| i32::try_from(p.len()).unwrap_or(i32::MAX)),
            key: key.map(|k| prefix(k, REJECTED_KEY_CAP)),
            timestamp_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_and_key_are_capped_and_the_original_size_kept() {
        let payload = vec![b'x'; REJECTED_PAYLOAD_CAP + 10];
        let key = vec![b'k'; REJECTED_KEY_CAP * 2];
        let at = MessageAt {
            topic: Topic::Settlements,
            partition: 3,
            offset: 9,
        };
        let record = RejectedMessage::new(at, "why".into(), "x", Some(&key), Some(&payload), None);
        assert_eq!(record.payload.map(|p| p.len()), Some(REJECTED_PAYLOAD_CAP));
        assert_eq!(record.payload_size as usize, REJECTED_PAYLOAD_CAP + 10);
        assert_eq!(record.key.map(|k| k.len()), Some(REJECTED_KEY_CAP));
        let empty = RejectedMessage::new(at, "why".into(), "x", None, None, Some(7));
        assert_eq!(
            (empty.payload, empty.payload_size, empty.key),
            (None, 0, None)
        );
    }
}
