-- When a late counterpart resolves a discrepancy that a person already accepted
-- (contract §8), the checkpoint finds the accepted row by its kind and subject to log
-- that the counterpart arrived (`write_discrepancies`, the `kept` part). No index
-- served that lookup: `recon_discrepancies_one_per_subject` is on COALESCE(...)
-- expressions and the open-only indexes exclude resolved rows. So every checkpoint
-- that resolved a discrepancy read the whole table once per resolved subject, and a
-- drain slowed down as discrepancies accumulated (from 8k to 250-400 messages a
-- second after 1.5M messages). These indexes hold accepted rows only, which people
-- make one at a time: the worker's own inserts and resolutions never touch them.
CREATE INDEX recon_discrepancies_accepted_by_payment_event
    ON recon_discrepancies (kind, payment_event_id)
    WHERE resolution = 'accepted';
CREATE INDEX recon_discrepancies_accepted_by_settlement_event
    ON recon_discrepancies (kind, settlement_event_id)
    WHERE resolution = 'accepted';
