//! The payout evaluator task (contract §7): every worker with payouts on runs one,
//! which calls [`Store::evaluate_payouts`] about every 5 s and publishes the payout
//! gauges. The transaction itself, and why evaluations are serial across workers, is
//! in `store::payouts`.
//!
//! Why a module of its own beside [`crate::pipeline`] rather than inside it: the
//! evaluator shares nothing with the pipeline's loop. It reads no Kafka, owns no
//! partition pair, has no batch to finish on shutdown, and must neither wait for the
//! loop nor hold it up: it only needs the store, so it runs as its own task, started
//! and stopped by the worker beside the pipeline. Its failures stay its own too:
//!
//! - **Errors** are logged and counted (`recon_payout_evaluations_total{result="failed"}`)
//!   and never stop anything: a transient one is retried with [`Backoff`] (counted in
//!   `recon_retries_total{operation="evaluate_payouts"}`), a permanent one (a bug, a
//!   schema that is not what this binary expects) is tried again each period, loudly,
//!   while ingestion goes on; the next run redoes whatever the failed one would have
//!   done. The [`Backoff`] reports to a [`Health`] of the evaluator's own, not the
//!   worker's: a failing evaluation must not make the worker not ready (its pairs are
//!   still being reconciled), and its retries must not feed the liveness probe that
//!   watches the pipeline's loop.
//! - **Shutdown** drops an evaluation in flight: its transaction rolls back (nothing
//!   half-done can be seen), and the next worker's run does it again.
//! - **Gauges** are global values read from the database after every run, also when
//!   another worker held the lock (so every worker reports, and dashboards take max()).

use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::engine::{DiscrepancyKind, PayoutStatus};
use crate::retry::{Backoff, Operation};
use crate::store::{PayoutGauges, PayoutRules, Store};
use crate::telemetry::metrics as m;
use crate::telemetry::Health;

/// `PAYOUT_EVALUATE_EVERY` of the design: how often each worker tries to evaluate.
/// Payouts fall due on the global watermark, which a quiet stream moves about once a
/// second; 5 s keeps `recon_payouts` and the discrepancies within seconds of the
/// lines at a few cheap statements per worker per period.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(5);

/// Each wait is the period ± this fraction, at random. Workers started together (a
/// rollout) would otherwise try the lock in step for ever; spread out, the gauges they
/// read after each try are refreshed at different moments too.
const JITTER: f64 = 0.2;

/// After a run a cap cut short, the next one comes after this fraction of the period:
/// a backlog (the first enablement, an outage) drains at once without one run growing
/// long.
const CATCH_UP: u32 = 10;

/// Runs the payout evaluator until `shutdown` resolves: evaluates about every `every`
/// (± 20%), publishes the payout gauges after each try. Never returns early: errors are
/// logged, counted and retried. Returns promptly once `shutdown` resolves, dropping an
/// evaluation in flight (it rolls back).
pub async fn run_evaluator(
    store: Store,
    rules: PayoutRules,
    every: Duration,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    // The evaluator's own: see the module doc.
    let health = Health::default();
    let mut backoff = Backoff::new(Operation::EvaluatePayouts, &health);
    let mut jitter = Jitter::seeded();
    tracing::info!(
        partitions = rules.partitions,
        grace = ?rules.grace,
        orphan_timeout = ?rules.orphan_timeout,
        ?every,
        "payout evaluator started"
    );
    loop {
        let attempt = tokio::select! {
            biased;
            () = &mut shutdown => break,
            attempt = store.evaluate_payouts(&rules) => attempt,
        };
        let pause = match attempt {
            Ok(Some(evaluation)) => {
                metrics::counter!(m::PAYOUT_EVALUATIONS, "result" => "acquired").increment(1);
                backoff = Backoff::new(Operation::EvaluatePayouts, &health);
                if evaluation.changed
                    + evaluation.opened
                    + evaluation.reopened
                    + evaluation.resolved
                    > 0
                {
                    tracing::info!(
                        touched = evaluation.touched,
                        changed = evaluation.changed,
                        opened = evaluation.opened,
                        reopened = evaluation.reopened,
                        resolved = evaluation.resolved,
                        more = evaluation.more,
                        global_watermark = ?evaluation.global_watermark,
                        "payouts evaluated"
                    );
                }
                publish(&store).await;
                if evaluation.more {
                    tokio::time::sleep(every / CATCH_UP)
                } else {
                    tokio::time::sleep(jitter.around(every))
                }
            }
            Ok(None) => {
                metrics::counter!(m::PAYOUT_EVALUATIONS, "result" => "skipped").increment(1);
                backoff = Backoff::new(Operation::EvaluatePayouts, &health);
                publish(&store).await;
                tokio::time::sleep(jitter.around(every))
            }
            Err(error) if error.is_transient() => {
                metrics::counter!(m::PAYOUT_EVALUATIONS, "result" => "failed").increment(1);
                backoff.wait(&error)
            }
            Err(error) => {
                metrics::counter!(m::PAYOUT_EVALUATIONS, "result" => "failed").increment(1);
                tracing::error!(
                    %error,
                    retry_in = ?every,
                    "payout evaluation failed; ingestion goes on, payouts are not evaluated until this is fixed"
                );
                tokio::time::sleep(jitter.around(every))
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = pause => {}
        }
    }
    tracing::info!("payout evaluator stopped");
}

/// Reads and publishes the payout gauges. A monitoring read: a failure is logged and
/// the gauges keep their last values until the next period.
async fn publish(store: &Store) {
    match store.payout_gauges().await {
        Ok(gauges) => publish_gauges(&gauges, Utc::now()),
        Err(error) => tracing::warn!(%error, "could not read the payout gauges"),
    }
}

/// Sets every payout series: each status and kind, 0 when absent; the oldest overdue
/// unbalanced payout's age at `now`, 0 when none; the global watermark, 0 while unknown.
pub fn publish_gauges(gauges: &PayoutGauges, now: DateTime<Utc>) {
    for status in PayoutStatus::ALL {
        let count = gauges
            .statuses
            .iter()
            .find(|(s, _)| s == status.as_str())
            .map_or(0, |(_, count)| *count);
        metrics::gauge!(m::PAYOUTS, "status" => status.as_str()).set(count as f64);
    }
    for kind in DiscrepancyKind::PAYOUT {
        let open = gauges
            .open_discrepancies
            .iter()
            .find(|(k, _)| k == kind.as_str())
            .map_or(0, |(_, open)| *open);
        metrics::gauge!(m::OPEN_PAYOUT_DISCREPANCIES, "kind" => kind.as_str()).set(open as f64);
    }
    let age = gauges.oldest_unbalanced_since.map_or(0.0, |since| {
        ((now - since).num_microseconds().unwrap_or(i64::MAX).max(0)) as f64 / 1e6
    });
    metrics::gauge!(m::OLDEST_UNBALANCED_PAYOUT_AGE).set(age);
    let watermark = gauges
        .global_watermark
        .map_or(0.0, |g| g.timestamp_micros() as f64 / 1e6);
    metrics::gauge!(m::GLOBAL_WATERMARK).set(watermark);
}

/// A small xorshift generator for the waits' jitter: spreading timers needs no
/// cryptographic quality, only a different seed per process, which the standard
/// library's randomly keyed hasher gives without another dependency.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        Jitter(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `every` ± [`JITTER`].
    fn around(&mut self, every: Duration) -> Duration {
        every.mul_f64(1.0 - JITTER + 2.0 * JITTER * self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_within_twenty_percent_and_vary() {
        let mut jitter = Jitter::seeded();
        let every = Duration::from_secs(5);
        let waits: Vec<Duration> = (0..1000).map(|_| jitter.around(every)).collect();
        assert!(waits
            .iter()
            .all(|w| *w >= Duration::from_secs(4) && *w < Duration::from_secs(6)));
        let shortest = waits.iter().min().copied().unwrap_or_default();
        let longest = waits.iter().max().copied().unwrap_or_default();
        // 1000 draws cover most of the ±1 s range.
        assert!(shortest < Duration::from_millis(4100), "{shortest:?}");
        assert!(longest > Duration::from_millis(5900), "{longest:?}");
    }

    #[tokio::test]
    async fn the_evaluator_can_be_spawned() {
        fn spawnable<F: Future + Send + 'static>(_: &F) {}
        let store = Store::connect_lazy(
            "postgres://nobody@127.0.0.1:1/none".parse().expect("url"),
            "p",
            "s",
        );
        let rules = PayoutRules::new(1, Duration::from_secs(1), Duration::from_secs(1));
        let runner = run_evaluator(store, rules, EVALUATE_EVERY, std::future::pending());
        spawnable(&runner);
    }

    /// The database is unreachable (nothing listens on port 1): the evaluation in
    /// flight waits on the pool, and retries back off; shutdown ends the task at once
    /// all the same.
    #[tokio::test]
    async fn shutdown_stops_the_evaluator_promptly_even_mid_evaluation() {
        let store = Store::connect_lazy(
            "postgres://nobody@127.0.0.1:1/none".parse().expect("url"),
            "p",
            "s",
        );
        let rules = PayoutRules::new(1, Duration::from_secs(1), Duration::from_secs(1));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_evaluator(
            store,
            rules,
            Duration::from_millis(50),
            async move {
                let _ = stopped.await;
            },
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "errors do not stop the evaluator");
        let asked = std::time::Instant::now();
        stop.send(()).expect("the task is waiting");
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("stopped within a second")
            .expect("no panic");
        assert!(asked.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn gauges_give_every_status_and_kind_a_value() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let now = Utc::now();
        let gauges = PayoutGauges {
            global_watermark: Some(DateTime::from_timestamp(1_700_000_000, 0).expect("time")),
            oldest_unbalanced_since: Some(now - chrono::Duration::seconds(90)),
            statuses: vec![("balanced".into(), 3), ("total_mismatch".into(), 2)],
            open_discrepancies: vec![("payout_mismatch".into(), 2)],
        };
        metrics::with_local_recorder(&recorder, || publish_gauges(&gauges, now));
        let text = recorder.handle().render();
        for line in [
            "recon_payouts{status=\"balanced\"} 3",
            "recon_payouts{status=\"total_mismatch\"} 2",
            "recon_payouts{status=\"pending\"} 0",
            "recon_payouts{status=\"currency_mismatch\"} 0",
            "recon_payouts{status=\"unannounced\"} 0",
            "recon_open_payout_discrepancies{kind=\"payout_mismatch\"} 2",
            "recon_open_payout_discrepancies{kind=\"unannounced_payout\"} 0",
            "recon_oldest_unbalanced_payout_age_seconds 90",
            "recon_global_watermark_timestamp_seconds 1700000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Nothing overdue, G not known: zeros, and a `since` ahead of now is no age.
        let none = PayoutGauges {
            oldest_unbalanced_since: Some(now + chrono::Duration::hours(1)),
            ..PayoutGauges::default()
        };
        metrics::with_local_recorder(&recorder, || publish_gauges(&none, now));
        let text = recorder.handle().render();
        for line in [
            "recon_payouts{status=\"balanced\"} 0",
            "recon_oldest_unbalanced_payout_age_seconds 0",
            "recon_global_watermark_timestamp_seconds 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
