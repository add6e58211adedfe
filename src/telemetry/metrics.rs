//! Metric names (contract §5), in one place so code, dashboard and alerts agree.
//! Labels are low-cardinality only: topic, partition, outcome, reason.

use crate::engine::{DiscrepancyKind, Outcome, PayoutStatus};
use crate::event::{EventKind, Input};

pub const EVENTS_CONSUMED: &str = "recon_events_consumed_total";
pub const EVENTS_REJECTED: &str = "recon_events_rejected_total";
pub const EVENTS_REDELIVERED: &str = "recon_events_redelivered_total";
pub const OUTCOMES: &str = "recon_outcomes_total";
pub const WINDOW_ITEMS: &str = "recon_window_items";
pub const WINDOW_BYTES: &str = "recon_window_bytes";
pub const CHECKPOINT_DURATION: &str = "recon_checkpoint_duration_seconds";
pub const CHECKPOINT_BATCH_SIZE: &str = "recon_checkpoint_batch_messages";
pub const CHECKPOINT_FAILURES: &str = "recon_checkpoint_failures_total";
pub const FENCED_CHECKPOINTS: &str = "recon_fenced_checkpoints_total";
/// Partition pairs re-read from their stored offsets after an event id clash.
pub const PAIR_REPLAYS: &str = "recon_pair_replays_total";
/// Partitions read from below the position the consumer stood at (topic recreated,
/// log truncated, offsets reset), or whose unread messages retention deleted.
pub const OFFSET_RESETS: &str = "recon_offset_resets_total";
pub const CONSUMER_LAG: &str = "recon_consumer_lag_messages";
pub const PROCESSING_LATENCY: &str = "recon_processing_latency_seconds";
pub const REBALANCES: &str = "recon_rebalances_total";
pub const TOPIC_PAUSES: &str = "recon_topic_pauses_total";
pub const ASSIGNED_PARTITIONS: &str = "recon_assigned_partitions";
pub const RETRIES: &str = "recon_retries_total";
pub const KAFKA_ERRORS: &str = "recon_kafka_errors_total";
pub const WATERMARK: &str = "recon_watermark_timestamp_seconds";
pub const OPEN_ITEMS: &str = "recon_open_items";
pub const OLDEST_OPEN_ITEM_AGE: &str = "recon_oldest_open_item_age_seconds";
/// Unresolved rows of `recon_discrepancies` of the owned pairs, by kind (contract §6:
/// `over_refunded` is money paid out twice). The pairs' kinds only
/// ([`DiscrepancyKind::of_pairs`]): payout discrepancies belong to no pair.
pub const OPEN_DISCREPANCIES: &str = "recon_open_discrepancies";
/// Re-drive requests of rejected messages this worker settled (contract §8), by
/// result: `accepted`, `redelivery`, `rejected` (still invalid), `truncated`.
pub const REDRIVES: &str = "recon_redrives_total";
/// The `result` labels of [`REDRIVES`].
pub const REDRIVE_RESULTS: [&str; 4] = ["accepted", "redelivery", "rejected", "truncated"];

// Payouts (contract §7). Unlike the gauges above, which each worker reports for the
// pairs it owns (so dashboards sum them), these are global: every worker running the
// payout evaluator reports the same values, read from the whole database after each
// evaluation, whether it or another worker ran it. Dashboards and alerts take max(),
// never sum(). Absent the evaluator (payouts off) they stay at their initial zeros.
/// Payouts per status (`recon_payout_status_counts`, kept exact by the evaluator).
pub const PAYOUTS: &str = "recon_payouts";
/// Now minus `since` of the oldest payout that is overdue and unbalanced
/// (`total_mismatch`, `currency_mismatch`, or `unannounced` past its deadline); 0 when
/// none is.
pub const OLDEST_UNBALANCED_PAYOUT_AGE: &str = "recon_oldest_unbalanced_payout_age_seconds";
/// Unresolved payout discrepancies, by kind ([`DiscrepancyKind::PAYOUT`]).
pub const OPEN_PAYOUT_DISCREPANCIES: &str = "recon_open_payout_discrepancies";
/// The global watermark (the smallest pair watermark, contract §7) the evaluator last
/// used, in Unix seconds; 0 until every pair has committed a watermark.
pub const GLOBAL_WATERMARK: &str = "recon_global_watermark_timestamp_seconds";
/// This worker's payout evaluation attempts, by result: `acquired` (it evaluated),
/// `skipped` (another worker held the evaluator's lock), `failed`.
pub const PAYOUT_EVALUATIONS: &str = "recon_payout_evaluations_total";
/// The `result` labels of [`PAYOUT_EVALUATIONS`].
pub const PAYOUT_EVALUATION_RESULTS: [&str; 3] = ["acquired", "skipped", "failed"];

/// The (event_kind, outcome) label pairs of open items: each open outcome
/// ([`Outcome::OPEN`], the one definition) with each kind of event that can carry it,
/// in that order. Computed at compile time so the gauges cannot drift from it.
pub const OPEN_KINDS: [(&str, &str); open_kind_count()] = open_kinds();

/// How many (event kind, open outcome) combinations can occur.
const fn open_kind_count() -> usize {
    let mut count = 0;
    let mut o = 0;
    while o < Outcome::OPEN.len() {
        let mut i = 0;
        while i < EventKind::ALL.len() {
            if Outcome::OPEN[o].is_carried_by(EventKind::ALL[i]) {
                count += 1;
            }
            i += 1;
        }
        o += 1;
    }
    count
}

const fn open_kinds() -> [(&'static str, &'static str); open_kind_count()] {
    let mut kinds = [("", ""); open_kind_count()];
    let mut next = 0;
    let mut o = 0;
    while o < Outcome::OPEN.len() {
        let outcome = Outcome::OPEN[o];
        let mut i = 0;
        while i < EventKind::ALL.len() {
            if outcome.is_carried_by(EventKind::ALL[i]) {
                kinds[next] = (EventKind::ALL[i].as_str(), outcome.as_str());
                next += 1;
            }
            i += 1;
        }
        o += 1;
    }
    kinds
}

/// Creates every low-cardinality series at zero, so alerts on `increase()` see the
/// first failure and dashboards show a line from the start.
pub fn init_series() {
    for counter in [REBALANCES, FENCED_CHECKPOINTS, PAIR_REPLAYS, KAFKA_ERRORS] {
        metrics::counter!(counter).absolute(0);
    }
    for kind in ["transient", "permanent"] {
        metrics::counter!(CHECKPOINT_FAILURES, "kind" => kind).absolute(0);
    }
    for result in REDRIVE_RESULTS {
        metrics::counter!(REDRIVES, "result" => result).absolute(0);
    }
    for topic in Input::ALL.map(Input::label) {
        metrics::counter!(EVENTS_CONSUMED, "topic" => topic).absolute(0);
        metrics::counter!(EVENTS_REDELIVERED, "topic" => topic).absolute(0);
        metrics::counter!(TOPIC_PAUSES, "topic" => topic).absolute(0);
        for reason in crate::event::Rejection::CLASSES {
            metrics::counter!(EVENTS_REJECTED, "topic" => topic, "reason" => reason).absolute(0);
        }
        // Values the decoder accepts but PostgreSQL refuses (SQLSTATE class 22).
        metrics::counter!(EVENTS_REJECTED, "topic" => topic, "reason" => crate::rejection::DATA_ERROR_CLASS)
            .absolute(0);
    }
    for outcome in Outcome::ALL {
        metrics::counter!(OUTCOMES, "outcome" => outcome.as_str()).absolute(0);
    }
    for (event_kind, outcome) in OPEN_KINDS {
        metrics::gauge!(OPEN_ITEMS, "event_kind" => event_kind, "outcome" => outcome).set(0.0);
        metrics::gauge!(OLDEST_OPEN_ITEM_AGE, "event_kind" => event_kind, "outcome" => outcome)
            .set(0.0);
    }
    for kind in DiscrepancyKind::of_pairs() {
        metrics::gauge!(OPEN_DISCREPANCIES, "kind" => kind.as_str()).set(0.0);
    }
    for status in PayoutStatus::ALL {
        metrics::gauge!(PAYOUTS, "status" => status.as_str()).set(0.0);
    }
    for kind in DiscrepancyKind::PAYOUT {
        metrics::gauge!(OPEN_PAYOUT_DISCREPANCIES, "kind" => kind.as_str()).set(0.0);
    }
    for result in PAYOUT_EVALUATION_RESULTS {
        metrics::counter!(PAYOUT_EVALUATIONS, "result" => result).absolute(0);
    }
    metrics::gauge!(OLDEST_UNBALANCED_PAYOUT_AGE).set(0.0);
    // 0 reads "not known": ReconGlobalWatermarkStalled fires on it only where payouts
    // are evaluated (deploy/prometheus/alerts.yml).
    metrics::gauge!(GLOBAL_WATERMARK).set(0.0);
    metrics::gauge!(ASSIGNED_PARTITIONS).set(0.0);
    metrics::gauge!(WINDOW_ITEMS).set(0.0);
    metrics::gauge!(WINDOW_BYTES).set(0.0);
}

/// Registers descriptions (HELP lines) for every metric.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_CONSUMED, "Messages read from Kafka, by topic.");
    describe_counter!(
        REDRIVES,
        "Re-drive requests of rejected messages settled, by result (accepted, redelivery, rejected, truncated)."
    );
    describe_counter!(
        EVENTS_REJECTED,
        "Messages rejected as bad input, by topic and reason."
    );
    describe_counter!(
        EVENTS_REDELIVERED,
        "Messages whose event_id was already accepted, by topic."
    );
    describe_counter!(
        OUTCOMES,
        "Outcomes assigned (including changes of outcome), by outcome."
    );
    describe_gauge!(
        WINDOW_ITEMS,
        "Payment ids held in the in-memory matching window."
    );
    describe_gauge!(
        WINDOW_BYTES,
        Unit::Bytes,
        "Approximate bytes held by the in-memory matching window."
    );
    describe_histogram!(
        CHECKPOINT_DURATION,
        Unit::Seconds,
        "Duration of checkpoint transactions."
    );
    describe_histogram!(
        CHECKPOINT_BATCH_SIZE,
        "Kafka messages per checkpoint transaction."
    );
    describe_counter!(
        CHECKPOINT_FAILURES,
        "Checkpoint transactions that failed, by kind."
    );
    describe_counter!(
        FENCED_CHECKPOINTS,
        "Checkpoints refused because another worker owns the partition pair."
    );
    describe_counter!(
        PAIR_REPLAYS,
        "Partition pairs re-read from their stored offsets because they inserted an event id \
         already stored under another payment id (a redelivery; results unaffected)."
    );
    describe_counter!(
        OFFSET_RESETS,
        "Partitions read from below the consumer's position (topic recreated, log truncated, \
         offsets reset; the messages are processed, event ids tell redeliveries apart) or whose \
         unread messages retention deleted, by topic and partition."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "High watermark minus the offset stored in PostgreSQL, by topic and partition."
    );
    describe_histogram!(
        PROCESSING_LATENCY,
        Unit::Seconds,
        "Kafka message timestamp to PostgreSQL commit."
    );
    describe_counter!(REBALANCES, "Consumer group rebalance callbacks.");
    describe_counter!(
        TOPIC_PAUSES,
        "Partitions paused for running ahead of their co-partition in a backlog, by topic."
    );
    describe_gauge!(ASSIGNED_PARTITIONS, "Partition pairs owned by this worker.");
    describe_counter!(RETRIES, "Retries after transient errors, by operation.");
    describe_counter!(KAFKA_ERRORS, "Errors reported by the Kafka client.");
    describe_gauge!(
        OPEN_ITEMS,
        "Events of owned partition pairs still waiting for a counterpart, by event_kind and outcome."
    );
    describe_gauge!(
        OLDEST_OPEN_ITEM_AGE,
        Unit::Seconds,
        "Now minus the event time of the oldest open item, by event_kind and outcome."
    );
    describe_gauge!(
        OPEN_DISCREPANCIES,
        "Unresolved discrepancies (recon_discrepancies rows without resolved_at) of owned \
         partition pairs, by kind; over_refunded is a payment paid back twice."
    );
    describe_gauge!(
        WATERMARK,
        Unit::Seconds,
        "Event-time watermark of each partition pair (Unix seconds)."
    );
    describe_gauge!(
        PAYOUTS,
        "Payouts by status (recon_payouts). Global: every evaluating worker reports the \
         same value; aggregate with max()."
    );
    describe_gauge!(
        OLDEST_UNBALANCED_PAYOUT_AGE,
        Unit::Seconds,
        "Now minus paid_at (or the first line's settled_at if unannounced) of the oldest \
         payout past its deadline and not balanced; 0 when none. Global: aggregate with max()."
    );
    describe_gauge!(
        OPEN_PAYOUT_DISCREPANCIES,
        "Unresolved payout discrepancies (payout_mismatch, unannounced_payout), by kind. \
         Global: aggregate with max()."
    );
    describe_gauge!(
        GLOBAL_WATERMARK,
        Unit::Seconds,
        "Global watermark: the smallest committed partition-pair watermark, which payout \
         deadlines wait for (Unix seconds; 0 until every pair has one). Global: aggregate \
         with max()."
    );
    describe_counter!(
        PAYOUT_EVALUATIONS,
        "Payout evaluation attempts of this worker, by result: acquired (it evaluated), \
         skipped (another worker was evaluating), failed."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_item_series_are_the_open_outcomes_of_each_kind() {
        assert_eq!(
            OPEN_KINDS,
            [
                ("payment", "pending"),
                ("refund", "pending"),
                ("settlement", "pending"),
                ("payment", "missing_settlement"),
                ("refund", "missing_settlement"),
                ("settlement", "orphan_settlement"),
            ]
        );
    }

    #[test]
    fn every_outcome_and_discrepancy_kind_has_a_series() {
        let outcomes: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        for new in ["duplicate_refund", "chargeback_open", "chargeback_reversed"] {
            assert!(outcomes.contains(&new), "{new}");
        }
        let kinds: Vec<&str> = DiscrepancyKind::all()
            .map(DiscrepancyKind::as_str)
            .collect();
        let mut unique = kinds.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), kinds.len(), "{kinds:?}");
        for kind in [
            "chargeback",
            "over_refunded",
            "missing_settlement",
            "orphan_settlement",
            "duplicate_refund",
        ] {
            assert!(kinds.contains(&kind), "{kind}");
        }
        for not_a_discrepancy in ["pending", "matched", "matched_late", "chargeback_open"] {
            assert!(!kinds.contains(&not_a_discrepancy), "{not_a_discrepancy}");
        }
        // The payout kinds are kinds, but not of a pair: the per-pair gauge leaves them
        // out and the payout gauge has exactly them.
        let of_pairs: Vec<&str> = DiscrepancyKind::of_pairs()
            .map(DiscrepancyKind::as_str)
            .collect();
        for payout in ["payout_mismatch", "unannounced_payout"] {
            assert!(kinds.contains(&payout), "{payout}");
            assert!(!of_pairs.contains(&payout), "{payout}");
        }
        assert_eq!(of_pairs.len() + DiscrepancyKind::PAYOUT.len(), kinds.len());
        assert!(DiscrepancyKind::PAYOUT.iter().all(|k| k.is_payout()));
        assert!(DiscrepancyKind::of_pairs().all(|k| !k.is_payout()));
    }

    #[test]
    fn payout_series_exist_at_zero_from_the_start() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, init_series);
        let text = recorder.handle().render();
        let has = |line: &str| text.lines().any(|l| l == line);
        for status in PayoutStatus::ALL {
            let line = format!("{PAYOUTS}{{status=\"{status}\"}} 0");
            assert!(has(&line), "{line} in\n{text}");
        }
        for kind in DiscrepancyKind::PAYOUT {
            let line = format!("{OPEN_PAYOUT_DISCREPANCIES}{{kind=\"{kind}\"}} 0");
            assert!(has(&line), "{line}");
            // Not a pair's kind: the per-pair gauge has no series for it.
            assert!(!text.contains(&format!("{OPEN_DISCREPANCIES}{{kind=\"{kind}\"}}")));
        }
        for result in PAYOUT_EVALUATION_RESULTS {
            let line = format!("{PAYOUT_EVALUATIONS}{{result=\"{result}\"}} 0");
            assert!(has(&line), "{line}");
        }
        assert!(has(&format!("{OLDEST_UNBALANCED_PAYOUT_AGE} 0")));
        assert!(has(&format!("{GLOBAL_WATERMARK} 0")));
    }

    #[test]
    fn every_payout_status_is_a_distinct_label() {
        let mut statuses: Vec<&str> = PayoutStatus::ALL.iter().map(|s| s.as_str()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!(statuses.len(), PayoutStatus::ALL.len());
    }
}
