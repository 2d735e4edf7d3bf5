-- aamm--3--4.sql: libaamm's SQL schema from version 3 to version 4 (lib/node_schema.c runs
-- it; see aamm--1.sql for the rules every script follows and lib/sql_contract.h for the
-- names the library relies on). Every statement is idempotent.
--
-- 1. DDL in the change stream (include/aamm/ddl.h, doc/ddl.md). On the origin an event
--    trigger (ddl_command_end) emits every replicated DDL statement as a transactional
--    logical message with prefix 'aamm_ddl' (lib/sql_contract.h), so it travels in commit
--    order with the data around it; a DDL command outside the allow-list is refused there
--    with an error that says how to run it on this node only. On a peer, apply runs the
--    message's statement at its place in the stream through aamm.apply_ddl(), as the role
--    that ran it on the origin (the apply role must be a member of that role: granting it
--    is the per-node opt-in, together with aamm.ddl_config.apply), never as a superuser.
--    Apply runs with session_replication_role = replica, which also keeps this trigger from
--    firing for the DDL it applies. Node-local DDL (an index on one node, REINDEX, VACUUM
--    FULL): SET aamm.replicate_ddl = off in that session first. Both sides are off until
--    the node turns them on (aamm_ddl_configure(), ddl.h): with capture on, every DDL
--    command outside the allow-list (GRANT, CREATE SCHEMA, COMMENT...) is refused unless
--    the session turned replication of its DDL off, and libaamm's own setup calls do so.

CREATE TABLE IF NOT EXISTS aamm.ddl_config (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  capture boolean NOT NULL DEFAULT false, -- send this node's DDL to its peers
  apply boolean NOT NULL DEFAULT false,   -- run DDL received from peers here
  allowed text[] NOT NULL DEFAULT ARRAY['CREATE TABLE', 'ALTER TABLE', 'DROP TABLE',
    'CREATE INDEX', 'ALTER INDEX', 'DROP INDEX', 'CREATE SEQUENCE', 'ALTER SEQUENCE',
    'DROP SEQUENCE', 'CREATE VIEW', 'ALTER VIEW', 'DROP VIEW', 'CREATE FUNCTION',
    'ALTER FUNCTION', 'DROP FUNCTION', 'CREATE TYPE', 'ALTER TYPE', 'DROP TYPE']);
INSERT INTO aamm.ddl_config DEFAULT VALUES ON CONFLICT DO NOTHING;
COMMENT ON TABLE aamm.ddl_config IS 'libaamm: DDL replication on this node (node-local, never replicated)';

CREATE TABLE IF NOT EXISTS aamm.ddl_log (
  id bigserial PRIMARY KEY,
  logged_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  origin_node int,
  role text,
  tags text[],
  command text NOT NULL,
  status text NOT NULL CHECK (status IN ('applied', 'skipped')),
  reason text);
COMMENT ON TABLE aamm.ddl_log IS 'libaamm: DDL received from peers, applied or skipped (node-local)';

-- Who may put DDL into the stream: a DDL message is trusted by the peers (they run it as
-- the role it names), so only aamm.ddl_emit() below may write one. pg_logical_emit_message
-- is therefore not every role's on a libaamm node (superusers keep it); markers, which
-- peers never run, go through aamm.emit_marker().
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC;

CREATE OR REPLACE FUNCTION aamm.ddl_settings() RETURNS aamm.ddl_config
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT c FROM aamm.ddl_config c $f$;

-- the origin side: one message per DDL statement (the statement text as the client sent
-- it, the search_path and role it ran with, the command tags). The tags come from
-- pg_event_trigger_ddl_commands(), which only an event trigger's execution can call, and
-- the role must be one the session's login may act as: nobody can make a peer run
-- something they could not run here.
CREATE OR REPLACE FUNCTION aamm.ddl_emit(r text, path text) RETURNS void
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  cfg aamm.ddl_config;
  tags text[];
  bad text[];
BEGIN
  SELECT * INTO cfg FROM aamm.ddl_config;
  IF NOT FOUND OR NOT cfg.capture THEN
    RETURN;
  END IF;
  -- libaamm's own objects and temporary ones never travel
  SELECT pg_catalog.array_agg(DISTINCT c.command_tag ORDER BY c.command_tag) INTO tags
    FROM pg_catalog.pg_event_trigger_ddl_commands() c
    WHERE c.schema_name IS DISTINCT FROM 'aamm' AND NOT c.in_extension
      AND COALESCE(c.schema_name, '') NOT LIKE 'pg\_temp%';
  IF tags IS NULL THEN
    RETURN;
  END IF;
  SELECT pg_catalog.array_agg(t) INTO bad FROM pg_catalog.unnest(tags) t
    WHERE t <> ALL (cfg.allowed);
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION 'aamm: % is not replicated to the other nodes', pg_catalog.array_to_string(bad, ', ')
      USING ERRCODE = 'AA007',
        HINT = 'Replicated DDL: ' || pg_catalog.array_to_string(cfg.allowed, ', ') ||
          '. To run this on this node only: SET aamm.replicate_ddl = off (aamm.ddl_config holds the list).';
  END IF;
  IF NOT pg_catalog.pg_has_role(session_user, r, 'MEMBER') THEN
    RAISE EXCEPTION 'aamm: DDL as role % from a session of %', r, session_user USING ERRCODE = '42501';
  END IF;
  PERFORM pg_catalog.pg_logical_emit_message(true, 'aamm_ddl',
    pg_catalog.jsonb_build_object('sql', pg_catalog.current_query(),
      'search_path', path, 'role', r, 'tags', tags)::text);
END $f$;

-- (no SET search_path here: the statement's own search_path is what travels; every name
-- below is qualified, and pg_catalog is always searched first)
CREATE OR REPLACE FUNCTION aamm.ddl_capture() RETURNS event_trigger
  LANGUAGE plpgsql AS $f$
BEGIN
  IF pg_catalog.current_setting('aamm.replicate_ddl', true) = 'off' THEN
    RETURN; -- node-local DDL, by the session's choice
  END IF;
  PERFORM aamm.ddl_emit(current_user::text, pg_catalog.current_setting('search_path'));
END $f$;

DROP EVENT TRIGGER IF EXISTS aamm_ddl_capture;
CREATE EVENT TRIGGER aamm_ddl_capture ON ddl_command_end EXECUTE FUNCTION aamm.ddl_capture();

-- a marker transaction's message (aamm_ddl_execute(): when every peer acknowledged it,
-- every peer has applied what this node committed before it); peers never run markers
CREATE OR REPLACE FUNCTION aamm.emit_marker(token text) RETURNS pg_lsn
  LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT pg_catalog.pg_logical_emit_message(true, 'aamm_marker', token) $f$;

-- the bookkeeping of the peer side (the apply role may not write aamm's tables itself)
CREATE OR REPLACE FUNCTION aamm.ddl_log_entry(onode int, r text, t text[], cmd text,
  st text, why text) RETURNS void
  LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $f$
  INSERT INTO aamm.ddl_log (origin_node, role, tags, command, status, reason)
  VALUES (onode, r, t, cmd, st, why) $f$;
REVOKE EXECUTE ON FUNCTION aamm.ddl_log_entry(int, text, text[], text, text, text) FROM PUBLIC;


-- the peer side: apply calls this (invoker's rights: the apply role) for each 'aamm_ddl'
-- message at its place in the transaction; the statement runs as the origin's role, with
-- the origin's search_path, and the session's search_path is '' again afterwards
CREATE OR REPLACE FUNCTION aamm.apply_ddl(msg text, onode int) RETURNS void
  LANGUAGE plpgsql AS $f$
DECLARE
  m jsonb := msg::jsonb;
  cfg aamm.ddl_config := aamm.ddl_settings();
  tags text[] := ARRAY(SELECT pg_catalog.jsonb_array_elements_text(m->'tags'));
  bad text[];
BEGIN
  IF cfg IS NULL OR NOT cfg.apply THEN
    PERFORM aamm.ddl_log_entry(onode, m->>'role', tags, m->>'sql', 'skipped',
      'DDL apply is off on this node (aamm.ddl_config.apply)');
    RAISE WARNING 'aamm: DDL from node % skipped (aamm.ddl_config.apply is off): %', onode, m->>'sql';
    RETURN;
  END IF;
  SELECT pg_catalog.array_agg(t) INTO bad FROM pg_catalog.unnest(tags) t
    WHERE t <> ALL (cfg.allowed);
  IF bad IS NOT NULL THEN
    PERFORM aamm.ddl_log_entry(onode, m->>'role', tags, m->>'sql', 'skipped',
      'not in this node''s allow-list: ' || pg_catalog.array_to_string(bad, ', '));
    RAISE WARNING 'aamm: DDL from node % skipped (not allowed here: %)', onode,
      pg_catalog.array_to_string(bad, ', ');
    RETURN;
  END IF;
  EXECUTE pg_catalog.format('SET LOCAL ROLE %I', m->>'role');
  PERFORM pg_catalog.set_config('search_path', m->>'search_path', true);
  BEGIN
    EXECUTE m->>'sql';
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'aamm: DDL from node % as role % (search_path %): %', onode, m->>'role',
      m->>'search_path', SQLERRM USING ERRCODE = SQLSTATE, DETAIL = m->>'sql';
  END;
  PERFORM pg_catalog.set_config('search_path', '', true);
  RESET ROLE;
  PERFORM aamm.ddl_log_entry(onode, m->>'role', tags, m->>'sql', 'applied', NULL);
END $f$;
