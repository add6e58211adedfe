//! `recon-worker rejects ...` (contract §8): listing rejected messages, and asking for
//! them to be re-driven once the cause of their rejection is fixed.
//!
//! This file owns those commands' arguments, their SQL and their rules:
//! - `list` streams, oldest first, as `discrepancies list` does.
//! - `redrive` only *asks* (migration 0011: `redrive_requested_at`): decoding again and
//!   processing is the job of the worker that owns the message's partition pair
//!   (`pipeline::redrive`), with its configuration (currencies, size limit...) and in
//!   the same transaction as the rest of its batch, which is what makes it exactly
//!   once. A request for a message already redriven, or already asked for, changes
//!   nothing; one whose payload was cut at 65,536 bytes is refused (it cannot be
//!   decoded again: the message must be published again upstream).
//! - `--wait` then follows the requests until the workers settle them and prints what
//!   became of them.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder};

use super::output::{csv_line, stream, table_line, Format, Listed};
use super::OperationError;
use crate::event::Rejection;
use crate::rejection::{DATA_ERROR_CLASS, REJECTED_PAYLOAD_CAP};

/// `recon-worker rejects <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List rejected messages, oldest first (by id: the order they were rejected).
    ///
    /// Rows are written as they are read from PostgreSQL, so any number of them needs
    /// the memory of one. Columns: id, topic, kafka_partition, kafka_offset,
    /// reason_class, reason, payload_size, truncated (the payload was cut at 65,536
    /// bytes: it cannot be redriven), rejected_at, status (`rejected`, `requested`: a
    /// re-drive is waiting for the worker, `redriven`), redrive_result (of the last
    /// re-drive: `accepted`, `redelivery`, `rejected`: still invalid, `truncated`),
    /// redriven_at, payload_preview (the first 60 bytes, invalid UTF-8 replaced).
    ///
    /// Formats as for `discrepancies list`: `table`, `csv` (RFC 4180 with a header
    /// line), `json` (one JSON object per line).
    List(ListArgs),
    /// Ask for rejected messages to be decoded again from their stored payload and,
    /// if now valid, processed exactly once as late events by the worker that owns
    /// their partition pair (in its next batch, within a few seconds). One still
    /// invalid stays rejected with its new reason.
    ///
    /// Messages already redriven are left alone. A message whose payload was cut at
    /// 65,536 bytes cannot be redriven: `--at` refuses it (exit code 1), `--all` and
    /// `--reason-class` skip it and say how many they skipped.
    Redrive(RedriveArgs),
}

/// The reason classes `rejected_events.reason_class` records.
fn reason_classes() -> impl Iterator<Item = &'static str> {
    Rejection::CLASSES
        .into_iter()
        .chain(std::iter::once(DATA_ERROR_CLASS))
}

/// `rejects list` arguments.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only rejects of this reason class.
    #[arg(long, value_name = "C", value_parser = clap::builder::PossibleValuesParser::new(reason_classes()))]
    pub reason_class: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `rejects redrive` arguments: exactly one of `--all`, `--reason-class`, `--at`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["all", "reason_class", "at"])))]
pub struct RedriveArgs {
    /// Every reject not yet redriven.
    #[arg(long)]
    pub all: bool,
    /// Every reject of this reason class not yet redriven.
    #[arg(long, value_name = "C", value_parser = clap::builder::PossibleValuesParser::new(reason_classes()))]
    pub reason_class: Option<String>,
    /// The one reject read at this position, e.g. `payments:3:1042`.
    #[arg(long, value_name = "TOPIC:PARTITION:OFFSET", value_parser = position)]
    pub at: Option<Position>,
    /// Who asks (kept in `rejected_events.redrive_requested_by`); `$USER` by default.
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Wait up to DUR (such as 30s or 5m) for the workers to settle the requests,
    /// then print what became of them; exit code 1 if some are still waiting.
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
}

/// Where a message was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

/// `TOPIC:PARTITION:OFFSET` (a Kafka topic name has no `:`).
fn position(value: &str) -> Result<Position, String> {
    let mut parts = value.rsplitn(3, ':');
    let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("expected TOPIC:PARTITION:OFFSET, such as payments:3:1042".into());
    };
    let partition = partition
        .parse::<i32>()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| format!("partition `{partition}` is not a partition number"))?;
    let offset = offset
        .parse::<i64>()
        .ok()
        .filter(|o| *o >= 0)
        .ok_or_else(|| format!("offset `{offset}` is not an offset"))?;
    if topic.is_empty() {
        return Err("the topic is missing".into());
    }
    Ok(Position {
        topic: topic.to_owned(),
        partition,
        offset,
    })
}

/// One listed reject, as read.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    reason_class: String,
    reason: String,
    payload_size: i32,
    truncated: bool,
    rejected_at: DateTime<Utc>,
    status: String,
    redrive_result: Option<String>,
    redriven_at: Option<DateTime<Utc>>,
    preview: Option<Vec<u8>>,
}

const COLUMNS: [&str; 13] = [
    "id",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "reason_class",
    "reason",
    "payload_size",
    "truncated",
    "rejected_at",
    "status",
    "redrive_result",
    "redriven_at",
    "payload_preview",
];

/// Table widths, in the order of [`COLUMNS`]; the table leaves out `truncated` and
/// `redriven_at` (see [`Listed::write`]) and shortens headers.
const TABLE: [(&str, usize); 10] = [
    ("ID", 8),
    ("TOPIC", 14),
    ("PART", 4),
    ("OFFSET", 10),
    ("CLASS", 23),
    ("STATUS", 9),
    ("RESULT", 10),
    ("SIZE", 7),
    ("REJECTED_AT", 20),
    ("REASON", 0),
];

#[derive(serde::Serialize)]
struct JsonRow<'a> {
    id: i64,
    topic: &'a str,
    kafka_partition: i32,
    kafka_offset: i64,
    reason_class: &'a str,
    reason: &'a str,
    payload_size: i32,
    truncated: bool,
    rejected_at: String,
    status: &'a str,
    redrive_result: Option<&'a str>,
    redriven_at: Option<String>,
    payload_preview: Option<&'a str>,
}

fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Listed for Row {
    fn header(format: Format, out: &mut impl Write) -> io::Result<()> {
        header(format, out)
    }

    fn write(&self, format: Format, out: &mut impl Write) -> io::Result<()> {
        let preview = self
            .preview
            .as_deref()
            .map(|bytes| String::from_utf8_lossy(bytes).replace(|c: char| c.is_control(), " "));
        match format {
            Format::Table => {
                let truncated_mark = if self.truncated { "*" } else { "" };
                let values = [
                    self.id.to_string(),
                    self.topic.clone(),
                    self.kafka_partition.to_string(),
                    self.kafka_offset.to_string(),
                    self.reason_class.clone(),
                    self.status.clone(),
                    self.redrive_result.clone().unwrap_or_else(|| "-".into()),
                    format!("{}{truncated_mark}", self.payload_size),
                    self.rejected_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                    self.reason.replace(['\n', '\r'], " "),
                ];
                table_line(
                    out,
                    values
                        .iter()
                        .map(String::as_str)
                        .zip(TABLE.map(|(_, width)| width)),
                )
            }
            Format::Csv => {
                let values = [
                    self.id.to_string(),
                    self.topic.clone(),
                    self.kafka_partition.to_string(),
                    self.kafka_offset.to_string(),
                    self.reason_class.clone(),
                    self.reason.clone(),
                    self.payload_size.to_string(),
                    self.truncated.to_string(),
                    time(&self.rejected_at),
                    self.status.clone(),
                    self.redrive_result.clone().unwrap_or_default(),
                    self.redriven_at.as_ref().map(time).unwrap_or_default(),
                    preview.unwrap_or_default(),
                ];
                csv_line(out, values.iter().map(String::as_str))
            }
            Format::Json => {
                let row = JsonRow {
                    id: self.id,
                    topic: &self.topic,
                    kafka_partition: self.kafka_partition,
                    kafka_offset: self.kafka_offset,
                    reason_class: &self.reason_class,
                    reason: &self.reason,
                    payload_size: self.payload_size,
                    truncated: self.truncated,
                    rejected_at: time(&self.rejected_at),
                    status: &self.status,
                    redrive_result: self.redrive_result.as_deref(),
                    redriven_at: self.redriven_at.as_ref().map(time),
                    payload_preview: preview.as_deref(),
                };
                serde_json::to_writer(&mut *out, &row).map_err(io::Error::from)?;
                out.write_all(b"\n")
            }
        }
    }
}

fn header(format: Format, out: &mut impl Write) -> io::Result<()> {
    match format {
        Format::Table => table_line(out, TABLE),
        Format::Csv => csv_line(out, COLUMNS),
        Format::Json => Ok(()),
    }
}

/// The SQL condition of a payload cut when it was rejected.
const TRUNCATED: &str = "(payload IS NOT NULL AND payload_size > octet_length(payload))";

/// Writes the rejects of `reason_class` (all when `None`) to `out` in `format`, oldest
/// first, each as it is read. Returns how many were written.
pub async fn list(
    connection: &mut PgConnection,
    reason_class: Option<&str>,
    format: Format,
    out: &mut impl Write,
) -> Result<u64, OperationError> {
    let mut query = QueryBuilder::<Postgres>::new(format!(
        "SELECT id, topic, kafka_partition, kafka_offset, reason_class, reason, payload_size,
                {TRUNCATED} AS truncated, rejected_at,
                CASE WHEN redriven_at IS NOT NULL THEN 'redriven'
                     WHEN redrive_requested_at IS NOT NULL THEN 'requested'
                     ELSE 'rejected' END AS status,
                redrive_result, redriven_at, substring(payload FROM 1 FOR 60) AS preview
         FROM rejected_events"
    ));
    if let Some(class) = reason_class {
        query
            .push(" WHERE reason_class = ")
            .push_bind(class.to_owned());
    }
    query.push(" ORDER BY id");
    stream::<Row>(connection, query, format, out).await
}

/// Which rejects a re-drive asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    ReasonClass(String),
    At(Position),
}

/// What a re-drive request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// Newly asked for.
    pub requested: u64,
    /// Asked for before and still waiting for a worker.
    pub already_requested: u64,
    /// Skipped: their payload was cut at 65,536 bytes.
    pub truncated: u64,
    /// The database time of this request (`redrive_requested_at`), to follow it.
    pub at: DateTime<Utc>,
}

/// Asks for the selected rejects to be redriven by `actor` (see the module doc).
/// `--at` a reject that does not exist, was redriven already, or whose payload was
/// cut is refused, changing nothing.
pub async fn request(
    connection: &mut PgConnection,
    selection: &Selection,
    actor: &str,
) -> Result<Requested, OperationError> {
    let mut tx = connection.begin().await?;
    let at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    if let Selection::At(position) = selection {
        refuse_unless_redrivable(&mut tx, position).await?;
    }
    let mut query = QueryBuilder::<Postgres>::new(format!(
        "WITH chosen AS (
             SELECT id, {TRUNCATED} AS truncated, redrive_requested_at IS NOT NULL AS pending
             FROM rejected_events WHERE redriven_at IS NULL"
    ));
    match selection {
        Selection::All => {}
        Selection::ReasonClass(class) => {
            query.push(" AND reason_class = ").push_bind(class.clone());
        }
        Selection::At(position) => {
            query
                .push(" AND topic = ")
                .push_bind(position.topic.clone())
                .push(" AND kafka_partition = ")
                .push_bind(position.partition)
                .push(" AND kafka_offset = ")
                .push_bind(position.offset);
        }
    }
    query
        .push(
            " FOR UPDATE),
         asked AS (
             UPDATE rejected_events r
             SET redrive_requested_at = ",
        )
        .push_bind(at)
        .push(", redrive_requested_by = ")
        .push_bind(actor.to_owned())
        .push(
            " FROM chosen c WHERE r.id = c.id AND NOT c.truncated AND NOT c.pending
             RETURNING 1)
         SELECT (SELECT count(*) FROM asked),
                count(*) FILTER (WHERE pending AND NOT truncated),
                count(*) FILTER (WHERE truncated)
         FROM chosen",
        );
    let (requested, already_requested, truncated): (i64, i64, i64) =
        query.build_query_as().fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(Requested {
        requested: requested as u64,
        already_requested: already_requested as u64,
        truncated: truncated as u64,
        at,
    })
}

/// `--at`: the reject exists, is not redriven, and its payload is whole.
async fn refuse_unless_redrivable(
    tx: &mut PgConnection,
    position: &Position,
) -> Result<(), OperationError> {
    type Found = (i64, i32, Option<i32>, Option<DateTime<Utc>>, Option<String>);
    let found: Option<Found> = sqlx::query_as(
        "SELECT id, payload_size, octet_length(payload), redriven_at, redrive_result
             FROM rejected_events
             WHERE topic = $1 AND kafka_partition = $2 AND kafka_offset = $3",
    )
    .bind(&position.topic)
    .bind(position.partition)
    .bind(position.offset)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, size, stored, redriven_at, result)) = found else {
        return Err(OperationError::Refused(format!(
            "no rejected message was read at {position}"
        )));
    };
    if let Some(at) = redriven_at {
        return Err(OperationError::Refused(format!(
            "the reject at {position} (id {id}) was redriven already, at {} ({})",
            at.to_rfc3339_opts(SecondsFormat::Secs, true),
            result.as_deref().unwrap_or("accepted")
        )));
    }
    if stored.is_some_and(|stored| size > stored) {
        return Err(OperationError::Refused(format!(
            "the reject at {position} (id {id}) cannot be redriven: its payload of {size} bytes \
             was cut at {REJECTED_PAYLOAD_CAP} when it was rejected; publish the message again upstream"
        )));
    }
    Ok(())
}

/// What became of the requests made at `at`, as far as the workers got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    pub accepted: u64,
    pub redelivery: u64,
    /// Still invalid (their new reason is in `rejects list`).
    pub rejected: u64,
    pub truncated: u64,
    /// Not yet settled by any worker.
    pub pending: u64,
}

/// Counts what became of the requests made at `at`.
pub async fn settled(
    connection: &mut PgConnection,
    at: DateTime<Utc>,
) -> Result<Settled, OperationError> {
    // A request settled keeps `redrive_attempted_at` (set by the worker after `at`);
    // a pending one keeps `redrive_requested_at = at`. A later request for the same
    // reject replaces this one's time, and is that request's to follow.
    let (accepted, redelivery, rejected, truncated, pending): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE redrive_result = 'accepted' AND redrive_attempted_at >= $1),
                    count(*) FILTER (WHERE redrive_result = 'redelivery' AND redrive_attempted_at >= $1),
                    count(*) FILTER (WHERE redrive_result = 'rejected' AND redrive_attempted_at >= $1),
                    count(*) FILTER (WHERE redrive_result = 'truncated' AND redrive_attempted_at >= $1),
                    count(*) FILTER (WHERE redrive_requested_at = $1 AND redriven_at IS NULL)
             FROM rejected_events
             WHERE redrive_attempted_at >= $1 OR redrive_requested_at = $1",
        )
        .bind(at)
        .fetch_one(&mut *connection)
        .await?;
    Ok(Settled {
        accepted: accepted as u64,
        redelivery: redelivery as u64,
        rejected: rejected as u64,
        truncated: truncated as u64,
        pending: pending as u64,
    })
}

/// How often `--wait` looks.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// Runs one command, writing to stdout.
pub async fn execute(
    connection: &mut PgConnection,
    command: Command,
) -> Result<(), OperationError> {
    let args = match command {
        Command::List(args) => {
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            let listed = list(
                connection,
                args.reason_class.as_deref(),
                args.format,
                &mut out,
            )
            .await;
            let result = listed.and_then(|_| out.flush().map_err(OperationError::Output));
            return super::output::ignore_broken_pipe(result.map(drop));
        }
        Command::Redrive(args) => args,
    };
    let selection = match (args.all, args.reason_class, args.at) {
        (_, _, Some(position)) => Selection::At(position),
        (_, Some(class), None) => Selection::ReasonClass(class),
        _ => Selection::All,
    };
    let actor = args
        .actor
        .or_else(|| std::env::var("USER").ok())
        .filter(|actor| !actor.trim().is_empty())
        .unwrap_or_else(|| "operator".into());
    let requested = request(connection, &selection, &actor).await?;
    println!(
        "redrive requested for {} rejected message(s) by {actor}; {} already waiting for a worker",
        requested.requested, requested.already_requested
    );
    if requested.truncated > 0 {
        eprintln!(
            "recon-worker: {} rejected message(s) skipped: their payload was cut at {REJECTED_PAYLOAD_CAP} bytes and cannot be redriven",
            requested.truncated
        );
    }
    let Some(wait) = args.wait else {
        return Ok(());
    };
    let deadline = Instant::now() + wait;
    loop {
        let settled = settled(connection, requested.at).await?;
        if settled.pending == 0 || Instant::now() >= deadline {
            println!(
                "accepted {}, redelivery {}, still rejected {}, truncated {}, waiting {}",
                settled.accepted,
                settled.redelivery,
                settled.rejected,
                settled.truncated,
                settled.pending
            );
            if settled.pending > 0 {
                return Err(OperationError::Refused(format!(
                    "{} re-drive request(s) still waiting after {}: is a worker running that reads their topic and partition?",
                    settled.pending,
                    humantime::format_duration(wait)
                )));
            }
            return Ok(());
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_from_the_right() {
        assert_eq!(
            position("pay.ments-1:3:1042"),
            Ok(Position {
                topic: "pay.ments-1".into(),
                partition: 3,
                offset: 1042
            })
        );
        assert!(position("payments:3").is_err());
        assert!(position(":3:4").is_err());
        assert!(position("payments:-1:4").is_err());
        assert!(position("payments:1:x").is_err());
    }

    #[test]
    fn every_class_the_worker_records_can_be_chosen() {
        let classes: Vec<&str> = reason_classes().collect();
        assert!(classes.contains(&"too_large"));
        assert!(classes.contains(&"unknown_currency"));
        assert!(classes.contains(&DATA_ERROR_CLASS));
    }
}
