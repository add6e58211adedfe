-- Contract §7: payout control totals across partition pairs. Design and reasons:
-- docs/payouts-design.md. Only additions, and the one relaxation a payout discrepancy
-- needs (it has no payment). Every name below is read by src/store/payouts.rs (the
-- evaluator) or src/store/checkpoint.rs (the pair's own transaction).

-- A pair's row gains its payouts partition's position and the pair's watermark (§2),
-- both committed by the pair's checkpoint, fenced like its offsets.
--   payouts_topic        the payouts topic the offset below belongs to (NULL: never
--                        read); another name means read from the beginning
--   watermark            the pair's watermark as committed; only ever moves forward
--                        (GREATEST), whichever worker owns the pair
--   payout_seq           bumped by each checkpoint that writes payout rows of this
--                        pair: the evaluator's cursor reads rows with a higher seq
ALTER TABLE recon_partition_pairs
    ADD COLUMN payouts_topic text,
    ADD COLUMN payouts_next_offset bigint,
    ADD COLUMN watermark timestamptz,
    ADD COLUMN payout_seq bigint NOT NULL DEFAULT 0;

-- Every accepted announcement (`payout_announced`), written by the checkpoint of the
-- pair that owns its payouts partition. A redelivery (same event_id) adds nothing.
-- For a payout announced more than once, the first in partition order (lowest id:
-- one key, one partition, one writer at a time) is the one that counts.
CREATE TABLE recon_payout_announcements (
    id              bigserial   PRIMARY KEY,
    event_id        text        COLLATE "C" NOT NULL UNIQUE,
    payout_id       text        COLLATE "C" NOT NULL,
    currency        text        NOT NULL,
    net_minor       bigint      NOT NULL,
    line_count      bigint      CHECK (line_count >= 0),
    paid_at         timestamptz NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    seq             bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recon_payout_announcements_by_payout ON recon_payout_announcements (payout_id, id);
CREATE INDEX recon_payout_announcements_by_seq ON recon_payout_announcements (kafka_partition, seq);

-- Each pair's partial sums of a payout's lines, per currency: written only by the
-- checkpoint that inserts the lines (the pair's fenced owner), so no two workers ever
-- write one row. numeric: a sum of bigints cannot overflow, so no data error can come
-- of it and stop a pair.
CREATE TABLE recon_payout_parts (
    payout_id        text        COLLATE "C" NOT NULL,
    kafka_partition  integer     NOT NULL,
    currency         text        NOT NULL,
    line_count       bigint      NOT NULL,
    net_minor        numeric     NOT NULL,
    first_settled_at timestamptz NOT NULL,
    last_settled_at  timestamptz NOT NULL,
    seq              bigint      NOT NULL,
    PRIMARY KEY (payout_id, kafka_partition, currency)
);
CREATE INDEX recon_payout_parts_by_seq ON recon_payout_parts (kafka_partition, seq);

-- Lines stored since migration 0008 already carry their payout_id: their sums, once.
INSERT INTO recon_payout_parts (payout_id, kafka_partition, currency, line_count, net_minor,
                                first_settled_at, last_settled_at, seq)
SELECT payout_id, kafka_partition, currency, count(*), sum(net_minor), min(event_time),
       max(event_time), 0
FROM recon_events
WHERE event_kind = 'settlement' AND payout_id IS NOT NULL
GROUP BY payout_id, kafka_partition, currency;

-- The evaluator's progress: per pair, the highest seq of parts and announcements it
-- has taken into recon_payout_state, and the topics of the pair row whose payout_seq
-- that seq counts. Parts carry no topic, and a pair row of other topics (renamed
-- payments or settlements topics: new rows) counts its payout_seq from 0 again; a
-- cursor of another row's count would hide the new row's first seqs for ever, so the
-- evaluator starts a pair over when the topics differ.
CREATE TABLE recon_payout_cursor (
    kafka_partition   integer PRIMARY KEY,
    payments_topic    text    NOT NULL,
    settlements_topic text    NOT NULL,
    seq               bigint  NOT NULL
);

-- The evaluator's clock: the global watermark it last used and the settings it used
-- them with (a change of grace or orphan timeout recomputes every unbalanced payout).
CREATE TABLE recon_payout_clock (
    id               boolean     PRIMARY KEY DEFAULT true CHECK (id),
    global_watermark timestamptz,
    grace            interval,
    orphan_timeout   interval,
    evaluated_at     timestamptz
);

-- One row per payout, kept by the evaluator (one at a time: an advisory lock).
--   since       paid_at, or the first line's settled_at when unannounced: the age
--   deadline_at paid_at + RECON_PAYOUT_GRACE, or the last line's settled_at + O
--   due         the global watermark passed deadline_at
CREATE TABLE recon_payout_state (
    payout_id             text        COLLATE "C" PRIMARY KEY,
    announcement_event_id text        COLLATE "C",
    announcements         integer     NOT NULL,
    currency              text,
    expected_net_minor    bigint,
    expected_line_count   bigint,
    paid_at               timestamptz,
    lines_net_minor       numeric,
    line_count            bigint      NOT NULL,
    other_currency_lines  bigint      NOT NULL,
    first_settled_at      timestamptz,
    last_settled_at       timestamptz,
    since                 timestamptz NOT NULL,
    deadline_at           timestamptz,
    due                   boolean     NOT NULL,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    status                text        NOT NULL CHECK (status IN (
                              'balanced', 'pending', 'total_mismatch', 'currency_mismatch',
                              'unannounced'))
);
-- "Payouts not balanced, oldest first".
CREATE INDEX recon_payout_state_unbalanced ON recon_payout_state (since, payout_id)
    WHERE status <> 'balanced';
-- Payouts whose deadline may pass as the global watermark moves.
CREATE INDEX recon_payout_state_awaiting_deadline ON recon_payout_state (deadline_at)
    WHERE NOT due AND status IN ('pending', 'unannounced');

-- Payouts per status, kept exact by the evaluator as it changes statuses: the
-- recon_payouts{status} gauge without counting the table.
CREATE TABLE recon_payout_status_counts (
    status  text   PRIMARY KEY,
    payouts bigint NOT NULL
);

-- The contract's view (§7's columns first, then what operators need beside them).
CREATE VIEW recon_payouts AS
SELECT payout_id, currency, expected_net_minor, lines_net_minor, expected_line_count,
       line_count, status, paid_at, updated_at,
       since, due, deadline_at, announcements, other_currency_lines, first_settled_at,
       last_settled_at
FROM recon_payout_state;

-- A payout discrepancy (payout_mismatch, unannounced_payout) has a payout and no
-- payment or partition.
ALTER TABLE recon_discrepancies
    ALTER COLUMN payment_id DROP NOT NULL,
    ALTER COLUMN kafka_partition DROP NOT NULL,
    ADD COLUMN payout_id text COLLATE "C",
    ADD CONSTRAINT recon_discrepancies_payment_or_payout
        CHECK ((payout_id IS NULL) <> (payment_id IS NULL)) NOT VALID;
ALTER TABLE recon_discrepancies VALIDATE CONSTRAINT recon_discrepancies_payment_or_payout;

-- Migration 0006's key identifies a discrepancy by its events; payout discrepancies
-- have none, so it applies to the others only, and payout ones have their own: one
-- row per payout and kind (reopened rather than opened twice), and at most one open
-- discrepancy per payout, which the database enforces whatever the code does.
CREATE UNIQUE INDEX recon_discrepancies_one_per_subject_v2 ON recon_discrepancies
    (kind, COALESCE(payment_event_id, ''), COALESCE(settlement_event_id, ''))
    WHERE payout_id IS NULL;
DROP INDEX recon_discrepancies_one_per_subject;
ALTER INDEX recon_discrepancies_one_per_subject_v2 RENAME TO recon_discrepancies_one_per_subject;
CREATE UNIQUE INDEX recon_discrepancies_one_per_payout ON recon_discrepancies (payout_id, kind)
    WHERE payout_id IS NOT NULL;
CREATE UNIQUE INDEX recon_discrepancies_one_open_per_payout ON recon_discrepancies (payout_id)
    WHERE payout_id IS NOT NULL AND resolved_at IS NULL;
