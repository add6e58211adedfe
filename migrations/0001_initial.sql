-- recon-worker schema. The worker applies this itself (`recon-worker migrate`, or at
-- the start of `recon-worker run`). One database (or schema) per deployment.

-- Position, ownership epoch and watermark inputs of each partition pair. The offsets
-- here are the source of truth; the epoch fences zombie workers.
CREATE TABLE recon_partition_pairs (
    payments_topic          text        NOT NULL,
    settlements_topic       text        NOT NULL,
    kafka_partition         integer     NOT NULL,
    epoch                   bigint      NOT NULL,
    payments_next_offset    bigint,
    settlements_next_offset bigint,
    payments_high_mark      timestamptz,
    settlements_high_mark   timestamptz,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payments_topic, settlements_topic, kafka_partition)
);

-- One row per accepted event, with its current outcome.
CREATE TABLE recon_events (
    event_kind           text        NOT NULL CHECK (event_kind IN ('payment', 'settlement')),
    event_id             text        NOT NULL,
    payment_id           text        NOT NULL,
    kafka_partition      integer     NOT NULL,
    kafka_offset         bigint      NOT NULL,
    outcome              text        NOT NULL CHECK (outcome IN (
                             'pending', 'matched', 'matched_late', 'currency_mismatch',
                             'amount_mismatch', 'fee_mismatch', 'duplicate_payment',
                             'duplicate_settlement', 'missing_settlement', 'orphan_settlement')),
    counterpart_event_id text,
    event_time           timestamptz NOT NULL,
    amount_minor         bigint      NOT NULL,
    fee_minor            bigint,
    net_minor            bigint,
    currency             text        NOT NULL,
    merchant_id          text,
    settlement_id        text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_kind, event_id)
);

-- Window misses: everything stored for a batch's payment ids.
CREATE INDEX recon_events_payment_id ON recon_events (payment_id);
-- Deadline sweeps over pending items of one partition pair, oldest first.
CREATE INDEX recon_events_pending_by_time ON recon_events (kafka_partition, event_kind, event_time)
    WHERE outcome = 'pending';

-- The contract's output: exactly one row per accepted event.
CREATE VIEW recon_outcomes AS
SELECT event_id, event_kind, payment_id, outcome, counterpart_event_id, updated_at,
       kafka_partition, kafka_offset, event_time, amount_minor, fee_minor, net_minor,
       currency, merchant_id, settlement_id, created_at
FROM recon_events;

-- Exactly one row per rejected message. `payload` keeps at most the first 65536
-- bytes; `payload_size` the original length.
CREATE TABLE rejected_events (
    id              bigserial   PRIMARY KEY,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    reason          text        NOT NULL,
    reason_class    text        NOT NULL,
    payload         bytea,
    payload_size    integer     NOT NULL,
    kafka_key       bytea,
    rejected_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, kafka_partition, kafka_offset)
);

-- Discrepancy history: every non-matching outcome, when it opened and, for the
-- deadline kinds a late counterpart can close, when and how it was resolved.
CREATE TABLE recon_discrepancies (
    id                  bigserial   PRIMARY KEY,
    kind                text        NOT NULL,
    payment_id          text        NOT NULL,
    kafka_partition     integer     NOT NULL,
    payment_event_id    text,
    settlement_event_id text,
    opened_at           timestamptz NOT NULL DEFAULT now(),
    resolved_at         timestamptz,
    resolution          text
);

CREATE INDEX recon_discrepancies_open_by_age ON recon_discrepancies (opened_at)
    WHERE resolved_at IS NULL;
CREATE INDEX recon_discrepancies_open_missing ON recon_discrepancies (payment_event_id)
    WHERE resolved_at IS NULL AND kind = 'missing_settlement';
CREATE INDEX recon_discrepancies_open_orphan ON recon_discrepancies (settlement_event_id)
    WHERE resolved_at IS NULL AND kind = 'orphan_settlement';
