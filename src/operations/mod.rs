//! The operators' commands (contract §8): what finance and on-call people run against
//! the worker's database, beside `migrate` and `run`. One file per command group:
//!
//! - `discrepancies`: `list` (streamed), `accept`, `reopen`, `annotate`, each change
//!   in one transaction with the discrepancy locked and its action appended to
//!   `recon_discrepancy_actions` (migration 0010);
//! - `rejects`: `list` (streamed) and `redrive`, which asks the worker owning each
//!   message's partition pair to decode it again (migration 0011);
//! - `output`: the output formats (`table`, `csv`, `json` lines) and writing rows to
//!   stdout as they arrive.
//!
//! This module owns the commands' entry point: their configuration (`DATABASE_URL`
//! only: they never talk to Kafka), one connection, and their exit codes, which
//! scripts depend on: 0 done, 1 refused (unknown id, wrong state) or failed (database
//! unreachable), 2 invalid arguments (clap) or configuration.
//!
//! They do not log through `tracing`: stdout carries the data and stderr one message
//! for a person, so a pipe into another tool gets nothing else.

pub mod discrepancies;
pub mod output;
pub mod rejects;

use std::process::ExitCode;

use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::config::{ConfigError, DatabaseConfig};

/// Why a command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// The request is understood but refused in the current state of what it names
    /// (or for something that does not exist), or `--wait` ran out. Exit code 1.
    #[error("refused: {0}")]
    Refused(String),
    /// Exit code 2, as for invalid arguments.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl OperationError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            OperationError::Config(_) => ExitCode::from(2),
            OperationError::Refused(_)
            | OperationError::Database(_)
            | OperationError::Output(_) => ExitCode::FAILURE,
        }
    }
}

/// An operators' command.
#[derive(Debug)]
pub enum Command {
    Discrepancies(discrepancies::Command),
    Rejects(rejects::Command),
}

/// Runs one operators' command from the process environment and reports its outcome
/// as an exit code, with one line on stderr when it did not succeed.
pub fn main(command: Command) -> ExitCode {
    let config = match DatabaseConfig::from_env() {
        Ok(config) => config,
        Err(error) => return report(&OperationError::from(error), None),
    };
    // One connection, one task: a current-thread runtime is all a command needs.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("recon-worker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command, &config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error, Some(&config)),
    }
}

async fn run(command: Command, config: &DatabaseConfig) -> Result<(), OperationError> {
    let mut connection = connect(config).await?;
    let result = match command {
        Command::Discrepancies(command) => discrepancies::execute(&mut connection, command).await,
        Command::Rejects(command) => rejects::execute(&mut connection, command).await,
    };
    // A failed close changes nothing the command did (committed or rolled back).
    let _ = connection.close().await;
    result
}

/// One connection, named so `pg_stat_activity` tells an operator's command from the
/// worker's sessions.
pub async fn connect(config: &DatabaseConfig) -> Result<PgConnection, OperationError> {
    let options = config
        .database
        .clone()
        .application_name("recon-worker operations");
    Ok(options.connect().await?)
}

fn report(error: &OperationError, config: Option<&DatabaseConfig>) -> ExitCode {
    let text = error.to_string();
    // sqlx's errors may quote the URL.
    let text = match config {
        Some(config) => config.scrubber.scrub(&text),
        None => text,
    };
    eprintln!("recon-worker: {text}");
    error.exit_code()
}
