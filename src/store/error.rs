//! What can go wrong in the store, and whether retrying can help.
//!
//! Owns [`StoreError`] and the classification of sqlx errors into transient and
//! permanent. Every store operation returns this one type, so the pipeline's retry
//! policy decides from [`StoreError::is_transient`] alone and never inspects
//! SQLSTATEs itself. Converting an error is also where the pool learns that its
//! connections must be replaced (see `pool`), because that is the one place
//! every failing statement passes through.

use crate::event::Topic;

use super::pool::replace_connections;

/// A store failure, saying whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connection lost, server restarting or read-only after a failover, pool
    /// exhausted, serialisation conflict, statement or lock timeout: retry with backoff.
    #[error("transient database error: {0}")]
    Transient(#[source] sqlx::Error),
    /// Schema missing, authentication, a certificate refused, constraint violations, a
    /// stored value the crate does not know (an event kind, an outcome): retrying will
    /// not help.
    #[error("database error: {0}")]
    Permanent(#[source] sqlx::Error),
    /// Another worker owns these partition pairs now (their epoch moved on).
    #[error("fenced: partition pairs {0:?} now belong to another worker")]
    Fenced(Vec<i32>),
    /// These partition pairs would insert event ids that are already stored (under
    /// another payment id, or by another pair of the same batch): their state must be
    /// rebuilt from their stored offsets with every event id checked against storage.
    #[error("partition pairs {0:?} insert event ids that are already stored")]
    EventIdsClash(Vec<i32>),
    /// PostgreSQL refused values of these messages (a data error, SQLSTATE class 22:
    /// a character the database encoding cannot hold, a time out of its range...).
    /// Nothing of their pairs was written: those pairs must be re-read from their
    /// stored offsets with these messages rejected. Not retryable as it stands.
    #[error("PostgreSQL refused values of messages {0:?}")]
    DataErrors(Vec<RefusedMessage>),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

impl crate::retry::Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if needs_new_connections(&error) {
            replace_connections();
        }
        if is_transient(&error) {
            StoreError::Transient(error)
        } else {
            StoreError::Permanent(error)
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        if let sqlx::migrate::MigrateError::Execute(inner)
        | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) = &error
        {
            if needs_new_connections(inner) {
                replace_connections();
            }
        }
        StoreError::Migrate(error)
    }
}

/// A message whose values PostgreSQL refused, with PostgreSQL's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedMessage {
    pub pair: i32,
    pub topic: Topic,
    pub offset: i64,
    pub reason: String,
}

/// Whether the same operation may succeed if tried again later. A value that does not
/// decode (`ColumnDecode`: an unknown event kind or outcome read back) is permanent,
/// and so is a TLS failure other than a connection broken mid-handshake
/// ([`is_transient_tls`]).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Tls(error) => is_transient_tls(error.as_ref()),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| is_transient_sqlstate(&code, db.message())),
        _ => false,
    }
}

/// Whether a TLS failure (sqlx reports one only while a connection is set up: the
/// handshake, or the certificates it loads) may pass by itself. Told apart by what
/// lies under it: an I/O error (reset, timed out) or an end of stream in the middle of
/// the handshake (OpenSSL 3 reports a server that went away as "unexpected eof while
/// reading") is the connection breaking, as it does while a server restarts, and the
/// next attempt may succeed. Anything else is the TLS layer's verdict on the
/// certificates and settings of either side — a CA the client does not trust
/// ("certificate verify failed"), a name the certificate does not carry, a server
/// without TLS under `sslmode=require` or `verify-*`, a CA file that is not PEM, no
/// protocol version in common — which every attempt meets again: the worker must stop
/// and say so instead of retrying for ever.
pub fn is_transient_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<std::io::Error>()
            || error
                .to_string()
                .to_ascii_lowercase()
                .contains("unexpected eof")
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The SQLSTATEs after which the same statement can succeed later: none says anything
/// about the data, and each ends by itself (a failover completes, a lock is released,
/// a migration finishes), so exiting would only hand the partitions to a worker that
/// meets the same condition.
pub fn is_transient_sqlstate(code: &str, message: &str) -> bool {
    // 08: connection exception; 53: out of resources.
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            // Serialisation failure, deadlock.
            "40001" | "40P01"
            // Admin shutdown (pg_terminate_backend, a failover), crash shutdown,
            // cannot connect now (starting up).
            | "57P01" | "57P02" | "57P03"
            // statement_timeout (or a cancel), lock_timeout.
            | "57014" | "55P03"
            // A write on a server that became a standby, or a database set
            // read-only for maintenance.
            | "25006"
        )
        // feature_not_supported is a programming error, except this one: a statement
        // prepared before a migration changed the table's columns. Only a new
        // connection (a fresh statement cache) gets past it.
        || (code == "0A000" && message.contains("cached plan must not change result type"))
}

/// Errors after which the pool's connections must not be reused: they are attached to
/// a server that no longer accepts writes (after a failover every pooled connection
/// points at the old primary, and retrying on them would fail for ever), or hold
/// prepared statements the server refuses.
fn needs_new_connections(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code().is_some_and(|code| {
        code == "25006"
            || (code == "0A000"
                && db
                    .message()
                    .contains("cached plan must not change result type"))
    })
}

/// SQLSTATE class 22, data exception: a value the statement's types cannot hold.
/// Caused by content, so by a message, not by the database's state.
pub(super) fn is_data_error(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.code().is_some_and(|code| code.starts_with("22"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_that_end_by_themselves_are_transient() {
        for code in [
            "08006", "08001", "53300", "40001", "40P01", "57P01", "57P02", "57P03", "57014",
            "55P03", "25006",
        ] {
            assert!(is_transient_sqlstate(code, "whatever"), "{code}");
        }
        assert!(is_transient_sqlstate(
            "0A000",
            "cached plan must not change result type"
        ));
        for code in [
            "0A000", "23505", "22021", "42P01", "28000", "3D000", "25001",
        ] {
            assert!(!is_transient_sqlstate(code, "some other failure"), "{code}");
        }
    }

    #[test]
    fn a_tls_verdict_is_permanent_and_a_broken_handshake_transient() {
        // What sqlx wraps: native-tls's error, whose source is OpenSSL's error stack
        // for a verdict and the socket's I/O error for a broken connection.
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Wrapped(String, #[source] Option<std::io::Error>);
        let verdict = sqlx::Error::Tls(Box::new(Wrapped(
            "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed (unable to get local issuer certificate)".into(),
            None,
        )));
        assert!(!is_transient(&verdict));
        assert!(!StoreError::from(verdict).is_transient());
        let no_tls = sqlx::Error::Tls("server does not support TLS".into());
        assert!(!is_transient(&no_tls));
        let reset = sqlx::Error::Tls(Box::new(Wrapped(
            "the handshake failed".into(),
            Some(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        )));
        assert!(is_transient(&reset));
        let eof = sqlx::Error::Tls(Box::new(Wrapped(
            "error:0A000126:SSL routines::unexpected eof while reading".into(),
            None,
        )));
        assert!(is_transient(&eof));
    }

    #[test]
    fn a_value_that_does_not_decode_is_permanent() {
        let error = sqlx::Error::ColumnDecode {
            index: "\"event_kind\"".into(),
            source: Box::new(super::super::rows::UnknownEventKind("refund".into())),
        };
        assert!(!StoreError::from(error).is_transient());
    }
}
