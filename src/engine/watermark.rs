//! The event-time watermark of one partition pair (contract §2).
//!
//! Each input keeps the largest event time accepted from it. The pair's watermark is
//! the smaller of the two, except that an input caught up for at least the idle timeout
//! no longer holds it back, and with both inputs idle it follows wall-clock time. It
//! never moves backwards. Time comes in as data (`now`), so this is deterministic.

use crate::event::{Input, Micros};
use crate::pair::PerInput;

#[derive(Debug, Clone, Default)]
pub struct Watermark {
    high: PerInput<Option<Micros>>,
    /// When the input was last seen caught up with nothing read since.
    idle_since: PerInput<Option<Micros>>,
    current: Option<Micros>,
}

impl Watermark {
    /// Restores the high marks stored with the last checkpoint.
    pub fn with_high_marks(high: PerInput<Option<Micros>>) -> Self {
        Self {
            high,
            ..Self::default()
        }
    }

    pub fn high_marks(&self) -> PerInput<Option<Micros>> {
        self.high
    }

    pub fn current(&self) -> Option<Micros> {
        self.current
    }

    /// An event was accepted from `input`: it is not idle, and its high mark may rise.
    pub fn observe_event(&mut self, input: Input, event_time: Micros) {
        let high = &mut self.high[input];
        *high = Some(high.map_or(event_time, |h| h.max(event_time)));
        self.idle_since[input] = None;
    }

    /// A message was read from `input` (accepted or not): it is not idle.
    pub fn observe_activity(&mut self, input: Input) {
        self.idle_since[input] = None;
    }

    /// The consumer reports whether `input` has nothing left to read at `now`.
    pub fn observe_caught_up(&mut self, input: Input, caught_up: bool, now: Micros) {
        let slot = &mut self.idle_since[input];
        if !caught_up {
            *slot = None;
        } else if slot.is_none() {
            *slot = Some(now);
        }
    }

    /// Recomputes the watermark at `now`; returns it.
    pub fn advance(&mut self, now: Micros, idle_timeout: Micros) -> Option<Micros> {
        let idle = self
            .idle_since
            .map(|since| since.is_some_and(|since| now - since >= idle_timeout));
        let candidate = match (idle.payments, idle.settlements) {
            (true, true) => Some(now),
            (true, false) => self.high.settlements,
            (false, true) => self.high.payments,
            (false, false) => match (self.high.payments, self.high.settlements) {
                (Some(p), Some(s)) => Some(p.min(s)),
                _ => None,
            },
        };
        self.current = self.current.max(candidate);
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Micros = 30_000_000;

    #[test]
    fn is_the_smaller_high_mark_while_both_inputs_are_busy() {
        let mut w = Watermark::default();
        w.observe_event(Input::Payments, 500);
        assert_eq!(w.advance(0, IDLE), None, "one input has no events yet");
        w.observe_event(Input::Settlements, 300);
        assert_eq!(w.advance(0, IDLE), Some(300));
        w.observe_event(Input::Settlements, 900);
        assert_eq!(w.advance(0, IDLE), Some(500));
    }

    #[test]
    fn an_input_idle_for_the_timeout_stops_holding_it_back() {
        let mut w = Watermark::default();
        w.observe_event(Input::Payments, 5_000);
        w.observe_event(Input::Settlements, 1_000);
        w.observe_caught_up(Input::Settlements, true, 0);
        assert_eq!(w.advance(IDLE - 1, IDLE), Some(1_000));
        assert_eq!(w.advance(IDLE, IDLE), Some(5_000));
    }

    #[test]
    fn a_backlogged_input_holds_it_back() {
        let mut w = Watermark::default();
        w.observe_event(Input::Payments, 5_000);
        w.observe_event(Input::Settlements, 1_000);
        w.observe_caught_up(Input::Payments, true, 0);
        w.observe_caught_up(Input::Settlements, false, 0);
        assert_eq!(w.advance(10 * IDLE, IDLE), Some(1_000));
    }

    #[test]
    fn follows_wall_clock_when_both_are_idle_and_never_goes_back() {
        let mut w = Watermark::default();
        w.observe_event(Input::Payments, 5_000);
        w.observe_caught_up(Input::Payments, true, 0);
        w.observe_caught_up(Input::Settlements, true, 0);
        assert_eq!(w.advance(IDLE + 7, IDLE), Some(IDLE + 7));
        w.observe_event(Input::Payments, 10);
        w.observe_event(Input::Settlements, 10);
        assert_eq!(w.advance(IDLE + 8, IDLE), Some(IDLE + 7));
    }

    #[test]
    fn an_event_ends_idleness() {
        let mut w = Watermark::default();
        w.observe_caught_up(Input::Payments, true, 0);
        w.observe_caught_up(Input::Settlements, true, 0);
        w.observe_event(Input::Settlements, 1);
        w.observe_caught_up(Input::Settlements, true, IDLE);
        assert_eq!(w.advance(IDLE + 1, IDLE), Some(1));
    }
}
