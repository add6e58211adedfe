//! The one retry policy for transient failures: what waits, for how long, and what an
//! operator sees meanwhile.
//!
//! Whatever is retried (a checkpoint, a lookup, the migrations at start), a transient
//! failure is counted in `recon_retries_total{operation}`, logged, marks the worker not
//! ready while it lasts, and waits with capped exponential backoff. Nothing is skipped:
//! the caller retries the same work. Errors say themselves whether they are transient
//! ([`Transient`]); anything else is returned at once.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::telemetry::metrics as m;
use crate::telemetry::Health;

/// First wait after a transient failure; each further one doubles, up to [`MAX_WAIT`].
pub const FIRST_WAIT: Duration = Duration::from_millis(100);
/// Longest wait between two attempts: a database back after a restart is used within
/// this long.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// An error that knows whether trying the same thing again can succeed.
pub trait Transient: Display {
    fn is_transient(&self) -> bool;
}

/// What is being retried: the `operation` label of the retry counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Migrate,
    AcquirePairs,
    OwnedPosition,
    Warm,
    WarmLookup,
    Lookup,
    LookupEventIds,
    Sweep,
    SweepLookup,
    Checkpoint,
    /// The payout evaluator's transaction (`payouts`): retried beside the pipeline,
    /// never in its way.
    EvaluatePayouts,
}

impl Operation {
    pub const ALL: [Operation; 11] = [
        Operation::Migrate,
        Operation::AcquirePairs,
        Operation::OwnedPosition,
        Operation::Warm,
        Operation::WarmLookup,
        Operation::Lookup,
        Operation::LookupEventIds,
        Operation::Sweep,
        Operation::SweepLookup,
        Operation::Checkpoint,
        Operation::EvaluatePayouts,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Operation::Migrate => "migrate",
            Operation::AcquirePairs => "acquire_pairs",
            Operation::OwnedPosition => "owned_position",
            Operation::Warm => "warm",
            Operation::WarmLookup => "warm_lookup",
            Operation::Lookup => "lookup",
            Operation::LookupEventIds => "lookup_event_ids",
            Operation::Sweep => "sweep",
            Operation::SweepLookup => "sweep_lookup",
            Operation::Checkpoint => "checkpoint",
            Operation::EvaluatePayouts => "evaluate_payouts",
        }
    }
}

/// Creates the retry counter of every operation at zero (see
/// [`crate::telemetry::metrics::init_series`]).
pub fn init_series() {
    for operation in Operation::ALL {
        metrics::counter!(m::RETRIES, "operation" => operation.label()).absolute(0);
    }
}

/// The waits of one operation's run of transient failures.
pub struct Backoff<'a> {
    operation: Operation,
    health: &'a Health,
    next: Duration,
}

impl<'a> Backoff<'a> {
    pub fn new(operation: Operation, health: &'a Health) -> Self {
        Self {
            operation,
            health,
            next: FIRST_WAIT,
        }
    }

    /// After a transient failure: counts and logs it, marks the worker not ready (the
    /// liveness probe stays fed) and returns the sleep to wait, doubling the next wait
    /// up to the cap. (It returns the sleep rather than awaiting it so that the error,
    /// whatever its type, is not held across the wait.)
    pub fn wait(&mut self, error: &dyn Display) -> tokio::time::Sleep {
        let operation = self.operation.label();
        metrics::counter!(m::RETRIES, "operation" => operation).increment(1);
        tracing::warn!(%error, operation, retry_in = ?self.next, "transient failure; retrying");
        self.health.set_backing_off(true);
        self.health.set_database_ok(false);
        self.health.loop_turned();
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_WAIT);
        tokio::time::sleep(wait)
    }

    /// The operation succeeded: the worker is ready again as far as it is concerned.
    pub fn recovered(&self) {
        self.health.set_backing_off(false);
        self.health.set_database_ok(true);
    }
}

/// Runs `attempt` until it succeeds or fails with an error that is not transient.
pub async fn retry<T, E, F, Fut>(
    operation: Operation,
    health: &Health,
    mut attempt: F,
) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(operation, health);
    loop {
        match attempt().await {
            Ok(value) => {
                backoff.recovered();
                return Ok(value);
            }
            Err(error) if error.is_transient() => backoff.wait(&error).await,
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Flaky(bool);

    impl Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "flaky (transient: {})", self.0)
        }
    }

    impl Transient for Flaky {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_doubling_waits_and_others_returned() {
        let health = Health::default();
        let mut failures = 3;
        let started = tokio::time::Instant::now();
        let value = retry(Operation::Lookup, &health, || {
            failures -= 1;
            let result = if failures >= 0 {
                Err(Flaky(true))
            } else {
                Ok(7)
            };
            std::future::ready(result)
        })
        .await;
        assert!(matches!(value, Ok(7)));
        // 100 + 200 + 400 ms of backoff, on tokio's paused clock.
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        let permanent: Result<(), Flaky> = retry(Operation::Lookup, &health, || {
            std::future::ready(Err(Flaky(false)))
        })
        .await;
        assert!(matches!(permanent, Err(Flaky(false))));
    }

    #[test]
    fn every_operation_has_its_own_label() {
        let mut labels: Vec<&str> = Operation::ALL.iter().map(|o| o.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Operation::ALL.len());
    }
}
