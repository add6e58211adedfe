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
    /// A `RECON_KAFKA_PROP_*` that would undo a setting correctness depends on.
    #[error("{variable}={value:?} is refused: {reason}")]
    Refused {
        variable: String,
        value: String,
        reason: String,
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

pub use crate::engine::{MatchConfig, WindowConfig};

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
    /// librdkafka properties from `RECON_KAFKA_PROP_<NAME>`.
    pub kafka_properties: BTreeMap<String, String>,
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
            .field("max_future_skew", &self.max_future_skew)
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

/// The secret values of a configuration, to blank out of text the worker does not
/// compose itself: librdkafka's configuration errors end with the refused property's
/// value, whatever it is.
#[derive(Clone, Default)]
pub struct Scrubber(Vec<String>);

impl Scrubber {
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

/// librdkafka properties whose values are secrets and never logged: passwords, client
/// secrets, tokens, private keys (`ssl.key.pem`, `ssl_key`; a `key` in the name may
/// also be a harmless path, which costs nothing to hide), and the OAUTHBEARER
/// configuration, which carries a token's claims or a client secret.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|word| name.contains(word))
        || name.starts_with("sasl.oauthbearer.config")
}

/// librdkafka properties recon-worker sets itself, which `RECON_KAFKA_PROP_*` may not
/// change: (property, what the worker needs, why). Applied last, an override would
/// silently undo exactly-once or co-partitioning.
const RESERVED_PROPERTIES: [(&str, &str, &str); 10] = [
    (
        "enable.auto.commit",
        "false",
        "offsets are stored in PostgreSQL with the results they produced, and committed to Kafka only after",
    ),
    (
        "auto.commit.enable",
        "false",
        "a legacy name of enable.auto.commit; offsets are stored in PostgreSQL",
    ),
    (
        "enable.auto.offset.store",
        "false",
        "an offset is stored only once the database commit covering it succeeded",
    ),
    (
        "isolation.level",
        "read_committed",
        "messages of aborted producer transactions must never be reconciled",
    ),
    (
        "partition.assignment.strategy",
        "range",
        "partition p of both topics must go to the same worker",
    ),
    (
        "group.protocol",
        "classic",
        "the rebalance handling is written for the classic protocol's range assignor",
    ),
    (
        "auto.offset.reset",
        "earliest",
        "a partition without stored offsets is read from its start: skipping input loses money",
    ),
    ("group.id", "RECON_GROUP_ID", "set it with RECON_GROUP_ID"),
    (
        "bootstrap.servers",
        "RECON_KAFKA_BROKERS",
        "set it with RECON_KAFKA_BROKERS",
    ),
    (
        "metadata.broker.list",
        "RECON_KAFKA_BROKERS",
        "an alias of bootstrap.servers: set it with RECON_KAFKA_BROKERS",
    ),
];

/// Why `property` may not be set through `RECON_KAFKA_PROP_*`, if it may not.
fn reserved_property(property: &str) -> Option<String> {
    RESERVED_PROPERTIES
        .iter()
        .find(|(name, _, _)| *name == property)
        .map(|(name, required, why)| {
            if required.starts_with("RECON_") {
                format!("{name} cannot be set through RECON_KAFKA_PROP_*: {why}")
            } else {
                format!("recon-worker sets {name}={required} and it cannot be overridden: {why}")
            }
        })
}

pub const KAFKA_PROP_PREFIX: &str = "RECON_KAFKA_PROP_";

/// Longest accepted `RECON_MAX_FUTURE_SKEW`: ten years is "no limit" for any real
/// producer, and keeps the bound far from overflowing microseconds.
const MAX_FUTURE_SKEW_BOUND: Duration = Duration::from_secs(3650 * 24 * 3600);

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
                // The name is malformed, so whether it holds a secret is a guess from
                // its words: shown only when it does not look like one.
                let shown = if is_secret_property(suffix) {
                    "***"
                } else {
                    value
                };
                let property = kafka_property_name(suffix)
                    .ok_or_else(|| invalid(name, shown, "RECON_KAFKA_PROP_ followed by a property name in upper case, `.` as `_` and `_` as `__`"))?;
                if let Some(reason) = reserved_property(&property) {
                    return Err(ConfigError::Refused {
                        variable: name.clone(),
                        value: shown.to_owned(),
                        reason,
                    });
                }
                kafka_properties.insert(property, value.clone());
            }
        }
        let mut secrets: Vec<String> = url_secret_ranges(&database_url)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|range| {
                let raw = database_url[range].to_owned();
                let decoded = percent_encoding::percent_decode_str(&raw)
                    .decode_utf8_lossy()
                    .into_owned();
                [raw, decoded]
            })
            .chain(
                kafka_properties
                    .iter()
                    .filter(|(name, _)| is_secret_property(name))
                    .map(|(_, value)| value.clone()),
            )
            .filter(|secret| !secret.is_empty())
            .collect();
        // Longest first: a secret containing another is blanked whole.
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
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
            scrubber: Scrubber(secrets),
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

/// Replaces every password a PostgreSQL connection string may carry with `***`,
/// leaving the rest readable: for logs and for the errors that echo `DATABASE_URL`.
///
/// The string is shown exactly when it is wrong, so the rules assume nothing about
/// it being well formed; where parsers could disagree on where the password ends, the
/// wider reading is hidden:
/// - URL userinfo: from the first `:` after `//` to the *last* `@`. A password with a
///   raw `/`, `?`, `#` or `@` (not percent-encoded) makes the URL parser cut the
///   authority at the wrong place (or libpq take the first `@`), and the string is then
///   echoed in the configuration error. With an `@` later in the query (say
///   `application_name=a@b`) more is hidden than needed, which is harmless.
/// - Query parameters whose name, percent-decoded, contains `password` (`password`,
///   `sslpassword`, `pass%77ord`): everything from their value to the end, as a
///   password may itself contain a raw `&`.
/// - Strings that are not URLs are shown as libpq `key=value` connection strings with
///   the value of every key containing `password` hidden (quoted values included).
pub fn redact_url(url: &str) -> String {
    match url_secret_ranges(url) {
        Some(hidden) => replace_ranges(url, hidden),
        None => redact_conninfo(url),
    }
}

/// Byte ranges of `url` [`redact_url`] hides, or `None` when it is not a URL.
fn url_secret_ranges(url: &str) -> Option<Vec<std::ops::Range<usize>>> {
    match url.split_once("://") {
        Some((scheme, rest)) if is_url_scheme(scheme) => {
            let offset = scheme.len() + 3;
            let mut hidden = Vec::new();
            if let Some(at) = rest.rfind('@') {
                if let Some(colon) = rest[..at].find(':') {
                    hidden.push(offset + colon + 1..offset + at);
                }
            }
            for (i, c) in rest.char_indices() {
                if c != '?' && c != '&' {
                    continue;
                }
                let param = &rest[i + 1..];
                let Some(eq) = param.find('=') else { continue };
                let name = &param[..eq];
                if name.contains('&') {
                    continue;
                }
                if decode_component(name).contains("password") {
                    hidden.push(offset + i + 1 + eq + 1..url.len());
                    break;
                }
            }
            Some(hidden)
        }
        _ => None,
    }
}

/// RFC 3986: a letter, then letters, digits, `+`, `-` or `.`.
fn is_url_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A query component as a URL parser reads it: `+` is a space, `%XX` a byte;
/// lower-cased, for comparing names.
fn decode_component(text: &str) -> String {
    let plus_as_space = text.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8_lossy()
        .to_lowercase()
}

/// `text` with each byte range (sorted or not, overlapping or not) replaced by `***`.
fn replace_ranges(text: &str, mut ranges: Vec<std::ops::Range<usize>>) -> String {
    ranges.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for range in ranges {
        // A range starting inside one already hidden only extends it.
        if range.start >= at {
            out.push_str(&text[at..range.start]);
            out.push_str("***");
        }
        at = at.max(range.end);
    }
    out.push_str(&text[at.min(text.len())..]);
    out
}

/// A libpq `key=value` connection string with every password value hidden. Read as
/// libpq reads it (values may be single-quoted, `\` escapes the next character);
/// from anything it cannot read on, the rest is hidden.
fn redact_conninfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
                       out: &mut String| {
        while let Some(&(_, c)) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
    };
    loop {
        skip_spaces(&mut chars, &mut out);
        let Some(&(key_start, _)) = chars.peek() else {
            return out;
        };
        let mut key_end = text.len();
        while let Some(&(i, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                key_end = i;
                break;
            }
            chars.next();
        }
        let key = &text[key_start..key_end];
        let mut spaces = String::new();
        skip_spaces(&mut chars, &mut spaces);
        if chars.next_if(|&(_, c)| c == '=').is_none() {
            // Not `key=value`: from here on nothing can be told apart from a password
            // (`user= password=' x'` leaves `x'` here).
            out.push_str("***");
            return out;
        }
        out.push_str(key);
        out.push_str(&spaces);
        out.push('=');
        skip_spaces(&mut chars, &mut out);
        let mut value = String::new();
        match chars.peek() {
            Some(&(_, '\'')) => {
                chars.next();
                value.push('\'');
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    value.push(c);
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '\'' => {
                            closed = true;
                            break;
                        }
                        _ => {}
                    }
                }
                if !closed {
                    out.push_str("***");
                    return out;
                }
            }
            _ => {
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    chars.next();
                    value.push(c);
                    if c == '\\' {
                        value.extend(chars.next().map(|(_, c)| c));
                    }
                }
            }
        }
        if key.to_lowercase().contains("password") {
            out.push_str("***");
        } else if value.to_lowercase().contains("password") {
            // libpq reads `user= password=x` as the user `password=x`; whoever wrote
            // it meant a password, and where it ends is anyone's guess.
            out.push_str("***");
            return out;
        } else {
            out.push_str(&value);
        }
    }
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

    fn bounded_duration(
        &self,
        variable: &str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
        expected: &str,
    ) -> Result<Duration, ConfigError> {
        match self.get(variable) {
            None => Ok(default),
            Some(value) => humantime::parse_duration(value)
                .ok()
                .filter(|d| range.contains(d))
                .ok_or_else(|| invalid(variable, value, expected)),
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
        assert_eq!(config.max_future_skew, Duration::from_secs(24 * 3600));
        assert_eq!(
            config.decode_limits(),
            crate::event::Limits {
                max_bytes: 64 * 1024,
                max_future_skew: 24 * 3600 * 1_000_000,
            }
        );
    }

    #[test]
    fn the_future_skew_is_a_duration() {
        let config =
            Config::from_vars(vars(&[URL, ("RECON_MAX_FUTURE_SKEW", "90m")])).expect("valid");
        assert_eq!(config.max_future_skew, Duration::from_secs(5400));
        assert_eq!(config.decode_limits().max_future_skew, 5_400_000_000);
    }

    #[test]
    fn kafka_properties_the_worker_depends_on_are_refused() {
        for (variable, value, property) in [
            (
                "RECON_KAFKA_PROP_ENABLE_AUTO_COMMIT",
                "true",
                "enable.auto.commit",
            ),
            (
                "RECON_KAFKA_PROP_AUTO_COMMIT_ENABLE",
                "true",
                "auto.commit.enable",
            ),
            (
                "RECON_KAFKA_PROP_ENABLE_AUTO_OFFSET_STORE",
                "true",
                "enable.auto.offset.store",
            ),
            (
                "RECON_KAFKA_PROP_ISOLATION_LEVEL",
                "read_uncommitted",
                "isolation.level",
            ),
            (
                "RECON_KAFKA_PROP_PARTITION_ASSIGNMENT_STRATEGY",
                "roundrobin",
                "partition.assignment.strategy",
            ),
            (
                "RECON_KAFKA_PROP_GROUP_PROTOCOL",
                "consumer",
                "group.protocol",
            ),
            (
                "RECON_KAFKA_PROP_AUTO_OFFSET_RESET",
                "latest",
                "auto.offset.reset",
            ),
            ("RECON_KAFKA_PROP_GROUP_ID", "other", "RECON_GROUP_ID"),
            (
                "RECON_KAFKA_PROP_BOOTSTRAP_SERVERS",
                "k:9092",
                "RECON_KAFKA_BROKERS",
            ),
            (
                "RECON_KAFKA_PROP_METADATA_BROKER_LIST",
                "k:9092",
                "RECON_KAFKA_BROKERS",
            ),
        ] {
            let err = Config::from_vars(vars(&[URL, (variable, value)])).expect_err(variable);
            assert!(matches!(err, ConfigError::Refused { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains(variable) && text.contains(value) && text.contains(property),
                "{text}"
            );
        }
        // Tuning stays open.
        let config = Config::from_vars(vars(&[
            URL,
            ("RECON_KAFKA_PROP_FETCH_WAIT_MAX_MS", "50"),
            ("RECON_KAFKA_PROP_CLIENT_ID", "recon-eu-1"),
        ]))
        .expect("valid");
        assert_eq!(config.kafka_properties["fetch.wait.max.ms"], "50");
    }

    #[test]
    fn secret_kafka_properties_are_never_shown() {
        let secrets = [
            ("RECON_KAFKA_PROP_SASL_PASSWORD", "pw-Alpha"),
            ("RECON_KAFKA_PROP_SSL_KEY_PASSWORD", "pw-Bravo"),
            (
                "RECON_KAFKA_PROP_SASL_OAUTHBEARER_CONFIG",
                "principal=x scope=Charlie",
            ),
            (
                "RECON_KAFKA_PROP_SASL_OAUTHBEARER_CLIENT_SECRET",
                "pw-Delta",
            ),
            ("RECON_KAFKA_PROP_SSL_KEY_PEM", "pw-Echo"),
            ("RECON_KAFKA_PROP_SSL__KEY", "pw-Foxtrot"),
            (
                "RECON_KAFKA_PROP_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                "https://idp/Golf",
            ),
            ("RECON_KAFKA_PROP_SSL_KEYSTORE_PASSWORD", "pw-Hotel"),
        ];
        let mut all = vec![URL];
        all.extend(secrets);
        let config = Config::from_vars(vars(&all)).expect("valid");
        let shown = format!("{config:?}");
        for (_, secret) in secrets {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("sasl.password"), "{shown}");
        // A malformed name that looks like a secret's: its value is not echoed.
        let err = Config::from_vars(vars(&[URL, ("RECON_KAFKA_PROP_sasl.password", "pw-India")]))
            .expect_err("malformed")
            .to_string();
        assert!(
            err.contains("RECON_KAFKA_PROP_sasl.password") && !err.contains("pw-India"),
            "{err}"
        );
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
            ("RECON_MAX_FUTURE_SKEW", "tomorrow"),
            ("RECON_MAX_FUTURE_SKEW", "0s"),
            ("RECON_MAX_FUTURE_SKEW", "4000d"),
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
    fn the_scrubber_blanks_every_secret_value() {
        let config = Config::from_vars(vars(&[
            ("DATABASE_URL", "postgres://app:p%40ss-Word@db/x"),
            ("RECON_KAFKA_PROP_SASL_PASSWORD", "kafka-Secret"),
            ("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "6000"),
        ]))
        .expect("valid");
        let text = "config error: sasl.password kafka-Secret; p@ss-Word, p%40ss-Word; 6000";
        assert_eq!(
            config.scrubber.scrub(text),
            "config error: sasl.password ***; ***, ***; 6000"
        );
    }

    #[test]
    fn passwords_with_url_delimiters_are_hidden() {
        for (url, shown) in [
            ("postgres://u:pa/ss@h:1/db", "postgres://u:***@h:1/db"),
            ("postgres://u:pa?ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pa#ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p:a@h/db", "postgres://u:***@h/db"),
            ("postgres://u:@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h:5432/db", "postgres://u@h:5432/db"),
            (
                "postgresql://h/db?PassWord=x&sslmode=require",
                "postgresql://h/db?PassWord=***",
            ),
            (
                "postgres://h/db?pass%77ord=x",
                "postgres://h/db?pass%77ord=***",
            ),
            (
                "postgres://h/db?sslpassword=x",
                "postgres://h/db?sslpassword=***",
            ),
            (
                "postgres://h/db?password=a@b&c",
                "postgres://h/db?password=***",
            ),
            (
                "host=h password=secret dbname=d",
                "host=h password=*** dbname=d",
            ),
            (
                "host=h password = 'se cr\\'et' dbname=d",
                "host=h password = *** dbname=d",
            ),
            ("host=h password='unterminated", "host=h password=***"),
            ("host=h password", "host=h ***"),
            ("host=h password=a://b", "host=h password=***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// How a password is written into a generated URL.
    #[derive(Debug, Clone, Copy)]
    enum Placement {
        Raw,
        Encoded,
        Query,
        QueryEncoded,
        Conninfo,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever a password holds and however it is written, nothing of it is shown:
        /// generated passwords always hold an upper-case letter and the rest of every
        /// URL is lower case, so any upper-case letter in the output is a leak.
        #[test]
        fn no_password_reaches_the_redacted_text(
            user in "[a-z]{0,6}",
            host in "[a-z]{1,8}(:[0-9]{1,5})?",
            db in "(/[a-z]{0,8})?",
            before in "(\\?([a-z]{1,6}=[a-z@]{0,4}&){0,2})?",
            password in "[A-Z0-9/?@#:&=%+ ;'\\\\!$.,~-]{0,8}[G-Z][A-Z0-9/?@#:&=%+ ;'\\\\!$.,~-]{0,8}",
            placement in proptest::prop_oneof![
                proptest::strategy::Just(Placement::Raw),
                proptest::strategy::Just(Placement::Encoded),
                proptest::strategy::Just(Placement::Query),
                proptest::strategy::Just(Placement::QueryEncoded),
                proptest::strategy::Just(Placement::Conninfo),
            ],
            after in "(&[a-z]{1,6}=[a-z]{0,4}){0,2}",
        ) {
            let encoded: String = password
                .bytes()
                .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect();
            let query_start = if before.is_empty() { "?" } else { "&" };
            let url = match placement {
                Placement::Raw => format!("postgres://{user}:{password}@{host}{db}{before}"),
                Placement::Encoded => format!("postgres://{user}:{encoded}@{host}{db}{before}"),
                Placement::Query => format!("postgres://{user}@{host}{db}{before}{query_start}password={password}{after}"),
                Placement::QueryEncoded => format!("postgres://{host}{db}{before}{query_start}password={encoded}{after}"),
                Placement::Conninfo => {
                    let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
                    format!("host={host} user={user} password='{quoted}' dbname=d")
                }
            };
            let shown = redact_url(&url);
            proptest::prop_assert!(
                !shown.chars().any(|c| c.is_ascii_uppercase()),
                "{url:?} shown as {shown:?}"
            );
            // Hiding must not swallow everything: the host stays readable unless an
            // `@` or a password sits before it.
            if matches!(placement, Placement::Encoded) && !before.contains('@') {
                proptest::prop_assert!(shown.contains(&host), "{url:?} shown as {shown:?}");
            }
        }
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
