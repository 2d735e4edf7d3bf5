-- aamm--2--3.sql: libaamm's SQL schema from version 2 to version 3 (lib/node_schema.c
-- runs it; see aamm--1.sql for the rules every script follows and lib/sql_contract.h for
-- the names the library relies on). Every statement is idempotent.
--
-- 1. The replicator's status (include/aamm/replicator.h): one row per peer, written by
--    the node's replicator every status interval on its control connection, read through
--    the view aamm.replication_status (the role of pg_stat_subscription for native
--    logical replication). The table is UNLOGGED (status is not worth WAL, and is never
--    replicated: schema aamm is never published) and node-local: a restarted server
--    starts it empty, and the replicator fills it again at its next interval.

CREATE UNLOGGED TABLE IF NOT EXISTS aamm.replicator_peer (
  peer_id integer PRIMARY KEY CHECK (peer_id BETWEEN 1 AND 1023),
  peer_name text NOT NULL,
  node_id integer NOT NULL,
  out_state text NOT NULL,
  out_sent_lsn pg_lsn,
  out_acked_lsn pg_lsn,
  out_confirmed_lsn pg_lsn,
  out_lag_bytes bigint NOT NULL DEFAULT 0,
  out_txns bigint NOT NULL DEFAULT 0,
  out_txn_rate double precision NOT NULL DEFAULT 0,
  in_state text NOT NULL,
  in_received_lsn pg_lsn,
  in_applied_lsn pg_lsn,
  in_lag_ms bigint NOT NULL DEFAULT 0,
  in_txns bigint NOT NULL DEFAULT 0,
  in_txn_rate double precision NOT NULL DEFAULT 0,
  in_pending bigint NOT NULL DEFAULT 0,
  conflicts jsonb NOT NULL DEFAULT '{}',
  reconnects bigint NOT NULL DEFAULT 0,
  reason text NOT NULL DEFAULT '',
  updated_at timestamptz NOT NULL DEFAULT now());
COMMENT ON TABLE aamm.replicator_peer IS 'libaamm: the replicator''s status per peer (node-local, unlogged; read aamm.replication_status)';
REVOKE ALL ON aamm.replicator_peer FROM PUBLIC;

CREATE OR REPLACE VIEW aamm.replication_status AS
  SELECT p.node_id, p.peer_id, p.peer_name,
         p.out_state, p.out_sent_lsn, p.out_acked_lsn, p.out_confirmed_lsn,
         p.out_lag_bytes, p.out_txns, p.out_txn_rate,
         p.in_state, p.in_received_lsn, p.in_applied_lsn, p.in_lag_ms, p.in_txns,
         p.in_txn_rate, p.in_pending, p.conflicts, p.reconnects, p.reason, p.updated_at,
         (pg_catalog.now() - p.updated_at) AS status_age,
         s.active AS slot_active,
         CASE WHEN s.restart_lsn IS NULL THEN NULL
              ELSE pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint
         END AS slot_retained_bytes
    FROM aamm.replicator_peer p
    LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = 'aamm_to_' || p.peer_id;
COMMENT ON VIEW aamm.replication_status IS 'libaamm: per peer, both directions of replication as this node''s replicator last saw them, with the slot''s retained WAL';
REVOKE ALL ON aamm.replication_status FROM PUBLIC;

-- 2. Tombstone flags: apply rechecks tombstones after an insert (aamm.recheck_tombs(),
--    aamm--1--2.sql section 4) only for relations a tombstone was ever written for. The
--    recheck costs a PL/pgSQL call and a query under a snapshot of its own in every applied
--    transaction that inserts rows, and can find something only where a delete committed
--    while the insert waited. A flag covers a bucket of relations (the hashtext of their
--    label, 16 buckets) and says whether a tombstone was ever written for one of them: a
--    sequence, which every session reads as it is now whatever its snapshot, set by
--    nextval() (atomic: concurrent first writers need no lock) and never reset. An ALWAYS
--    trigger on aamm.tombstone sets it for every writer (local deletes through
--    aamm.tombstone_trigger(), apply's through aamm.put_tombstone()) inside the writing
--    transaction, so before that commits; its WHEN clause skips the call once the flag is
--    set. Apply reads the flag after the insert (lib/apply_sql.c, sb_recheck()): a delete
--    the recheck could find committed before that, so an unset flag means there is none.
--    CREATE TRIGGER waits for the transactions writing tombstones at upgrade time, so none
--    of theirs goes unflagged. aamm.tomb_flag() folds to a constant for a literal label (a
--    SQL function, inlined; its body is parsed again for every plan, so it names the
--    sequences there are). Apply's role reads the flags: SELECT to PUBLIC (a flag tells
--    only that some relation of its bucket had a delete).

DO $d$ BEGIN
  FOR i IN 0..15 LOOP
    IF pg_catalog.to_regclass(pg_catalog.format('aamm.tomb_flag_%s', i)) IS NULL THEN
      EXECUTE pg_catalog.format('CREATE SEQUENCE aamm.tomb_flag_%s', i);
    END IF;
    EXECUTE pg_catalog.format('GRANT SELECT ON SEQUENCE aamm.tomb_flag_%s TO PUBLIC', i);
  END LOOP;
END $d$;
CREATE OR REPLACE FUNCTION aamm.tomb_flag(rel text) RETURNS regclass LANGUAGE sql IMMUTABLE
  AS $f$ SELECT ('{aamm.tomb_flag_0, aamm.tomb_flag_1, aamm.tomb_flag_2, aamm.tomb_flag_3,
    aamm.tomb_flag_4, aamm.tomb_flag_5, aamm.tomb_flag_6, aamm.tomb_flag_7,
    aamm.tomb_flag_8, aamm.tomb_flag_9, aamm.tomb_flag_10, aamm.tomb_flag_11,
    aamm.tomb_flag_12, aamm.tomb_flag_13, aamm.tomb_flag_14,
    aamm.tomb_flag_15}'::pg_catalog.regclass[])[(pg_catalog.hashtext(rel)
    OPERATOR(pg_catalog.&) 15) OPERATOR(pg_catalog.+) 1] $f$;
CREATE OR REPLACE FUNCTION aamm.tomb_flag_set() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  PERFORM pg_catalog.nextval(aamm.tomb_flag(NEW.relation));
  RETURN NULL;
END $f$;
REVOKE ALL ON FUNCTION aamm.tomb_flag_set() FROM PUBLIC;
CREATE OR REPLACE TRIGGER tomb_flag AFTER INSERT OR UPDATE ON aamm.tombstone FOR EACH ROW
  WHEN (pg_catalog.pg_sequence_last_value(aamm.tomb_flag(NEW.relation)) IS NULL)
  EXECUTE FUNCTION aamm.tomb_flag_set();
ALTER TABLE aamm.tombstone ENABLE ALWAYS TRIGGER tomb_flag;
