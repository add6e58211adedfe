//! recon-worker: command line. Parses arguments, sets up logging, dispatches.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use recon_worker::config::{Config, LogFormat};
use recon_worker::{admin, loadgen, store::Store, telemetry, worker};

/// Reconciles payments against settlements from Kafka into PostgreSQL, exactly once.
///
/// Configuration comes from environment variables (DATABASE_URL, RECON_*); see the
/// README for the full list.
#[derive(Parser)]
#[command(name = "recon-worker", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations and exit.
    Migrate,
    /// Apply migrations, then consume and reconcile until SIGINT/SIGTERM. On a signal:
    /// finish the batch in hand, commit, leave the consumer group, exit 0.
    Run,
    /// Create the payments and settlements topics, co-partitioned (same partition count).
    CreateTopics {
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Produce a deterministic stream of payments and settlements with every outcome
    /// kind and bad messages, and print the expected outcome counts.
    Loadgen {
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
        /// Scenario weights, e.g. `matched=70,late=3,currency=2,amount=3,fee=2,dup_payment=2,dup_settlement=2,missing=3,orphan=3,pending=0,redelivery=5`.
        #[arg(long)]
        mix: Option<String>,
        /// After the mix, this many duplicates of one payment id, each with a fresh event
        /// id (a duplicate storm; some are also sent again).
        #[arg(long, default_value_t = 0)]
        duplicate_storm: usize,
    },
    /// Measurements for scripts/bench.sh (they print figures and assert nothing).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// RSS growth per open payment held in the in-memory window.
    WindowMemory {
        #[arg(long, default_value_t = 1_000_000)]
        items: usize,
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
    /// Raw PostgreSQL write rate of outcome rows (batched UNNEST insert).
    PgWrite {
        #[arg(long, default_value_t = 500_000)]
        rows: usize,
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
    },
    /// The worker's ceiling without the broker: pre-decoded events through engine and checkpoint.
    Pipeline {
        #[arg(long, default_value_t = 200_000)]
        scenarios: usize,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
}

fn main() -> ExitCode {
    recon_worker::allocator::tune();
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("recon-worker: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let log_format = config.log_format;
    let scrubber = config.scrubber.clone();
    telemetry::init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("recon-worker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Errors of librdkafka and sqlx may quote configuration values.
            let error = scrubber.scrub(&format!("{error:#}"));
            if log_format == LogFormat::Json {
                tracing::error!(error, "recon-worker failed");
            } else {
                eprintln!("recon-worker: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let store = Store::connect_lazy(
                config.database.clone(),
                &config.payments_topic,
                &config.settlements_topic,
            );
            worker::migrate(
                &store,
                &telemetry::Health::default(),
                Duration::from_secs(30),
            )
            .await?;
            tracing::info!(database = %config.database_display, "migrations applied");
            Ok(())
        }
        Command::Run => worker::run(config).await,
        Command::CreateTopics { partitions } => {
            admin::create_topics(
                &config.brokers,
                &[&config.payments_topic, &config.settlements_topic],
                partitions,
            )
            .await
            .context("creating topics")?;
            println!(
                "topics {} and {} exist with {partitions} partitions each (existing topics are left as they are)",
                config.payments_topic, config.settlements_topic
            );
            Ok(())
        }
        Command::Bench(command) => bench(command, config).await,
        Command::Loadgen {
            scenarios,
            seed,
            poison_every,
            id_prefix,
            rate,
            mix,
            duplicate_storm,
        } => {
            let engine = recon_worker::engine::EngineConfig::new(&config.matching, config.window);
            let plan = loadgen::Plan {
                seed,
                scenarios,
                mix: loadgen::Mix {
                    poison_every,
                    ..loadgen::parse_mix(mix.as_deref().unwrap_or(""))
                        .map_err(anyhow::Error::msg)?
                },
                base_time: chrono::Utc::now().timestamp_micros(),
                deadline: engine.deadline,
                orphan_timeout: engine.orphan_timeout,
                max_message_bytes: config.max_message_bytes,
                id_prefix,
            };
            let (mut records, mut truth) = loadgen::generate(&plan);
            if duplicate_storm > 0 {
                let (storm, storm_truth) = loadgen::duplicate_storm(&plan, duplicate_storm);
                records.extend(storm);
                truth.outcomes.extend(storm_truth.outcomes);
            }
            let producer = admin::producer(&config.brokers).context("creating the producer")?;
            let started = std::time::Instant::now();
            admin::produce_paced(
                &producer,
                &records,
                [&config.payments_topic, &config.settlements_topic],
                rate,
            )
            .await
            .context("producing")?;
            println!(
                "produced {} messages ({} bad) in {:.1}s; expected outcomes:",
                records.len(),
                truth.rejected.len(),
                started.elapsed().as_secs_f64()
            );
            for (outcome, count) in truth.outcome_counts() {
                println!("  {outcome:<22} {count}");
            }
            Ok(())
        }
    }
}

async fn bench(command: BenchCommand, config: Config) -> anyhow::Result<()> {
    use recon_worker::bench;
    match command {
        BenchCommand::WindowMemory { items } => {
            let (before, after, per_item, estimated) = bench::window_memory(items);
            println!(
                "window_memory: items={items} rss_before_mb={:.1} rss_after_mb={:.1} rss_bytes_per_item={per_item:.1} accounted_bytes_per_item={estimated}",
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
            let store = Store::connect_lazy(
                config.database.clone(),
                &config.payments_topic,
                &config.settlements_topic,
            );
            let elapsed = bench::raw_pg_write(&store, rows, batch).await?;
            println!(
                "pg_write: rows={rows} batch={batch} seconds={:.2} rows_per_s={:.0}",
                elapsed.as_secs_f64(),
                rows as f64 / elapsed.as_secs_f64().max(1e-9)
            );
        }
        BenchCommand::Pipeline {
            scenarios,
            partitions,
        } => {
            let store = Store::connect_lazy(
                config.database.clone(),
                &config.payments_topic,
                &config.settlements_topic,
            );
            let (count, elapsed) =
                bench::pipeline_only(&config, store, scenarios, partitions).await?;
            println!(
                "pipeline: messages={count} seconds={:.2} eps={:.0} peak_rss_mb={:.1}",
                elapsed.as_secs_f64(),
                count as f64 / elapsed.as_secs_f64().max(1e-9),
                bench::peak_rss_bytes() as f64 / 1e6
            );
        }
    }
    Ok(())
}
