//! Connection hygiene for the store's pool: which pooled connections may be handed
//! out again, and giving back a connection's buffers when it returns.
//!
//! Kept apart from the queries because both concerns are about the pool's lifetime,
//! not about any statement: after a failover (or a migration that changed a table's
//! columns) every pooled connection is useless and must be replaced, and a pooled
//! connection otherwise keeps the largest buffers it ever needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Time base of [`REPLACE_BEFORE_NANOS`].
static CLOCK: OnceLock<Instant> = OnceLock::new();

/// Pooled connections opened before this many nanoseconds after [`CLOCK`] are closed
/// instead of handed out (0: none). Process-wide because errors become
/// [`super::StoreError`] where no pool is at hand (`?`); a pool that did not see the
/// error only reconnects once, which costs a connection set-up.
static REPLACE_BEFORE_NANOS: AtomicU64 = AtomicU64::new(0);

fn clock_nanos() -> u64 {
    let elapsed = CLOCK.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// Marks every connection open now as not to be reused.
pub(super) fn replace_connections() {
    tracing::warn!("closing pooled database connections: they reach a read-only server or hold stale prepared statements");
    REPLACE_BEFORE_NANOS.fetch_max(clock_nanos().max(1), Ordering::Relaxed);
}

/// Whether a pooled connection of this age may be reused.
pub(super) fn connection_is_current(age: Duration) -> bool {
    let replace_before = REPLACE_BEFORE_NANOS.load(Ordering::Relaxed);
    if replace_before == 0 {
        return true;
    }
    let age = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
    clock_nanos().saturating_sub(age) > replace_before
}

/// A pooled connection that gives back its buffers when it returns to the pool. See
/// [`super::Store::connection`].
pub(super) struct ShrinkOnReturn(pub(super) sqlx::pool::PoolConnection<sqlx::Postgres>);

impl std::ops::Deref for ShrinkOnReturn {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ShrinkOnReturn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ShrinkOnReturn {
    fn drop(&mut self) {
        sqlx::Connection::shrink_buffers(&mut *self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_opened_before_a_replacement_are_not_reused() {
        replace_connections();
        // Opened before the mark: closed. Opened after it: kept.
        assert!(!connection_is_current(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(connection_is_current(Duration::ZERO));
    }
}
