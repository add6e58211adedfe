//! recon-tools: command line. Parses arguments, sets up logging, dispatches to
//! [`recon_tools::cli`].

use std::process::ExitCode;

use clap::Parser;
use recon_worker::config::Config;
use recon_worker::telemetry;

/// Tools around recon-worker: topic creation, a load generator, benchmarks.
///
/// Configuration comes from the worker's environment variables (DATABASE_URL,
/// RECON_*), so the tools address the same brokers, topics and database.
#[derive(Parser)]
#[command(name = "recon-tools", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: recon_tools::cli::Command,
}

fn main() -> ExitCode {
    // The benchmarks measure the worker's parts under the worker's allocator settings.
    recon_worker::allocator::tune();
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("recon-tools: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let scrubber = config.scrubber.clone();
    telemetry::init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("recon-tools: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(recon_tools::cli::dispatch(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Errors of librdkafka and sqlx may quote configuration values.
            eprintln!("recon-tools: {}", scrubber.scrub(&format!("{error:#}")));
            ExitCode::FAILURE
        }
    }
}
