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
