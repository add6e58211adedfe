//! Exactly-once under faults, the way Kafka's own transaction system tests prove it:
//! bounce everything hard, then compare the output with ground truth.
//!
//! Three workers consume four co-partitioned partition pairs (two with static
//! membership, as the Kubernetes manifests run them, one without) while two upstream
//! producers stream a generated workload (every outcome kind, refunds and chargebacks
//! of contract §6 included, redeliveries, every class of bad input): an idempotent one (`acks=all`) and a transactional one that commits
//! part of its transactions and aborts the rest. Meanwhile the test SIGKILLs workers
//! 1–3 s apart, twice two at the same moment, restarts PostgreSQL, SIGKILLs and restarts
//! the broker while both producers keep writing, and freezes one worker with SIGSTOP
//! past the session timeout. The idempotent producer also streams payouts (contract §7:
//! lines spread over every partition, announcements on the payouts topic).
//! Afterwards `recon_outcomes` and `recon_discrepancies` must equal the ground truth of
//! everything acknowledged or committed, exactly once; every payout's sums and counts
//! must equal its lines' (no line counted twice or lost); nothing of an aborted
//! transaction may appear; and every bad message must be in `rejected_events` exactly
//! once. A group that stops making progress is a failure: nothing nudges it. (That a
//! quiet stream ending in transaction markers still fires its deadlines needs a stream
//! of its own: `e2e`'s quiet-partition tests.)
//!
//! It restarts the shared PostgreSQL and broker, so it runs alone, after the rest of the
//! suite: `cargo nextest run --run-ignored only` (scripts/test.sh does this).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use recon_tools::loadgen::{Mix, Record};
use sqlx::PgPool;

const WORKERS: usize = 3;

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .max()
        })
        .expect("a Debian PostgreSQL cluster");
    // RECON_TEST_PG_CLUSTER: a second cluster started by scripts/dev-services.sh with
    // RECON_PG_CLUSTER (the chaos test can then run beside other tests).
    let cluster = std::env::var("RECON_TEST_PG_CLUSTER").unwrap_or_else(|_| "main".into());
    let status = std::process::Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            &cluster,
            "restart",
            "-m",
            "fast",
        ])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "PostgreSQL restart failed");
}

fn restart_broker() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-services.sh");
    // SIGKILL, not a controlled shutdown: acknowledged writes must survive a crash.
    let status = std::process::Command::new(script)
        .args(["restart-broker", "--hard"])
        .status()
        .expect("dev-services");
    assert!(status.success(), "broker restart failed");
}

async fn progress(world: &World) -> i64 {
    world
        .count("SELECT COALESCE(SUM(COALESCE(payments_next_offset, 0) + COALESCE(settlements_next_offset, 0)), 0)::bigint FROM recon_partition_pairs")
        .await
}

/// Seconds until the stored offsets move again after a fault.
async fn recovery(world: &World, since: Instant, before: i64) -> f64 {
    loop {
        let now = progress(world).await;
        if now > before || since.elapsed() > Duration::from_secs(90) {
            return since.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL this many workers at the same moment, then start them again.
    Kill(usize),
    RestartPostgres,
    RestartBroker,
    /// SIGSTOP one worker past its session timeout, then SIGCONT: a zombie.
    Freeze,
}

/// Faults in bursts: a burst's faults follow each other 1–3 s apart; the time to
/// recover is measured after the burst.
const BURSTS: [(u64, &[Fault]); 6] = [
    (5, &[Fault::Kill(1), Fault::Kill(1), Fault::Kill(2)]),
    (30, &[Fault::RestartPostgres]),
    (45, &[Fault::Kill(1), Fault::Kill(1), Fault::Kill(1)]),
    (65, &[Fault::RestartBroker]),
    (90, &[Fault::Freeze]),
    (115, &[Fault::Kill(2), Fault::Kill(1)]),
];

/// Streams `chunks` with the idempotent producer, one every 1.5 s, through every fault.
fn feed_idempotent(world: &World, chunks: Vec<Vec<Record>>) -> tokio::task::JoinHandle<()> {
    let topics = [
        world.payments.clone(),
        world.settlements.clone(),
        world.payouts.clone().expect("a payouts topic"),
    ];
    tokio::spawn(async move {
        let producer = recon_tools::admin::producer(&brokers()).expect("producer");
        for chunk in chunks {
            recon_tools::admin::produce_all(
                &producer,
                &chunk,
                [&topics[0], &topics[1], &topics[2]],
            )
            .await
            .expect("an acknowledged write was refused");
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
    })
}

/// Alternates a committed and an aborted transaction every 1.5 s, through every fault.
fn feed_transactional(
    world: &World,
    committed: Vec<Vec<Record>>,
    aborted: Vec<Vec<Record>>,
) -> tokio::task::JoinHandle<()> {
    let topics = [world.payments.clone(), world.settlements.clone()];
    let transactional_id = unique("chaos-txn");
    tokio::spawn(async move {
        let producer = transactional_producer(&transactional_id).await;
        let mut aborted = aborted.into_iter();
        for chunk in committed {
            produce_in_transaction(&producer, &chunk, [&topics[0], &topics[1]], true)
                .await
                .expect("transaction commit");
            if let Some(chunk) = aborted.next() {
                produce_in_transaction(&producer, &chunk, [&topics[0], &topics[1]], false)
                    .await
                    .expect("transaction abort");
            }
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
    })
}

fn chunks_of(records: &[Record], count: usize) -> Vec<Vec<Record>> {
    records
        .chunks(records.len() / count + 1)
        .map(<[Record]>::to_vec)
        .collect()
}

/// Worker slots: the first two join with a fixed `group.instance.id` (static
/// membership, as the manifests run pods), the third as a new member each time.
fn spawn_slot(world: &World, slot: usize, generation: usize) -> Worker {
    let instance = format!("{}-{slot}", world.group);
    let mut settings = vec![
        ("RECON_BATCH_MAX_MESSAGES", "100"),
        ("RECON_IDLE_TIMEOUT", "2s"),
        // The stream's events are dated about 61 hours back (loadgen keeps late lines
        // behind their Kafka timestamps): with the default grace every unbalanced
        // payout would be due by the end. The check is of sums and counts.
        ("RECON_PAYOUT_GRACE", "30d"),
    ];
    if slot < 2 {
        settings.push(("RECON_INSTANCE_ID", &instance));
    }
    world.spawn_worker(&format!("worker-{slot}-{generation}"), &settings)
}

#[sqlx::test(migrations = false)]
#[ignore = "restarts shared services; run alone with --run-ignored only"]
async fn exactly_once_through_kills_restarts_and_a_frozen_worker(pool: PgPool) {
    let world = World::with_payouts(pool, 4).await;
    let mix = Mix {
        poison_every: 40,
        ..Mix::default()
    };
    let plan = world.plan(12_000, 77, mix.clone());
    let (records, mut truth) = generate(&plan);
    // The transactional producer's two streams: same event times (so no deadline of one
    // fires early because of the other), ids of their own, no bad messages.
    let clean = Mix {
        poison_every: 0,
        ..mix
    };
    let mut committed_plan = world.plan(2_000, 78, clean.clone());
    committed_plan.base_time = plan.base_time;
    committed_plan.id_prefix = "txc-".into();
    let mut aborted_plan = world.plan(2_000, 79, clean);
    aborted_plan.base_time = plan.base_time;
    aborted_plan.id_prefix = "txa-".into();
    let (committed_records, committed_truth) = generate(&committed_plan);
    let (aborted_records, _) = generate(&aborted_plan);
    truth.extend(committed_truth);
    // Payouts of 3 to 50 lines each, every way a payout can end, streamed beside the rest.
    let mut payouts_plan = world.plan(60, 80, Mix::payouts_only(1));
    payouts_plan.base_time = plan.base_time;
    payouts_plan.id_prefix = "po-".into();
    let (payout_records, payouts_truth) = generate(&payouts_plan);
    truth.extend(payouts_truth);
    let idempotent: Vec<Vec<Record>> = chunks_of(&records, 100)
        .into_iter()
        .zip(
            chunks_of(&payout_records, 100)
                .into_iter()
                .chain(std::iter::repeat(Vec::new())),
        )
        .map(|(mut chunk, payouts)| {
            chunk.extend(payouts);
            chunk
        })
        .collect();

    let mut generation = 0usize;
    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|slot| spawn_slot(&world, slot, generation))
        .collect();
    let feeders = [
        feed_idempotent(&world, idempotent),
        feed_transactional(
            &world,
            chunks_of(&committed_records, 100),
            chunks_of(&aborted_records, 100),
        ),
    ];

    let started = Instant::now();
    let mut recoveries: Vec<(String, f64)> = Vec::new();
    let mut rng = rand::rng();
    let (mut kills, mut double_kills) = (0, 0);
    for (at, faults) in BURSTS {
        tokio::time::sleep(Duration::from_secs(at).saturating_sub(started.elapsed())).await;
        let before = progress(&world).await;
        let burst_at = Instant::now();
        let mut labels = Vec::new();
        let mut frozen = None;
        for (i, fault) in faults.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..=3_000))).await;
            }
            match *fault {
                Fault::Kill(n) => {
                    let mut victims: Vec<usize> = (0..WORKERS).collect();
                    while victims.len() > n {
                        victims.remove(rng.random_range(0..victims.len()));
                    }
                    for &v in &victims {
                        workers[v].signal("KILL");
                    }
                    generation += 1;
                    for &v in &victims {
                        workers[v].wait(Duration::from_secs(5));
                        workers[v] = spawn_slot(&world, v, generation);
                    }
                    kills += n;
                    double_kills += usize::from(n >= 2);
                    labels.push(format!("kill {victims:?}"));
                }
                Fault::RestartPostgres => {
                    restart_postgres();
                    labels.push("PostgreSQL restart".into());
                }
                Fault::RestartBroker => {
                    let down = Instant::now();
                    restart_broker();
                    labels.push(format!(
                        "broker SIGKILL + restart (ready again after {:.1}s)",
                        down.elapsed().as_secs_f64()
                    ));
                }
                Fault::Freeze => {
                    let victim = rng.random_range(0..WORKERS);
                    workers[victim].signal("STOP");
                    frozen = Some(victim);
                    labels.push(format!("freeze [{victim}]"));
                }
            }
        }
        let label = format!("{} at {at}s", labels.join(", "));
        let took = if let Some(victim) = frozen {
            // Frozen past the session timeout: the others must take its pairs over
            // meanwhile, and it must come back as a fenced zombie, not a writer.
            let (took, ()) = tokio::join!(recovery(&world, burst_at, before), async {
                tokio::time::sleep(Duration::from_secs(12)).await;
                workers[victim].signal("CONT");
            });
            took
        } else {
            recovery(&world, burst_at, before).await
        };
        eprintln!("chaos: {label}: stored offsets moved again after {took:.1}s");
        recoveries.push((label, took));
    }
    for feeder in feeders {
        feeder.await.expect("feeder");
    }
    let produced_at = Instant::now();
    // No watchdog: a group that stops short of the end is a failure.
    world.await_truth(&truth, Duration::from_secs(120)).await;
    let drained = produced_at.elapsed().as_secs_f64();
    // Every discrepancy once, in its state: chargebacks and over-refunds (contract §6,
    // in the default mix) included, whatever the kills did to the order of reading.
    world
        .await_discrepancies(&truth, Duration::from_secs(30))
        .await;

    let outcomes = world.outcomes().await;
    let rejected = world.rejected().await;
    let lost = truth
        .outcomes
        .keys()
        .filter(|k| !outcomes.contains_key(*k))
        .count();
    let wrong = truth
        .outcomes
        .iter()
        .filter(|(k, v)| outcomes.get(*k).is_some_and(|o| o != *v))
        .count();
    let rows = world.count("SELECT count(*) FROM recon_outcomes").await;
    let distinct = world
        .count("SELECT count(DISTINCT (event_kind, event_id)) FROM recon_outcomes")
        .await;
    let aborted_seen = world
        .count("SELECT count(*) FROM recon_outcomes WHERE event_id LIKE 'txa-%' OR payment_id LIKE 'txa-%'")
        .await;
    let fenced: usize = workers
        .iter()
        .map(|w| w.log_text().matches("fenced: another worker owns").count())
        .sum();
    eprintln!(
        "chaos: messages={} committed_txn_messages={} aborted_txn_messages={} accepted_rows={rows} \
         rejected_rows={} (expected {}) lost={lost} wrong={wrong} duplicated={} aborted_seen={aborted_seen} \
         kills={kills} double_kills={double_kills} fenced_checkpoints_in_live_logs={fenced} \
         drained_after_last_produce={drained:.1}s total={:.0}s",
        records.len(),
        committed_records.len(),
        aborted_records.len(),
        rejected.len(),
        truth.rejected.len(),
        rows - distinct,
        started.elapsed().as_secs_f64()
    );
    for (label, took) in &recoveries {
        eprintln!("chaos: recovery {label}: {took:.1}s");
    }
    assert!(kills >= 5 && double_kills >= 2, "{kills} kills");
    assert_eq!((lost, wrong, rows - distinct, aborted_seen), (0, 0, 0, 0));
    // No unique key hides a second write of a discrepancy: each must be there once.
    let twice = world
        .count("SELECT count(*) FROM (SELECT kind, payment_event_id, settlement_event_id, payout_id FROM recon_discrepancies GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d")
        .await;
    assert_eq!(twice, 0, "a discrepancy was recorded twice");
    // Every payout's lines counted exactly once, whatever was killed or read twice; no
    // announced payout is due (24h grace).
    let expected_payouts = expected_view_before_deadlines(&truth);
    let started_payouts = Instant::now();
    let mut payouts = payouts_view(&world).await;
    while payouts != expected_payouts && started_payouts.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        payouts = payouts_view(&world).await;
    }
    let wrong_payouts: Vec<_> = expected_payouts
        .iter()
        .filter(|(id, row)| payouts.get(*id) != Some(row))
        .map(|(id, row)| (id, row, payouts.get(id)))
        .collect();
    eprintln!(
        "chaos: payouts={} wrong_payouts={} announcements={}",
        expected_payouts.len(),
        wrong_payouts.len(),
        world
            .count("SELECT count(*) FROM recon_payout_announcements")
            .await
    );
    assert!(wrong_payouts.is_empty(), "{wrong_payouts:#?}");
    assert_eq!(payouts.len(), expected_payouts.len());
    // The only payouts already due are those of the stale refund lines of the default
    // mix (their payout ids are never announced, and their last line is more than O
    // old): each may have its one open unannounced_payout, nothing else.
    for (payout, kind, open, _) in payout_discrepancies(&world).await {
        assert!(
            kind == "unannounced_payout"
                && open
                && truth.payouts[&payout].expected_net_minor.is_none(),
            "{payout}: {kind} (open: {open})"
        );
    }

    for worker in &mut workers {
        worker.signal("TERM");
        assert!(
            worker.wait(Duration::from_secs(40)).success(),
            "{}",
            worker.log_text()
        );
    }
}
