/* node.c: node setup: apply's SQL objects in schema aamm, the apply role, replicated tables,
 * tombstone collection. Blocking calls on a host-provided connection. */
#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>
#include <openssl/crypto.h>

#include <aamm/node.h>

#include "internal.h"

/* ====================================================================================
 * The SQL objects. Everything lives in schema aamm; nothing here is ever published.
 * Invoker-rights functions are called by apply's role; the two SECURITY DEFINER ones
 * (conflict log, tombstone writes) let it log and remember deletes without write grants
 * on aamm's tables. Keep this text in step with doc/conflicts.md and lib/conflict.c.
 * ==================================================================================== */

static const char install_sql[] =
    "CREATE SCHEMA IF NOT EXISTS aamm;\n"
    "CREATE TABLE IF NOT EXISTS aamm.apply_meta (version int NOT NULL);\n"
    "CREATE TABLE IF NOT EXISTS aamm.conflict_log (\n"
    "  id bigserial PRIMARY KEY,\n"
    "  logged_at timestamptz NOT NULL DEFAULT now(),\n"
    "  xid xid8 DEFAULT pg_current_xact_id(),\n"
    "  kind text NOT NULL, relation text NOT NULL, key jsonb,\n"
    "  local_row jsonb, remote_row jsonb,\n"
    "  local_time timestamptz, local_node int, remote_time timestamptz, remote_node int,\n"
    "  resolution text NOT NULL);\n"
    /* earlier versions: an index for a per-transaction conflict query (conflicts now reach
     * the applier as notices), decision functions with a key-lock argument (the guard
     * statement takes the locks now) */
    "DROP INDEX IF EXISTS aamm.conflict_log_xid;\n"
    "DROP FUNCTION IF EXISTS aamm.decide(text, text, jsonb, xid, jsonb, jsonb, timestamptz, int,\n"
    "  text, boolean);\n"
    "DROP FUNCTION IF EXISTS aamm.insert_ok(text, jsonb, timestamptz, int, jsonb, text, boolean);\n"
    "DROP FUNCTION IF EXISTS aamm.update_missing(text, jsonb, timestamptz, int, jsonb, boolean,\n"
    "  text, boolean);\n"
    "DROP FUNCTION IF EXISTS aamm.delete_missing(text, jsonb, timestamptz, int, jsonb, boolean);\n"
    "DROP FUNCTION IF EXISTS aamm.decide(text, text, jsonb, xid, jsonb, jsonb, timestamptz, int,\n"
    "  text, bigint);\n"
    "DROP FUNCTION IF EXISTS aamm.insert_ok(text, jsonb, timestamptz, int, jsonb, text, bigint);\n"
    "DROP FUNCTION IF EXISTS aamm.update_missing(text, jsonb, timestamptz, int, jsonb, boolean,\n"
    "  text, bigint);\n"
    "DROP FUNCTION IF EXISTS aamm.delete_missing(text, jsonb, timestamptz, int, jsonb, bigint);\n"
    "CREATE TABLE IF NOT EXISTS aamm.tombstone (relation text NOT NULL, key jsonb NOT NULL,\n"
    "  PRIMARY KEY (relation, key));\n"
    /* node id of a replication origin id: 0 = this node (the apply session sets
     * aamm.node_id), aamm_from_<n> = node n, anything else unknown (NULL) */
    /* PL/pgSQL, not SQL: a SQL function that cannot be inlined is parsed again at every
     * call, PL/pgSQL keeps its plans for the session */
    "DROP FUNCTION IF EXISTS aamm.node_of(oid) CASCADE;\n"
    "CREATE FUNCTION aamm.node_of(r oid) RETURNS int LANGUAGE plpgsql STABLE AS $f$\n"
    "BEGIN\n"
    "  IF r = 0 THEN\n"
    "    RETURN NULLIF(pg_catalog.current_setting('aamm.node_id', true), '')::int;\n"
    "  END IF;\n"
    "  RETURN (SELECT CASE WHEN o.roname OPERATOR(pg_catalog.~) '^aamm_from_[0-9]+$'\n"
    "          THEN pg_catalog.substr(o.roname, 11)::int END\n"
    "          FROM pg_catalog.pg_replication_origin o WHERE o.roident = r);\n"
    "END $f$;\n"
    /* the version (commit timestamp, origin node) of the transaction @x; a one-row set
     * so that a call in FROM is inlined into the caller's plan */
    "DROP FUNCTION IF EXISTS aamm.version_of(xid) CASCADE;\n"
    "CREATE FUNCTION aamm.version_of(x xid) RETURNS TABLE (ts timestamptz, node int)\n"
    "  LANGUAGE sql STABLE ROWS 1 AS $f$\n"
    "  SELECT c.timestamp, aamm.node_of(c.roident)\n"
    "  FROM pg_catalog.pg_xact_commit_timestamp_origin(x) c $f$;\n"
    /* (ts1, n1) newer than (ts2, n2)? unknown (NULL ts) is oldest */
    "CREATE OR REPLACE FUNCTION aamm.newer(ts1 timestamptz, n1 int, ts2 timestamptz, n2 int)\n"
    "  RETURNS boolean LANGUAGE sql IMMUTABLE AS $f$\n"
    "  SELECT CASE WHEN ts1 IS NULL THEN false WHEN ts2 IS NULL THEN true\n"
    "    WHEN ts1 OPERATOR(pg_catalog.<>) ts2 THEN ts1 OPERATOR(pg_catalog.>) ts2\n"
    "    ELSE COALESCE(n1, 0) OPERATOR(pg_catalog.>) COALESCE(n2, 0)\n"
    "  END $f$;\n"
    "CREATE OR REPLACE FUNCTION aamm.log_conflict(kind text, rel text, k jsonb, lrow jsonb,\n"
    "  rrow jsonb, lts timestamptz, lnode int, rts timestamptz, rnode int, res text)\n"
    "  RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$\n"
    "BEGIN\n"
    "  INSERT INTO aamm.conflict_log (kind, relation, key, local_row, remote_row, local_time,\n"
    "    local_node, remote_time, remote_node, resolution)\n"
    "  VALUES (kind, rel, k, lrow, rrow, lts, lnode, rts, rnode, res);\n"
    /* the applier learns of the conflict from this notice (lib/apply.c, on_notice()):
     * fields separated by chr(31), which JSON text never holds raw; the relation last */
    "  RAISE NOTICE USING MESSAGE = 'aamm_conflict', DETAIL = concat_ws(chr(31), kind,\n"
    "    COALESCE(k::text, ''), COALESCE(lrow::text, ''), COALESCE(rrow::text, ''),\n"
    "    COALESCE((extract(epoch FROM lts) * 1000000)::int8::text, ''),\n"
    "    COALESCE(lnode::text, ''),\n"
    "    COALESCE((extract(epoch FROM rts) * 1000000)::int8::text, ''),\n"
    "    COALESCE(rnode::text, ''), res, rel);\n"
    "END $f$;\n"
    /* remember a delete of @k done by the current transaction unless a newer one is known:
     * apply's remote deletes, key-changing updates (the old key) and deletes of absent rows
     * (the triggers below fire for local writers only: apply runs with
     * session_replication_role = replica, which spares every applied UPDATE their WHEN
     * clause). Returns true, so that a statement can call it in an expression. */
    "DO $d$ BEGIN\n"
    "  IF (SELECT prorettype = 'void'::regtype FROM pg_catalog.pg_proc WHERE oid =\n"
    "      to_regprocedure('aamm.put_tombstone(text, jsonb, timestamptz, int)')) THEN\n"
    "    DROP FUNCTION aamm.put_tombstone(text, jsonb, timestamptz, int);\n"
    "  END IF;\n"
    "END $d$;\n"
    "CREATE OR REPLACE FUNCTION aamm.put_tombstone(rel text, k jsonb, rts timestamptz,\n"
    "  rnode int) RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER\n"
    "  SET search_path = pg_catalog AS $f$\n"
    "BEGIN\n"
    "  INSERT INTO aamm.tombstone AS t VALUES (rel, k) ON CONFLICT (relation, key)\n"
    "  DO UPDATE SET relation = EXCLUDED.relation\n"
    "  WHERE NOT (SELECT aamm.newer(v.ts, v.node, rts, rnode) FROM aamm.version_of(t.xmin) v);\n"
    "  RETURN true;\n"
    "END $f$;\n"
    /* A relation's label, which keys tombstones, apply's advisory locks and the conflict
     * log: schema and name each bare when they are plain lower-case identifiers, else
     * double-quoted with quotes doubled, joined by a dot. Unambiguous ("a.b".c is not
     * a."b.c"), and plain names read as before. lib/apply.c (rel_label()) builds the same
     * text. */
    "CREATE OR REPLACE FUNCTION aamm.label_part(s text) RETURNS text LANGUAGE sql IMMUTABLE\n"
    "  AS $f$ SELECT CASE WHEN s OPERATOR(pg_catalog.~) '^[a-z_][a-z0-9_]*$' THEN s\n"
    "  ELSE '\"' OPERATOR(pg_catalog.||) pg_catalog.replace(s, '\"', '\"\"')\n"
    "    OPERATOR(pg_catalog.||) '\"' END $f$;\n"
    "CREATE OR REPLACE FUNCTION aamm.rel_label(schema text, name text) RETURNS text\n"
    "  LANGUAGE sql IMMUTABLE AS $f$ SELECT aamm.label_part(schema) OPERATOR(pg_catalog.||)\n"
    "  '.' OPERATOR(pg_catalog.||) aamm.label_part(name) $f$;\n"
    /* tombstones written under the earlier, ambiguous labels (schema.name unquoted): read
     * as split at the first dot */
    "UPDATE aamm.tombstone SET relation = aamm.rel_label(pg_catalog.split_part(relation, '.', 1),\n"
    "  pg_catalog.substr(relation, pg_catalog.strpos(relation, '.') + 1))\n"
    "  WHERE relation OPERATOR(pg_catalog.<>) aamm.rel_label(\n"
    "    pg_catalog.split_part(relation, '.', 1),\n"
    "    pg_catalog.substr(relation, pg_catalog.strpos(relation, '.') + 1))\n"
    "  AND pg_catalog.left(relation, 1) OPERATOR(pg_catalog.<>) '\"'\n"
    "  AND pg_catalog.strpos(relation, '\"') OPERATOR(pg_catalog.=) 0;\n"
    "CREATE OR REPLACE FUNCTION aamm.tombstone_trigger() RETURNS trigger LANGUAGE plpgsql\n"
    "  SECURITY DEFINER SET search_path = pg_catalog AS $f$\n"
    "DECLARE o jsonb := to_jsonb(OLD); k jsonb;\n"
    "BEGIN\n"
    "  SELECT jsonb_agg(o -> u.a ORDER BY u.i) INTO k\n"
    "  FROM unnest(TG_ARGV) WITH ORDINALITY AS u(a, i);\n"
    "  INSERT INTO aamm.tombstone VALUES (aamm.rel_label(TG_TABLE_SCHEMA, TG_TABLE_NAME), k)\n"
    "  ON CONFLICT (relation, key) DO UPDATE SET relation = EXCLUDED.relation;\n"
    "  RETURN NULL;\n"
    "END $f$;\n"
    /* the guard of a remote transaction is plain SQL in lib/apply.c (guard_sql); this
     * raises when it trips (pipelining must never commit transaction N+1 after N failed) */
    "DROP FUNCTION IF EXISTS aamm.begin_remote(text, pg_lsn, pg_lsn, timestamptz);\n"
    "CREATE OR REPLACE FUNCTION aamm.guard_failed(origin text, cur pg_lsn, prev pg_lsn)\n"
    "  RETURNS boolean LANGUAGE plpgsql AS $f$\n"
    "BEGIN\n"
    "  RAISE EXCEPTION 'aamm: origin % is at %, expected % (an earlier transaction did not "
    "commit)', origin, cur, prev USING ERRCODE = 'AA002';\n"
    "END $f$;\n"
    /* a merged statement's guard met a key lock another applier holds (lib/apply.c,
     * guard_fold_sql): its snapshot predates the lock, so it must not go on */
    "CREATE OR REPLACE FUNCTION aamm.key_lock_busy(id bigint) RETURNS text\n"
    "  LANGUAGE plpgsql AS $f$\n"
    "BEGIN\n"
    "  RAISE EXCEPTION 'aamm: key lock % is held by another applier', id\n"
    "    USING ERRCODE = 'AA005';\n"
    "END $f$;\n"
    /* the apply session's origin (created when missing): SECURITY DEFINER, so that the
     * apply role needs no grant on pg_replication_origin_create/_session_setup, which
     * would let it take up any origin (a native subscription's too); it may take up only
     * the origins named aamm_from_<node id> (doc/security.md) */
    "CREATE OR REPLACE FUNCTION aamm.origin_session(origin text, OUT progress pg_lsn,\n"
    "  OUT roident oid) LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog\n"
    "  AS $f$\n"
    "BEGIN\n"
    "  IF origin IS NULL OR origin OPERATOR(pg_catalog.!~) '^aamm_from_[0-9]+$' THEN\n"
    "    RAISE EXCEPTION 'aamm: % is not the origin of a peer (aamm_from_<node id>)',\n"
    "      origin USING ERRCODE = '42501';\n"
    "  END IF;\n"
    "  IF pg_catalog.pg_replication_origin_oid(origin) IS NULL THEN\n"
    "    PERFORM pg_catalog.pg_replication_origin_create(origin);\n"
    "  END IF;\n"
    "  PERFORM pg_catalog.pg_replication_origin_session_setup(origin);\n"
    "  progress := COALESCE(\n"
    "    pg_catalog.pg_replication_origin_progress(origin, false), '0/0');\n"
    "  roident := pg_catalog.pg_replication_origin_oid(origin);\n"
    "END $f$;\n"
    /* policy 'callback': stop the transaction and hand the conflict to the host's resolver
     * (AA004, fields in the detail separated by chr(31)); 'verdict:<res>:<xmin>': the
     * resolver's answer, valid while the local row is still version <xmin> ('*': any) */
    "CREATE OR REPLACE FUNCTION aamm.resolve_cb(kind text, k jsonb, lxmin text, lts timestamptz,\n"
    "  lnode int, lrow jsonb, rrow jsonb, policy text) RETURNS text LANGUAGE plpgsql AS $f$\n"
    "DECLARE v text[];\n"
    "BEGIN\n"
    "  IF pg_catalog.starts_with(policy, 'verdict:') THEN\n"
    "    v := pg_catalog.string_to_array(policy, ':');\n"
    "    IF v[3] = '*' OR v[3] = lxmin THEN RETURN v[2]; END IF;\n"
    "  END IF;\n"
    "  RAISE EXCEPTION USING ERRCODE = 'AA004',\n"
    "    MESSAGE = pg_catalog.format('aamm: %s conflict on key %s is for the resolver', kind, k),\n"
    "    DETAIL = pg_catalog.concat_ws(chr(31), kind, COALESCE(lxmin, ''),\n"
    "      COALESCE((extract(epoch FROM lts) * 1000000)::int8::text, ''), COALESCE(lnode::text, "
    "''),\n"
    "      COALESCE(k::text, ''), COALESCE(lrow::text, ''), COALESCE(rrow::text, ''));\n"
    "END $f$;\n"
    /* the decision for a remote write that found a local row (doc/conflicts.md);
     * kind is insert_exists, update_origin_differs or delete_origin_differs */
    "CREATE OR REPLACE FUNCTION aamm.decide(kind text, rel text, k jsonb, lxmin xid,\n"
    "  lrow jsonb, rrow jsonb, rts timestamptz, rnode int, policy text)\n"
    "  RETURNS boolean LANGUAGE plpgsql AS $f$\n"
    "DECLARE lts timestamptz; lnode int; res text;\n"
    "BEGIN\n"

    "  SELECT v.ts, v.node INTO lts, lnode FROM aamm.version_of(lxmin) v;\n"
    "  IF kind <> 'insert_exists' AND (lts IS NULL OR lnode IS NOT DISTINCT FROM rnode) THEN\n"
    "    RETURN true;\n"
    "  END IF;\n"
    "  res := CASE policy\n"
    "    WHEN 'lww' THEN CASE WHEN aamm.newer(rts, rnode, lts, lnode) THEN 'apply_remote'\n"
    "                    ELSE 'keep_local' END\n"
    "    WHEN 'keep_local' THEN 'keep_local' WHEN 'apply_remote' THEN 'apply_remote'\n"
    "    WHEN 'error' THEN 'error'\n"
    "    ELSE aamm.resolve_cb(kind, k, lxmin::text, lts, lnode, lrow, rrow, policy) END;\n"
    "  IF res = 'error' THEN\n"
    "    RAISE EXCEPTION 'aamm: % conflict on % key % (policy error)', kind, rel, k\n"
    "      USING ERRCODE = 'AA001';\n"
    "  END IF;\n"
    "  PERFORM aamm.log_conflict(kind, rel, k, lrow, rrow, lts, lnode, rts, rnode, res);\n"
    "  RETURN res IN ('apply_remote', 'merged');\n"
    "END $f$;\n"
    "DROP FUNCTION IF EXISTS aamm.tomb_version(text, jsonb) CASCADE;\n"
    "CREATE FUNCTION aamm.tomb_version(rel text, k jsonb) RETURNS TABLE (ts timestamptz,\n"
    "  node int) LANGUAGE sql STABLE ROWS 1 AS $f$\n"
    "  SELECT v.ts, v.node FROM aamm.tombstone t, aamm.version_of(t.xmin) v\n"
    "  WHERE t.relation OPERATOR(pg_catalog.=) rel AND t.key OPERATOR(pg_catalog.=) k $f$;\n"
    /* remote INSERT of a key that is not present: refused iff a newer delete is known */
    "CREATE OR REPLACE FUNCTION aamm.insert_ok(rel text, k jsonb, rts timestamptz, rnode int,\n"
    "  rrow jsonb, policy text) RETURNS boolean LANGUAGE plpgsql AS $f$\n"
    "DECLARE tts timestamptz; tnode int; res text;\n"
    "BEGIN\n"

    "  SELECT v.ts, v.node INTO tts, tnode FROM aamm.tomb_version(rel, k) v;\n"
    "  IF tts IS NOT NULL AND (policy = 'callback' OR pg_catalog.starts_with(policy, 'verdict:'))\n"
    "  THEN\n"
    "    res := aamm.resolve_cb('insert_exists', k, NULL, tts, tnode, NULL, rrow, policy);\n"
    "    PERFORM aamm.log_conflict('insert_exists', rel, k, NULL, rrow, tts, tnode, rts, rnode,\n"
    "      res);\n"
    "    RETURN res IN ('apply_remote', 'merged');\n"
    "  END IF;\n"
    "  IF tts IS NULL OR policy = 'apply_remote' OR aamm.newer(rts, rnode, tts, tnode) THEN\n"
    "    RETURN true;\n"
    "  END IF;\n"
    "  IF policy = 'error' THEN\n"
    "    RAISE EXCEPTION 'aamm: insert_exists conflict (deleted) on % key % (policy error)',\n"
    "      rel, k USING ERRCODE = 'AA001';\n"
    "  END IF;\n"
    "  PERFORM aamm.log_conflict('insert_exists', rel, k, NULL, rrow, tts, tnode, rts, rnode,\n"
    "    'keep_local');\n"
    "  RETURN false;\n"
    "END $f$;\n"
    /* After a remote write inserted rows with the keys @keys (lib/apply.c, sb_recheck()):
     * a tombstone for one of them that the write's own decision would have acted on, had
     * it seen it, can only be one committed after the write's snapshot was taken: a local
     * transaction deleted the row and the insert waited for it (ON CONFLICT, or the unique
     * check, waits for the deleter, then inserts once the row is gone). Raise AA006
     * (transient): the transaction is retried, and its decision sees the delete. A VOLATILE
     * function: its query runs under a snapshot of its own, taken now. @upd: the rule of
     * update_missing (a newer delete wins, whatever the policy), else insert_ok's. */
    "CREATE OR REPLACE FUNCTION aamm.recheck_tombs(rel text, keys jsonb[], rts timestamptz,\n"
    "  rnode int, policy text, upd boolean) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$\n"
    "DECLARE k jsonb;\n"
    "BEGIN\n"
    "  IF keys IS NULL OR (NOT upd AND (policy = 'apply_remote'\n"
    "      OR pg_catalog.starts_with(policy, 'verdict:'))) THEN\n"
    "    RETURN true;\n"
    "  END IF;\n"
    "  SELECT t.key INTO k FROM aamm.tombstone t, aamm.version_of(t.xmin) v\n"
    "  WHERE t.relation OPERATOR(pg_catalog.=) rel AND t.key OPERATOR(pg_catalog.=) ANY (keys)\n"
    "    AND v.ts IS NOT NULL AND CASE WHEN upd THEN aamm.newer(v.ts, v.node, rts, rnode)\n"
    "      ELSE policy = 'callback' OR NOT aamm.newer(rts, rnode, v.ts, v.node) END\n"
    "  LIMIT 1;\n"
    "  IF FOUND THEN\n"
    "    RAISE EXCEPTION 'aamm: % key % was deleted by a concurrent transaction while the '\n"
    "      'remote write waited for it', rel, k USING ERRCODE = 'AA006';\n"
    "  END IF;\n"
    "  RETURN true;\n"
    "END $f$;\n"
    /* update_missing's INSERT met a key that its checks did not see (a concurrent insert,
     * committed after the statement's snapshot): retry, so that the update is decided
     * against that row (lib/apply.c, build_full()) */
    "CREATE OR REPLACE FUNCTION aamm.write_raced(rel text, k jsonb) RETURNS boolean\n"
    "  LANGUAGE plpgsql AS $f$\n"
    "BEGIN\n"
    "  RAISE EXCEPTION 'aamm: % key % was written by a concurrent transaction while the '\n"
    "    'remote write waited for it', rel, k USING ERRCODE = 'AA006';\n"
    "END $f$;\n"
    /* remote UPDATE found no row: insert it unless a newer delete is known or the update
     * lacks unchanged-TOAST values */
    "CREATE OR REPLACE FUNCTION aamm.update_missing(rel text, k jsonb, rts timestamptz,\n"
    "  rnode int, rrow jsonb, has_u boolean, policy text) RETURNS boolean\n"
    "  LANGUAGE plpgsql AS $f$\n"
    "DECLARE tts timestamptz; tnode int; res text;\n"
    "BEGIN\n"

    "  SELECT v.ts, v.node INTO tts, tnode FROM aamm.tomb_version(rel, k) v;\n"
    "  IF aamm.newer(tts, tnode, rts, rnode) THEN res := 'skip';\n"
    "  ELSIF policy = 'error' THEN\n"
    "    RAISE EXCEPTION 'aamm: update_missing conflict on % key % (policy error)', rel, k\n"
    "      USING ERRCODE = 'AA001';\n"
    "  ELSIF has_u OR policy = 'keep_local' THEN res := 'skip';\n"
    "  ELSIF policy = 'callback' OR pg_catalog.starts_with(policy, 'verdict:') THEN\n"
    "    res := aamm.resolve_cb('update_missing', k, NULL, tts, tnode, NULL, rrow, policy);\n"
    "    IF res = 'keep_local' THEN res := 'skip'; END IF;\n"
    "  ELSE res := 'apply_remote';\n"
    "  END IF;\n"
    "  PERFORM aamm.log_conflict('update_missing', rel, k, NULL, rrow, tts, tnode, rts, rnode,\n"
    "    res);\n"
    "  RETURN res IN ('apply_remote', 'merged');\n"
    "END $f$;\n"
    /* remote DELETE found no row: log, and remember the delete (it may overtake the insert
     * or an update from a third node) */
    "CREATE OR REPLACE FUNCTION aamm.delete_missing(rel text, k jsonb, rts timestamptz,\n"
    "  rnode int, rrow jsonb) RETURNS boolean LANGUAGE plpgsql AS $f$\n"
    "DECLARE tts timestamptz; tnode int;\n"
    "BEGIN\n"

    "  SELECT v.ts, v.node INTO tts, tnode FROM aamm.tomb_version(rel, k) v;\n"
    "  PERFORM aamm.log_conflict('delete_missing', rel, k, NULL, rrow, tts, tnode, rts, rnode,\n"
    "    'skip');\n"
    "  PERFORM aamm.put_tombstone(rel, k, rts, rnode);\n"
    "  RETURN false;\n"
    "END $f$;\n"
    /* the slow path of a row change whose fast statement wrote nothing (lib/apply.c,
     * build_sql()): the whole statement @q with every check and decision, run as a
     * statement of its own (fresh snapshot) with the change's parameters; @q2, when
     * given, runs when @q changed no row (an UPDATE's update_missing INSERT) */
    "DROP FUNCTION IF EXISTS aamm.update_missing_exec(text, text[]);\n"
    "CREATE OR REPLACE FUNCTION aamm.apply_slow(q text, q2 text, p text[]) RETURNS boolean\n"
    "  LANGUAGE plpgsql AS $f$\n"
    "DECLARE n bigint;\n"
    "BEGIN\n"
    "  EXECUTE q USING p;\n"
    "  IF q2 IS NOT NULL THEN\n"
    "    GET DIAGNOSTICS n = ROW_COUNT;\n"
    "    IF n = 0 THEN\n"
    "      EXECUTE q2 USING p;\n"
    "    END IF;\n"
    "  END IF;\n"
    "  RETURN true;\n"
    "END $f$;\n"
    "CREATE OR REPLACE FUNCTION aamm.log_truncate(rel text, rts timestamptz, rnode int)\n"
    "  RETURNS void LANGUAGE sql AS $f$\n"
    "  SELECT aamm.log_conflict('truncate', rel, NULL, NULL, NULL, NULL, NULL, rts, rnode,\n"
    "    'apply_remote') $f$;\n"
    "CREATE OR REPLACE FUNCTION aamm.gc_tombstones(before timestamptz) RETURNS bigint\n"
    "  LANGUAGE sql AS $f$\n"
    "  WITH d AS (DELETE FROM aamm.tombstone t WHERE COALESCE(\n"
    "    pg_catalog.pg_xact_commit_timestamp(t.xmin) OPERATOR(pg_catalog.<) before, true)\n"
    "    RETURNING 1)\n"
    "  SELECT pg_catalog.count(*) FROM d $f$;\n"
    "REVOKE EXECUTE ON FUNCTION aamm.log_conflict(text, text, jsonb, jsonb, jsonb, timestamptz,\n"
    "  int, timestamptz, int, text), aamm.put_tombstone(text, jsonb, timestamptz, int),\n"
    "  aamm.origin_session(text)\n"
    "  FROM PUBLIC;\n"
    "DELETE FROM aamm.apply_meta;\n"
    "INSERT INTO aamm.apply_meta VALUES (1);\n";

/* ====================================================================================
 * Helpers
 * ==================================================================================== */

static int seterr(char *err, size_t errsize, int code, const char *fmt, ...) AAMM_PRINTF(4, 5);

static int seterr(char *err, size_t errsize, int code, const char *fmt, ...)
{
    if (err && errsize) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsize, fmt, ap);
        va_end(ap);
        size_t n = strlen(err);
        while (n && (err[n - 1] == '\n' || err[n - 1] == ' ')) /* libpq's trailing newline */
            err[--n] = '\0';
    }
    return code;
}

/* Run @sql (one or more statements, one implicit transaction) and check it. */
static int run(PGconn *conn, const char *what, const char *sql, char *err, size_t errsize)
{
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return seterr(err, errsize, AAMM_ECONN, "node: %s: not connected", what);
    PGresult *res = PQexec(conn, "SET client_min_messages = warning");
    PQclear(res);
    res = PQexec(conn, sql);
    int st = PQresultStatus(res);
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        rc = seterr(err, errsize, PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                    "node: %s: %s", what, PQerrorMessage(conn));
    }
    PQclear(res);
    return rc;
}

/* Append the SQL identifier @id, quoted, to the heap string *s (NULL on failure). */
static char *qident(const char *id)
{
    size_t n = strlen(id);
    char *out = aamm__malloc(2 * n + 3);
    if (!out)
        return NULL;
    char *p = out;
    *p++ = '"';
    for (const char *c = id; *c; c++) {
        if (*c == '"')
            *p++ = '"';
        *p++ = *c;
    }
    *p++ = '"';
    *p = '\0';
    return out;
}

static char *qliteral(const char *s)
{
    size_t n = strlen(s);
    char *out = aamm__malloc(2 * n + 3);
    if (!out)
        return NULL;
    char *p = out;
    *p++ = '\'';
    for (const char *c = s; *c; c++) {
        if (*c == '\'')
            *p++ = '\'';
        *p++ = *c;
    }
    *p++ = '\'';
    *p = '\0';
    return out;
}

/* ====================================================================================
 * Public API
 * ==================================================================================== */

int aamm_node_install(struct pg_conn *conn, char *err, size_t errsize)
{
    /* one transaction: a concurrent install on the same node waits instead of failing
     * half-way */
    char *sql = aamm__asprintf("BEGIN;\nSELECT pg_catalog.pg_advisory_xact_lock(4242001);\n"
                               "%sCOMMIT;\n",
                               install_sql);
    if (!sql)
        return seterr(err, errsize, AAMM_ENOMEM, "node: install: out of memory");
    int rc = run(conn, "install", sql, err, errsize);
    aamm__free(sql);
    if (rc < 0)
        run(conn, "rollback", "ROLLBACK", NULL, 0);
    return rc;
}

/* Overwrite @s (libpq's or ours, NUL-terminated; NULL accepted): it held a password
 * verifier. */
static void wipe(char *s)
{
    if (s)
        OPENSSL_cleanse(s, strlen(s));
}

int aamm_node_create_apply_role(struct pg_conn *conn, const char *role, const char *password,
                                char *err, size_t errsize)
{
    if (!role || !*role)
        return seterr(err, errsize, AAMM_EINVAL, "node: apply role: empty role name");
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return seterr(err, errsize, AAMM_ECONN, "node: apply role: not connected");

    /* 1. the name quoted by libpq (it knows the connection's encoding); the password hashed
     *    here into a SCRAM verifier, as psql's \password does: the server never sees the
     *    password, so no statement it logs (log_min_error_statement, log_statement) holds
     *    it. The verifier is not the secret, but it is kept out of the log where it can
     *    be (a failing script is logged whole) and wiped after use. */
    char *qr = PQescapeIdentifier(conn, role, strlen(role));
    if (!qr)
        return seterr(err, errsize, AAMM_EINVAL, "node: apply role: %s", PQerrorMessage(conn));
    char *verifier = NULL, *lv = NULL, *sql = NULL;
    int rc = 0;
    if (password) {
        verifier = PQencryptPasswordConn(conn, password, role, "scram-sha-256");
        if (verifier)
            lv = PQescapeLiteral(conn, verifier, strlen(verifier));
        if (!lv) {
            rc = seterr(err, errsize, AAMM_ENOMEM, "node: apply role: password: %s",
                        PQerrorMessage(conn));
            goto out;
        }
    }

    /* 2. one transaction, serialized with install: does the role exist? (a bound
     *    parameter: no literal to quote) */
    rc = run(conn, "apply role", "BEGIN; SELECT pg_catalog.pg_advisory_xact_lock(4242001)", err,
             errsize);
    if (rc < 0)
        goto fail;
    const char *pv[1] = {role};
    PGresult *res = PQexecParams(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1", 1,
                                 NULL, pv, NULL, NULL, 0);
    bool exists = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = seterr(err, errsize, PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                    "node: apply role: %s", PQerrorMessage(conn));
    PQclear(res);
    if (rc < 0)
        goto fail;

    /* 3. the attributes and exactly the grants apply needs (doc/security.md); what earlier
     *    versions granted beyond them is revoked, so that calling this again after an
     *    upgrade narrows an existing role */
    sql = aamm__asprintf(
        "%s%s%s"
        "ALTER ROLE %s LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION BYPASSRLS%s%s;\n"
        "GRANT SET ON PARAMETER session_replication_role TO %s;\n"
        "GRANT EXECUTE ON FUNCTION\n"
        "  pg_catalog.pg_replication_origin_xact_setup(pg_lsn, timestamptz),\n"
        "  pg_catalog.pg_replication_origin_xact_reset(),\n"
        "  pg_catalog.pg_replication_origin_progress(text, boolean) TO %s;\n"
        "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_create(text),\n"
        "  pg_catalog.pg_replication_origin_oid(text),\n"
        "  pg_catalog.pg_replication_origin_session_setup(text),\n"
        "  pg_catalog.pg_replication_origin_session_reset() FROM %s;\n"
        "GRANT USAGE ON SCHEMA aamm TO %s;\n"
        "GRANT SELECT ON aamm.tombstone TO %s;\n"
        "REVOKE SELECT ON aamm.conflict_log FROM %s;\n"
        "GRANT EXECUTE ON FUNCTION aamm.origin_session(text),\n"
        "  aamm.log_conflict(text, text, jsonb, jsonb, jsonb, timestamptz, int, timestamptz,\n"
        "  int, text),\n"
        "  aamm.put_tombstone(text, jsonb, timestamptz, int) TO %s;\n"
        "COMMIT;\n",
        exists ? "" : "CREATE ROLE ", exists ? "" : qr, exists ? "" : ";\n", qr,
        lv ? " PASSWORD " : "", lv ? lv : "", qr, qr, qr, qr, qr, qr, qr);
    if (!sql) {
        rc = seterr(err, errsize, AAMM_ENOMEM, "node: apply role: out of memory");
        goto fail;
    }
    rc = run(conn, "apply role", sql, err, errsize);
    if (rc == 0)
        goto out;
fail:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) /* no WARNING from a needless ROLLBACK */
        run(conn, "rollback", "ROLLBACK", NULL, 0);
out:
    wipe(sql);
    aamm__free(sql);
    wipe(lv);
    PQfreemem(lv);
    wipe(verifier);
    PQfreemem(verifier);
    PQfreemem(qr);
    return rc;
}

int aamm_node_replicate_table(struct pg_conn *conn, const char *schema, const char *table,
                              const char *apply_role, const char *publication, char *err,
                              size_t errsize)
{
    if (!schema || !table || !*schema || !*table)
        return seterr(err, errsize, AAMM_EINVAL, "node: replicate table: empty name");
    if (strcmp(schema, "aamm") == 0)
        return seterr(err, errsize, AAMM_EINVAL,
                      "node: replicate table: schema aamm holds libaamm's own tables and is "
                      "never replicated");
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return seterr(err, errsize, AAMM_ECONN, "node: replicate table: not connected");

    /* 1. the primary key columns, from the catalog */
    const char *params[2] = {schema, table};
    PGresult *res = PQexecParams(
        conn,
        "SELECT a.attname FROM pg_catalog.pg_class c\n"
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\n"
        "JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary\n"
        "JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true\n"
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum\n"
        "WHERE n.nspname = $1 AND c.relname = $2 ORDER BY k.ord",
        2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        int rc = seterr(err, errsize, AAMM_ESERVER, "node: replicate table %s.%s: %s", schema,
                        table, PQerrorMessage(conn));
        PQclear(res);
        return rc;
    }
    int nkeys = PQntuples(res);
    if (nkeys == 0) {
        PQclear(res);
        return seterr(err, errsize, AAMM_ENOTFOUND,
                      "node: replicate table %s.%s: no such table or it has no primary key", schema,
                      table);
    }

    /* 2. build the statements */
    char *qs = qident(schema), *qt = qident(table);
    char *tname = aamm__asprintf("aamm_tombstone");
    size_t cap = 256;
    for (int i = 0; i < nkeys; i++)
        cap += 8 * strlen(PQgetvalue(res, i, 0)) + 64;
    char *args = aamm__calloc(1, cap), *when = aamm__calloc(1, cap);
    char *sql = NULL;
    int rc = AAMM_ENOMEM;
    if (qs && qt && tname && args && when) {
        for (int i = 0; i < nkeys; i++) {
            char *lit = qliteral(PQgetvalue(res, i, 0));
            char *id = qident(PQgetvalue(res, i, 0));
            if (!lit || !id) {
                aamm__free(lit);
                aamm__free(id);
                goto out;
            }
            size_t al = strlen(args), wl = strlen(when);
            snprintf(args + al, cap - al, "%s%s", i ? ", " : "", lit);
            snprintf(when + wl, cap - wl, "%sOLD.%s IS DISTINCT FROM NEW.%s", i ? " OR " : "", id,
                     id);
            aamm__free(lit);
            aamm__free(id);
        }
        char *qrole = apply_role ? qident(apply_role) : NULL;
        char *qpub = publication ? qident(publication) : NULL;
        char *lpub = publication ? qliteral(publication) : NULL;
        if ((apply_role && !qrole) || (publication && (!qpub || !lpub))) {
            aamm__free(qrole);
            aamm__free(qpub);
            aamm__free(lpub);
            goto out;
        }
        char *grant = qrole ? aamm__asprintf("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON "
                                             "%s.%s TO %s;\n",
                                             qs, qt, qrole)
                            : aamm__strdup("");
        char *pub = NULL;
        char *ls = qliteral(schema), *lt = qliteral(table);
        if (qpub && ls && lt)
            pub = aamm__asprintf(
                "DO $d$ BEGIN\n"
                "  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s)\n"
                "  THEN EXECUTE pg_catalog.format('CREATE PUBLICATION %%I', %s); END IF;\n"
                "  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables WHERE\n"
                "    pubname = %s AND schemaname = %s AND tablename = %s) THEN\n"
                "    EXECUTE pg_catalog.format('ALTER PUBLICATION %%I ADD TABLE %%I.%%I', %s, %s, "
                "%s);\n"
                "  END IF;\n"
                "END $d$;\n",
                lpub, lpub, lpub, ls, lt, lpub, ls, lt);
        else if (!qpub)
            pub = aamm__strdup("");
        aamm__free(ls);
        aamm__free(lt);
        aamm__free(qrole);
        aamm__free(qpub);
        aamm__free(lpub);
        if (!grant || !pub) {
            aamm__free(grant);
            aamm__free(pub);
            goto out;
        }
        sql =
            aamm__asprintf("BEGIN;\n"
                           "DROP TRIGGER IF EXISTS aamm_tombstone_del ON %s.%s;\n"
                           "DROP TRIGGER IF EXISTS aamm_tombstone_upd ON %s.%s;\n"
                           "CREATE TRIGGER aamm_tombstone_del AFTER DELETE ON %s.%s FOR EACH ROW\n"
                           "  EXECUTE FUNCTION aamm.tombstone_trigger(%s);\n"
                           "CREATE TRIGGER aamm_tombstone_upd AFTER UPDATE ON %s.%s FOR EACH ROW\n"
                           "  WHEN (%s) EXECUTE FUNCTION aamm.tombstone_trigger(%s);\n"
                           "ALTER TABLE %s.%s REPLICA IDENTITY FULL;\n"
                           "%s%s"
                           "COMMIT;\n",
                           qs, qt, qs, qt, qs, qt, args, qs, qt, when, args, qs, qt, grant, pub);
        aamm__free(grant);
        aamm__free(pub);
        if (sql) {
            rc = run(conn, "replicate table", sql, err, errsize);
            if (rc < 0)
                run(conn, "rollback", "ROLLBACK", NULL, 0);
        }
    }
out:
    if (rc == AAMM_ENOMEM)
        seterr(err, errsize, rc, "node: replicate table: out of memory");
    PQclear(res);
    aamm__free(sql);
    aamm__free(qs);
    aamm__free(qt);
    aamm__free(tname);
    aamm__free(args);
    aamm__free(when);
    return rc;
}

int aamm_node_gc_tombstones(struct pg_conn *conn, int64_t before_us, uint64_t *removed, char *err,
                            size_t errsize)
{
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return seterr(err, errsize, AAMM_ECONN, "node: gc tombstones: not connected");
    char ts[64];
    aamm_time_format(before_us, ts, sizeof ts);
    const char *params[1] = {ts};
    PGresult *res = PQexecParams(conn, "SELECT aamm.gc_tombstones($1::timestamptz)", 1, NULL,
                                 params, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        rc = seterr(err, errsize, AAMM_ESERVER, "node: gc tombstones: %s", PQerrorMessage(conn));
    } else if (removed) {
        *removed = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
    }
    PQclear(res);
    return rc;
}
