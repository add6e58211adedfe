-- Contract §6, version 2 of the input contract: refund requests on the payments
-- topic, settlement lines of every type, chargebacks and the payment's net position.
-- Only additions: every column, kind and outcome of version 1 keeps its meaning, so
-- readers of version 1 keep working.

-- Three outcomes. NOT VALID then VALIDATE: the check of existing rows takes no lock
-- that blocks writers for the length of a scan.
--
-- A refund request (`refund_requested`) is stored with the event_kind of its topic,
-- `payment`, and told apart by its refund_id: the key (event_id, event_kind) then
-- stays unique per topic, so an event id sent again on the payments topic is a
-- redelivery whatever its type (contract §1), enforced by the key the worker already
-- relies on, at no cost per row. recon_outcomes shows it as event_kind `refund`.
ALTER TABLE recon_events
    DROP CONSTRAINT recon_events_outcome_check,
    ADD CONSTRAINT recon_events_outcome_check CHECK (outcome IN (
        'pending', 'matched', 'matched_late', 'currency_mismatch', 'amount_mismatch',
        'fee_mismatch', 'duplicate_payment', 'duplicate_settlement', 'missing_settlement',
        'orphan_settlement', 'duplicate_refund', 'chargeback_open', 'chargeback_reversed'))
        NOT VALID,
    -- The settlement line's type; NULL for a capture (stored as version 1 stored
    -- captures, one value fewer per row) and for payments and refund requests.
    ADD COLUMN line_type text COLLATE "C"
        CHECK (line_type IN ('refund', 'chargeback', 'chargeback_reversal')),
    -- The refund a refund request or refund line is about.
    ADD COLUMN refund_id text COLLATE "C",
    -- The dispute a chargeback or its reversal is about.
    ADD COLUMN dispute_id text COLLATE "C",
    -- The payout a settlement line is paid out in (contract §7), when the PSP says.
    ADD COLUMN payout_id text COLLATE "C";
ALTER TABLE recon_events VALIDATE CONSTRAINT recon_events_outcome_check;

-- The contract's output gains the event kind `refund` and the new columns (at the end:
-- a view's columns can only be added there). A line without a stored type is a
-- capture.
CREATE OR REPLACE VIEW recon_outcomes AS
SELECT event_id,
       CASE WHEN refund_id IS NOT NULL AND event_kind = 'payment' THEN 'refund' ELSE event_kind END
           COLLATE "C" AS event_kind,
       payment_id, outcome, counterpart_event_id, updated_at,
       kafka_partition, kafka_offset, event_time, amount_minor, fee_minor, net_minor,
       currency, merchant_id, settlement_id, created_at,
       CASE WHEN event_kind = 'settlement' THEN COALESCE(line_type, 'capture') END AS line_type,
       refund_id, dispute_id, payout_id
FROM recon_events;

-- Window lookups leave out every duplicate outcome (migration 0007), now three. The
-- index is rebuilt with the new list under a new name, then takes the old one.
CREATE INDEX recon_events_payment_id_live_v2 ON recon_events (payment_id)
    WHERE outcome NOT IN ('duplicate_payment', 'duplicate_settlement', 'duplicate_refund');
DROP INDEX recon_events_payment_id_live;
ALTER INDEX recon_events_payment_id_live_v2 RENAME TO recon_events_payment_id_live;

-- A chargeback discrepancy is resolved by its reversal, found by the chargeback line
-- (as missing and orphan ones are by their subject, migration 0001).
CREATE INDEX recon_discrepancies_open_chargeback ON recon_discrepancies (settlement_event_id)
    WHERE resolved_at IS NULL AND kind = 'chargeback';

-- At most one over_refunded discrepancy per payment: the worker sets its state (open,
-- resolved, about which line, or absent) by payment id.
CREATE UNIQUE INDEX recon_discrepancies_one_over_refund ON recon_discrepancies (payment_id)
    WHERE kind = 'over_refunded';

-- The open-item gauges count refund requests apart from payments (they share the
-- payments topic's event_kind, told apart by refund_id): the open-items index
-- (migration 0002) carries refund_id so the count stays an index-only scan. It is
-- NULL, a bit in the tuple header, for everything but refund requests and refund lines.
CREATE INDEX recon_events_open_items_v2 ON recon_events (kafka_partition, event_kind, outcome, event_time)
    INCLUDE (refund_id)
    WHERE outcome IN ('pending', 'missing_settlement', 'orphan_settlement');
DROP INDEX recon_events_open_items;
ALTER INDEX recon_events_open_items_v2 RENAME TO recon_events_open_items;

-- An over_refunded discrepancy that the lines, once all read, say never existed (a
-- line settled earlier than those read before it lifts every prefix of the position
-- back to zero or above) is removed: arrival order changes neither whether it exists
-- nor whether it is open (contract §6). The runtime role has no DELETE on any table
-- (SECURITY.md), so the worker removes such rows through this function, which runs
-- with its owner's rights and deletes exactly those rows and nothing else. Its
-- search_path is fixed to this schema (then pg_temp, last), so no object of the
-- caller's can stand in for the table. EXECUTE is revoked from PUBLIC and granted to
-- the runtime role by deploy/sql/runtime-role.sql.
DO $migration$
BEGIN
    EXECUTE format(
        $create$
        CREATE FUNCTION recon_withdraw_over_refunds(payment_ids text[]) RETURNS void
        LANGUAGE sql SECURITY DEFINER SET search_path = %I, pg_temp
        AS 'DELETE FROM recon_discrepancies WHERE kind = ''over_refunded'' AND payment_id = ANY(payment_ids)'
        $create$,
        current_schema());
END
$migration$;
REVOKE EXECUTE ON FUNCTION recon_withdraw_over_refunds(text[]) FROM PUBLIC;
