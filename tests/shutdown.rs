//! Shutdown in process: `worker::run` runs inside the test process against the real
//! broker and PostgreSQL, and is stopped by resolving the future it was given instead
//! of by a signal. Twice in one process, which also shows that a second worker started
//! in the same process gets the metrics recorder and a port of its own.

mod common;

use std::time::{Duration, Instant};

use common::*;
use recon_tools::loadgen::{Mix, Record};
use recon_worker::config::Config;
use recon_worker::event::Input;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WITHIN: Duration = Duration::from_secs(90);

/// The worker's graceful-shutdown bound (`RECON_SHUTDOWN_TIMEOUT`'s default) with some
/// slack for the consumer to leave its group.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(35);

/// A worker run in this process, and the trigger of its shutdown.
struct InProcess {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn start(world: &World, extra: &[(&str, &str)]) -> Self {
        let config = Config::from_vars(world.worker_env(extra)).expect("valid configuration");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(recon_worker::worker::run(config, until(stopped)));
        Self { stop, task }
    }

    /// Resolves the shutdown future; returns what `run` returned and how long it took.
    async fn shut_down(self) -> (anyhow::Result<()>, Duration) {
        let started = Instant::now();
        self.stop.send(()).expect("the worker is still running");
        let result = tokio::time::timeout(SHUTDOWN_BOUND, self.task)
            .await
            .expect("run returns within the shutdown bound")
            .expect("the worker task neither panicked nor was cancelled");
        (result, started.elapsed())
    }
}

/// The shutdown future: resolves when the test says so (or drops the sender).
async fn until(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

/// Stored next offsets summed per topic: (payments, settlements).
async fn stored_offsets(world: &World) -> (i64, i64) {
    let payments = world
        .count("SELECT COALESCE(SUM(payments_next_offset), 0)::bigint FROM recon_partition_pairs")
        .await;
    let settlements = world
        .count(
            "SELECT COALESCE(SUM(settlements_next_offset), 0)::bigint FROM recon_partition_pairs",
        )
        .await;
    (payments, settlements)
}

fn produced(records: &[Record]) -> (i64, i64) {
    let payments = records
        .iter()
        .filter(|r| r.input() == Some(Input::Payments))
        .count();
    (payments as i64, (records.len() - payments) as i64)
}

#[sqlx::test(migrations = false)]
async fn resolving_the_shutdown_future_stops_the_worker_with_everything_committed(pool: PgPool) {
    let world = World::new(pool, 4).await;
    let plan = world.plan(3_000, 29, Mix::default());
    let (records, truth) = generate(&plan);
    world.produce(&records).await;
    let total = truth.outcomes.len() as i64;

    // Small batches so the stream takes a while and the stop lands mid-stream.
    let first = InProcess::start(&world, &[("RECON_BATCH_MAX_MESSAGES", "20")]);
    let started = Instant::now();
    loop {
        let rows = world.count("SELECT count(*) FROM recon_outcomes").await;
        if rows > 200 {
            assert!(
                rows < total,
                "stream finished before the stop; make it longer"
            );
            break;
        }
        assert!(!first.task.is_finished(), "the worker stopped on its own");
        assert!(started.elapsed() < WITHIN, "the worker made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (result, took) = first.shut_down().await;
    result.expect("run returns Ok after its shutdown future resolves");
    assert!(
        took < Duration::from_secs(30),
        "shutdown within RECON_SHUTDOWN_TIMEOUT, took {took:?}"
    );
    let (payments, settlements) = stored_offsets(&world).await;
    let (all_payments, all_settlements) = produced(&records);
    assert!(
        payments + settlements < all_payments + all_settlements,
        "stopped mid-stream ({payments} + {settlements} stored)"
    );
    assert!(world.count("SELECT count(*) FROM recon_outcomes").await > 0);

    // A second worker in the same process resumes from the stored offsets: nothing
    // the first one consumed is lost or counted twice.
    let second = InProcess::start(&world, &[]);
    world.await_truth(&truth, WITHIN).await;
    let started = Instant::now();
    while stored_offsets(&world).await != (all_payments, all_settlements) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "stored offsets {:?} never reached the produced counts {:?}",
            stored_offsets(&world).await,
            (all_payments, all_settlements)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (result, took) = second.shut_down().await;
    result.expect("the second run returns Ok too");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(
        stored_offsets(&world).await,
        (all_payments, all_settlements),
        "stored offsets equal the produced counts per topic"
    );
    assert_eq!(
        world.count("SELECT count(*) FROM recon_outcomes").await,
        total,
        "one outcome row per accepted event"
    );
}
