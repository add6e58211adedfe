-- The runtime role of recon-worker: what `recon-worker run` needs and nothing more.
-- Rows only: SELECT, INSERT and UPDATE on the worker's tables, USAGE on their
-- sequences, TEMPORARY on the database; no DDL, no DELETE, no TRUNCATE. Migrations
-- (`recon-worker migrate`) run as the owner role, which owns the tables; a `run` with
-- this role checks that no migration is pending and refuses to start otherwise.
--
-- A psql script, run once per database by an administrator (a superuser, or on a
-- managed PostgreSQL the provider's admin user, which must be a member of the owner
-- role), connected to the worker's database AFTER the first `recon-worker migrate`:
--
--   psql "$ADMIN_DATABASE_URL" -X -v ON_ERROR_STOP=1 \
--        -v owner_role=recon_owner -v runtime_role=recon_runtime \
--        -f deploy/sql/runtime-role.sql
--
-- then give the runtime role a password without it reaching a command line or a log
-- (`\password recon_runtime` in psql sends it hashed), or let the provider's IAM
-- authenticate it. Idempotent: run it again whenever you like.
--
-- The owner role, for reference (before the first migration):
--   CREATE ROLE recon_owner LOGIN;
--   GRANT CREATE, USAGE ON SCHEMA public TO recon_owner;  -- or make it the schema's owner
--
-- What the worker's statements need (src/store/):
--   recon_partition_pairs  SELECT, INSERT, UPDATE  taking pairs over (INSERT ... ON
--                                                  CONFLICT DO UPDATE), positions,
--                                                  the fencing update of a checkpoint
--   recon_events           SELECT, INSERT, UPDATE  lookups, sweeps, new events,
--                                                  changed outcomes
--   recon_discrepancies    SELECT, INSERT, UPDATE  opened (ON CONFLICT DO NOTHING),
--                                                  resolved (UPDATE ... FROM)
--   recon_discrepancy_actions  SELECT, INSERT      the action log (contract §8,
--                                                  migration 0010): append-only, the
--                                                  worker's own actions and the
--                                                  operators' commands; no UPDATE
--   rejected_events        SELECT, INSERT, UPDATE  rejects (redrive sets redriven_at)
--   recon_outcomes (view)  SELECT                  operators' and tests' reads
--   *_id_seq               USAGE                   the bigserial ids of the two above
--                                                  (and of the announcements below)
--   _sqlx_migrations       SELECT                  the pending-migrations check
--   the database           CONNECT, TEMPORARY      tracing a value PostgreSQL refuses
--                                                  to its message creates temporary
--                                                  tables (src/store/refusals.rs)
-- and for payouts (contract §7, migration 0009; src/store/payouts.rs is the evaluator):
--   recon_payout_announcements  SELECT, INSERT     checkpoints append announcements;
--                                                  the evaluator reads them
--   recon_payout_parts     SELECT, INSERT, UPDATE  checkpoints add to a pair's partial
--                                                  sums (INSERT ... ON CONFLICT DO
--                                                  UPDATE); the evaluator reads them
--   recon_payout_cursor    SELECT, INSERT, UPDATE  the evaluator's per-pair progress
--   recon_payout_clock     SELECT, INSERT, UPDATE  the global watermark and settings
--   recon_payout_state     SELECT, INSERT, UPDATE  each payout's status, recomputed
--   recon_payout_status_counts  SELECT, INSERT,    payouts per status (the gauge)
--                               UPDATE
--   recon_discrepancies    (as above)              payout discrepancies: opened,
--                                                  resolved, reopened (ON CONFLICT DO
--                                                  UPDATE)
--   recon_payouts (view)   SELECT                  operators' and tests' reads
--   pg_try_advisory_xact_lock  (any role)          one evaluator at a time
-- All of them come from the default privileges below (the tables are the owner's,
-- created by migrations); none needs DELETE.

\if :{?owner_role}
\else
  \warn 'set -v owner_role=<the role that runs recon-worker migrate>'
  SELECT 'owner_role' AS missing_variable, 1 / 0;
\endif
\if :{?runtime_role}
\else
  \warn 'set -v runtime_role=<the role recon-worker run connects as>'
  SELECT 'runtime_role' AS missing_variable, 1 / 0;
\endif

-- Created without any attribute beyond LOGIN (not a superuser, cannot create roles or
-- databases). An existing role is kept as it is: check its attributes yourself.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'runtime_role') AS create_runtime_role
\gset
\if :create_runtime_role
  CREATE ROLE :"runtime_role" LOGIN;
\endif

SELECT current_database() AS database
\gset
GRANT CONNECT, TEMPORARY ON DATABASE :"database" TO :"runtime_role";
GRANT USAGE ON SCHEMA public TO :"runtime_role";
-- PostgreSQL 14 and older let every role create in `public` (15 stopped): a runtime
-- role that can create there looks like one with DDL rights, and `recon-worker run`
-- would try to migrate with it. One database per deployment, so this touches no one
-- else (a no-op on 15 and later).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The tables and sequences that exist now...
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO :"runtime_role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO :"runtime_role";
-- ...and the ones later migrations create (as the owner role).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE ON TABLES TO :"runtime_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO :"runtime_role";
-- The one function the worker calls (migration 0008, redefined by 0010): it removes,
-- with its owner's rights, over_refunded discrepancies the lines say never existed,
-- and logs each removal in the action log. EXECUTE is revoked from PUBLIC there;
-- functions later migrations create are granted by the default privileges.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO :"runtime_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT EXECUTE ON FUNCTIONS TO :"runtime_role";
-- The output view is read only (a simple view is updatable: the grant above gave the
-- same writes as on recon_events, nothing more, but no code writes through it).
REVOKE INSERT, UPDATE ON public.recon_outcomes FROM :"runtime_role";
-- Likewise the payouts view (migration 0009): the evaluator writes the table under it.
SELECT to_regclass('public.recon_payouts') IS NOT NULL AS has_payouts_view
\gset
\if :has_payouts_view
  REVOKE INSERT, UPDATE ON public.recon_payouts FROM :"runtime_role";
\endif
-- The migration table is read, never written, by the runtime role. (Fails if the
-- owner has not migrated yet: run `recon-worker migrate` first.)
REVOKE INSERT, UPDATE ON public._sqlx_migrations FROM :"runtime_role";
-- The operators' action log (contract §8) is append-only: INSERT and SELECT only.
-- The default privileges above grant UPDATE on every new table, so the migration that
-- creates it (0010) revokes UPDATE from every grantee, and a rerun of this script must
-- not grant it again. (DELETE and TRUNCATE are never granted; triggers refuse all
-- three to every role, the owner included.)
SELECT to_regclass('public.recon_discrepancy_actions') IS NOT NULL AS has_action_log
\gset
\if :has_action_log
  REVOKE UPDATE, DELETE, TRUNCATE ON public.recon_discrepancy_actions FROM :"runtime_role";
\endif
