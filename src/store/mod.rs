//! PostgreSQL: the durable state of the worker. Partition-pair ownership (epochs and
//! stored offsets), window lookups, deadline sweeps and the checkpoint transaction.
//!
//! This file owns the [`Store`] handle itself: connecting and handing out pooled
//! connections. Each concern of what the store does with them has its own file, so a
//! new kind of stored state (refunds, payouts) has an obvious place to go:
//!
//! - `migrations`: applying migrations, whether the role may, and which are pending;
//! - `error`: [`StoreError`] and which failures are worth retrying;
//! - `pool`: connections replaced after a failover, buffers given back on return;
//! - `ownership`: taking pairs over (epoch bumps), where a pair stands, and the
//!   fencing update every checkpoint starts with;
//! - `lookups`: window lookups by payment id and event-id probes;
//! - `sweeps`: deadline sweeps and open-item counts, the reads of open outcomes;
//! - `checkpoint`: the one transaction a batch ends in (advancing pairs, then
//!   events, outcomes, discrepancies, rejects) and what its failures mean;
//! - `writes`: the statements of that transaction, one per kind of change, each
//!   logging the worker's own discrepancy actions (contract §8) as it changes them;
//! - `payout_rows`: the payout partial sums and announcements a checkpoint writes;
//! - `refusals`: tracing a data error PostgreSQL raised to the messages carrying it;
//! - `redrive`: the re-drive requests of rejected messages a worker reads for its
//!   pairs, and their results its checkpoint writes (contract §8);
//! - `payouts`: the payout evaluator's transaction (contract §7): payout state, status
//!   counts and payout discrepancies from the parts and announcements checkpoints
//!   commit;
//! - `rows`: typed rows and the text mappings of event kind, outcome and currency.
//!
//! Every statement that touches many rows binds arrays (`UNNEST`, `= ANY`): one round
//! trip per kind of change per batch, never one per event. The checkpoint updates the
//! partition-pair rows first and only where the epoch still matches, so a worker that
//! lost its partitions (a zombie) is fenced before it writes anything else, and the
//! row locks it takes serialise it against the new owner's epoch bump.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::event::Topic;

mod checkpoint;
mod error;
mod lookups;
mod migrations;
mod ownership;
mod payout_rows;
mod payouts;
mod pool;
mod redrive;
mod refusals;
mod rows;
mod sweeps;
mod writes;

pub use checkpoint::{AnnouncementAt, PairCheckpoint};
pub use error::{
    is_transient, is_transient_sqlstate, is_transient_tls, RefusedMessage, StoreError,
};
pub use migrations::{MigrationName, MigrationStatus, MIGRATOR};
pub use payouts::{Evaluation, PayoutGauges, PayoutRules, ACCEPTED, ANNOUNCED, BALANCED};
pub use redrive::{RedriveRequest, RedriveResult, Redriven, REDRIVE_REQUESTS_PER_POLL};
pub use sweeps::DueKeys;
pub use writes::{COUNTERPART_ARRIVED, WORKER_ACTOR};

use pool::{connection_is_current, ShrinkOnReturn};

/// The worker's handle on PostgreSQL, for one pair of topics. Cheap to clone: the
/// clones share one pool.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    payments_topic: String,
    settlements_topic: String,
    /// The payouts topic (contract §7), when this worker reads one.
    payouts_topic: Option<String>,
}

impl Store {
    /// Connects lazily: the pool opens connections on first use, so a database that is
    /// down at start is retried like any other outage.
    pub fn connect_lazy(
        options: PgConnectOptions,
        payments_topic: &str,
        settlements_topic: &str,
    ) -> Self {
        // Every statement here is a keyed batch (thousands of index probes). JIT
        // compilation costs more than such a statement runs, and with the default
        // random_page_cost the planner prefers a full merge join over a few thousand
        // probes once the table reaches a few hundred thousand rows, so each batch
        // costs O(table) (measured: 245 ms instead of 12 ms at 300k rows). Session
        // settings only; the server's configuration is left alone.
        let options = options.options([("jit", "off"), ("random_page_cost", "1.1")]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .before_acquire(|_, meta| {
                let current = connection_is_current(meta.age);
                Box::pin(async move { Ok(current) })
            })
            .connect_lazy_with(options);
        Self::with_pool(pool, payments_topic, settlements_topic)
    }

    pub fn with_pool(pool: PgPool, payments_topic: &str, settlements_topic: &str) -> Self {
        Self {
            pool,
            payments_topic: payments_topic.to_owned(),
            settlements_topic: settlements_topic.to_owned(),
            payouts_topic: None,
        }
    }

    /// The same store reading payout announcements from `topic` too (contract §7).
    pub fn with_payouts_topic(mut self, topic: Option<&str>) -> Self {
        self.payouts_topic = topic.map(str::to_owned);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A pooled connection that gives back its buffers when it returns to the pool.
    /// sqlx keeps a connection's buffers at the size of the largest message it ever
    /// carried; a batch's statements are up to a few MB, so over a long drain each of
    /// the pool's connections ratcheted up to the largest batch seen (measured: peak
    /// RSS rising from 47 to 82 MB over 1M messages).
    async fn connection(&self) -> Result<ShrinkOnReturn, StoreError> {
        Ok(ShrinkOnReturn(self.pool.acquire().await?))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A topic's name, as `rejected_events.topic` names it. Nothing is read from a
    /// payouts topic that is not configured; its role name stands in.
    fn topic(&self, topic: Topic) -> &str {
        match topic {
            Topic::Payments => &self.payments_topic,
            Topic::Settlements => &self.settlements_topic,
            Topic::Payouts => self.payouts_topic.as_deref().unwrap_or("payouts"),
        }
    }
}
