-- aamm--1--2.sql: libaamm's SQL schema from version 1 to version 2 (lib/node_schema.c
-- runs it; see aamm--1.sql for the rules every script follows and lib/sql_contract.h for
-- the names apply relies on). Every statement is idempotent, so that a node whose objects
-- were already partly at version 2 when it still recorded version 1 upgrades too.
--
-- 1. The SQL generators of the seq component (until version 2 a separate, unversioned
--    install by aamm_seq_install(); its node-local row in aamm.seq_config stays that
--    call's). Advisory lock keys: (1633774957 = 'aamm', 1) snowflake, (..., 2) UUIDv7,
--    (..., hashtext(seqname)) galloc values, (1633774958, hashtext(seqname)) galloc
--    supply; (1633774957, 0) is the installer's (lib/sql_contract.h). The state of each
--    generator lives in a native sequence, never in a row (doc/sequences.md: a row would
--    serialize every inserting transaction); aamm.seq_clock_ms() is their clock, which
--    tests replace. Function bodies are the same on every node: the node id is read from
--    aamm.seq_config at each call.

CREATE SCHEMA IF NOT EXISTS aamm;
GRANT USAGE ON SCHEMA aamm TO PUBLIC;
CREATE TABLE IF NOT EXISTS aamm.seq_config (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  node_id integer NOT NULL CHECK (node_id BETWEEN 0 AND 1023),
  epoch_ms bigint NOT NULL);
COMMENT ON TABLE aamm.seq_config IS 'libaamm: this node''s snowflake node id (node-local, never replicated)';
CREATE SEQUENCE IF NOT EXISTS aamm.snowflake_state MINVALUE -1 START -1;
CREATE SEQUENCE IF NOT EXISTS aamm.uuid_v7_state MINVALUE -1 START -1;
CREATE TABLE IF NOT EXISTS aamm.galloc_range (
  seqname text NOT NULL,
  range_start bigint NOT NULL,
  range_end bigint NOT NULL,
  supplied_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (seqname, range_start),
  CHECK (range_start >= 0 AND range_end > range_start));
COMMENT ON TABLE aamm.galloc_range IS 'libaamm: galloc ranges [start, end) reserved for this node through consensus (node-local)';

CREATE OR REPLACE FUNCTION aamm.seq_clock_ms() RETURNS bigint
LANGUAGE sql VOLATILE AS
$f$ SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint $f$;

-- snowflake: bits 62..22 ms since epoch_ms, 21..12 node, 11 source (1 = SQL), 10..0
-- counter; the sequence holds the last id issued.
CREATE OR REPLACE FUNCTION aamm.snowflake_nextval(seqname text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS
$f$
DECLARE
  node integer; ep bigint; base bigint; now_ms bigint; cand bigint;
  n bigint; s bigint; nxt bigint;
  locked boolean := false;
BEGIN
  IF seqname IS NULL THEN
    RAISE EXCEPTION 'aamm.snowflake_nextval: sequence name is NULL';
  END IF;
  SELECT c.node_id, c.epoch_ms INTO node, ep FROM aamm.seq_config c;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'aamm.snowflake_nextval: this node has no node id'
      USING HINT = 'the host must run aamm_seq_install() on this node';
  END IF;
  base := (node::bigint << 12) | 2048;
  BEGIN
    locked := pg_advisory_lock(1633774957, 1)::text = '';
    now_ms := greatest(aamm.seq_clock_ms() - ep, 0);
    IF now_ms >= 2199023255552 THEN
      RAISE EXCEPTION 'aamm.snowflake_nextval: the clock is past the 41-bit time range (2093)';
    END IF;
    cand := (now_ms << 22) | base;
    n := nextval('aamm.snowflake_state');
    s := n - 1;
    IF s < 0 THEN
      nxt := cand;
    ELSIF (s & 2047) <> 2047 AND (s & 4192256) = base THEN
      nxt := greatest(s + 1, cand);
    ELSIF (s >> 22) + 1 >= 2199023255552 THEN
      RAISE EXCEPTION 'aamm.snowflake_nextval: time part past 2^41 ms (year 2093)';
    ELSE
      nxt := greatest((((s >> 22) + 1) << 22) | base, cand);
    END IF;
    IF (nxt >> 22) >= 2199023255552 THEN
      RAISE EXCEPTION 'aamm.snowflake_nextval: time part past 2^41 ms (year 2093)';
    END IF;
    IF nxt <> n THEN
      PERFORM setval('aamm.snowflake_state', nxt);
    END IF;
    PERFORM pg_advisory_unlock(1633774957, 1);
  EXCEPTION WHEN OTHERS OR query_canceled THEN
    IF locked THEN
      PERFORM pg_advisory_unlock(1633774957, 1);
    END IF;
    RAISE;
  END;
  RETURN nxt;
END
$f$;

-- UUIDv7: the sequence holds ms << 12 | 12-bit counter (rand_a) of the last UUID.
CREATE OR REPLACE FUNCTION aamm.uuid_v7() RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS
$f$
DECLARE
  r text; seed bigint; now_ms bigint; n bigint; s bigint; v bigint; t text;
  locked boolean := false;
BEGIN
  r := gen_random_uuid()::text;
  seed := ('x' || substr(r, 1, 3))::bit(12)::bigint & 2047;
  BEGIN
    locked := pg_advisory_lock(1633774957, 2)::text = '';
    now_ms := greatest(aamm.seq_clock_ms(), 0);
    n := nextval('aamm.uuid_v7_state');
    s := n - 1;
    IF s >= 0 AND (s >> 12) >= now_ms THEN
      v := s + 1;
    ELSE
      v := (now_ms << 12) | seed;
    END IF;
    IF (v >> 12) >= 281474976710656 THEN
      RAISE EXCEPTION 'aamm.uuid_v7: timestamp past 48 bits';
    END IF;
    IF v <> n THEN
      PERFORM setval('aamm.uuid_v7_state', v);
    END IF;
    PERFORM pg_advisory_unlock(1633774957, 2);
  EXCEPTION WHEN OTHERS OR query_canceled THEN
    IF locked THEN
      PERFORM pg_advisory_unlock(1633774957, 2);
    END IF;
    RAISE;
  END;
  t := lpad(to_hex(v >> 12), 12, '0');
  RETURN (substr(t, 1, 8) || '-' || substr(t, 9, 4) || '-7' ||
          lpad(to_hex(v & 4095), 3, '0') || '-' || substr(r, 20))::uuid;
END
$f$;

-- galloc: per sequence name a native sequence aamm.galloc_<md5(name)> holding the last
-- value issued; ranges in aamm.galloc_range.
CREATE OR REPLACE FUNCTION aamm.galloc_nextval(seqname text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS
$f$
DECLARE
  rel regclass; n bigint; v bigint; rs bigint; issued bigint;
  locked boolean := false;
BEGIN
  IF seqname IS NULL THEN
    RAISE EXCEPTION 'aamm.galloc_nextval: sequence name is NULL';
  END IF;
  rel := to_regclass('aamm.' || quote_ident('galloc_' || md5(seqname)));
  IF rel IS NULL THEN
    RAISE EXCEPTION 'aamm.galloc_nextval: galloc sequence "%" has no range on this node', seqname
      USING ERRCODE = '2200H',
            HINT = 'the host must supply ranges agreed through consensus (aamm_galloc_supply_node)';
  END IF;
  BEGIN
    locked := pg_advisory_lock(1633774957, hashtext(seqname))::text = '';
    n := nextval(rel);
    SELECT g.range_start INTO rs FROM aamm.galloc_range g
      WHERE g.seqname = galloc_nextval.seqname AND g.range_end > n
      ORDER BY g.range_start LIMIT 1;
    IF NOT FOUND THEN
      PERFORM setval(rel, greatest(n - 1, -1), n - 1 >= 0);
      SELECT count(*) INTO issued FROM aamm.galloc_range g WHERE g.seqname = galloc_nextval.seqname;
      RAISE EXCEPTION 'aamm.galloc_nextval: galloc sequence "%" has no values left on this node (% supplied ranges used up)', seqname, issued
        USING ERRCODE = '2200H',
              HINT = 'the host must supply the next range agreed through consensus (aamm_galloc_supply_node); a node that cannot reach a majority gets none';
    END IF;
    IF rs <= n THEN
      v := n;
    ELSE
      v := rs;
      PERFORM setval(rel, v);
    END IF;
    PERFORM pg_advisory_unlock(1633774957, hashtext(seqname));
  EXCEPTION WHEN OTHERS OR query_canceled THEN
    IF locked THEN
      PERFORM pg_advisory_unlock(1633774957, hashtext(seqname));
    END IF;
    RAISE;
  END;
  RETURN v;
END
$f$;

CREATE OR REPLACE FUNCTION aamm.galloc_remaining(seqname text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS
$f$
DECLARE
  rel regclass; s bigint;
BEGIN
  rel := to_regclass('aamm.' || quote_ident('galloc_' || md5(seqname)));
  IF rel IS NULL THEN
    RETURN 0;
  END IF;
  s := coalesce(pg_sequence_last_value(rel), -1);
  RETURN coalesce((SELECT sum(g.range_end - greatest(g.range_start, s + 1))
                   FROM aamm.galloc_range g
                   WHERE g.seqname = galloc_remaining.seqname AND g.range_end > s + 1), 0);
END
$f$;

CREATE OR REPLACE FUNCTION aamm.galloc_supply(seqname text, range_start bigint, range_end bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS
$f$
DECLARE
  relname text := 'galloc_' || md5(seqname);
BEGIN
  IF seqname IS NULL OR range_start IS NULL OR range_end IS NULL
     OR range_start < 0 OR range_end <= range_start THEN
    RAISE EXCEPTION 'aamm.galloc_supply: invalid range [%, %) for "%"', range_start, range_end, seqname;
  END IF;
  PERFORM pg_advisory_xact_lock(1633774958, hashtext(seqname));
  IF EXISTS (SELECT 1 FROM aamm.galloc_range g WHERE g.seqname = galloc_supply.seqname
             AND g.range_start = galloc_supply.range_start AND g.range_end = galloc_supply.range_end) THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM aamm.galloc_range g WHERE g.seqname = galloc_supply.seqname
             AND g.range_start < galloc_supply.range_end AND galloc_supply.range_start < g.range_end) THEN
    RAISE EXCEPTION 'aamm.galloc_supply: range [%, %) of "%" overlaps a range already supplied', range_start, range_end, seqname;
  END IF;
  IF to_regclass('aamm.' || quote_ident(relname)) IS NULL THEN
    EXECUTE format('CREATE SEQUENCE aamm.%I MINVALUE -1 START -1', relname);
  END IF;
  INSERT INTO aamm.galloc_range (seqname, range_start, range_end)
    VALUES (galloc_supply.seqname, galloc_supply.range_start, galloc_supply.range_end);
END
$f$;
REVOKE ALL ON FUNCTION aamm.galloc_supply(text, bigint, bigint) FROM PUBLIC;

-- 2. Relation labels that are unambiguous (issue 9), and old tombstones relabelled.
-- A relation's label, which keys tombstones, apply's advisory locks and the conflict log:
-- schema and name each bare when they are plain lower-case identifiers, else double-quoted
-- with quotes doubled, joined by a dot. Unambiguous ("a.b".c is not a."b.c"), and plain
-- names read as before. lib/apply.c (rel_label()) builds the same text.
CREATE OR REPLACE FUNCTION aamm.label_part(s text) RETURNS text LANGUAGE sql IMMUTABLE
  AS $f$ SELECT CASE WHEN s OPERATOR(pg_catalog.~) '^[a-z_][a-z0-9_]*$' THEN s
  ELSE '"' OPERATOR(pg_catalog.||) pg_catalog.replace(s, '"', '""')
    OPERATOR(pg_catalog.||) '"' END $f$;
CREATE OR REPLACE FUNCTION aamm.rel_label(schema text, name text) RETURNS text
  LANGUAGE sql IMMUTABLE AS $f$ SELECT aamm.label_part(schema) OPERATOR(pg_catalog.||)
  '.' OPERATOR(pg_catalog.||) aamm.label_part(name) $f$;
-- tombstones written under the earlier, ambiguous labels (schema.name unquoted): read as
-- split at the first dot
UPDATE aamm.tombstone SET relation = aamm.rel_label(pg_catalog.split_part(relation, '.', 1),
  pg_catalog.substr(relation, pg_catalog.strpos(relation, '.') + 1))
  WHERE relation OPERATOR(pg_catalog.<>) aamm.rel_label(
    pg_catalog.split_part(relation, '.', 1),
    pg_catalog.substr(relation, pg_catalog.strpos(relation, '.') + 1))
  AND pg_catalog.left(relation, 1) OPERATOR(pg_catalog.<>) '"'
  AND pg_catalog.strpos(relation, '"') OPERATOR(pg_catalog.=) 0;
-- the tombstone trigger labels its relation so
CREATE OR REPLACE FUNCTION aamm.tombstone_trigger() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE o jsonb := to_jsonb(OLD); k jsonb;
BEGIN
  SELECT jsonb_agg(o -> u.a ORDER BY u.i) INTO k
  FROM unnest(TG_ARGV) WITH ORDINALITY AS u(a, i);
  INSERT INTO aamm.tombstone VALUES (aamm.rel_label(TG_TABLE_SCHEMA, TG_TABLE_NAME), k)
  ON CONFLICT (relation, key) DO UPDATE SET relation = EXCLUDED.relation;
  RETURN NULL;
END $f$;

-- 3. The apply role's narrowed reach (doc/security.md): aamm.origin_session becomes
--    SECURITY DEFINER and accepts the origins aamm_from_<n> only.
-- the apply session's origin (created when missing): SECURITY DEFINER, so that the apply
-- role needs no grant on pg_replication_origin_create/_session_setup, which would let it
-- take up any origin (a native subscription's too); it may take up only the origins named
-- aamm_from_<node id> (doc/security.md)
CREATE OR REPLACE FUNCTION aamm.origin_session(origin text, OUT progress pg_lsn,
  OUT roident oid) LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
  AS $f$
BEGIN
  IF origin IS NULL OR origin OPERATOR(pg_catalog.!~) '^aamm_from_[0-9]+$' THEN
    RAISE EXCEPTION 'aamm: % is not the origin of a peer (aamm_from_<node id>)',
      origin USING ERRCODE = '42501';
  END IF;
  IF pg_catalog.pg_replication_origin_oid(origin) IS NULL THEN
    PERFORM pg_catalog.pg_replication_origin_create(origin);
  END IF;
  PERFORM pg_catalog.pg_replication_origin_session_setup(origin);
  progress := COALESCE(
    pg_catalog.pg_replication_origin_progress(origin, false), '0/0');
  roident := pg_catalog.pg_replication_origin_oid(origin);
END $f$;

-- 4. A remote write that raced a local writer is retried (AA006, issue 9 section 5).
-- After a remote write inserted rows with the keys @keys (lib/apply.c, sb_recheck()): a
-- tombstone for one of them that the write's own decision would have acted on, had it seen
-- it, can only be one committed after the write's snapshot was taken: a local transaction
-- deleted the row and the insert waited for it (ON CONFLICT, or the unique check, waits for
-- the deleter, then inserts once the row is gone). Raise AA006 (transient): the transaction
-- is retried, and its decision sees the delete. A VOLATILE function: its query runs under a
-- snapshot of its own, taken now. @upd: the rule of update_missing (a newer delete wins,
-- whatever the policy), else insert_ok's.
CREATE OR REPLACE FUNCTION aamm.recheck_tombs(rel text, keys jsonb[], rts timestamptz,
  rnode int, policy text, upd boolean) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$
DECLARE k jsonb;
BEGIN
  IF keys IS NULL OR (NOT upd AND (policy = 'apply_remote'
      OR pg_catalog.starts_with(policy, 'verdict:'))) THEN
    RETURN true;
  END IF;
  SELECT t.key INTO k FROM aamm.tombstone t, aamm.version_of(t.xmin) v
  WHERE t.relation OPERATOR(pg_catalog.=) rel AND t.key OPERATOR(pg_catalog.=) ANY (keys)
    AND v.ts IS NOT NULL AND CASE WHEN upd THEN aamm.newer(v.ts, v.node, rts, rnode)
      ELSE policy = 'callback' OR NOT aamm.newer(rts, rnode, v.ts, v.node) END
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'aamm: % key % was deleted by a concurrent transaction while the '
      'remote write waited for it', rel, k USING ERRCODE = 'AA006';
  END IF;
  RETURN true;
END $f$;
-- update_missing's INSERT met a key that its checks did not see (a concurrent insert,
-- committed after the statement's snapshot): retry, so that the update is decided against
-- that row (lib/apply.c, build_full())
CREATE OR REPLACE FUNCTION aamm.write_raced(rel text, k jsonb) RETURNS boolean
  LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'aamm: % key % was written by a concurrent transaction while the '
    'remote write waited for it', rel, k USING ERRCODE = 'AA006';
END $f$;

REVOKE EXECUTE ON FUNCTION aamm.origin_session(text) FROM PUBLIC;
