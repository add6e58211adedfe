//! Configuration from the environment (contract §4), parsed once at start into
//! validated types. Every error names the variable, the value and what was expected;
//! the database password is never part of an error or a log line. Every
//! secret-bearing variable `X` (`DATABASE_URL`, `RECON_KAFKA_PROP_<NAME>`) may instead
//! be given as `X_FILE`, the path of a file holding it (a Kubernetes secret mount).
//!
//! This module owns the [`Config`] type and the order it is read in; its parts own one
//! concern each: `env` (reading a variable: defaults, parsing, bounds, the error
//! naming it, secrets read from files), `kafka` (`RECON_KAFKA_PROP_*`: property names,
//! refused and secret properties), `database` (`DATABASE_URL`, the CA file it names,
//! and hiding its password).

mod database;
mod env;
mod kafka;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

pub use self::database::redact_url;
use self::env::{invalid, Env};
pub use self::kafka::{is_secret_property, kafka_property_name, KAFKA_PROP_PREFIX};

/// A configuration error, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{variable} is required but not set")]
    Missing { variable: String },
    #[error("{variable}={value:?} is invalid: expected {expected}")]
    Invalid {
        variable: String,
        value: String,
        expected: String,
    },
    /// A `RECON_KAFKA_PROP_*` that would undo a setting correctness depends on.
    #[error("{variable}={value:?} is refused: {reason}")]
    Refused {
        variable: String,
        value: String,
        reason: String,
    },
    /// A secret given both directly and as the file its `_FILE` variable names.
    #[error("{variable} and {file_variable} are both set: set only one")]
    Conflict {
        variable: String,
        file_variable: String,
    },
    /// A file a variable names cannot be read. Its content is never part of the error.
    #[error("{variable}={path:?}: cannot read the file: {reason}")]
    File {
        variable: String,
        path: String,
        reason: String,
    },
}

/// Whether `recon-worker run` applies migrations (`RECON_MIGRATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateMode {
    /// Migrate when the role may create objects in its schema (the owner role); a
    /// role without DDL rights only checks that no migration is pending (contract §4).
    Auto,
    /// Never migrate, only check: for a deployment whose migrations run elsewhere (a
    /// Kubernetes Job as the owner role), so a worker never runs DDL even if its role
    /// happens to be allowed to (PostgreSQL 14 and older let every role create in
    /// `public`).
    Never,
}

/// The consumer group protocol (`RECON_GROUP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    /// The classic protocol with the client-side range assignor (eager rebalances).
    Classic,
    /// The next-generation protocol (KIP-848): the broker's range assignor, partitions
    /// handed over incrementally.
    Consumer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub use crate::engine::{MatchConfig, WindowConfig};

/// Payout control totals (contract §7), on when `RECON_PAYOUTS_TOPIC` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutsConfig {
    /// The payouts topic, co-partitioned with the other two.
    pub topic: String,
    /// `RECON_PAYOUT_GRACE`: how long after `paid_at` a payout may stay unbalanced
    /// before its discrepancy opens (on the global watermark).
    pub grace: Duration,
}

/// The whole worker configuration.
#[derive(Clone)]
pub struct Config {
    pub database: PgConnectOptions,
    /// `DATABASE_URL` with the password replaced, for logs.
    pub database_display: String,
    pub brokers: String,
    pub group_id: String,
    pub payments_topic: String,
    pub settlements_topic: String,
    /// `RECON_PAYOUTS_TOPIC` and `RECON_PAYOUT_GRACE` (contract §7); `None`: off.
    pub payouts: Option<PayoutsConfig>,
    pub matching: MatchConfig,
    pub window: WindowConfig,
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    /// Largest accepted message value; larger ones are rejected.
    pub max_message_bytes: usize,
    /// How far an event time may be ahead of its message's Kafka timestamp (§1).
    pub max_future_skew: Duration,
    /// Most messages in one checkpoint transaction.
    pub batch_max_messages: usize,
    /// Longest a batch waits to fill before it is processed.
    pub batch_max_wait: Duration,
    /// Transactions a batch's commit is split into (by partition pair), run at once.
    pub commit_parallelism: usize,
    /// Bound on graceful shutdown after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// librdkafka properties from `RECON_KAFKA_PROP_<NAME>` (or `..._FILE`).
    pub kafka_properties: BTreeMap<String, String>,
    /// The properties among them read from files: never shown, whatever their name.
    pub kafka_properties_from_files: BTreeSet<String>,
    /// `RECON_MIGRATE`: whether `run` may apply migrations.
    pub migrate: MigrateMode,
    /// `RECON_INSTANCE_ID`: the consumer's `group.instance.id` (static membership), so
    /// a restarted pod gets its pairs back without rebalancing the other workers.
    pub instance_id: Option<String>,
    pub group_protocol: GroupProtocol,
    /// Blanks this configuration's secrets out of errors.
    pub scrubber: Scrubber,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted_props: BTreeMap<&str, &str> = self
            .kafka_properties
            .iter()
            .map(|(k, v)| {
                let hidden = is_secret_property(k) || self.kafka_properties_from_files.contains(k);
                (k.as_str(), if hidden { "***" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("Config")
            .field("database", &self.database_display)
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("payments_topic", &self.payments_topic)
            .field("settlements_topic", &self.settlements_topic)
            .field("payouts", &self.payouts)
            .field("matching", &self.matching)
            .field("window", &self.window)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_format", &self.log_format)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_future_skew", &self.max_future_skew)
            .field("batch_max_messages", &self.batch_max_messages)
            .field("batch_max_wait", &self.batch_max_wait)
            .field("commit_parallelism", &self.commit_parallelism)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("kafka_properties", &redacted_props)
            .field("instance_id", &self.instance_id)
            .field("group_protocol", &self.group_protocol)
            .field("migrate", &self.migrate)
            .finish()
    }
}

/// The secret values of a configuration, to blank out of text the worker does not
/// compose itself: librdkafka's configuration errors end with the refused property's
/// value, whatever it is.
#[derive(Clone, Default)]
pub struct Scrubber(Vec<String>);

impl Scrubber {
    /// Blanks out `secrets` (empty ones ignored).
    fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|secret| !secret.is_empty())
            .collect();
        // Longest first: a secret containing another is blanked whole.
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Self(secrets)
    }

    /// `text` with every secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.0 {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} secrets)", self.0.len())
    }
}

/// What the operators' commands (`recon-worker discrepancies ...`, contract §8) read:
/// `DATABASE_URL` (or `DATABASE_URL_FILE`) alone. They talk to PostgreSQL only, so a
/// Kafka or tuning variable, set or not, valid or not, is no concern of theirs.
#[derive(Clone)]
pub struct DatabaseConfig {
    pub database: PgConnectOptions,
    /// `DATABASE_URL` with the password replaced, for messages.
    pub database_display: String,
    /// Blanks the URL's passwords out of errors.
    pub scrubber: Scrubber,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("database", &self.database_display)
            .finish()
    }
}

impl DatabaseConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads `DATABASE_URL` from the given variables.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        let database = database::read(&Env(&vars))?;
        Ok(Self {
            database: database.options,
            database_display: database.display,
            scrubber: Scrubber::new(database.secrets),
        })
    }
}

/// Longest accepted `RECON_MAX_FUTURE_SKEW`: ten years is "no limit" for any real
/// producer, and keeps the bound far from overflowing microseconds.
const MAX_FUTURE_SKEW_BOUND: Duration = Duration::from_secs(3650 * 24 * 3600);

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from the given variables (the environment, or a test's).
    /// Variables are read in a fixed order, so of several invalid ones the same one is
    /// always reported.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        let env = Env(&vars);
        let database = database::read(&env)?;
        let matching = matching(&env)?;
        let window = window(&env)?;
        let metrics_addr = env.parsed(
            "RECON_METRICS_ADDR",
            "0.0.0.0:9898",
            "a socket address such as 0.0.0.0:9898",
        )?;
        let log_format = log_format(&env)?;
        let kafka = kafka::properties(&vars)?;
        let scrubber =
            Scrubber::new((database.secrets.into_iter()).chain(kafka::secret_values(&kafka)));
        Ok(Self {
            database: database.options,
            database_display: database.display,
            brokers: env.text("RECON_KAFKA_BROKERS", "127.0.0.1:9092")?,
            group_id: env.text("RECON_GROUP_ID", "recon-worker")?,
            payments_topic: env.text("RECON_PAYMENTS_TOPIC", "payments")?,
            settlements_topic: env.text("RECON_SETTLEMENTS_TOPIC", "settlements")?,
            payouts: payouts(&env)?,
            matching,
            window,
            metrics_addr,
            log_format,
            max_message_bytes: env.number(
                "RECON_MAX_MESSAGE_BYTES",
                64 * 1024,
                16..=16 * 1024 * 1024,
                "a whole number of bytes from 16 to 16777216",
            )?,
            // Under a backlog a batch fills to this bound whenever a commit is slow (a
            // checkpoint), with the next batch and the read-ahead full behind it, so
            // the bound sets the peak memory. 2500 lowered a 5M-message drain's peak
            // from 47 to 44-46 MB but the pipeline's rate by about 7% (README).
            batch_max_messages: env.number(
                "RECON_BATCH_MAX_MESSAGES",
                5_000,
                1..=100_000,
                "a whole number from 1 to 100000",
            )?,
            max_future_skew: env.bounded_duration(
                "RECON_MAX_FUTURE_SKEW",
                Duration::from_secs(24 * 3600),
                Duration::from_secs(1)..=MAX_FUTURE_SKEW_BOUND,
                "a duration from 1s to 3650d such as 15m or 24h",
            )?,
            batch_max_wait: env.duration("RECON_BATCH_MAX_WAIT", Duration::from_millis(20))?,
            commit_parallelism: env.number(
                "RECON_COMMIT_PARALLELISM",
                2,
                1..=64,
                "a whole number from 1 to 64",
            )?,
            shutdown_timeout: env.duration("RECON_SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
            kafka_properties: kafka.values,
            kafka_properties_from_files: kafka.from_files,
            migrate: migrate_mode(&env)?,
            instance_id: env.instance_id("RECON_INSTANCE_ID")?,
            group_protocol: group_protocol(&env)?,
            scrubber,
        })
        .and_then(Config::validate)
    }

    /// What the decoder checks beyond the contract's fixed rules.
    pub fn decode_limits(&self) -> crate::event::Limits {
        crate::event::Limits {
            max_bytes: self.max_message_bytes,
            // Bounded at parse time (ten years), so this conversion cannot saturate.
            max_future_skew: i64::try_from(self.max_future_skew.as_micros()).unwrap_or(i64::MAX),
        }
    }

    fn validate(self) -> Result<Self, ConfigError> {
        if self.payments_topic == self.settlements_topic {
            return Err(invalid(
                "RECON_SETTLEMENTS_TOPIC",
                &self.settlements_topic,
                "a topic different from RECON_PAYMENTS_TOPIC",
            ));
        }
        if let Some(payouts) = &self.payouts {
            if payouts.topic == self.payments_topic || payouts.topic == self.settlements_topic {
                return Err(invalid(
                    "RECON_PAYOUTS_TOPIC",
                    &payouts.topic,
                    "a topic different from RECON_PAYMENTS_TOPIC and RECON_SETTLEMENTS_TOPIC",
                ));
            }
        }
        if self.matching.idle_timeout.is_zero() {
            return Err(invalid("RECON_IDLE_TIMEOUT", "0s", "a positive duration"));
        }
        Ok(self)
    }
}

/// `RECON_SETTLEMENT_DEADLINE`, `RECON_ORPHAN_TIMEOUT`, `RECON_IDLE_TIMEOUT` and
/// `RECON_AMOUNT_TOLERANCE_MINOR` (contract §2).
fn matching(env: &Env<'_>) -> Result<MatchConfig, ConfigError> {
    let defaults = MatchConfig::default();
    Ok(MatchConfig {
        settlement_deadline: env
            .duration("RECON_SETTLEMENT_DEADLINE", defaults.settlement_deadline)?,
        orphan_timeout: env.duration("RECON_ORPHAN_TIMEOUT", defaults.orphan_timeout)?,
        idle_timeout: env.duration("RECON_IDLE_TIMEOUT", defaults.idle_timeout)?,
        amount_tolerance_minor: env.number(
            "RECON_AMOUNT_TOLERANCE_MINOR",
            0,
            0..=crate::money::MAX_MINOR,
            "a whole number of minor units, 0 or more",
        )?,
    })
}

/// Longest accepted `RECON_PAYOUT_GRACE`, ten years: beyond it a payout never falls due.
const MAX_PAYOUT_GRACE: Duration = Duration::from_secs(3650 * 24 * 3600);

/// `RECON_PAYOUTS_TOPIC` (unset or empty: off) and `RECON_PAYOUT_GRACE` (read, and
/// checked, only when the topic is set).
fn payouts(env: &Env<'_>) -> Result<Option<PayoutsConfig>, ConfigError> {
    let topic = match env.get("RECON_PAYOUTS_TOPIC") {
        None | Some("") => return Ok(None),
        Some(_) => env.text("RECON_PAYOUTS_TOPIC", "")?,
    };
    let grace = env.bounded_duration(
        "RECON_PAYOUT_GRACE",
        Duration::from_secs(24 * 3600),
        Duration::ZERO..=MAX_PAYOUT_GRACE,
        "a duration from 0s to 3650d such as 24h",
    )?;
    Ok(Some(PayoutsConfig { topic, grace }))
}

/// `RECON_WINDOW_MAX_ITEMS` and `RECON_WINDOW_MAX_BYTES`: the in-memory window's bounds.
fn window(env: &Env<'_>) -> Result<WindowConfig, ConfigError> {
    let defaults = WindowConfig::default();
    Ok(WindowConfig {
        max_items: env.number(
            "RECON_WINDOW_MAX_ITEMS",
            defaults.max_items,
            1..=100_000_000,
            "a whole number of items from 1 to 100000000",
        )?,
        max_bytes: env.number(
            "RECON_WINDOW_MAX_BYTES",
            defaults.max_bytes,
            1024..=64 * 1024 * 1024 * 1024,
            "a whole number of bytes, at least 1024",
        )?,
    })
}

/// `RECON_LOG_FORMAT`.
fn log_format(env: &Env<'_>) -> Result<LogFormat, ConfigError> {
    match env.get("RECON_LOG_FORMAT").unwrap_or("text") {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid("RECON_LOG_FORMAT", other, "`text` or `json`")),
    }
}

/// `RECON_MIGRATE`.
fn migrate_mode(env: &Env<'_>) -> Result<MigrateMode, ConfigError> {
    match env.get("RECON_MIGRATE").unwrap_or("auto") {
        "auto" => Ok(MigrateMode::Auto),
        "never" => Ok(MigrateMode::Never),
        other => Err(invalid(
            "RECON_MIGRATE",
            other,
            "`auto` (migrate when the role has DDL rights) or `never` (only check that none is pending)",
        )),
    }
}

/// `RECON_GROUP_PROTOCOL`.
fn group_protocol(env: &Env<'_>) -> Result<GroupProtocol, ConfigError> {
    match env.get("RECON_GROUP_PROTOCOL").unwrap_or("classic") {
        "classic" => Ok(GroupProtocol::Classic),
        "consumer" => Ok(GroupProtocol::Consumer),
        other => Err(invalid(
            "RECON_GROUP_PROTOCOL",
            other,
            "`classic` or `consumer` (KIP-848, Kafka 4.0 or later)",
        )),
    }
}
