-- Re-drive of rejected messages (contract §8): an operator asks for a rejected message
-- to be decoded again from its stored payload (`recon-worker rejects redrive`); the
-- worker that owns its partition pair does it in its next batch and, if the message is
-- now valid, processes it as a late event in the same transaction that sets
-- `redriven_at`. The row stays: still exactly one row per rejected message.
--
-- A request is pending while `redrive_requested_at IS NOT NULL AND redriven_at IS
-- NULL`. Its outcome:
--   accepted    processed as a late event (`redriven_at` set);
--   redelivery  its event id was accepted meanwhile, from another message: nothing
--               changes (contract §1), `redriven_at` set;
--   rejected    still invalid: `reason` and `reason_class` say why now, the request
--               is cleared (`redriven_at` stays NULL), it may be asked for again;
--   truncated   its payload was cut at 65,536 bytes: it cannot be decoded again (the
--               command refuses to ask; this covers a request made by hand).
ALTER TABLE rejected_events
    -- The message's Kafka timestamp, which the future-skew rule (contract §1) measures
    -- event times against: NULL when the message had none (no bound then, as on first
    -- reading). Unknown for messages rejected before this migration
    -- (`kafka_timestamp_known` false), for which a re-drive measures against
    -- `rejected_at` (a little later than the message was produced, so at most a
    -- little more lenient).
    ADD COLUMN kafka_timestamp      timestamptz,
    ADD COLUMN kafka_timestamp_known boolean NOT NULL DEFAULT false,
    ADD COLUMN redrive_requested_at timestamptz,
    ADD COLUMN redrive_requested_by text,
    ADD COLUMN redriven_at          timestamptz,
    ADD COLUMN redrive_attempted_at timestamptz,
    ADD COLUMN redrive_result       text COLLATE "C"
        CHECK (redrive_result IN ('accepted', 'redelivery', 'rejected', 'truncated')),
    ADD CONSTRAINT rejected_events_redriven_is_a_result
        CHECK (redriven_at IS NULL OR redrive_result IN ('accepted', 'redelivery'));

-- Rows from now on know their timestamp (or that the message had none): the worker's
-- insert leaves this column to its default.
ALTER TABLE rejected_events ALTER COLUMN kafka_timestamp_known SET DEFAULT true;

-- The workers' poll for requests (every few seconds, by partition pair): empty but for
-- pending requests, so it costs nothing when there are none, and nothing on the insert
-- path of a reject.
CREATE INDEX rejected_events_redrive_pending
    ON rejected_events (kafka_partition, id)
    WHERE redrive_requested_at IS NOT NULL AND redriven_at IS NULL;

-- `rejects list --reason-class C` and `rejects redrive --reason-class C`, in order.
CREATE INDEX rejected_events_by_class ON rejected_events (reason_class, id);
