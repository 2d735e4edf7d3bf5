-- aamm--1.sql: version 1 of libaamm's SQL schema (schema aamm), as the library at commit
-- 29aa597 installed it. A released script never changes: a change to the schema is a new
-- script aamm--<n>--<n+1>.sql (PostgreSQL's contrib/*/*--1.4--1.5.sql are the model).
-- lib/node_schema.c runs this script on a node without aamm.apply_meta, then every
-- upgrade script in order, in one transaction under one advisory lock, and records the
-- version reached in aamm.apply_meta; the scripts never write the version themselves.
--
-- The C<->SQL contract (the functions apply calls, the SQLSTATEs AA001-AA006, the
-- aamm_conflict notice) is written down in lib/sql_contract.h; a change to a name, an
-- argument list or an error code here is a change there. The decision rules (aamm.decide,
-- aamm.update_missing, aamm.newer) are those of lib/conflict.c
-- (tests/integration/test_conflict_rule.c runs every row of the decision table through
-- both). Everything lives in schema aamm, which is never published. Invoker-rights
-- functions are called by apply's role; the SECURITY DEFINER ones (conflict log,
-- tombstone writes) let it log and remember deletes without write grants on aamm's
-- tables.
--
-- The DROP ... IF EXISTS statements near the top cleared objects of development versions
-- that predate version 1; on an empty schema they do nothing.

CREATE SCHEMA IF NOT EXISTS aamm;
CREATE TABLE IF NOT EXISTS aamm.apply_meta (version int NOT NULL);
CREATE TABLE IF NOT EXISTS aamm.conflict_log (
  id bigserial PRIMARY KEY,
  logged_at timestamptz NOT NULL DEFAULT now(),
  xid xid8 DEFAULT pg_current_xact_id(),
  kind text NOT NULL, relation text NOT NULL, key jsonb,
  local_row jsonb, remote_row jsonb,
  local_time timestamptz, local_node int, remote_time timestamptz, remote_node int,
  resolution text NOT NULL);
-- earlier versions: an index for a per-transaction conflict query (conflicts now reach the
-- applier as notices), decision functions with a key-lock argument (the guard statement
-- takes the locks now)
DROP INDEX IF EXISTS aamm.conflict_log_xid;
DROP FUNCTION IF EXISTS aamm.decide(text, text, jsonb, xid, jsonb, jsonb, timestamptz, int,
  text, boolean);
DROP FUNCTION IF EXISTS aamm.insert_ok(text, jsonb, timestamptz, int, jsonb, text, boolean);
DROP FUNCTION IF EXISTS aamm.update_missing(text, jsonb, timestamptz, int, jsonb, boolean,
  text, boolean);
DROP FUNCTION IF EXISTS aamm.delete_missing(text, jsonb, timestamptz, int, jsonb, boolean);
DROP FUNCTION IF EXISTS aamm.decide(text, text, jsonb, xid, jsonb, jsonb, timestamptz, int,
  text, bigint);
DROP FUNCTION IF EXISTS aamm.insert_ok(text, jsonb, timestamptz, int, jsonb, text, bigint);
DROP FUNCTION IF EXISTS aamm.update_missing(text, jsonb, timestamptz, int, jsonb, boolean,
  text, bigint);
DROP FUNCTION IF EXISTS aamm.delete_missing(text, jsonb, timestamptz, int, jsonb, bigint);
CREATE TABLE IF NOT EXISTS aamm.tombstone (relation text NOT NULL, key jsonb NOT NULL,
  PRIMARY KEY (relation, key));
-- node id of a replication origin id: 0 = this node (the apply session sets aamm.node_id),
-- aamm_from_<n> = node n, anything else unknown (NULL)
-- PL/pgSQL, not SQL: a SQL function that cannot be inlined is parsed again at every call,
-- PL/pgSQL keeps its plans for the session
DROP FUNCTION IF EXISTS aamm.node_of(oid) CASCADE;
CREATE FUNCTION aamm.node_of(r oid) RETURNS int LANGUAGE plpgsql STABLE AS $f$
BEGIN
  IF r = 0 THEN
    RETURN NULLIF(pg_catalog.current_setting('aamm.node_id', true), '')::int;
  END IF;
  RETURN (SELECT CASE WHEN o.roname OPERATOR(pg_catalog.~) '^aamm_from_[0-9]+$'
          THEN pg_catalog.substr(o.roname, 11)::int END
          FROM pg_catalog.pg_replication_origin o WHERE o.roident = r);
END $f$;
-- the version (commit timestamp, origin node) of the transaction @x; a one-row set so that
-- a call in FROM is inlined into the caller's plan
DROP FUNCTION IF EXISTS aamm.version_of(xid) CASCADE;
CREATE FUNCTION aamm.version_of(x xid) RETURNS TABLE (ts timestamptz, node int)
  LANGUAGE sql STABLE ROWS 1 AS $f$
  SELECT c.timestamp, aamm.node_of(c.roident)
  FROM pg_catalog.pg_xact_commit_timestamp_origin(x) c $f$;
-- (ts1, n1) newer than (ts2, n2)? unknown (NULL ts) is oldest
CREATE OR REPLACE FUNCTION aamm.newer(ts1 timestamptz, n1 int, ts2 timestamptz, n2 int)
  RETURNS boolean LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE WHEN ts1 IS NULL THEN false WHEN ts2 IS NULL THEN true
    WHEN ts1 OPERATOR(pg_catalog.<>) ts2 THEN ts1 OPERATOR(pg_catalog.>) ts2
    ELSE COALESCE(n1, 0) OPERATOR(pg_catalog.>) COALESCE(n2, 0)
  END $f$;
CREATE OR REPLACE FUNCTION aamm.log_conflict(kind text, rel text, k jsonb, lrow jsonb,
  rrow jsonb, lts timestamptz, lnode int, rts timestamptz, rnode int, res text)
  RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  INSERT INTO aamm.conflict_log (kind, relation, key, local_row, remote_row, local_time,
    local_node, remote_time, remote_node, resolution)
  VALUES (kind, rel, k, lrow, rrow, lts, lnode, rts, rnode, res);
-- the applier learns of the conflict from this notice (lib/apply.c, on_notice()): fields
-- separated by chr(31), which JSON text never holds raw; the relation last
  RAISE NOTICE USING MESSAGE = 'aamm_conflict', DETAIL = concat_ws(chr(31), kind,
    COALESCE(k::text, ''), COALESCE(lrow::text, ''), COALESCE(rrow::text, ''),
    COALESCE((extract(epoch FROM lts) * 1000000)::int8::text, ''),
    COALESCE(lnode::text, ''),
    COALESCE((extract(epoch FROM rts) * 1000000)::int8::text, ''),
    COALESCE(rnode::text, ''), res, rel);
END $f$;
-- remember a delete of @k done by the current transaction unless a newer one is known:
-- apply's remote deletes, key-changing updates (the old key) and deletes of absent rows
-- (the triggers below fire for local writers only: apply runs with session_replication_role
-- = replica, which spares every applied UPDATE their WHEN clause). Returns true, so that a
-- statement can call it in an expression.
DO $d$ BEGIN
  IF (SELECT prorettype = 'void'::regtype FROM pg_catalog.pg_proc WHERE oid =
      to_regprocedure('aamm.put_tombstone(text, jsonb, timestamptz, int)')) THEN
    DROP FUNCTION aamm.put_tombstone(text, jsonb, timestamptz, int);
  END IF;
END $d$;
CREATE OR REPLACE FUNCTION aamm.put_tombstone(rel text, k jsonb, rts timestamptz,
  rnode int) RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS $f$
BEGIN
  INSERT INTO aamm.tombstone AS t VALUES (rel, k) ON CONFLICT (relation, key)
  DO UPDATE SET relation = EXCLUDED.relation
  WHERE NOT (SELECT aamm.newer(v.ts, v.node, rts, rnode) FROM aamm.version_of(t.xmin) v);
  RETURN true;
END $f$;
CREATE OR REPLACE FUNCTION aamm.tombstone_trigger() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE o jsonb := to_jsonb(OLD); k jsonb;
BEGIN
  SELECT jsonb_agg(o -> u.a ORDER BY u.i) INTO k
  FROM unnest(TG_ARGV) WITH ORDINALITY AS u(a, i);
  INSERT INTO aamm.tombstone VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, k)
  ON CONFLICT (relation, key) DO UPDATE SET relation = EXCLUDED.relation;
  RETURN NULL;
END $f$;
-- the guard of a remote transaction is plain SQL in lib/apply.c (guard_sql); this raises
-- when it trips (pipelining must never commit transaction N+1 after N failed)
DROP FUNCTION IF EXISTS aamm.begin_remote(text, pg_lsn, pg_lsn, timestamptz);
CREATE OR REPLACE FUNCTION aamm.guard_failed(origin text, cur pg_lsn, prev pg_lsn)
  RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'aamm: origin % is at %, expected % (an earlier transaction did not commit)', origin, cur, prev USING ERRCODE = 'AA002';
END $f$;
-- a merged statement's guard met a key lock another applier holds (lib/apply.c,
-- guard_fold_sql): its snapshot predates the lock, so it must not go on
CREATE OR REPLACE FUNCTION aamm.key_lock_busy(id bigint) RETURNS text
  LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'aamm: key lock % is held by another applier', id
    USING ERRCODE = 'AA005';
END $f$;
CREATE OR REPLACE FUNCTION aamm.origin_session(origin text, OUT progress pg_lsn,
  OUT roident oid) LANGUAGE plpgsql AS $f$
BEGIN
  IF pg_catalog.pg_replication_origin_oid(origin) IS NULL THEN
    PERFORM pg_catalog.pg_replication_origin_create(origin);
  END IF;
  PERFORM pg_catalog.pg_replication_origin_session_setup(origin);
  progress := COALESCE(
    pg_catalog.pg_replication_origin_progress(origin, false), '0/0');
  roident := pg_catalog.pg_replication_origin_oid(origin);
END $f$;
-- policy 'callback': stop the transaction and hand the conflict to the host's resolver
-- (AA004, fields in the detail separated by chr(31)); 'verdict:<res>:<xmin>': the
-- resolver's answer, valid while the local row is still version <xmin> ('*': any)
CREATE OR REPLACE FUNCTION aamm.resolve_cb(kind text, k jsonb, lxmin text, lts timestamptz,
  lnode int, lrow jsonb, rrow jsonb, policy text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE v text[];
BEGIN
  IF pg_catalog.starts_with(policy, 'verdict:') THEN
    v := pg_catalog.string_to_array(policy, ':');
    IF v[3] = '*' OR v[3] = lxmin THEN RETURN v[2]; END IF;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'AA004',
    MESSAGE = pg_catalog.format('aamm: %s conflict on key %s is for the resolver', kind, k),
    DETAIL = pg_catalog.concat_ws(chr(31), kind, COALESCE(lxmin, ''),
      COALESCE((extract(epoch FROM lts) * 1000000)::int8::text, ''), COALESCE(lnode::text, ''),
      COALESCE(k::text, ''), COALESCE(lrow::text, ''), COALESCE(rrow::text, ''));
END $f$;
-- the decision for a remote write that found a local row (doc/conflicts.md); kind is
-- insert_exists, update_origin_differs or delete_origin_differs
CREATE OR REPLACE FUNCTION aamm.decide(kind text, rel text, k jsonb, lxmin xid,
  lrow jsonb, rrow jsonb, rts timestamptz, rnode int, policy text)
  RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE lts timestamptz; lnode int; res text;
BEGIN
  SELECT v.ts, v.node INTO lts, lnode FROM aamm.version_of(lxmin) v;
  IF kind <> 'insert_exists' AND (lts IS NULL OR lnode IS NOT DISTINCT FROM rnode) THEN
    RETURN true;
  END IF;
  res := CASE policy
    WHEN 'lww' THEN CASE WHEN aamm.newer(rts, rnode, lts, lnode) THEN 'apply_remote'
                    ELSE 'keep_local' END
    WHEN 'keep_local' THEN 'keep_local' WHEN 'apply_remote' THEN 'apply_remote'
    WHEN 'error' THEN 'error'
    ELSE aamm.resolve_cb(kind, k, lxmin::text, lts, lnode, lrow, rrow, policy) END;
  IF res = 'error' THEN
    RAISE EXCEPTION 'aamm: % conflict on % key % (policy error)', kind, rel, k
      USING ERRCODE = 'AA001';
  END IF;
  PERFORM aamm.log_conflict(kind, rel, k, lrow, rrow, lts, lnode, rts, rnode, res);
  RETURN res IN ('apply_remote', 'merged');
END $f$;
DROP FUNCTION IF EXISTS aamm.tomb_version(text, jsonb) CASCADE;
CREATE FUNCTION aamm.tomb_version(rel text, k jsonb) RETURNS TABLE (ts timestamptz,
  node int) LANGUAGE sql STABLE ROWS 1 AS $f$
  SELECT v.ts, v.node FROM aamm.tombstone t, aamm.version_of(t.xmin) v
  WHERE t.relation OPERATOR(pg_catalog.=) rel AND t.key OPERATOR(pg_catalog.=) k $f$;
-- remote INSERT of a key that is not present: refused iff a newer delete is known
CREATE OR REPLACE FUNCTION aamm.insert_ok(rel text, k jsonb, rts timestamptz, rnode int,
  rrow jsonb, policy text) RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE tts timestamptz; tnode int; res text;
BEGIN
  SELECT v.ts, v.node INTO tts, tnode FROM aamm.tomb_version(rel, k) v;
  IF tts IS NOT NULL AND (policy = 'callback' OR pg_catalog.starts_with(policy, 'verdict:'))
  THEN
    res := aamm.resolve_cb('insert_exists', k, NULL, tts, tnode, NULL, rrow, policy);
    PERFORM aamm.log_conflict('insert_exists', rel, k, NULL, rrow, tts, tnode, rts, rnode,
      res);
    RETURN res IN ('apply_remote', 'merged');
  END IF;
  IF tts IS NULL OR policy = 'apply_remote' OR aamm.newer(rts, rnode, tts, tnode) THEN
    RETURN true;
  END IF;
  IF policy = 'error' THEN
    RAISE EXCEPTION 'aamm: insert_exists conflict (deleted) on % key % (policy error)',
      rel, k USING ERRCODE = 'AA001';
  END IF;
  PERFORM aamm.log_conflict('insert_exists', rel, k, NULL, rrow, tts, tnode, rts, rnode,
    'keep_local');
  RETURN false;
END $f$;
-- remote UPDATE found no row: insert it unless a newer delete is known or the update lacks
-- unchanged-TOAST values
CREATE OR REPLACE FUNCTION aamm.update_missing(rel text, k jsonb, rts timestamptz,
  rnode int, rrow jsonb, has_u boolean, policy text) RETURNS boolean
  LANGUAGE plpgsql AS $f$
DECLARE tts timestamptz; tnode int; res text;
BEGIN
  SELECT v.ts, v.node INTO tts, tnode FROM aamm.tomb_version(rel, k) v;
  IF aamm.newer(tts, tnode, rts, rnode) THEN res := 'skip';
  ELSIF policy = 'error' THEN
    RAISE EXCEPTION 'aamm: update_missing conflict on % key % (policy error)', rel, k
      USING ERRCODE = 'AA001';
  ELSIF has_u OR policy = 'keep_local' THEN res := 'skip';
  ELSIF policy = 'callback' OR pg_catalog.starts_with(policy, 'verdict:') THEN
    res := aamm.resolve_cb('update_missing', k, NULL, tts, tnode, NULL, rrow, policy);
    IF res = 'keep_local' THEN res := 'skip'; END IF;
  ELSE res := 'apply_remote';
  END IF;
  PERFORM aamm.log_conflict('update_missing', rel, k, NULL, rrow, tts, tnode, rts, rnode,
    res);
  RETURN res IN ('apply_remote', 'merged');
END $f$;
-- remote DELETE found no row: log, and remember the delete (it may overtake the insert or
-- an update from a third node)
CREATE OR REPLACE FUNCTION aamm.delete_missing(rel text, k jsonb, rts timestamptz,
  rnode int, rrow jsonb) RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE tts timestamptz; tnode int;
BEGIN
  SELECT v.ts, v.node INTO tts, tnode FROM aamm.tomb_version(rel, k) v;
  PERFORM aamm.log_conflict('delete_missing', rel, k, NULL, rrow, tts, tnode, rts, rnode,
    'skip');
  PERFORM aamm.put_tombstone(rel, k, rts, rnode);
  RETURN false;
END $f$;
-- the slow path of a row change whose fast statement wrote nothing (lib/apply.c,
-- build_sql()): the whole statement @q with every check and decision, run as a statement of
-- its own (fresh snapshot) with the change's parameters; @q2, when given, runs when @q
-- changed no row (an UPDATE's update_missing INSERT)
DROP FUNCTION IF EXISTS aamm.update_missing_exec(text, text[]);
CREATE OR REPLACE FUNCTION aamm.apply_slow(q text, q2 text, p text[]) RETURNS boolean
  LANGUAGE plpgsql AS $f$
DECLARE n bigint;
BEGIN
  EXECUTE q USING p;
  IF q2 IS NOT NULL THEN
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
      EXECUTE q2 USING p;
    END IF;
  END IF;
  RETURN true;
END $f$;
CREATE OR REPLACE FUNCTION aamm.log_truncate(rel text, rts timestamptz, rnode int)
  RETURNS void LANGUAGE sql AS $f$
  SELECT aamm.log_conflict('truncate', rel, NULL, NULL, NULL, NULL, NULL, rts, rnode,
    'apply_remote') $f$;
CREATE OR REPLACE FUNCTION aamm.gc_tombstones(before timestamptz) RETURNS bigint
  LANGUAGE sql AS $f$
  WITH d AS (DELETE FROM aamm.tombstone t WHERE COALESCE(
    pg_catalog.pg_xact_commit_timestamp(t.xmin) OPERATOR(pg_catalog.<) before, true)
    RETURNING 1)
  SELECT pg_catalog.count(*) FROM d $f$;
REVOKE EXECUTE ON FUNCTION aamm.log_conflict(text, text, jsonb, jsonb, jsonb, timestamptz,
  int, timestamptz, int, text), aamm.put_tombstone(text, jsonb, timestamptz, int)
  FROM PUBLIC;
