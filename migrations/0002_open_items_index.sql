-- Open items (still waiting for a counterpart) per partition pair, for the
-- recon_open_items / recon_oldest_open_item_age_seconds gauges and for operators.
CREATE INDEX recon_events_open_items ON recon_events (kafka_partition, event_kind, outcome, event_time)
    WHERE outcome IN ('pending', 'missing_settlement', 'orphan_settlement');
