//! The engine's own parameters: matching (contract §2) and the window's bounds. The
//! worker's configuration parses them from the environment; the engine sees only these.

use std::time::Duration;

use crate::event::{Input, Micros};

/// Matching parameters (contract §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchConfig {
    /// D: a payment without a settlement after this long is `missing_settlement`.
    pub settlement_deadline: Duration,
    /// O: a settlement without a payment after this long is `orphan_settlement`.
    pub orphan_timeout: Duration,
    /// T: largest |gross − amount| still counted as equal.
    pub amount_tolerance_minor: i64,
    /// An input caught up for this long no longer holds the watermark back.
    pub idle_timeout: Duration,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            settlement_deadline: Duration::from_secs(72 * 3600),
            orphan_timeout: Duration::from_secs(72 * 3600),
            amount_tolerance_minor: 0,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Bounds of the in-memory matching window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub max_items: usize,
    pub max_bytes: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            max_items: 50_000,
            max_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Engine parameters in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub deadline: Micros,
    pub orphan_timeout: Micros,
    pub tolerance: i64,
    pub idle_timeout: Micros,
    pub window: WindowConfig,
}

impl EngineConfig {
    pub fn new(matching: &MatchConfig, window: WindowConfig) -> Self {
        let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self {
            deadline: micros(matching.settlement_deadline),
            orphan_timeout: micros(matching.orphan_timeout),
            tolerance: matching.amount_tolerance_minor,
            idle_timeout: micros(matching.idle_timeout),
            window,
        }
    }

    /// How long a pending event of `input` waits for its counterpart before its
    /// deadline fires: D for a payment, O for a settlement line.
    pub(super) fn unmatched_after(&self, input: Input) -> Micros {
        match input {
            Input::Payments => self.deadline,
            Input::Settlements => self.orphan_timeout,
        }
    }
}
