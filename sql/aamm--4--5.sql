-- aamm--4--5.sql: libaamm's SQL schema from version 4 to version 5 (lib/node_schema.c runs
-- it; see aamm--1.sql for the rules every script follows and lib/sql_contract.h for the
-- names the library relies on). Every statement is idempotent.
--
-- The conflict log holds the conflicts that lost or kept a write against another
-- (doc/conflicts.md, "What is logged"). Until version 4 every remote UPDATE or DELETE of a
-- row another node wrote last was logged as update_origin_differs / delete_origin_differs,
-- also when the remote writer had seen that row (an ordinary update of another node's row,
-- no concurrency at all). From version 5:
-- - a decision that does not apply the remote write as it came (keep_local, merged), and
--   every insert_exists, is logged as before;
-- - a remote UPDATE or DELETE that is applied over another origin's row is logged only when
--   the change carries the remote old row (REPLICA IDENTITY FULL) and that old row differs
--   from the local row in a column both have: the remote writer had not seen our version,
--   so a concurrent write was overwritten. Otherwise it is not logged (without the old row
--   a concurrent write cannot be told apart; its losing side, on the other node, is logged).
-- Every decision still reaches the applier: a logged one as NOTICE 'aamm_conflict', one
-- that is not logged as NOTICE 'aamm_conflict_unlogged' with the same detail fields (the
-- rows left empty), so apply's counters count every decision by kind.
--
-- The nine-argument aamm.decide of version 1 stays as it was (a library older than version
-- 5 still calls it and logs every decision); this library calls the ten-argument one.

-- the fields of the conflict notices (lib/sql_contract.h): chr(31)-separated, the
-- relation last
CREATE OR REPLACE FUNCTION aamm.conflict_detail(kind text, rel text, k jsonb, lrow jsonb,
  rrow jsonb, lts timestamptz, lnode int, rts timestamptz, rnode int, res text)
  RETURNS text LANGUAGE sql STABLE AS $f$
  SELECT pg_catalog.concat_ws(chr(31), kind,
    COALESCE(k::text, ''), COALESCE(lrow::text, ''), COALESCE(rrow::text, ''),
    COALESCE((extract(epoch FROM lts) * 1000000)::int8::text, ''),
    COALESCE(lnode::text, ''),
    COALESCE((extract(epoch FROM rts) * 1000000)::int8::text, ''),
    COALESCE(rnode::text, ''), res, rel) $f$;
CREATE OR REPLACE FUNCTION aamm.log_conflict(kind text, rel text, k jsonb, lrow jsonb,
  rrow jsonb, lts timestamptz, lnode int, rts timestamptz, rnode int, res text)
  RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  INSERT INTO aamm.conflict_log (kind, relation, key, local_row, remote_row, local_time,
    local_node, remote_time, remote_node, resolution)
  VALUES (kind, rel, k, lrow, rrow, lts, lnode, rts, rnode, res);
-- the applier learns of the conflict from this notice (lib/apply_pipe.c,
-- aamm__apply_on_notice())
  RAISE NOTICE USING MESSAGE = 'aamm_conflict', DETAIL = aamm.conflict_detail(kind, rel, k,
    lrow, rrow, lts, lnode, rts, rnode, res);
END $f$;
-- whether the remote writer had seen the local row: every column of its old row @orow that
-- the local row @lrow has holds the same value (JSON equality of the typed values;
-- unchanged-TOAST values are not in @orow). NULL @orow: unknown, false.
CREATE OR REPLACE FUNCTION aamm.old_row_matches(orow jsonb, lrow jsonb) RETURNS boolean
  LANGUAGE sql IMMUTABLE AS $f$
  SELECT orow IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM pg_catalog.jsonb_each(orow) o
    WHERE lrow OPERATOR(pg_catalog.?) o.key
      AND (lrow OPERATOR(pg_catalog.->) o.key) IS DISTINCT FROM o.value) $f$;
-- the decision for a remote write that found a local row (doc/conflicts.md); kind is
-- insert_exists, update_origin_differs or delete_origin_differs; @orow: the remote old row
-- (REPLICA IDENTITY FULL) as JSON, or NULL
CREATE OR REPLACE FUNCTION aamm.decide(kind text, rel text, k jsonb, lxmin xid,
  lrow jsonb, rrow jsonb, rts timestamptz, rnode int, policy text, orow jsonb)
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
  -- a remote UPDATE/DELETE applied over a row whose version its writer saw, or could have
  -- seen (no old row): counted, not logged
  IF res = 'apply_remote' AND kind <> 'insert_exists'
     AND (orow IS NULL OR aamm.old_row_matches(orow, lrow)) THEN
    RAISE NOTICE USING MESSAGE = 'aamm_conflict_unlogged', DETAIL = aamm.conflict_detail(kind,
      rel, k, NULL, NULL, lts, lnode, rts, rnode, res);
  ELSE
    PERFORM aamm.log_conflict(kind, rel, k, lrow, rrow, lts, lnode, rts, rnode, res);
  END IF;
  RETURN res IN ('apply_remote', 'merged');
END $f$;
