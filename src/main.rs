//! recon-worker: command line. Parses arguments, sets up logging, dispatches.
//!
//! Only the product's commands live here; topic creation, the load generator and the
//! benchmarks are the `recon-tools` binary (package `tools/`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use recon_worker::config::{Config, LogFormat};
use recon_worker::consumer::ConsumerError;
use recon_worker::{operations, store::Store, telemetry, worker};

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
    /// Apply migrations (a role without DDL rights, or RECON_MIGRATE=never: check that
    /// none is pending, and refuse to start otherwise), then consume and reconcile until
    /// SIGINT/SIGTERM. On a signal: finish the batch in hand, commit, leave the consumer
    /// group, exit 0.
    Run,
    /// List discrepancies and act on them: accept, reopen, annotate (each action is
    /// kept in recon_discrepancy_actions). Needs DATABASE_URL only.
    ///
    /// Exit codes: 0 done; 1 refused (unknown id, wrong state) or failed (database);
    /// 2 invalid arguments or configuration.
    #[command(subcommand)]
    Discrepancies(operations::discrepancies::Command),
    /// List rejected messages and ask for them to be redriven (decoded again and, if
    /// now valid, processed exactly once as late events by the worker owning their
    /// partition pair). Needs DATABASE_URL only.
    ///
    /// Exit codes: 0 done; 1 refused (unknown position, already redriven, payload cut
    /// at 65,536 bytes, --wait ran out) or failed (database); 2 invalid arguments or
    /// configuration.
    #[command(subcommand)]
    Rejects(operations::rejects::Command),
}

fn main() -> ExitCode {
    recon_worker::allocator::tune();
    let cli = Cli::parse();
    // The operators' commands read DATABASE_URL only and print their own errors.
    let command = match cli.command {
        Command::Discrepancies(command) => {
            return operations::main(operations::Command::Discrepancies(command))
        }
        Command::Rejects(command) => {
            return operations::main(operations::Command::Rejects(command))
        }
        Command::Migrate => WorkerCommand::Migrate,
        Command::Run => WorkerCommand::Run,
    };
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
    match runtime.block_on(dispatch(command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let code = exit_code(&error);
            // Errors of librdkafka and sqlx may quote configuration values.
            let error = scrubber.scrub(&describe(&error));
            if log_format == LogFormat::Json {
                tracing::error!(error, "recon-worker failed");
            } else {
                eprintln!("recon-worker: {error}");
            }
            code
        }
    }
}

/// 2 when only a change of configuration can help (the code of an invalid variable):
/// a broker refusing the worker's credentials or its TLS. 1 for the rest, which may
/// pass (an outage) or need a look (a failed migration).
fn exit_code(error: &anyhow::Error) -> ExitCode {
    let refused = error.chain().any(|cause| {
        cause
            .downcast_ref::<ConsumerError>()
            .is_some_and(ConsumerError::is_configuration)
    });
    if refused {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// An error and its causes, as `{:#}` shows them, but without a cause the text
/// before it already quotes: sqlx's and the store's messages include their source, so
/// a refused certificate was otherwise printed four times over.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// The commands that read the worker's whole configuration.
enum WorkerCommand {
    Migrate,
    Run,
}

async fn dispatch(command: WorkerCommand, config: Config) -> anyhow::Result<()> {
    match command {
        WorkerCommand::Migrate => {
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
        WorkerCommand::Run => worker::run(config, worker::shutdown_signal()).await,
    }
}
