-- Window lookups read a key's payment and first settlement line, never its duplicates
-- (duplicate_payment / duplicate_settlement never change outcome and take no part in
-- matching). With every row of a payment id in the index, a producer minting a fresh
-- event id per resend of one payment made each lookup of that key read every
-- duplicate ever sent for it (issue 19: 100k duplicates, 100k rows per lookup). The
-- partial index holds at most two rows per key whatever the input, and duplicates no
-- longer cost an index entry on insert. It replaces the full index rather than sitting
-- beside it: the worker has no other reader of payment_id alone, and a second index
-- on every event would slow every insert. Ad-hoc queries by payment_id use it when
-- they carry the same condition (a duplicate is found by its event id, or through
-- its duplicate_* discrepancy).
CREATE INDEX recon_events_payment_id_live ON recon_events (payment_id)
    WHERE outcome NOT IN ('duplicate_payment', 'duplicate_settlement');
DROP INDEX recon_events_payment_id;
