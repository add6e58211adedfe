-- Deadline sweeps read recon_events_open_items (partition, kind, outcome, event_time),
-- which serves `outcome = 'pending' AND event_time < $t ORDER BY event_time` as well;
-- one index fewer to maintain on every insert and outcome change.
DROP INDEX IF EXISTS recon_events_pending_by_time;
