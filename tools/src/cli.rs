//! The `recon-tools` command line: its subcommands and what each prints. The tools
//! read the worker's own configuration (`DATABASE_URL`, `RECON_*`), so they address
//! the same brokers, topics and database as a worker started in the same environment.

use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use recon_worker::config::Config;
use recon_worker::engine::EngineConfig;
use recon_worker::store::Store;

use crate::{admin, bench, loadgen, same_rows};

#[derive(Subcommand)]
pub enum Command {
    /// Create the payments and settlements topics, and the payouts topic when
    /// RECON_PAYOUTS_TOPIC is set, co-partitioned (same partition count).
    CreateTopics {
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Produce a deterministic stream of payments and settlements with every outcome
    /// kind and bad messages (and payout announcements when the mix has payouts), and
    /// print the expected outcome and payout counts.
    Loadgen(LoadgenArgs),
    /// Measurements for scripts/bench.sh (they print figures and assert nothing).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
pub struct LoadgenArgs {
    /// Number of scenarios (payment ids).
    #[arg(long, default_value_t = 1000)]
    scenarios: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// One bad message every N scenarios (0 for none).
    #[arg(long, default_value_t = 50)]
    poison_every: usize,
    /// Prefix for every generated id, to keep runs apart.
    #[arg(long, default_value = "")]
    id_prefix: String,
    /// Target rate in messages per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Scenario weights over the defaults (presets: `v1`, the version-1 stream;
    /// `payouts`, every payout scenario at 1 over what came before), e.g. `matched=70,late=3,currency=2,amount=3,fee=2,dup_payment=2,dup_settlement=2,missing=3,orphan=3,pending=0,redelivery=5`;
    /// contract §6: `refund=3,refund_late=1,refund_currency=1,refund_amount=1,refund_fee=1,refund_missing=1,refund_orphan=1,dup_refund=1,dup_refund_line=1,chargeback=1,chargeback_reversed=1,orphan_reversal=1,over_refunded=1,over_refunded_recovered=1`.
    /// contract §7: `payout_balanced=1,payout_short=1,payout_currency=1,payout_count=1,payout_unannounced=1,payout_announced_first=1,payout_reannounced=1`.
    #[arg(long)]
    mix: Option<String>,
    /// The topic payout announcements go to [default: RECON_PAYOUTS_TOPIC if set, else
    /// `payouts`].
    #[arg(long)]
    payouts_topic: Option<String>,
    /// K > 0: every capture line goes into a payout of K consecutive lines (of one
    /// currency), each announced, balanced, after its last line.
    #[arg(long, default_value_t = 0)]
    payouts_every_line: usize,
    /// After the mix, this many duplicates of one payment id, each with a fresh event
    /// id (a duplicate storm; some are also sent again).
    #[arg(long, default_value_t = 0)]
    duplicate_storm: usize,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// RSS growth per open payment held in the in-memory window.
    WindowMemory {
        #[arg(long, default_value_t = 1_000_000)]
        items: usize,
        /// The kind of open item each key holds.
        #[arg(long, value_enum, default_value_t = bench::OpenItem::Payment)]
        item: bench::OpenItem,
    },
    /// Raw consume rate of both topics from the beginning (a consumer that only counts).
    Consume {
        #[arg(long)]
        messages: u64,
    },
    /// Latency from Kafka timestamp to a consumer with the worker's fetch settings, for
    /// messages produced while it runs: the broker's share of end-to-end latency.
    BrokerLatency {
        /// Stop after this many messages, or when none arrives for 5 seconds.
        #[arg(long)]
        messages: u64,
    },
    /// Raw PostgreSQL write rate of simple outcome rows (batched UNNEST insert): one
    /// pair, one connection, short ascending ids, all `matched`, events only.
    PgWrite {
        #[arg(long, default_value_t = 500_000)]
        rows: usize,
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
    },
    /// Raw PostgreSQL insert rate of the rows the pipeline stores for its benchmark
    /// stream (`bench pipeline` with the same arguments): runs the pipeline into
    /// `--scratch-database`, then times inserting its final rows into DATABASE_URL's
    /// database (both freshly created) with the checkpoint's statements, in the
    /// pipeline's batches and concurrent transactions, and checks both hold the same.
    PgSameRows {
        #[command(flatten)]
        stream: StreamArgs,
        /// A database on the same server for the pipeline's run.
        #[arg(long)]
        scratch_database: String,
    },
    /// The worker's ceiling without the broker: pre-decoded events through engine and checkpoint.
    Pipeline {
        #[command(flatten)]
        stream: StreamArgs,
        /// K > 0: the same stream with every capture line in a payout of K lines
        /// (their `payout_id` written; the announcements are left out until the
        /// pipeline reads the payouts topic).
        #[arg(long, default_value_t = 0)]
        payouts_every_line: usize,
    },
}

/// The benchmark stream `bench pipeline` and `bench pg-same-rows` generate (seed 1).
#[derive(Args)]
pub struct StreamArgs {
    #[arg(long, default_value_t = 200_000)]
    scenarios: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// The stream's mix, as `loadgen --mix` takes it (`v1` first: the version-1
    /// stream, then entries turning scenarios on, e.g. `v1,refund=11,chargeback=1`).
    #[arg(long, default_value = "")]
    mix: String,
}

/// Runs one command to its end.
pub async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::CreateTopics { partitions } => create_topics(&config, partitions).await,
        Command::Loadgen(args) => produce_load(&config, args).await,
        Command::Bench(command) => run_bench(command, config).await,
    }
}

async fn create_topics(config: &Config, partitions: i32) -> anyhow::Result<()> {
    let mut topics = vec![
        config.payments_topic.as_str(),
        config.settlements_topic.as_str(),
    ];
    // Contract §7: the payouts topic must have the same partition count.
    topics.extend(config.payouts.as_ref().map(|p| p.topic.as_str()));
    admin::create_topics(&config.brokers, &topics, partitions)
        .await
        .context("creating topics")?;
    println!(
        "topics {} exist with {partitions} partitions each (existing topics are left as they are)",
        topics.join(", ")
    );
    Ok(())
}

async fn produce_load(config: &Config, args: LoadgenArgs) -> anyhow::Result<()> {
    let engine = EngineConfig::new(&config.matching, config.window);
    let plan = loadgen::Plan {
        seed: args.seed,
        scenarios: args.scenarios,
        mix: loadgen::Mix {
            poison_every: args.poison_every,
            ..loadgen::parse_mix(args.mix.as_deref().unwrap_or("")).map_err(anyhow::Error::msg)?
        },
        base_time: chrono::Utc::now().timestamp_micros(),
        deadline: engine.deadline,
        orphan_timeout: engine.orphan_timeout,
        max_message_bytes: config.max_message_bytes,
        id_prefix: args.id_prefix,
        payout_every_line: args.payouts_every_line,
    };
    let (mut records, mut truth) = loadgen::generate(&plan);
    if args.duplicate_storm > 0 {
        let (storm, storm_truth) = loadgen::duplicate_storm(&plan, args.duplicate_storm);
        records.extend(storm);
        truth.extend(storm_truth);
    }
    let payouts_topic = args
        .payouts_topic
        .or_else(|| config.payouts.as_ref().map(|p| p.topic.clone()))
        .unwrap_or_else(|| "payouts".to_owned());
    let producer = admin::producer(&config.brokers).context("creating the producer")?;
    let started = Instant::now();
    admin::produce_paced(
        &producer,
        &records,
        [
            &config.payments_topic,
            &config.settlements_topic,
            &payouts_topic,
        ],
        args.rate,
    )
    .await
    .context("producing")?;
    println!(
        "produced {} messages ({} bad) in {:.1}s; expected outcomes:",
        records.len(),
        truth.rejected.len(),
        started.elapsed().as_secs_f64()
    );
    for ((kind, outcome), count) in truth.outcome_counts_by_kind() {
        // (as_str: the types' Display writes the name without padding)
        println!("  {:<10} {:<22} {count}", kind.as_str(), outcome.as_str());
    }
    println!("expected discrepancies (besides deadlines that fire and resolve in passing):");
    for ((kind, resolution), count) in truth.discrepancy_counts() {
        let state = resolution.map_or_else(|| "open".to_owned(), |r| format!("resolved {r}"));
        println!("  {:<22} {state:<20} {count}", kind.as_str());
    }
    if !truth.payouts.is_empty() {
        // (contract §7; the announcements went to `payouts_topic`)
        let announcements = records.iter().filter(|r| r.input().is_none()).count();
        println!(
            "expected payouts ({} announcements to {payouts_topic}), by status once every deadline has passed:",
            announcements
        );
        for (status, count) in truth.payout_counts() {
            println!("  {:<22} {count}", status.as_str());
        }
        println!("expected open payout discrepancies:");
        for (kind, count) in truth.payout_discrepancy_counts() {
            println!("  {:<22} {count}", kind.as_str());
        }
    }
    println!("scenarios:");
    for (name, count) in &truth.scenarios {
        println!("  {name:<24} {count}");
    }
    Ok(())
}

async fn run_bench(command: BenchCommand, config: Config) -> anyhow::Result<()> {
    match command {
        BenchCommand::WindowMemory { items, item } => {
            let (before, after, per_item, estimated) = bench::window_memory(items, item);
            let item = format!("{item:?}").to_lowercase();
            println!(
                "window_memory: item={item} items={items} rss_before_mb={:.1} rss_after_mb={:.1} rss_bytes_per_item={per_item:.1} accounted_bytes_per_item={estimated}",
                before as f64 / 1e6,
                after as f64 / 1e6
            );
        }
        BenchCommand::Consume { messages } => {
            let (count, elapsed) =
                tokio::task::spawn_blocking(move || bench::raw_consume(&config, messages))
                    .await??;
            println!(
                "raw_consume: messages={count} seconds={:.2} eps={:.0}",
                elapsed.as_secs_f64(),
                count as f64 / elapsed.as_secs_f64().max(1e-9)
            );
        }
        BenchCommand::BrokerLatency { messages } => {
            let (count, p50, p99) =
                tokio::task::spawn_blocking(move || bench::broker_latency(&config, messages))
                    .await??;
            println!("broker_latency: messages={count} p50_ms={p50:.1} p99_ms={p99:.1}");
        }
        BenchCommand::PgWrite { rows, batch } => {
            let elapsed = bench::raw_pg_write(&store(&config), rows, batch).await?;
            println!(
                "pg_write: rows={rows} batch={batch} seconds={:.2} rows_per_s={:.0}",
                elapsed.as_secs_f64(),
                rows as f64 / elapsed.as_secs_f64().max(1e-9)
            );
        }
        BenchCommand::PgSameRows {
            stream:
                StreamArgs {
                    scenarios,
                    partitions,
                    mix,
                },
            scratch_database,
        } => {
            let mix = loadgen::parse_mix(&mix).map_err(anyhow::Error::msg)?;
            let mut scratch_config = config.clone();
            scratch_config.database = config.database.clone().database(&scratch_database);
            let run = same_rows::same_rows(
                &config,
                store(&config),
                store(&scratch_config),
                scenarios,
                partitions,
                mix,
            )
            .await?;
            let seconds = run.elapsed.as_secs_f64().max(1e-9);
            // events_per_s counts the stream's messages, as `bench pipeline`'s eps
            // does: the two are rates of the same work, and their ratio the ratio of
            // the two times.
            println!(
                "pg_same_rows: messages={} event_rows={} discrepancies={} rejected={} batches={} seconds={seconds:.2} events_per_s={:.0} rows_per_s={:.0} source_pipeline_eps={:.0} (events_per_s: messages of the stream per second; rows_per_s: event rows)",
                run.messages,
                run.event_rows,
                run.discrepancies,
                run.rejected,
                run.batches,
                run.messages as f64 / seconds,
                run.event_rows as f64 / seconds,
                run.source.messages as f64 / run.source.elapsed.as_secs_f64().max(1e-9),
            );
        }
        BenchCommand::Pipeline {
            stream:
                StreamArgs {
                    scenarios,
                    partitions,
                    mix,
                },
            payouts_every_line,
        } => {
            let mix = loadgen::parse_mix(&mix).map_err(anyhow::Error::msg)?;
            let run = bench::pipeline_only(
                &config,
                store(&config),
                scenarios,
                partitions,
                mix,
                payouts_every_line,
            )
            .await?;
            let (count, elapsed) = (run.messages, run.elapsed);
            println!(
                "pipeline: messages={count} announcements={} seconds={:.2} eps={:.0} peak_rss_mb={:.1}",
                run.announcements,
                elapsed.as_secs_f64(),
                count as f64 / elapsed.as_secs_f64().max(1e-9),
                bench::peak_rss_bytes() as f64 / 1e6
            );
        }
    }
    Ok(())
}

/// The worker's store on the configured database, connected on first use.
fn store(config: &Config) -> Store {
    Store::connect_lazy(
        config.database.clone(),
        &config.payments_topic,
        &config.settlements_topic,
    )
    .with_payouts_topic(config.payouts.as_ref().map(|p| p.topic.as_str()))
}
