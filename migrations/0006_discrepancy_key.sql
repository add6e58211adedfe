-- One row per discrepancy, enforced. A checkpoint whose COMMIT lost its connection
-- is retried without knowing whether it committed; a batch of only deadline firings
-- (outcome updates and opened discrepancies, no event insert to clash) then inserted
-- its discrepancies twice. A discrepancy is identified by its kind and the events it
-- concerns (event ids are unique for all time, and a pair of events opens a kind at
-- most once), so the worker's insert can skip one already there.
-- Copies left by such retries before this migration go first (the oldest stays; a
-- resolution reached every open copy alike).
DELETE FROM recon_discrepancies d
USING recon_discrepancies e
WHERE d.kind = e.kind
  AND d.payment_event_id IS NOT DISTINCT FROM e.payment_event_id
  AND d.settlement_event_id IS NOT DISTINCT FROM e.settlement_event_id
  AND d.id > e.id;

CREATE UNIQUE INDEX recon_discrepancies_one_per_subject
    ON recon_discrepancies (kind, COALESCE(payment_event_id, ''), COALESCE(settlement_event_id, ''));
