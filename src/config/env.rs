//! Reading variables: a value, its default, its parse and its bounds, with an error
//! naming the variable, the value and what was expected (contract §4).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use super::ConfigError;

/// The error for `variable`'s `value`, saying what was `expected`.
pub(super) fn invalid(variable: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        variable: variable.to_owned(),
        value: value.to_owned(),
        expected: expected.to_owned(),
    }
}

/// The variables a configuration is read from.
pub(super) struct Env<'a>(pub(super) &'a BTreeMap<String, String>);

impl Env<'_> {
    pub(super) fn get(&self, variable: &str) -> Option<&str> {
        self.0.get(variable).map(String::as_str)
    }

    pub(super) fn required(&self, variable: &str) -> Result<String, ConfigError> {
        match self.get(variable) {
            Some(value) if !value.trim().is_empty() => Ok(value.to_owned()),
            _ => Err(ConfigError::Missing {
                variable: variable.to_owned(),
            }),
        }
    }

    pub(super) fn text(&self, variable: &str, default: &str) -> Result<String, ConfigError> {
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
    pub(super) fn instance_id(&self, variable: &str) -> Result<Option<String>, ConfigError> {
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

    pub(super) fn duration(
        &self,
        variable: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match self.get(variable) {
            None => Ok(default),
            Some(value) => humantime::parse_duration(value)
                .map_err(|_| invalid(variable, value, "a duration such as 90s, 15m or 72h")),
        }
    }

    pub(super) fn bounded_duration(
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

    pub(super) fn number<T>(
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

    pub(super) fn parsed<T: FromStr>(
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
