//! `RECON_KAFKA_PROP_*`: librdkafka properties given through the environment — how a
//! variable's name maps to a property, which properties the worker refuses to let an
//! override undo, which hold secrets that are never shown, and which are read from
//! the file a `RECON_KAFKA_PROP_<NAME>_FILE` names.

use std::collections::{BTreeMap, BTreeSet};

use super::env::{invalid, secret, FILE_SUFFIX};
use super::ConfigError;

/// librdkafka's own properties whose names end in `.file` (they take a path): their
/// variables end in `_FILE` and are properties, not values read from a file.
const LIBRDKAFKA_FILE_PROPERTIES: [&str; 3] = [
    "sasl.oauthbearer.assertion.file",
    "sasl.oauthbearer.assertion.jwt.template.file",
    "sasl.oauthbearer.assertion.private.key.file",
];

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

/// The librdkafka properties of a configuration.
pub(super) struct KafkaProperties {
    /// By property name.
    pub(super) values: BTreeMap<String, String>,
    /// The properties whose value was read from a file.
    pub(super) from_files: BTreeSet<String>,
}

/// For `RECON_KAFKA_PROP_<NAME>_FILE`: the `<NAME>` whose value the file holds.
/// `None` for any other suffix, and for librdkafka's own `*.file` properties.
fn file_variable_target(suffix: &str) -> Option<&str> {
    let property = kafka_property_name(suffix)?;
    if !property.ends_with(".file") || LIBRDKAFKA_FILE_PROPERTIES.contains(&property.as_str()) {
        return None;
    }
    // The name maps to `<something>.file`, so it ends in a lone `_FILE`.
    suffix
        .strip_suffix(FILE_SUFFIX)
        .filter(|target| !target.is_empty())
}

/// The librdkafka properties among `vars`. A malformed name or a reserved property
/// stops the configuration; a value that may be a secret is never part of the error,
/// and neither is anything read from a file.
pub(super) fn properties(vars: &BTreeMap<String, String>) -> Result<KafkaProperties, ConfigError> {
    let mut kafka_properties = BTreeMap::new();
    let mut from_files = BTreeSet::new();
    for (name, value) in vars {
        if let Some(suffix) = name.strip_prefix(KAFKA_PROP_PREFIX) {
            let (suffix, value, from_file) = match file_variable_target(suffix) {
                Some(target) => {
                    let variable = format!("{KAFKA_PROP_PREFIX}{target}");
                    // Both set is an error. Only the direct one set (this one empty):
                    // that one is read under its own name.
                    match secret(vars, &variable, name)? {
                        Some(read) if read.file.is_some() => (target, read.value, true),
                        _ => continue,
                    }
                }
                None => (suffix, value.clone(), false),
            };
            let value = &value;
            // The name is malformed, so whether it holds a secret is a guess from
            // its words: shown only when it does not look like one.
            let shown = if from_file || is_secret_property(suffix) {
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
            if from_file {
                from_files.insert(property.clone());
            }
            kafka_properties.insert(property, value.clone());
        }
    }
    Ok(KafkaProperties {
        values: kafka_properties,
        from_files,
    })
}

/// The values of the secret properties among `properties` (by name, or read from a
/// file), for the [`Scrubber`](super::Scrubber).
pub(super) fn secret_values(properties: &KafkaProperties) -> impl Iterator<Item = String> + '_ {
    properties
        .values
        .iter()
        .filter(|(name, _)| is_secret_property(name) || properties.from_files.contains(*name))
        .map(|(_, value)| value.clone())
}
