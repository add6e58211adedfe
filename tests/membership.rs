//! Static membership (`RECON_INSTANCE_ID` → `group.instance.id`): a worker restarted
//! within the session timeout gets its partition pairs back without a rebalance of the
//! other workers' pairs, as a Kubernetes rolling restart needs. The same restart without
//! instance ids is the control: there the other worker's pairs are rebalanced, so the
//! measure can tell the two apart.

mod common;

use std::time::{Duration, Instant};

use common::*;
use recon_tools::loadgen::Mix;
use sqlx::PgPool;

const WITHIN: Duration = Duration::from_secs(90);

/// Ownership epoch of every pair, in pair order.
async fn epochs(world: &World) -> Vec<i64> {
    sqlx::query_scalar("SELECT epoch FROM recon_partition_pairs ORDER BY kafka_partition")
        .persistent(false)
        .fetch_all(&world.pool)
        .await
        .expect("epochs")
}

/// The worker's rebalance count once it has stopped changing for two seconds.
async fn settled_rebalances(worker: &Worker) -> f64 {
    let addr = worker.metrics_addr(WITHIN);
    let started = Instant::now();
    let mut last = (
        scrape(&addr, "recon_rebalances_total").await,
        Instant::now(),
    );
    while last.1.elapsed() < Duration::from_secs(2) {
        assert!(started.elapsed() < WITHIN, "rebalances never settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = scrape(&addr, "recon_rebalances_total").await;
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    last.0
}

/// Two workers share four pairs; the first is stopped with SIGTERM and started again
/// at once. Returns (the second worker's rebalance callbacks during the restart, the
/// pairs whose ownership epoch moved).
async fn restart_one_of_two(pool: PgPool, static_membership: bool, seed: u64) -> (f64, Vec<usize>) {
    let world = World::new(pool, 4).await;
    let ids = [format!("{}-a", world.group), format!("{}-b", world.group)];
    let settings = |i: usize| {
        // A session longer than the restart takes (under the next-generation protocol
        // the broker's, 10 s in scripts/dev-services.sh).
        let mut s = Vec::new();
        if !consumer_protocol() {
            s.push(("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "30000"));
        }
        if static_membership {
            s.push(("RECON_INSTANCE_ID", ids[i].as_str()));
        }
        s
    };
    let mut first = world.spawn_worker("a-1", &settings(0));
    let second = world.spawn_worker("b", &settings(1));
    let plan = world.plan(400, seed, Mix::default());
    let (records, mut truth) = generate(&plan);
    world.produce(&records).await;
    world.await_truth(&truth, WITHIN).await;
    let before = settled_rebalances(&second).await;
    let epochs_before = epochs(&world).await;

    first.signal("TERM");
    assert!(
        first.wait(Duration::from_secs(35)).success(),
        "{}",
        first.log_text()
    );
    let _first = world.spawn_worker("a-2", &settings(0));
    let mut later = world.plan(400, seed + 1, Mix::default());
    later.id_prefix = format!("later{seed}-");
    let (records, later_truth) = generate(&later);
    truth.outcomes.extend(later_truth.outcomes);
    truth.rejected.extend(later_truth.rejected);
    world.produce(&records).await;
    world.await_truth(&truth, WITHIN).await;

    let during = settled_rebalances(&second).await - before;
    let epochs_after = epochs(&world).await;
    let moved = (0..epochs_before.len())
        .filter(|&p| epochs_before[p] != epochs_after[p])
        .collect();
    (during, moved)
}

#[sqlx::test(migrations = false)]
async fn a_static_member_restarted_within_the_session_moves_no_other_pair(pool: PgPool) {
    let (rebalances, moved) = restart_one_of_two(pool, true, 31).await;
    assert_eq!(
        rebalances, 0.0,
        "the other worker was rebalanced during a static member's restart"
    );
    // Range assignment gives each of the two members two of the four pairs: only the
    // restarted member's two changed owner (to its new process).
    assert_eq!(moved.len(), 2, "pairs whose epoch moved: {moved:?}");
}

#[sqlx::test(migrations = false)]
async fn without_instance_ids_the_same_restart_rebalances_the_other_worker(pool: PgPool) {
    if consumer_protocol() {
        // Not a control there: under the next-generation protocol the leaver's pairs
        // go to the other worker only at its next heartbeat, and a restart quicker
        // than that leaves the other worker untouched even without instance ids.
        return;
    }
    let (rebalances, moved) = restart_one_of_two(pool, false, 41).await;
    assert!(
        rebalances >= 2.0,
        "leave and rejoin must revoke and assign the other worker's pairs ({rebalances})"
    );
    // Every pair of both workers is revoked and assigned again.
    assert_eq!(moved.len(), 4, "pairs whose epoch moved: {moved:?}");
}

/// Progress of each pair's stored offsets over time: the longest stretch in which a
/// pair committed nothing while messages kept arriving.
struct PauseMeter {
    last: Vec<(i64, Instant)>,
    longest: Vec<Duration>,
}

impl PauseMeter {
    async fn sample(&mut self, world: &World) {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT kafka_partition, COALESCE(payments_next_offset, 0) + COALESCE(settlements_next_offset, 0)
             FROM recon_partition_pairs ORDER BY kafka_partition",
        )
        .persistent(false)
        .fetch_all(&world.pool)
        .await
        .unwrap_or_default();
        let now = Instant::now();
        for (pair, offsets) in rows {
            let pair = pair as usize;
            if self.last[pair].0 != offsets {
                self.longest[pair] = self.longest[pair].max(now - self.last[pair].1);
                self.last[pair] = (offsets, now);
            }
        }
    }

    /// Samples every 20 ms for `period`, then reports and starts afresh.
    async fn measure(&mut self, world: &World, period: Duration) -> String {
        self.longest = vec![Duration::ZERO; self.longest.len()];
        let until = Instant::now() + period;
        while Instant::now() < until {
            self.sample(world).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.report()
    }

    fn report(&self) -> String {
        let ms: Vec<u128> = self.longest.iter().map(Duration::as_millis).collect();
        format!(
            "longest_gap_ms_per_pair={ms:?} max={}",
            ms.iter().max().unwrap_or(&0)
        )
    }
}

/// Measures, not asserts: how long a join and a leave stop each pair's commits under
/// a steady stream, for the protocol in RECON_TEST_GROUP_PROTOCOL (`classic` unless
/// `consumer`). Run: `cargo test --test membership -- --ignored --nocapture`, once per
/// protocol.
#[sqlx::test(migrations = false)]
#[ignore = "a measurement: prints figures"]
async fn rebalance_pause_under_a_steady_stream(pool: PgPool) {
    const PAIRS: usize = 6;
    let world = World::new(pool, PAIRS as i32).await;
    let mut plan = world.plan(30_000, 51, Mix::default());
    plan.mix.poison_every = 0;
    let (records, truth) = generate(&plan);
    let mut workers = vec![world.spawn_worker("w1", &[]), world.spawn_worker("w2", &[])];
    let producing = {
        let topics = [world.payments.clone(), world.settlements.clone()];
        tokio::spawn(async move {
            let producer = recon_tools::admin::producer(&brokers()).expect("producer");
            recon_tools::admin::produce_paced(&producer, &records, [&topics[0], &topics[1]], 2_000)
                .await
                .expect("produce");
        })
    };
    let mut meter = PauseMeter {
        last: vec![(0, Instant::now()); PAIRS],
        longest: vec![Duration::ZERO; PAIRS],
    };
    // Warm up: both workers own their pairs and the stream flows.
    meter.measure(&world, Duration::from_secs(8)).await;
    workers.push(world.spawn_worker("w3", &[]));
    let join = meter.measure(&world, Duration::from_secs(12)).await;
    workers[0].signal("TERM");
    let leave = meter.measure(&world, Duration::from_secs(12)).await;
    let protocol = std::env::var("RECON_TEST_GROUP_PROTOCOL").unwrap_or_else(|_| "classic".into());
    eprintln!("rebalance_pause: protocol={protocol} join: {join}");
    eprintln!("rebalance_pause: protocol={protocol} leave: {leave}");
    producing.await.expect("producer");
    world.await_truth(&truth, WITHIN).await;
}
