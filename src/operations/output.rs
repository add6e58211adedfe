//! Output formats of the listing commands, written row by row as rows arrive from
//! PostgreSQL, so a listing of any length needs the memory of one row (contract §8):
//!
//! - `table`: for a person; columns padded to fixed widths (a streamed listing cannot
//!   measure its longest value first), a longer value is written whole and shifts the
//!   rest of its line; an absent value is `-`;
//! - `csv`: RFC 4180, a header line first, `,` separated, fields quoted only when they
//!   hold a comma, a quote or a line break; an absent value is an empty field;
//! - `json`: one JSON object per line (NDJSON, JSON Lines), no enclosing array, so a
//!   consumer can stream it too; an absent value is `null`.

use std::io::{self, Write};

use futures_util::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::OperationError;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for a person.
    Table,
    /// CSV with a header line (RFC 4180).
    Csv,
    /// One JSON object per line (NDJSON).
    Json,
}

/// A row of a listing: its header and how one is written, in each format.
pub trait Listed: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin {
    fn header(format: Format, out: &mut impl Write) -> io::Result<()>;
    fn write(&self, format: Format, out: &mut impl Write) -> io::Result<()>;
}

/// Runs `query` and writes its rows to `out` as sqlx reads them off the connection
/// (never collected: any number of rows in the memory of one). Returns how many.
pub async fn stream<T: Listed>(
    connection: &mut PgConnection,
    mut query: QueryBuilder<'_, Postgres>,
    format: Format,
    out: &mut impl Write,
) -> Result<u64, OperationError> {
    T::header(format, out).map_err(OperationError::Output)?;
    let mut written = 0;
    let mut rows = query.build_query_as::<T>().fetch(&mut *connection);
    while let Some(row) = rows.try_next().await? {
        row.write(format, out).map_err(OperationError::Output)?;
        written += 1;
    }
    Ok(written)
}

/// A listing's result, where a reader that went away (`| head`) is not a failure: it
/// has what it wanted.
pub fn ignore_broken_pipe(
    result: Result<(), super::OperationError>,
) -> Result<(), super::OperationError> {
    match result {
        Err(super::OperationError::Output(error)) if error.kind() == io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        other => other,
    }
}

/// A CSV field, quoted when it must be.
pub fn csv_field(out: &mut impl Write, value: &str) -> io::Result<()> {
    if value.contains([',', '"', '\n', '\r']) {
        out.write_all(b"\"")?;
        out.write_all(value.replace('"', "\"\"").as_bytes())?;
        out.write_all(b"\"")
    } else {
        out.write_all(value.as_bytes())
    }
}

/// One CSV line of `fields`.
pub fn csv_line<'a>(
    out: &mut impl Write,
    fields: impl IntoIterator<Item = &'a str>,
) -> io::Result<()> {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        csv_field(out, field)?;
    }
    out.write_all(b"\n")
}

/// One table line: each value left-aligned in its width, two spaces between columns,
/// no trailing spaces.
pub fn table_line<'a>(
    out: &mut impl Write,
    columns: impl IntoIterator<Item = (&'a str, usize)>,
) -> io::Result<()> {
    let mut line = String::new();
    for (i, (value, width)) in columns.into_iter().enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        line.push_str(value);
        for _ in value.chars().count()..width {
            line.push(' ');
        }
    }
    out.write_all(line.trim_end().as_bytes())?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(fields: &[&str]) -> String {
        let mut out = Vec::new();
        csv_line(&mut out, fields.iter().copied()).expect("write");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        assert_eq!(csv(&["a", "", "b c"]), "a,,b c\n");
        assert_eq!(
            csv(&["x,y", "say \"hi\"", "two\nlines"]),
            "\"x,y\",\"say \"\"hi\"\"\",\"two\nlines\"\n"
        );
    }

    #[test]
    fn table_pads_to_widths_and_keeps_long_values_whole() {
        let mut out = Vec::new();
        table_line(&mut out, [("id", 4), ("kind", 6), ("x", 3)]).expect("write");
        table_line(&mut out, [("12345", 4), ("k", 6), ("", 3)]).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "id    kind    x\n12345  k\n"
        );
    }
}
