//! Configuration from the environment (contract §4), parsed once at start into
//! validated types. Every error names the variable, the value and what was expected;
//! the database password is never part of an error or a log line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

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

/// Matching parameters (contract §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchConfig {
    /// D: a payment without a settlement after this long is `missing_settlement`.
    pub settlement_deadline: Duration,
    /// O: a settlement without a payment after this long is `orphan_settlement`.
    pub orphan_timeout: Duration,
    /// T: largest |gross − amount| still counted as equal.
    pub amount_tolerance_minor: i64,
    /// An input caught up for this long no longer holds the watermark back.
    pub idle_timeout: Duration,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            settlement_deadline: Duration::from_secs(72 * 3600),
            orphan_timeout: Duration::from_secs(72 * 3600),
            amount_tolerance_minor: 0,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Bounds of the in-memory matching window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub max_items: usize,
    pub max_bytes: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            max_items: 50_000,
            max_bytes: 8 * 1024 * 1024,
        }
    }
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
    pub matching: MatchConfig,
    pub window: WindowConfig,
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    /// Largest accepted message value; larger ones are rejected.
    pub max_message_bytes: usize,
    /// Most messages in one checkpoint transaction.
    pub batch_max_messages: usize,
    /// Longest a batch waits to fill before it is processed.
    pub batch_max_wait: Duration,
    /// Transactions a batch's commit is split into (by partition pair), run at once.
    pub commit_parallelism: usize,
    /// Bound on graceful shutdown after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// librdkafka properties from `RECON_KAFKA_PROP_<NAME>`.
    pub kafka_properties: BTreeMap<String, String>,
    /// `RECON_INSTANCE_ID`: the consumer's `group.instance.id` (static membership), so
    /// a restarted pod gets its pairs back without rebalancing the other workers.
    pub instance_id: Option<String>,
    pub group_protocol: GroupProtocol,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted_props: BTreeMap<&str, &str> = self
            .kafka_properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_property(k) { "***" } else { v }))
            .collect();
        f.debug_struct("Config")
            .field("database", &self.database_display)
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("payments_topic", &self.payments_topic)
            .field("settlements_topic", &self.settlements_topic)
            .field("matching", &self.matching)
            .field("window", &self.window)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_format", &self.log_format)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("batch_max_messages", &self.batch_max_messages)
            .field("batch_max_wait", &self.batch_max_wait)
            .field("commit_parallelism", &self.commit_parallelism)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("kafka_properties", &redacted_props)
            .field("instance_id", &self.instance_id)
            .field("group_protocol", &self.group_protocol)
            .finish()
    }
}

/// librdkafka properties whose values are secrets and never logged.
pub fn is_secret_property(name: &str) -> bool {
    name.contains("password") || name.contains("secret") || name.ends_with(".key.pem")
}

pub const KAFKA_PROP_PREFIX: &str = "RECON_KAFKA_PROP_";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from the given variables (the environment, or a test's).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        let env = Env(&vars);
        let database_url = env.required("DATABASE_URL")?;
        let database_display = redact_url(&database_url);
        let database =
            PgConnectOptions::from_str(&database_url).map_err(|_| ConfigError::Invalid {
                variable: "DATABASE_URL".into(),
                value: database_display.clone(),
                expected: "a PostgreSQL URL such as postgres://user@host:5432/db".into(),
            })?;
        let defaults = MatchConfig::default();
        let window_defaults = WindowConfig::default();
        let matching = MatchConfig {
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
        };
        let window = WindowConfig {
            max_items: env.number(
                "RECON_WINDOW_MAX_ITEMS",
                window_defaults.max_items,
                1..=100_000_000,
                "a whole number of items from 1 to 100000000",
            )?,
            max_bytes: env.number(
                "RECON_WINDOW_MAX_BYTES",
                window_defaults.max_bytes,
                1024..=64 * 1024 * 1024 * 1024,
                "a whole number of bytes, at least 1024",
            )?,
        };
        let metrics_addr = env.parsed(
            "RECON_METRICS_ADDR",
            "0.0.0.0:9898",
            "a socket address such as 0.0.0.0:9898",
        )?;
        let log_format = match env.get("RECON_LOG_FORMAT").unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("RECON_LOG_FORMAT", other, "`text` or `json`")),
        };
        let mut kafka_properties = BTreeMap::new();
        for (name, value) in &vars {
            if let Some(suffix) = name.strip_prefix(KAFKA_PROP_PREFIX) {
                let property = kafka_property_name(suffix)
                    .ok_or_else(|| invalid(name, value, "RECON_KAFKA_PROP_ followed by a property name in upper case, `.` as `_` and `_` as `__`"))?;
                kafka_properties.insert(property, value.clone());
            }
        }
        Ok(Self {
            database,
            database_display,
            brokers: env.text("RECON_KAFKA_BROKERS", "127.0.0.1:9092")?,
            group_id: env.text("RECON_GROUP_ID", "recon-worker")?,
            payments_topic: env.text("RECON_PAYMENTS_TOPIC", "payments")?,
            settlements_topic: env.text("RECON_SETTLEMENTS_TOPIC", "settlements")?,
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
            batch_max_wait: env.duration("RECON_BATCH_MAX_WAIT", Duration::from_millis(20))?,
            commit_parallelism: env.number(
                "RECON_COMMIT_PARALLELISM",
                2,
                1..=64,
                "a whole number from 1 to 64",
            )?,
            shutdown_timeout: env.duration("RECON_SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
            kafka_properties,
            instance_id: env.instance_id("RECON_INSTANCE_ID")?,
            group_protocol: match env.get("RECON_GROUP_PROTOCOL").unwrap_or("classic") {
                "classic" => GroupProtocol::Classic,
                "consumer" => GroupProtocol::Consumer,
                other => {
                    return Err(invalid(
                        "RECON_GROUP_PROTOCOL",
                        other,
                        "`classic` or `consumer` (KIP-848, Kafka 4.0 or later)",
                    ))
                }
            },
        })
        .and_then(Config::validate)
    }

    fn validate(self) -> Result<Self, ConfigError> {
        if self.payments_topic == self.settlements_topic {
            return Err(invalid(
                "RECON_SETTLEMENTS_TOPIC",
                &self.settlements_topic,
                "a topic different from RECON_PAYMENTS_TOPIC",
            ));
        }
        if self.matching.idle_timeout.is_zero() {
            return Err(invalid("RECON_IDLE_TIMEOUT", "0s", "a positive duration"));
        }
        Ok(self)
    }
}

/// `SESSION_TIMEOUT_MS` → `session.timeout.ms`; `__` stands for a literal `_`.
pub fn kafka_property_name(suffix: &str) -> Option<String> {
    if suffix.is_empty()
        || !suffix
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let mut name = String::with_capacity(suffix.len());
    let mut chars = suffix.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '_' {
            if chars.peek() == Some(&'_') {
                chars.next();
                name.push('_');
            } else {
                name.push('.');
            }
        } else {
            name.push(c.to_ascii_lowercase());
        }
    }
    Some(name)
}

/// Replaces the password of a URL with `***`, leaving the rest readable.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let redacted_authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let redacted_tail = redact_query_password(tail);
    format!("{scheme}://{redacted_authority}{redacted_tail}")
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

fn invalid(variable: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        variable: variable.to_owned(),
        value: value.to_owned(),
        expected: expected.to_owned(),
    }
}

struct Env<'a>(&'a BTreeMap<String, String>);

impl Env<'_> {
    fn get(&self, variable: &str) -> Option<&str> {
        self.0.get(variable).map(String::as_str)
    }

    fn required(&self, variable: &str) -> Result<String, ConfigError> {
        match self.get(variable) {
            Some(value) if !value.trim().is_empty() => Ok(value.to_owned()),
            _ => Err(ConfigError::Missing {
                variable: variable.to_owned(),
            }),
        }
    }

    fn text(&self, variable: &str, default: &str) -> Result<String, ConfigError> {
        match self.get(variable) {
            None => Ok(default.to_owned()),
            Some(value) if value.trim().is_empty() || value.trim() != value => Err(invalid(
                variable,
                value,
                "a non-empty value without surrounding spaces",
            )),
            Some(value) => Ok(value.to_owned()),
        }
    }

    /// A Kafka `group.instance.id`: the broker accepts what a topic name may hold
    /// (ASCII letters, digits, `.`, `_`, `-`, at most 249), and refuses the rest only
    /// when the group is joined, so it is checked here. Unset or empty: no static
    /// membership.
    fn instance_id(&self, variable: &str) -> Result<Option<String>, ConfigError> {
        match self.get(variable) {
            None | Some("") => Ok(None),
            Some(id)
                if id.len() <= 249
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
            {
                Ok(Some(id.to_owned()))
            }
            Some(id) => Err(invalid(
                variable,
                id,
                "at most 249 ASCII letters, digits, `.`, `_` or `-` (a pod name)",
            )),
        }
    }

    fn duration(&self, variable: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(variable) {
            None => Ok(default),
            Some(value) => humantime::parse_duration(value)
                .map_err(|_| invalid(variable, value, "a duration such as 90s, 15m or 72h")),
        }
    }

    fn number<T>(
        &self,
        variable: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
        expected: &str,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Copy,
    {
        match self.get(variable) {
            None => Ok(default),
            Some(value) => value
                .parse::<T>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| invalid(variable, value, expected)),
        }
    }

    fn parsed<T: FromStr>(
        &self,
        variable: &str,
        default: &str,
        expected: &str,
    ) -> Result<T, ConfigError> {
        let value = self.get(variable).unwrap_or(default);
        value
            .parse()
            .map_err(|_| invalid(variable, value, expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const URL: (&str, &str) = ("DATABASE_URL", "postgres://app:s3cret@db:5432/recon");

    #[test]
    fn defaults_follow_the_contract() {
        let config = Config::from_vars(vars(&[URL])).expect("valid");
        assert_eq!(config.brokers, "127.0.0.1:9092");
        assert_eq!(config.group_id, "recon-worker");
        assert_eq!(config.payments_topic, "payments");
        assert_eq!(config.settlements_topic, "settlements");
        assert_eq!(config.matching, MatchConfig::default());
        assert_eq!(
            config.matching.settlement_deadline,
            Duration::from_secs(72 * 3600)
        );
        assert_eq!(config.matching.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn database_url_is_required() {
        let err = Config::from_vars(vars(&[])).expect_err("missing");
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn errors_name_variable_value_and_expectation() {
        for (variable, value) in [
            ("RECON_SETTLEMENT_DEADLINE", "3 days-ish"),
            ("RECON_ORPHAN_TIMEOUT", "-1h"),
            ("RECON_IDLE_TIMEOUT", "soon"),
            ("RECON_AMOUNT_TOLERANCE_MINOR", "-5"),
            ("RECON_WINDOW_MAX_ITEMS", "0"),
            ("RECON_METRICS_ADDR", "port 80"),
            ("RECON_LOG_FORMAT", "xml"),
            ("RECON_KAFKA_PROP_session.timeout.ms", "6000"),
            ("RECON_INSTANCE_ID", "pod/0"),
            ("RECON_GROUP_PROTOCOL", "cooperative"),
        ] {
            let err = Config::from_vars(vars(&[URL, (variable, value)]))
                .expect_err(variable)
                .to_string();
            assert!(
                err.contains(variable) && err.contains(value) && err.contains("expected"),
                "{err}"
            );
        }
    }

    #[test]
    fn durations_and_kafka_properties_are_parsed() {
        let config = Config::from_vars(vars(&[
            URL,
            ("RECON_SETTLEMENT_DEADLINE", "90s"),
            ("RECON_ORPHAN_TIMEOUT", "15m"),
            ("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "6000"),
            ("RECON_KAFKA_PROP_SASL_PASSWORD", "kafka-secret"),
            ("RECON_KAFKA_PROP_SOME__ODD_NAME", "x"),
        ]))
        .expect("valid");
        assert_eq!(config.matching.settlement_deadline, Duration::from_secs(90));
        assert_eq!(config.matching.orphan_timeout, Duration::from_secs(900));
        assert_eq!(config.kafka_properties["session.timeout.ms"], "6000");
        assert_eq!(config.kafka_properties["some_odd.name"], "x");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("kafka-secret"),
            "{shown}"
        );
    }

    #[test]
    fn instance_id_is_optional_and_kafka_shaped() {
        let unset = Config::from_vars(vars(&[URL])).expect("valid");
        assert_eq!(unset.instance_id, None);
        let empty = Config::from_vars(vars(&[URL, ("RECON_INSTANCE_ID", "")])).expect("valid");
        assert_eq!(empty.instance_id, None);
        let pod = Config::from_vars(vars(&[URL, ("RECON_INSTANCE_ID", "recon-worker-7f9c-x2")]))
            .expect("valid");
        assert_eq!(pod.instance_id.as_deref(), Some("recon-worker-7f9c-x2"));
        let too_long = "a".repeat(250);
        assert!(Config::from_vars(vars(&[URL, ("RECON_INSTANCE_ID", &too_long)])).is_err());
    }

    #[test]
    fn bad_database_url_does_not_echo_the_password() {
        let err = Config::from_vars(vars(&[("DATABASE_URL", "mysql://app:s3cret@db/x")]))
            .map(|_| ())
            .err();
        // sqlx may accept odd schemes lazily; if it rejects, the password must be hidden.
        if let Some(err) = err {
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        assert_eq!(
            redact_url("postgres://u:p%40ss@h:1/db?sslmode=require&password=x"),
            "postgres://u:***@h:1/db?sslmode=require&password=***"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
