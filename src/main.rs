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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("recon-worker: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(config.log_format);
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
            if matches!(
                Config::from_env().map(|c| c.log_format),
                Ok(LogFormat::Json)
            ) {
                tracing::error!(error = format!("{error:#}"), "recon-worker failed");
            } else {
                eprintln!("recon-worker: {error:#}");
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
            worker::migrate(&store, Duration::from_secs(30)).await?;
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
        Command::Loadgen {
            scenarios,
            seed,
            poison_every,
            id_prefix,
        } => {
            let engine = recon_worker::engine::EngineConfig::new(&config.matching, config.window);
            let plan = loadgen::Plan {
                seed,
                scenarios,
                mix: loadgen::Mix {
                    poison_every,
                    ..loadgen::Mix::default()
                },
                base_time: chrono::Utc::now().timestamp_micros(),
                deadline: engine.deadline,
                orphan_timeout: engine.orphan_timeout,
                max_message_bytes: config.max_message_bytes,
                id_prefix,
            };
            let (records, truth) = loadgen::generate(&plan);
            let producer = admin::producer(&config.brokers).context("creating the producer")?;
            let started = std::time::Instant::now();
            admin::produce_all(
                &producer,
                &records,
                [&config.payments_topic, &config.settlements_topic],
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
