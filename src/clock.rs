//! The wall clock: the only place the worker reads time. Everything below the edges
//! (the engine above all) takes time as data, so tests and the oracle can drive it.

use crate::event::Micros;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}
