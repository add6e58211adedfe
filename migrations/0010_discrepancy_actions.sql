-- The discrepancy action log (contract §8): who did what to a discrepancy, and when.
-- The worker records its own changes here (actor `recon-worker`: opened, resolved,
-- reopened) in the transaction that makes them; operators' commands record theirs
-- (accepted, reopened, annotated) in the transaction that changes the discrepancy.
--
-- Append-only, for every role, the owner included: an auditor must be able to rely on
-- it. Privileges alone cannot say that (the owner keeps every right on its table), so
-- triggers refuse UPDATE, DELETE and TRUNCATE. What they cannot stop is DDL by the
-- owner (DROP TRIGGER, DROP TABLE): that is a schema change, done by a migration or by
-- hand with the owner's credentials, and is outside what a table can protect itself
-- from.
CREATE TABLE recon_discrepancy_actions (
    id             bigserial   PRIMARY KEY,
    -- Not a foreign key: a withdrawn over_refunded row is deleted, its log kept (below).
    discrepancy_id bigint      NOT NULL,
    action         text        COLLATE "C" NOT NULL
                   CHECK (action IN ('opened', 'resolved', 'reopened', 'annotated', 'accepted')),
    actor          text        NOT NULL CHECK (actor <> ''),
    note           text,
    at             timestamptz NOT NULL DEFAULT now()
);

-- A discrepancy's history, in order.
CREATE INDEX recon_discrepancy_actions_by_discrepancy
    ON recon_discrepancy_actions (discrepancy_id, id);

CREATE FUNCTION recon_discrepancy_actions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $function$
BEGIN
    RAISE EXCEPTION 'recon_discrepancy_actions is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a further action (annotated, reopened) instead';
END
$function$;

CREATE TRIGGER recon_discrepancy_actions_no_update_or_delete
    BEFORE UPDATE OR DELETE ON recon_discrepancy_actions
    FOR EACH ROW EXECUTE FUNCTION recon_discrepancy_actions_append_only();
CREATE TRIGGER recon_discrepancy_actions_no_truncate
    BEFORE TRUNCATE ON recon_discrepancy_actions
    FOR EACH STATEMENT EXECUTE FUNCTION recon_discrepancy_actions_append_only();

-- Rows only, and only INSERT and SELECT: the owner's default privileges
-- (deploy/sql/runtime-role.sql) gave the runtime role UPDATE on this new table as on
-- every other; take it back from every grantee, so the privileges say what the
-- triggers enforce.
DO $migration$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
        FROM pg_class c
        CROSS JOIN LATERAL aclexplode(c.relacl) a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'recon_discrepancy_actions'::regclass
          AND a.grantee <> c.relowner
          AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')
    LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON recon_discrepancy_actions FROM %s',
                       grantee);
    END LOOP;
END
$migration$;

-- The history so far, as far as the rows tell it: each discrepancy's opening and, if
-- resolved, its resolution. (A payout discrepancy reopened before this migration shows
-- only its last state: the rows kept no more.)
INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note, at)
SELECT id, action, 'recon-worker', note, at
FROM (
    SELECT id, 1 AS step, 'opened' AS action, 'recorded by migration 0010' AS note,
           opened_at AS at
    FROM recon_discrepancies
    UNION ALL
    SELECT id, 2, 'resolved', resolution || ' (recorded by migration 0010)', resolved_at
    FROM recon_discrepancies
    WHERE resolved_at IS NOT NULL
) history
ORDER BY at, id, step;

-- An over_refunded discrepancy the lines, once all read, say never existed is deleted
-- (migration 0008): contract §6 says arrival order changes neither whether it exists
-- nor whether it is open, so a row read in one order and gone in settled_at order must
-- not be there. Its history is not lost: the same statement logs a last `resolved`
-- action whose note says it was withdrawn, and the log keeps every earlier action
-- (an operator may have seen it, annotated it, accepted it). That is why
-- `discrepancy_id` above is not a foreign key: the log outlives withdrawn rows, and a
-- payment that goes below zero again later gets a new row and a new id.
--
-- The runtime role has no DELETE, so the function keeps its owner's rights (SECURITY
-- DEFINER) as in 0008; its name, argument and fixed search_path stay, so a worker of
-- the previous version still running during a rolling upgrade keeps working.
DO $migration$
BEGIN
    EXECUTE format(
        $create$
        CREATE OR REPLACE FUNCTION recon_withdraw_over_refunds(payment_ids text[]) RETURNS void
        LANGUAGE sql SECURITY DEFINER SET search_path = %I, pg_temp
        AS $body$
            WITH withdrawn AS (
                DELETE FROM recon_discrepancies
                WHERE kind = 'over_refunded' AND payment_id = ANY(payment_ids)
                RETURNING id)
            INSERT INTO recon_discrepancy_actions (discrepancy_id, action, actor, note)
            SELECT id, 'resolved', 'recon-worker',
                   'withdrawn: in settled_at order its lines never take the position below zero; the row is removed (contract §6)'
            FROM withdrawn
            ORDER BY id
        $body$
        $create$,
        current_schema());
END
$migration$;
