//! Payout control totals (contract §7): the evaluator's transaction, which turns the
//! partial sums the pairs' checkpoints commit into each payout's status and its
//! discrepancies. Design: docs/payouts-design.md, sections 5 and 6.
//!
//! This file owns everything that reads `recon_payout_parts` and
//! `recon_payout_announcements` and everything that writes `recon_payout_state`,
//! `recon_payout_status_counts`, `recon_payout_cursor`, `recon_payout_clock` and the
//! payout kinds of `recon_discrepancies`. The checkpoint (`checkpoint`, `writes`)
//! only adds to its pair's parts and appends announcements, each stamped with its
//! pair's new `payout_seq`, and moves its pair's `watermark`; nothing here writes what
//! a checkpoint writes, so the two never contend for a row.
//!
//! Why one serial evaluator rather than each checkpoint judging its payouts: a payout's
//! lines are spread over every partition pair, owned by different workers, so no
//! checkpoint sees a whole payout. Runs are made strictly serial by a
//! transaction-scoped advisory lock that any worker may take (no election, no zombie
//! holder, works through any pooler); a worker that finds it taken skips its turn.
//! Serial runs each see the previous one's commit, so the history of a payout's
//! discrepancy is clean (opened, resolved, reopened, never two open at once), and the
//! partial unique index `recon_discrepancies_one_open_per_payout` (migration 0009)
//! refuses a second open one even if this code were wrong.
//!
//! One run, in one READ COMMITTED transaction:
//! 1. **lock** — `pg_try_advisory_xact_lock`, the first statement; not acquired: done;
//! 2. **clock** — the global watermark G, the smallest committed pair watermark of
//!    the N pairs, NULL until all N have one; stored as `GREATEST(old, new)`, so G
//!    never moves back (a NULL from a pair row not there yet keeps the old value);
//! 3. **touched set** S — payouts whose deadline G has just passed, payouts with parts
//!    or announcements past the per-pair cursor (the cursor moves in the same
//!    statement), and, after a change of grace or orphan timeout, unbalanced payouts
//!    whose deadline was computed with the old ones; capped per run
//!    ([`PayoutRules::max_touched`]), the rest left for the next run;
//! 4. **state** — `recon_payout_state` recomputed for S (the rules are at
//!    `RECOMPUTE`), `recon_payout_status_counts` moved by the old→new deltas;
//! 5. **resolve**, then 6. **open or reopen** the payout discrepancies of S.
//!
//! Set-based: each step is one statement over the whole of S, about ten round trips a
//! run whatever S holds.
//!
//! The view `recon_payouts` is therefore up to one evaluation period (about 5 s) plus
//! one run behind the committed lines, and always consistent with the discrepancies:
//! both are written by the same transaction. Deadlines compare strictly (`G >
//! deadline`), as the engine's do. `due` is kept current for payouts awaiting a
//! deadline (`pending`, `unannounced`); a balanced payout's `due` is as of its last
//! recompute (nothing depends on it).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::engine::{DiscrepancyKind, PayoutStatus};

use super::writes::WORKER_ACTOR;
use super::{Store, StoreError};

/// The key of the evaluator's advisory lock, with `hashtext(current_schema())` as the
/// second half so two deployments sharing a database in different schemas do not
/// exclude each other. `"reco"` in ASCII. Two-int4 keys do not overlap with the single
/// bigint key sqlx's migrator locks.
const EVALUATOR_LOCK: i32 = 0x7265_636f;

/// What an evaluation needs to know that the database does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRules {
    /// N, the partition count of the co-partitioned topics: G waits for pairs
    /// `0..N` all to have a watermark.
    pub partitions: i32,
    /// `RECON_PAYOUT_GRACE`: an announced payout is due once G passes
    /// `paid_at` + grace.
    pub grace: Duration,
    /// O, `RECON_ORPHAN_TIMEOUT`: an unannounced payout is due once G passes its last
    /// line's `settled_at` + O.
    pub orphan_timeout: Duration,
    /// Most payouts one source of the touched set adds to a run (parts and
    /// announcements past the cursor, deadlines passed, a settings change): bounds a
    /// run's time and its transaction's size; what is left waits for the next run.
    pub max_touched: usize,
}

impl PayoutRules {
    /// A run of 20k new payouts (80k parts) took about 1.2 s on a 2-core development
    /// machine, and a day of real payouts is a few thousand: a backlog (the first
    /// enablement, an outage) drains within a few runs while no run grows long.
    pub const MAX_TOUCHED: usize = 20_000;

    pub fn new(partitions: i32, grace: Duration, orphan_timeout: Duration) -> Self {
        Self {
            partitions,
            grace,
            orphan_timeout,
            max_touched: Self::MAX_TOUCHED,
        }
    }
}

/// What one evaluation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The global watermark used (after `GREATEST` with the stored one); `None` until
    /// every pair has committed a watermark, and then nothing falls due.
    pub global_watermark: Option<DateTime<Utc>>,
    /// Payouts in the touched set (recomputed; unchanged rows are not rewritten).
    pub touched: usize,
    /// State rows inserted or changed.
    pub changed: usize,
    /// Payout discrepancies opened, reopened and resolved.
    pub opened: usize,
    pub reopened: usize,
    pub resolved: usize,
    /// A cap cut the touched set short: there is more to do right away.
    pub more: bool,
}

/// The payout gauges' values, read from the whole database (they are global).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PayoutGauges {
    pub global_watermark: Option<DateTime<Utc>>,
    /// `since` of the oldest payout past its deadline and not balanced.
    pub oldest_unbalanced_since: Option<DateTime<Utc>>,
    /// (status, payouts), from `recon_payout_status_counts`.
    pub statuses: Vec<(String, i64)>,
    /// (kind, open payout discrepancies).
    pub open_discrepancies: Vec<(String, i64)>,
}

/// `$n::bigint * interval '1 microsecond'`: durations travel as microseconds, and the
/// interval has no day part, so `timestamptz + interval` is exact whatever the
/// session's time zone (a `'1 day'` interval would follow daylight saving time).
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The global watermark, stored monotone with the settings in use. `count(watermark)`
/// counts only pairs that have one, so a pair without a row or without a watermark
/// makes it NULL. Returns G and whether the stored settings are ours.
const CLOCK: &str = "
WITH g AS (
    SELECT CASE WHEN count(watermark) = $3 THEN min(watermark) END AS g
    FROM recon_partition_pairs
    WHERE payments_topic = $1 AND settlements_topic = $2
      AND kafka_partition >= 0 AND kafka_partition < $3)
INSERT INTO recon_payout_clock AS c (id, global_watermark, grace, orphan_timeout, evaluated_at)
SELECT true, g.g, $4::bigint * interval '1 microsecond', $5::bigint * interval '1 microsecond', now()
FROM g
ON CONFLICT (id) DO UPDATE
SET global_watermark = GREATEST(c.global_watermark, EXCLUDED.global_watermark),
    evaluated_at = EXCLUDED.evaluated_at
RETURNING global_watermark,
          grace IS NOT DISTINCT FROM $4::bigint * interval '1 microsecond'
          AND orphan_timeout IS NOT DISTINCT FROM $5::bigint * interval '1 microsecond'
          AS settings_current";

/// Payouts awaiting a deadline that G has passed. The condition repeats the predicate
/// of `recon_payout_state_awaiting_deadline` literally, so the planner reads that
/// partial index (a bound list would not prove it, see `sweeps`).
const DEADLINES: &str = "
SELECT payout_id FROM recon_payout_state
WHERE NOT due AND status IN ('pending', 'unannounced') AND deadline_at < $1
ORDER BY deadline_at
LIMIT $2";

/// Parts and announcements past each pair's cursor, and the cursor moved past those
/// taken, in one statement (one snapshot). In that snapshot each pair's rows are a
/// prefix of its seq order: a pair's checkpoints are serialised by its row lock in
/// `advance_pairs` and commit in seq order, so nothing below a cursor can appear later.
/// A missing cursor is -1: the migration backfilled parts with seq 0.
///
/// Renamed payments or settlements topics make new pair rows, whose `payout_seq`
/// counts from 0 again, while parts and announcements (which carry no topic) keep the
/// old rows' higher seqs. A cursor recorded for other topics, or ahead of its pair's
/// `payout_seq`, is therefore not that pair's: the pair starts over from -1
/// (recomputing is idempotent), and rows above the pair's `payout_seq` (the old rows'
/// seqs) are not read, since they were read under the old topics.
///
/// The cap: rows are taken in whole checkpoints (a pair's seq), all pairs' merged in
/// seq order, until `$4` rows are taken; the first checkpoint is always taken, so the
/// cursor moves whatever the cap. Taken checkpoints are a prefix of each pair's.
const CURSOR: &str = "
WITH bounds AS (
    SELECT p AS kafka_partition,
           CASE WHEN c.payments_topic = $1 AND c.settlements_topic = $2
                     AND c.seq <= COALESCE(pp.payout_seq, c.seq)
                THEN c.seq ELSE -1 END AS after,
           COALESCE(pp.payout_seq, 9223372036854775807) AS upto
    FROM generate_series(0, $3 - 1) AS p
    LEFT JOIN recon_payout_cursor c ON c.kafka_partition = p
    LEFT JOIN recon_partition_pairs pp
           ON pp.payments_topic = $1 AND pp.settlements_topic = $2 AND pp.kafka_partition = p),
fresh AS (
    SELECT b.kafka_partition, r.seq, r.payout_id
    FROM bounds b
    CROSS JOIN LATERAL (
        SELECT seq, payout_id FROM recon_payout_parts
        WHERE kafka_partition = b.kafka_partition AND seq > b.after AND seq <= b.upto
        UNION ALL
        SELECT seq, payout_id FROM recon_payout_announcements
        WHERE kafka_partition = b.kafka_partition AND seq > b.after AND seq <= b.upto) r),
checkpoints AS (
    SELECT kafka_partition, seq,
           (sum(count(*)) OVER (ORDER BY seq, kafka_partition) - count(*))::bigint AS before
    FROM fresh GROUP BY kafka_partition, seq),
taken AS (
    SELECT kafka_partition, seq FROM checkpoints WHERE before < GREATEST($4, 1)),
moved AS (
    INSERT INTO recon_payout_cursor AS c (kafka_partition, payments_topic, settlements_topic, seq)
    SELECT kafka_partition, $1, $2, max(seq) FROM taken GROUP BY kafka_partition
    ON CONFLICT (kafka_partition) DO UPDATE
    SET payments_topic = EXCLUDED.payments_topic, settlements_topic = EXCLUDED.settlements_topic,
        seq = EXCLUDED.seq)
SELECT ARRAY(SELECT DISTINCT f.payout_id FROM fresh f JOIN taken t USING (kafka_partition, seq))
           AS payouts,
       EXISTS (SELECT FROM checkpoints WHERE before >= GREATEST($4, 1)) AS more";

/// Unbalanced payouts whose deadline was computed with other settings than ours,
/// oldest first. The deadline says which settings it was computed with, so this needs
/// no progress marker: once none is left (the run took them all), the clock records
/// our settings.
const STALE: &str = "
SELECT payout_id FROM recon_payout_state
WHERE status <> 'balanced'
  AND deadline_at IS DISTINCT FROM
      CASE WHEN announcement_event_id IS NULL
           THEN last_settled_at + $2::bigint * interval '1 microsecond'
           ELSE paid_at + $1::bigint * interval '1 microsecond' END
ORDER BY since, payout_id
LIMIT $3";

/// The state of the payouts `$1`, recomputed from their first announcement (lowest
/// id: partition order, one key one partition) and their parts summed per currency,
/// with G `$2`, grace `$3` and O `$4` (microseconds). Contract §7 and design 5.3:
///
/// - announced: `lines_net_minor` sums the lines in its currency only,
///   `other_currency_lines` counts the rest, `line_count` counts all;
///   balanced = no other-currency line, the sum equals `net_minor`, and the count
///   equals `line_count` when one was given. Otherwise pending until due, then
///   `currency_mismatch` if any line is in another currency (it wins over the total,
///   as rule 1 of §2 does), else `total_mismatch`. Due: G > `paid_at` + grace.
/// - unannounced: currency and sum of its lines when they share one currency, else
///   NULL; due: G > the last line's `settled_at` + O.
///
/// Rows that would not change are not rewritten, and `updated_at` moves only when the
/// status, the sum or the count does. The status counts move by the old→new deltas of
/// the rows written (the `old` CTE reads the table as it was before the statement).
const RECOMPUTE: &str = "
WITH s AS (SELECT DISTINCT unnest($1::text[]) AS payout_id),
a AS (
    SELECT DISTINCT ON (payout_id) payout_id, event_id, currency, net_minor, line_count,
           paid_at, count(*) OVER (PARTITION BY payout_id) AS announcements
    FROM recon_payout_announcements WHERE payout_id = ANY($1)
    ORDER BY payout_id, id),
c AS (
    SELECT payout_id, currency, sum(line_count) AS lines, sum(net_minor) AS net,
           min(first_settled_at) AS first_at, max(last_settled_at) AS last_at
    FROM recon_payout_parts WHERE payout_id = ANY($1)
    GROUP BY payout_id, currency),
l AS (
    SELECT c.payout_id, sum(c.lines) AS lines, count(*) AS currencies,
           min(c.currency) AS some_currency, sum(c.net) AS net,
           COALESCE(sum(c.net) FILTER (WHERE c.currency = a.currency), 0) AS announced_net,
           COALESCE(sum(c.lines) FILTER (WHERE c.currency <> a.currency), 0) AS other_lines,
           min(c.first_at) AS first_at, max(c.last_at) AS last_at
    FROM c LEFT JOIN a USING (payout_id)
    GROUP BY c.payout_id),
computed AS (
    SELECT s.payout_id, a.event_id, COALESCE(a.announcements, 0)::int AS announcements,
           CASE WHEN a.event_id IS NOT NULL THEN a.currency
                WHEN l.currencies = 1 THEN l.some_currency END AS currency,
           a.net_minor AS expected_net_minor, a.line_count AS expected_line_count, a.paid_at,
           CASE WHEN a.event_id IS NOT NULL THEN COALESCE(l.announced_net, 0)
                WHEN l.currencies = 1 THEN l.net END AS lines_net_minor,
           COALESCE(l.lines, 0)::bigint AS line_count,
           COALESCE(l.other_lines, 0)::bigint AS other_currency_lines,
           l.first_at, l.last_at,
           COALESCE(a.paid_at, l.first_at) AS since,
           CASE WHEN a.event_id IS NOT NULL THEN a.paid_at + $3::bigint * interval '1 microsecond'
                ELSE l.last_at + $4::bigint * interval '1 microsecond' END AS deadline_at
    FROM s LEFT JOIN a USING (payout_id) LEFT JOIN l USING (payout_id)
    WHERE a.event_id IS NOT NULL OR l.payout_id IS NOT NULL),
judged AS (
    SELECT computed.*, COALESCE($2::timestamptz > deadline_at, false) AS due,
           CASE WHEN event_id IS NULL THEN 'unannounced'
                WHEN other_currency_lines = 0 AND lines_net_minor = expected_net_minor
                     AND (expected_line_count IS NULL OR line_count = expected_line_count)
                     THEN 'balanced'
                WHEN NOT COALESCE($2::timestamptz > deadline_at, false) THEN 'pending'
                WHEN other_currency_lines > 0 THEN 'currency_mismatch'
                ELSE 'total_mismatch' END AS status
    FROM computed),
old AS (SELECT payout_id, status FROM recon_payout_state WHERE payout_id = ANY($1)),
written AS (
    INSERT INTO recon_payout_state AS t
           (payout_id, announcement_event_id, announcements, currency, expected_net_minor,
            expected_line_count, paid_at, lines_net_minor, line_count, other_currency_lines,
            first_settled_at, last_settled_at, since, deadline_at, due, updated_at, status)
    SELECT payout_id, event_id, announcements, currency, expected_net_minor,
           expected_line_count, paid_at, lines_net_minor, line_count, other_currency_lines,
           first_at, last_at, since, deadline_at, due, now(), status
    FROM judged
    ON CONFLICT (payout_id) DO UPDATE
    SET announcement_event_id = EXCLUDED.announcement_event_id,
        announcements = EXCLUDED.announcements,
        currency = EXCLUDED.currency,
        expected_net_minor = EXCLUDED.expected_net_minor,
        expected_line_count = EXCLUDED.expected_line_count,
        paid_at = EXCLUDED.paid_at,
        lines_net_minor = EXCLUDED.lines_net_minor,
        line_count = EXCLUDED.line_count,
        other_currency_lines = EXCLUDED.other_currency_lines,
        first_settled_at = EXCLUDED.first_settled_at,
        last_settled_at = EXCLUDED.last_settled_at,
        since = EXCLUDED.since,
        deadline_at = EXCLUDED.deadline_at,
        due = EXCLUDED.due,
        updated_at = CASE WHEN (t.status, t.lines_net_minor, t.line_count)
                               IS DISTINCT FROM
                               (EXCLUDED.status, EXCLUDED.lines_net_minor, EXCLUDED.line_count)
                          THEN EXCLUDED.updated_at ELSE t.updated_at END,
        status = EXCLUDED.status
    WHERE (t.announcement_event_id, t.announcements, t.currency, t.expected_net_minor,
           t.expected_line_count, t.paid_at, t.lines_net_minor, t.line_count,
           t.other_currency_lines, t.first_settled_at, t.last_settled_at, t.since,
           t.deadline_at, t.due, t.status)
          IS DISTINCT FROM
          (EXCLUDED.announcement_event_id, EXCLUDED.announcements, EXCLUDED.currency,
           EXCLUDED.expected_net_minor, EXCLUDED.expected_line_count, EXCLUDED.paid_at,
           EXCLUDED.lines_net_minor, EXCLUDED.line_count, EXCLUDED.other_currency_lines,
           EXCLUDED.first_settled_at, EXCLUDED.last_settled_at, EXCLUDED.since,
           EXCLUDED.deadline_at, EXCLUDED.due, EXCLUDED.status)
    RETURNING payout_id, status),
deltas AS (
    SELECT status, sum(d) AS d
    FROM (SELECT status, 1 AS d FROM written
          UNION ALL
          SELECT old.status, -1 FROM written JOIN old USING (payout_id)) x
    GROUP BY status
    HAVING sum(d) <> 0),
counted AS (
    INSERT INTO recon_payout_status_counts AS k (status, payouts)
    SELECT status, d FROM deltas
    ON CONFLICT (status) DO UPDATE SET payouts = k.payouts + EXCLUDED.payouts)
SELECT count(*) FROM written";

/// Resolution of an open `payout_mismatch` whose payout balanced.
pub const BALANCED: &str = "balanced";
/// Resolution of an open `unannounced_payout` whose payout was announced.
pub const ANNOUNCED: &str = "announced";
/// The resolution a person gives by hand (contract §8): never reopened automatically.
pub const ACCEPTED: &str = "accepted";

/// Step 5, before any opening: a mismatch that balanced, an unannounced payout that
/// was announced. A pending (not yet due again, after a longer grace) payout's
/// mismatch stays open: it was overdue, and only balancing settles it. Open ones only,
/// so one a person accepted stays as they left it. Each resolution is logged
/// (contract §8) by the same statement, which returns how many it resolved.
fn resolve_statement() -> String {
    let mismatch = DiscrepancyKind::PayoutMismatch;
    let unannounced = DiscrepancyKind::UnannouncedPayout;
    let balanced = PayoutStatus::Balanced;
    format!(
        "WITH resolved AS (
             UPDATE recon_discrepancies d
             SET resolved_at = now(),
                 resolution = CASE d.kind WHEN '{mismatch}' THEN '{BALANCED}' ELSE '{ANNOUNCED}' END
             FROM recon_payout_state s
             WHERE s.payout_id = ANY($1) AND d.payout_id = s.payout_id
               AND d.payout_id IS NOT NULL AND d.resolved_at IS NULL
               AND ((d.kind = '{mismatch}' AND s.status = '{balanced}')
                    OR (d.kind = '{unannounced}' AND s.announcement_event_id IS NOT NULL))
             RETURNING d.id, d.resolution),
         logged AS (
             INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
             SELECT id, 'resolved', '{WORKER_ACTOR}', resolution FROM resolved ORDER BY id)
         SELECT count(*) FROM resolved"
    )
}

/// Step 6: one row per payout and kind, opened, or reopened when it was resolved by
/// the evaluator (never after a person's `accepted`). `xmax = 0` tells an inserted
/// row from an updated one; each is logged as `opened` or `reopened` (contract §8) by
/// the same statement.
///
/// Opening never meets the other kind open for the same payout (which
/// `recon_discrepancies_one_open_per_payout` would refuse, failing the run): a
/// `payout_mismatch` is wanted only for an announced payout, whose open
/// `unannounced_payout` step 5 has just resolved; an `unannounced_payout` only for an
/// unannounced one, which never had a `payout_mismatch` (announcements are never
/// removed).
fn open_statement() -> String {
    let mismatch = DiscrepancyKind::PayoutMismatch;
    let unannounced = DiscrepancyKind::UnannouncedPayout;
    format!(
        "WITH changed AS (
             INSERT INTO recon_discrepancies AS d (kind, payout_id)
             SELECT CASE WHEN s.status = 'unannounced' THEN '{unannounced}' ELSE '{mismatch}' END,
                    s.payout_id
             FROM recon_payout_state s
             WHERE s.payout_id = ANY($1) AND s.due
               AND s.status IN ('total_mismatch', 'currency_mismatch', 'unannounced')
             ON CONFLICT (payout_id, kind) WHERE payout_id IS NOT NULL DO UPDATE
             SET resolved_at = NULL, resolution = NULL
             WHERE d.resolved_at IS NOT NULL AND d.resolution IS DISTINCT FROM '{ACCEPTED}'
             RETURNING d.id, xmax = 0 AS inserted),
         logged AS (
             INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor)
             SELECT id, CASE WHEN inserted THEN 'opened' ELSE 'reopened' END, '{WORKER_ACTOR}'
             FROM changed ORDER BY id)
         SELECT inserted FROM changed"
    )
}

/// The gauges' reads, in one round trip. The oldest overdue unbalanced payout is the
/// first row of `recon_payout_state_unbalanced` (literal `status <> 'balanced'`) that is
/// due: a due row is never pending (pending means not due) nor balanced, so `due`
/// selects exactly `total_mismatch`, `currency_mismatch` and overdue `unannounced`.
/// Open payout discrepancies are the rows of `recon_discrepancies_one_open_per_payout`.
const GAUGES: &str = "
SELECT (SELECT global_watermark FROM recon_payout_clock) AS global_watermark,
       (SELECT since FROM recon_payout_state WHERE status <> 'balanced' AND due
        ORDER BY since, payout_id LIMIT 1) AS oldest,
       ARRAY(SELECT status FROM recon_payout_status_counts ORDER BY status) AS statuses,
       ARRAY(SELECT payouts FROM recon_payout_status_counts ORDER BY status) AS counts,
       ARRAY(SELECT kind FROM recon_discrepancies
             WHERE payout_id IS NOT NULL AND resolved_at IS NULL
             GROUP BY kind ORDER BY kind) AS kinds,
       ARRAY(SELECT count(*) FROM recon_discrepancies
             WHERE payout_id IS NOT NULL AND resolved_at IS NULL
             GROUP BY kind ORDER BY kind) AS open";

type GaugesRow = (
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Vec<String>,
    Vec<i64>,
    Vec<String>,
    Vec<i64>,
);

impl Store {
    /// One evaluation (see the module doc). `Ok(None)`: another worker is evaluating
    /// now; nothing was read or written. Any error leaves everything as it was (one
    /// transaction), so the caller just tries again later.
    pub async fn evaluate_payouts(
        &self,
        rules: &PayoutRules,
    ) -> Result<Option<Evaluation>, StoreError> {
        let mut connection = self.connection().await?;
        let mut tx =
            sqlx::Connection::begin_with(&mut *connection, "BEGIN ISOLATION LEVEL READ COMMITTED")
                .await?;
        // NULL (no current schema) reads as taken: such a session finds no tables.
        let acquired: Option<bool> =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(EVALUATOR_LOCK)
                .fetch_one(&mut *tx)
                .await?;
        if acquired != Some(true) {
            tx.commit().await?;
            return Ok(None);
        }
        let (grace, orphan) = (micros(rules.grace), micros(rules.orphan_timeout));
        let cap = i64::try_from(rules.max_touched).unwrap_or(i64::MAX);

        let (global_watermark, settings_current): (Option<DateTime<Utc>>, bool) =
            sqlx::query_as(CLOCK)
                .bind(&self.payments_topic)
                .bind(&self.settlements_topic)
                .bind(rules.partitions)
                .bind(grace)
                .bind(orphan)
                .fetch_one(&mut *tx)
                .await?;

        let mut touched: Vec<String> = Vec::new();
        let mut more = false;
        // Each capped read asks for one more row than it takes: that one says whether
        // anything is left.
        let take = |mut rows: Vec<String>, more: &mut bool| {
            if rows.len() > rules.max_touched {
                rows.truncate(rules.max_touched);
                *more = true;
            }
            rows
        };
        if let Some(g) = global_watermark {
            let due: Vec<String> = sqlx::query_scalar(DEADLINES)
                .bind(g)
                .bind(cap.saturating_add(1))
                .fetch_all(&mut *tx)
                .await?;
            touched.extend(take(due, &mut more));
        }

        let (fresh, cursor_more): (Vec<String>, bool) = sqlx::query_as(CURSOR)
            .bind(&self.payments_topic)
            .bind(&self.settlements_topic)
            .bind(rules.partitions)
            .bind(cap)
            .fetch_one(&mut *tx)
            .await?;
        more |= cursor_more;
        touched.extend(fresh);

        let mut settings_done = settings_current;
        if !settings_current {
            let stale: Vec<String> = sqlx::query_scalar(STALE)
                .bind(grace)
                .bind(orphan)
                .bind(cap.saturating_add(1))
                .fetch_all(&mut *tx)
                .await?;
            let mut left = false;
            touched.extend(take(stale, &mut left));
            settings_done = !left;
            more |= left;
        }

        touched.sort_unstable();
        touched.dedup();
        let mut evaluation = Evaluation {
            global_watermark,
            touched: touched.len(),
            changed: 0,
            opened: 0,
            reopened: 0,
            resolved: 0,
            more,
        };
        if !touched.is_empty() {
            let changed: i64 = sqlx::query_scalar(RECOMPUTE)
                .bind(&touched)
                .bind(global_watermark)
                .bind(grace)
                .bind(orphan)
                .fetch_one(&mut *tx)
                .await?;
            evaluation.changed = usize::try_from(changed).unwrap_or(0);
            let resolved: i64 = sqlx::query_scalar(&resolve_statement())
                .bind(&touched)
                .fetch_one(&mut *tx)
                .await?;
            evaluation.resolved = usize::try_from(resolved).unwrap_or(0);
            let opened: Vec<bool> = sqlx::query_scalar(&open_statement())
                .bind(&touched)
                .fetch_all(&mut *tx)
                .await?;
            evaluation.opened = opened.iter().filter(|inserted| **inserted).count();
            evaluation.reopened = opened.len() - evaluation.opened;
        }
        if !settings_current && settings_done {
            sqlx::query(
                "UPDATE recon_payout_clock
                 SET grace = $1::bigint * interval '1 microsecond',
                     orphan_timeout = $2::bigint * interval '1 microsecond'",
            )
            .bind(grace)
            .bind(orphan)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(evaluation))
    }

    /// The payout gauges' values (global: the same whichever worker reads them).
    pub async fn payout_gauges(&self) -> Result<PayoutGauges, StoreError> {
        let (global_watermark, oldest, statuses, counts, kinds, open): GaugesRow =
            sqlx::query_as(GAUGES).fetch_one(&self.pool).await?;
        Ok(PayoutGauges {
            global_watermark,
            oldest_unbalanced_since: oldest,
            statuses: statuses.into_iter().zip(counts).collect(),
            open_discrepancies: kinds.into_iter().zip(open).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_kinds_and_statuses_of_the_vocabulary() {
        let resolve = resolve_statement();
        let open = open_statement();
        for kind in DiscrepancyKind::PAYOUT {
            assert!(resolve.contains(&format!("'{kind}'")), "{resolve}");
            assert!(open.contains(&format!("'{kind}'")), "{open}");
        }
        for status in PayoutStatus::ALL {
            assert!(
                RECOMPUTE.contains(&format!("'{status}'")),
                "{status} is a status the recompute can give"
            );
        }
    }

    #[test]
    fn durations_travel_as_microseconds() {
        assert_eq!(micros(Duration::from_secs(3600)), 3_600_000_000);
        assert_eq!(micros(Duration::MAX), i64::MAX);
    }
}
