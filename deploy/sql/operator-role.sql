-- The operator role of recon-worker: what finance and on-call people need to run
-- `recon-worker discrepancies ...` and `recon-worker rejects ...` (contract §8), and
-- nothing more. Read everything; change only what those commands change, column by
-- column:
--
--   every table and view of the schema   SELECT          listings and reports
--   recon_discrepancies (resolved_at,    UPDATE          accept (resolved, `accepted`)
--                        resolution)                     and reopen; the commands'
--                                                        SELECT ... FOR UPDATE needs
--                                                        UPDATE on a column
--   recon_discrepancy_actions            INSERT          the action each command logs
--                                                        (append-only for every role)
--   recon_discrepancy_actions_id_seq     USAGE           its ids
--   rejected_events (redrive_requested_at, UPDATE        `rejects redrive` asks; the
--                    redrive_requested_by)               worker does the rest
--
-- No INSERT into the worker's tables, no other UPDATE (an operator cannot change an
-- outcome, a reason, an offset or a discrepancy's kind), no DELETE, no DDL.
--
-- A psql script, run by an administrator connected to the worker's database after
-- the migrations (and again after a migration that adds a table, for its SELECT):
--
--   psql "$ADMIN_DATABASE_URL" -X -v ON_ERROR_STOP=1 \
--        -v operator_role=recon_operator -f deploy/sql/operator-role.sql
--
-- Give each person their own login role and make it a member of this one
-- (`GRANT recon_operator TO alice`), so `pg_stat_activity` and the server's logs name
-- them; the commands' `--actor` is what the action log keeps. Idempotent.

\if :{?operator_role}
\else
  \warn 'set -v operator_role=<the role the operators'' commands connect as>'
  SELECT 'operator_role' AS missing_variable, 1 / 0;
\endif

-- A group role: people log in as themselves, members of it.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'operator_role') AS create_operator_role
\gset
\if :create_operator_role
  CREATE ROLE :"operator_role" NOLOGIN;
\endif

SELECT current_database() AS database
\gset
GRANT CONNECT ON DATABASE :"database" TO :"operator_role";
GRANT USAGE ON SCHEMA public TO :"operator_role";

GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"operator_role";
GRANT UPDATE (resolved_at, resolution) ON public.recon_discrepancies TO :"operator_role";
GRANT INSERT ON public.recon_discrepancy_actions TO :"operator_role";
GRANT USAGE ON SEQUENCE public.recon_discrepancy_actions_id_seq TO :"operator_role";
GRANT UPDATE (redrive_requested_at, redrive_requested_by) ON public.rejected_events
    TO :"operator_role";
