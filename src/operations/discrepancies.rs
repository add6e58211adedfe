//! `recon-worker discrepancies ...` (contract §8): listing discrepancies, and the three
//! things a person does to one: accept it (a known difference), reopen it, annotate
//! it.
//!
//! This file owns those commands' arguments, their SQL and their rules:
//! - `list` streams: rows are written as sqlx reads them off the connection
//!   (`fetch`, never collected), so a million rows need the memory of one. `--open`
//!   (the default) names `resolved_at IS NULL` literally, so PostgreSQL reads the
//!   partial index `recon_discrepancies_open_by_age` in order and sends the first row
//!   at once instead of sorting first.
//! - `accept`, `reopen`, `annotate` each run in one transaction that locks the
//!   discrepancy (`SELECT ... FOR UPDATE`), checks its state, changes it and appends
//!   the action to `recon_discrepancy_actions`. The lock serialises them against each
//!   other and against the worker's checkpoint, whose resolving `UPDATE` waits and
//!   then re-checks `resolved_at IS NULL` (READ COMMITTED): an accepted discrepancy is
//!   never resolved again by the worker, nor logged twice.
//!
//! A person's resolution is `accepted` ([`ACCEPTED`]); the worker never touches such a
//! discrepancy again (`store::writes`, `store::payouts`), while the outcomes of its
//! events still change as contract §2 says.

use std::io::{self, Write};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder};

use super::output::{csv_line, stream, table_line, Format, Listed};
use super::OperationError;
use crate::engine::DiscrepancyKind;
use crate::store::{ACCEPTED, WORKER_ACTOR};

/// `recon-worker discrepancies <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List discrepancies, oldest first (by opened_at, then id).
    ///
    /// Rows are written as they are read from PostgreSQL, so any number of them needs
    /// the memory of one. Columns: id, kind, payment_id, payout_id, payment_event_id,
    /// settlement_event_id, opened_at, resolved_at, resolution, age_seconds (how long it
    /// has been open: until now, or until resolved_at for a resolved one). Times are
    /// RFC 3339 in UTC.
    ///
    /// Formats: `table` (aligned columns for a person; `-` for no value), `csv` (RFC
    /// 4180 with a header line; an empty field for no value), `json` (NDJSON: one JSON
    /// object per line, no enclosing array; null for no value).
    List(ListArgs),
    /// Accept an open discrepancy as a known difference: it is resolved with
    /// resolution `accepted`, and the worker never reopens or re-resolves it, even when
    /// its counterpart arrives later (the events' outcomes still change).
    ///
    /// Refused (exit code 1) for an unknown id or a discrepancy already resolved.
    Accept(ActionArgs),
    /// Reopen a resolved discrepancy (by the worker or by a person): resolved_at and
    /// resolution are cleared. It stays open until the worker resolves it on a later
    /// change of its events, or a person accepts it.
    ///
    /// Refused (exit code 1) for an unknown id, an open discrepancy, or a payout
    /// discrepancy whose payout has another one open.
    Reopen(ActionArgs),
    /// Add a note to a discrepancy's history, open or resolved; nothing else changes.
    ///
    /// Refused (exit code 1) for an unknown id.
    Annotate(ActionArgs),
}

/// `discrepancies list` arguments.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only discrepancies of this kind.
    #[arg(long, value_name = "KIND", value_parser = clap::builder::PossibleValuesParser::new(
        DiscrepancyKind::all().map(DiscrepancyKind::as_str)))]
    pub kind: Option<String>,
    /// Only open discrepancies (the default).
    #[arg(long, conflicts_with = "all")]
    pub open: bool,
    /// Open and resolved discrepancies.
    #[arg(long)]
    pub all: bool,
    /// Only discrepancies opened more than DUR ago, a duration such as 90s, 15m, 72h
    /// or 7d.
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Only discrepancies of this payment.
    #[arg(long, value_name = "ID")]
    pub payment_id: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl ListArgs {
    pub fn filter(&self) -> ListFilter {
        ListFilter {
            kind: self.kind.clone(),
            include_resolved: self.all,
            older_than: self.older_than,
            payment_id: self.payment_id.clone(),
        }
    }
}

/// `accept`, `reopen`, `annotate` arguments.
#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    /// The discrepancy's id (the `id` column of `list`).
    #[arg(value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    pub id: i64,
    /// Who does this (a person's name or login), kept in the action log. Not
    /// `recon-worker`, which names the worker's own actions.
    #[arg(long, value_name = "NAME", value_parser = actor)]
    pub actor: String,
    /// Why, kept in the action log.
    #[arg(long, value_name = "TEXT", value_parser = note)]
    pub note: String,
}

fn actor(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        Err("an actor names who acts: it cannot be empty".into())
    } else if value == WORKER_ACTOR {
        Err(format!("`{WORKER_ACTOR}` names the worker's own actions"))
    } else {
        Ok(value.to_owned())
    }
}

fn note(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        Err("a note says why: it cannot be empty".into())
    } else {
        Ok(value.to_owned())
    }
}

/// Which discrepancies `list` shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub kind: Option<String>,
    /// `--all`; otherwise open ones only.
    pub include_resolved: bool,
    /// Opened more than this long ago.
    pub older_than: Option<Duration>,
    pub payment_id: Option<String>,
}

/// One listed discrepancy, as read.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    kind: String,
    payment_id: Option<String>,
    payout_id: Option<String>,
    payment_event_id: Option<String>,
    settlement_event_id: Option<String>,
    opened_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
    resolution: Option<String>,
    age_seconds: i64,
}

/// The columns, in order, as the csv header and the json keys name them.
const COLUMNS: [&str; 10] = [
    "id",
    "kind",
    "payment_id",
    "payout_id",
    "payment_event_id",
    "settlement_event_id",
    "opened_at",
    "resolved_at",
    "resolution",
    "age_seconds",
];

/// Table widths, in the order of [`COLUMNS`] (the last header is `age`).
const WIDTHS: [usize; 10] = [8, 19, 20, 16, 20, 20, 20, 20, 10, 0];

/// A listed row as one JSON object.
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    id: i64,
    kind: &'a str,
    payment_id: Option<&'a str>,
    payout_id: Option<&'a str>,
    payment_event_id: Option<&'a str>,
    settlement_event_id: Option<&'a str>,
    opened_at: String,
    resolved_at: Option<String>,
    resolution: Option<&'a str>,
    age_seconds: i64,
}

fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An age for a person: its two largest units.
fn short_age(seconds: i64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3_600,
        seconds % 3_600 / 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

impl Listed for Row {
    fn header(format: Format, out: &mut impl Write) -> io::Result<()> {
        header(format, out)
    }

    fn write(&self, format: Format, out: &mut impl Write) -> io::Result<()> {
        match format {
            Format::Table => {
                let opened = self.opened_at.to_rfc3339_opts(SecondsFormat::Secs, true);
                let resolved = self
                    .resolved_at
                    .map(|at| at.to_rfc3339_opts(SecondsFormat::Secs, true));
                let age = short_age(self.age_seconds);
                let id = self.id.to_string();
                let values = [
                    id.as_str(),
                    &self.kind,
                    self.payment_id.as_deref().unwrap_or("-"),
                    self.payout_id.as_deref().unwrap_or("-"),
                    self.payment_event_id.as_deref().unwrap_or("-"),
                    self.settlement_event_id.as_deref().unwrap_or("-"),
                    &opened,
                    resolved.as_deref().unwrap_or("-"),
                    self.resolution.as_deref().unwrap_or("-"),
                    &age,
                ];
                table_line(out, values.into_iter().zip(WIDTHS))
            }
            Format::Csv => {
                let id = self.id.to_string();
                let opened = time(&self.opened_at);
                let resolved = self.resolved_at.as_ref().map(time);
                let age = self.age_seconds.to_string();
                csv_line(
                    out,
                    [
                        id.as_str(),
                        &self.kind,
                        self.payment_id.as_deref().unwrap_or(""),
                        self.payout_id.as_deref().unwrap_or(""),
                        self.payment_event_id.as_deref().unwrap_or(""),
                        self.settlement_event_id.as_deref().unwrap_or(""),
                        &opened,
                        resolved.as_deref().unwrap_or(""),
                        self.resolution.as_deref().unwrap_or(""),
                        &age,
                    ],
                )
            }
            Format::Json => {
                let row = JsonRow {
                    id: self.id,
                    kind: &self.kind,
                    payment_id: self.payment_id.as_deref(),
                    payout_id: self.payout_id.as_deref(),
                    payment_event_id: self.payment_event_id.as_deref(),
                    settlement_event_id: self.settlement_event_id.as_deref(),
                    opened_at: time(&self.opened_at),
                    resolved_at: self.resolved_at.as_ref().map(time),
                    resolution: self.resolution.as_deref(),
                    age_seconds: self.age_seconds,
                };
                serde_json::to_writer(&mut *out, &row).map_err(io::Error::from)?;
                out.write_all(b"\n")
            }
        }
    }
}

fn header(format: Format, out: &mut impl Write) -> io::Result<()> {
    match format {
        Format::Table => {
            let mut names = COLUMNS;
            names[9] = "age";
            let upper: Vec<String> = names.iter().map(|n| n.to_uppercase()).collect();
            table_line(out, upper.iter().map(String::as_str).zip(WIDTHS))
        }
        Format::Csv => csv_line(out, COLUMNS),
        Format::Json => Ok(()),
    }
}

/// Writes the discrepancies `filter` selects to `out` in `format`, oldest first, each
/// as it is read. Returns how many were written.
pub async fn list(
    connection: &mut PgConnection,
    filter: &ListFilter,
    format: Format,
    out: &mut impl Write,
) -> Result<u64, OperationError> {
    let mut query = QueryBuilder::<Postgres>::new(
        "SELECT id, kind, payment_id, payout_id, payment_event_id, settlement_event_id,
                opened_at, resolved_at, resolution,
                floor(extract(epoch FROM COALESCE(resolved_at, now()) - opened_at))::bigint
                    AS age_seconds
         FROM recon_discrepancies WHERE true",
    );
    if !filter.include_resolved {
        // Literal, for the partial index (see the module doc).
        query.push(" AND resolved_at IS NULL");
    }
    if let Some(kind) = &filter.kind {
        query.push(" AND kind = ").push_bind(kind.clone());
    }
    if let Some(older_than) = filter.older_than {
        let micros = i64::try_from(older_than.as_micros()).unwrap_or(i64::MAX);
        query
            .push(" AND opened_at < now() - ")
            .push_bind(micros)
            .push("::bigint * interval '1 microsecond'");
    }
    if let Some(payment_id) = &filter.payment_id {
        query
            .push(" AND payment_id = ")
            .push_bind(payment_id.clone());
    }
    query.push(" ORDER BY opened_at, id");

    stream::<Row>(connection, query, format, out).await
}

/// What a person does to a discrepancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Accept,
    Reopen,
    Annotate,
}

impl Act {
    /// The action as `recon_discrepancy_actions.action` records it.
    pub const fn action(self) -> &'static str {
        match self {
            Act::Accept => "accepted",
            Act::Reopen => "reopened",
            Act::Annotate => "annotated",
        }
    }
}

/// An action recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub discrepancy_id: i64,
    /// `recon_discrepancy_actions.id`.
    pub action_id: i64,
    pub action: &'static str,
}

/// Does `act` to discrepancy `id` as `actor`, in one transaction (see the module
/// doc). Refused, changing nothing, for an unknown id or the wrong state.
pub async fn act(
    connection: &mut PgConnection,
    act: Act,
    id: i64,
    actor: &str,
    note: &str,
) -> Result<Recorded, OperationError> {
    let mut tx = connection.begin().await?;
    let state: Option<(Option<DateTime<Utc>>, Option<String>)> = sqlx::query_as(
        "SELECT resolved_at, resolution FROM recon_discrepancies WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((resolved_at, resolution)) = state else {
        return Err(OperationError::Refused(format!(
            "no discrepancy has id {id}"
        )));
    };
    let resolved = resolved_at.map(|at| {
        format!(
            "resolved ({}) at {}",
            resolution.as_deref().unwrap_or("no resolution"),
            at.to_rfc3339_opts(SecondsFormat::Secs, true)
        )
    });
    match (act, resolved) {
        (Act::Accept, Some(resolved)) => {
            return Err(OperationError::Refused(format!(
                "discrepancy {id} is already {resolved}: only an open one can be accepted \
                 (reopen it first to change how it was resolved)"
            )));
        }
        (Act::Accept, None) => {
            sqlx::query(
                "UPDATE recon_discrepancies SET resolved_at = now(), resolution = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(ACCEPTED)
            .execute(&mut *tx)
            .await?;
        }
        (Act::Reopen, None) => {
            return Err(OperationError::Refused(format!(
                "discrepancy {id} is open: only a resolved one can be reopened"
            )));
        }
        (Act::Reopen, Some(_)) => {
            sqlx::query(
                "UPDATE recon_discrepancies SET resolved_at = NULL, resolution = NULL WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|error| refused_reopen(id, error))?;
        }
        (Act::Annotate, _) => {}
    }
    let action_id: i64 = sqlx::query_scalar(
        "INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(id)
    .bind(act.action())
    .bind(actor)
    .bind(note)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Recorded {
        discrepancy_id: id,
        action_id,
        action: act.action(),
    })
}

/// A payout has at most one open discrepancy (migration 0009): reopening one while
/// the other kind is open is refused by the database, and so by the command.
fn refused_reopen(id: i64, error: sqlx::Error) -> OperationError {
    match &error {
        sqlx::Error::Database(db)
            if db.constraint() == Some("recon_discrepancies_one_open_per_payout") =>
        {
            OperationError::Refused(format!(
                "discrepancy {id} cannot be reopened: its payout has another discrepancy open"
            ))
        }
        _ => OperationError::Database(error),
    }
}

/// Runs one command, writing to stdout.
pub async fn execute(
    connection: &mut PgConnection,
    command: Command,
) -> Result<(), OperationError> {
    let (act_, args) = match command {
        Command::List(args) => {
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            let listed = list(connection, &args.filter(), args.format, &mut out).await;
            let result = listed.and_then(|_| out.flush().map_err(OperationError::Output));
            return super::output::ignore_broken_pipe(result.map(drop));
        }
        Command::Accept(args) => (Act::Accept, args),
        Command::Reopen(args) => (Act::Reopen, args),
        Command::Annotate(args) => (Act::Annotate, args),
    };
    let recorded = act(connection, act_, args.id, &args.actor, &args.note).await?;
    println!(
        "discrepancy {}: {} by {} (action {})",
        recorded.discrepancy_id, recorded.action, args.actor, recorded.action_id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_show_their_two_largest_units() {
        assert_eq!(short_age(5), "5s");
        assert_eq!(short_age(65), "1m 5s");
        assert_eq!(short_age(3 * 3600 + 120), "3h 2m");
        assert_eq!(short_age(2 * 86_400 + 5 * 3600 + 7), "2d 5h");
    }

    #[test]
    fn a_person_cannot_act_as_the_worker_or_without_a_note() {
        assert!(actor("recon-worker").is_err());
        assert!(actor("  ").is_err());
        assert_eq!(actor(" alice ").as_deref(), Ok("alice"));
        assert!(note(" ").is_err());
    }
}
