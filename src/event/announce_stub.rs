//! TEMPORARY stand-in until the payouts decoder lands (branch po-decode).
use super::{Announcement, Limits, Rejection};

pub fn decode_announcement(
    _key: Option<&[u8]>,
    _value: Option<&[u8]>,
    _timestamp_ms: Option<i64>,
    _limits: Limits,
) -> Result<Announcement, Rejection> {
    Err(Rejection::Empty)
}
