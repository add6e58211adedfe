//! Reading variables: a value, its default, its parse and its bounds, with an error
//! naming the variable, the value and what was expected (contract §4); and a secret's
//! value from the file its `*_FILE` variable names, which no error ever quotes.

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

/// What ends the name of a variable naming a file that holds another variable's value.
pub(super) const FILE_SUFFIX: &str = "_FILE";

/// A secret-bearing variable's value, and where it came from.
pub(super) struct Secret {
    pub(super) value: String,
    /// `(VARIABLE_FILE, path)` when the value was read from a file.
    pub(super) file: Option<(String, String)>,
}

/// The value of `variable`, given directly or as the content of the file that
/// `file_variable` names; `None` when neither is set. Both set (and not empty) is an
/// error naming both: which one wins would be a guess.
pub(super) fn secret(
    vars: &BTreeMap<String, String>,
    variable: &str,
    file_variable: &str,
) -> Result<Option<Secret>, ConfigError> {
    let set = |name: &str| vars.get(name).filter(|value| !value.is_empty());
    match (set(variable), set(file_variable)) {
        (Some(_), Some(_)) => Err(ConfigError::Conflict {
            variable: variable.to_owned(),
            file_variable: file_variable.to_owned(),
        }),
        (_, Some(path)) => Ok(Some(Secret {
            value: read_secret_file(file_variable, path)?,
            file: Some((file_variable.to_owned(), path.clone())),
        })),
        (Some(value), None) => Ok(Some(Secret {
            value: value.clone(),
            file: None,
        })),
        (None, None) => Ok(vars.get(variable).map(|value| Secret {
            value: value.clone(),
            file: None,
        })),
    }
}

/// The content of a secret file, without the line break(s) that end it: Kubernetes
/// secrets written with `echo` or an editor end in one, and no password, URL or
/// token ends in a line break on purpose. An error names the variable and the path,
/// never the content (the I/O error's text is the operating system's, not the file's).
fn read_secret_file(file_variable: &str, path: &str) -> Result<String, ConfigError> {
    let content = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
        variable: file_variable.to_owned(),
        path: path.to_owned(),
        reason: error.to_string(),
    })?;
    Ok(content.trim_end_matches(['\n', '\r']).to_owned())
}

/// The variables a configuration is read from.
pub(super) struct Env<'a>(pub(super) &'a BTreeMap<String, String>);

impl Env<'_> {
    pub(super) fn get(&self, variable: &str) -> Option<&str> {
        self.0.get(variable).map(String::as_str)
    }

    /// A required secret-bearing variable, given directly or as `{variable}_FILE`.
    /// Empty or blank counts as not set; from a file, it is reported as an empty file.
    pub(super) fn required_secret(&self, variable: &str) -> Result<Secret, ConfigError> {
        let file_variable = format!("{variable}{FILE_SUFFIX}");
        match secret(self.0, variable, &file_variable)? {
            Some(secret) if !secret.value.trim().is_empty() => Ok(secret),
            Some(Secret {
                file: Some((file_variable, path)),
                ..
            }) => Err(invalid(
                &file_variable,
                &path,
                &format!("a file holding the value of {variable}, not an empty one"),
            )),
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
