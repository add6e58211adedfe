//! `DATABASE_URL` (or the file `DATABASE_URL_FILE` names): its parse into connection
//! options, the CA file it names checked at start, and its password hidden wherever
//! the URL is shown (logs, configuration errors) or might be echoed (the secrets a
//! [`Scrubber`](super::Scrubber) blanks out of other libraries' errors).

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

use super::env::Env;
use super::ConfigError;

/// `DATABASE_URL`, read and checked.
pub(super) struct Database {
    pub(super) options: PgConnectOptions,
    /// The URL with its passwords replaced, for logs.
    pub(super) display: String,
    /// The passwords the URL carries, as written and percent-decoded.
    pub(super) secrets: Vec<String>,
}

/// Reads `DATABASE_URL` or `DATABASE_URL_FILE`; an error shows the URL with its
/// password hidden.
pub(super) fn read(env: &Env<'_>) -> Result<Database, ConfigError> {
    let secret = env.required_secret("DATABASE_URL")?;
    let url = secret.value;
    let variable = match &secret.file {
        Some((file_variable, path)) => format!("DATABASE_URL (read from {file_variable}={path})"),
        None => "DATABASE_URL".to_owned(),
    };
    let display = redact_url(&url);
    let options = PgConnectOptions::from_str(&url).map_err(|_| ConfigError::Invalid {
        variable: variable.clone(),
        value: display.clone(),
        expected: "a PostgreSQL URL such as postgres://user@host:5432/db".into(),
    })?;
    check_root_certificate(&url, &variable)?;
    let secrets = url_secret_ranges(&url)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|range| {
            let raw = url[range].to_owned();
            let decoded = percent_encoding::percent_decode_str(&raw)
                .decode_utf8_lossy()
                .into_owned();
            [raw, decoded]
        })
        .collect();
    Ok(Database {
        options,
        display,
        secrets,
    })
}

/// Checks that the CA file the URL names (`sslrootcert`, or sqlx's aliases
/// `ssl-root-cert` and `ssl-ca`; the last one given counts, as in sqlx) can be read.
/// sqlx reads it at every connection and reports a missing file as an I/O error, which
/// is what an unreachable server looks like too: the worker would retry a typo in a
/// mount path for ever instead of saying so at start.
fn check_root_certificate(url: &str, variable: &str) -> Result<(), ConfigError> {
    let Some(path) = root_certificate_path(url) else {
        return Ok(());
    };
    std::fs::File::open(&path)
        .map(drop)
        .map_err(|error| ConfigError::File {
            variable: format!("{variable} (sslrootcert)"),
            path,
            reason: error.to_string(),
        })
}

/// The CA file a URL names, read from its query as a URL parser reads it (the query
/// starts at the first `?` and ends at a `#`; `+` is a space, `%XX` a byte).
fn root_certificate_path(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| {
            matches!(
                decode_component_raw(name).as_str(),
                "sslrootcert" | "ssl-root-cert" | "ssl-ca"
            )
        })
        .map(|(_, value)| decode_component_raw(value))
        .next_back()
}

/// A query component as a URL parser reads it, case kept.
fn decode_component_raw(text: &str) -> String {
    let plus_as_space = text.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8_lossy()
        .into_owned()
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
    decode_component_raw(text).to_lowercase()
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

/// A libpq connection string, read character by character with byte offsets.
type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

/// A libpq `key=value` connection string with every password value hidden. Read as
/// libpq reads it (values may be single-quoted, `\` escapes the next character);
/// from anything it cannot read on, the rest is hidden.
fn redact_conninfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
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
        let Some(value) = conninfo_value(&mut chars) else {
            out.push_str("***");
            return out;
        };
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

/// Moves whitespace from `chars` to `out`.
fn skip_spaces(chars: &mut Chars<'_>, out: &mut String) {
    while let Some(&(_, c)) = chars.peek() {
        if !c.is_whitespace() {
            break;
        }
        out.push(c);
        chars.next();
    }
}

/// Reads one value as written (quotes and escapes kept): up to the next whitespace,
/// or a single-quoted string. `None`: a quote that is never closed.
fn conninfo_value(chars: &mut Chars<'_>) -> Option<String> {
    let mut value = String::new();
    if chars.next_if(|&(_, c)| c == '\'').is_some() {
        value.push('\'');
        while let Some((_, c)) = chars.next() {
            value.push(c);
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '\'' => return Some(value),
                _ => {}
            }
        }
        return None;
    }
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
    Some(value)
}
