-- aamm--5--6.sql: libaamm's SQL schema from version 5 to version 6 (lib/node_schema.c runs
-- it; see aamm--1.sql for the rules every script follows and lib/sql_contract.h for the
-- names the library relies on). Every statement is idempotent.
--
-- 1. The SQL form of aamm_ddl_execute() (include/aamm/ddl.h): the global DDL lock lives in
--    consensus, inside the node's agent, so `CALL aamm.ddl_execute('ALTER TABLE ...')` is a
--    request the agent serves (aamm_ddl_serve()): the procedure records it in
--    aamm.ddl_request for the caller's role, commits, notifies channel aamm_ddl and waits
--    (commit + pg_sleep loop) until the agent has run it (done, with the lock's fencing
--    token), it failed (the agent's message), or the timeout (the request is marked
--    abandoned: the agent never runs it later).
--    Who may run DDL as whom: the request runs as the caller's current_user; the recording
--    function (SECURITY DEFINER) checks, like aamm.ddl_emit, that the session's login may
--    act as that role, and refuses superuser roles (the peers' apply roles are never
--    members of a superuser: such DDL would stop every stream; SET ROLE to the tables'
--    owner first). A request made through a SECURITY DEFINER function of another role runs
--    as the role the session acts as, not as that function's owner: do not call
--    aamm.ddl_execute() from code you do not trust.
-- 2. TRUNCATE only under the DDL lock. Row rules cannot make TRUNCATE converge, so the
--    publication "aamm" stops publishing it (publish = insert, update, delete), and every
--    replicated table gets a statement-level BEFORE TRUNCATE trigger (aamm_truncate_guard;
--    aamm_node_replicate_table() installs it on new tables, this script on the existing
--    ones: those with libaamm's tombstone trigger). On a node with DDL capture on, a plain
--    TRUNCATE is refused with AA007; after SET aamm.replicate_ddl = off it is node-local;
--    under aamm_ddl_execute() (which sets aamm.ddl_token for its transaction) the trigger
--    emits the statement as a DDL message (TRUNCATE fires no event trigger), and the peers
--    run it at its place in the stream through aamm.apply_ddl(), whose allow-list now holds
--    'TRUNCATE TABLE' (added to existing aamm.ddl_config rows too). Apply runs with
--    session_replication_role = replica: the trigger does not fire for what it applies.

-- ---- 1. DDL requests ----------------------------------------------------------------

CREATE TABLE IF NOT EXISTS aamm.ddl_request (
  id bigserial PRIMARY KEY,
  command text NOT NULL,
  role text NOT NULL,
  search_path text NOT NULL,
  requested_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  deadline timestamptz NOT NULL,
  status text NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'running', 'done', 'failed', 'abandoned')),
  token bigint,
  message text,
  finished_at timestamptz);
CREATE INDEX IF NOT EXISTS ddl_request_pending ON aamm.ddl_request (id) WHERE status = 'pending';
COMMENT ON TABLE aamm.ddl_request IS 'libaamm: DDL requests of CALL aamm.ddl_execute(), served by the node''s agent (node-local)';
REVOKE ALL ON aamm.ddl_request FROM PUBLIC;

-- records a request for role @r (the procedure passes its current_user; anyone calling this
-- directly is held to the same check: the session's login must be able to act as @r)
CREATE OR REPLACE FUNCTION aamm.ddl_request_submit(r text, command text, path text,
  timeout interval) RETURNS bigint
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  rid bigint;
BEGIN
  IF command IS NULL OR pg_catalog.btrim(command) = '' THEN
    RAISE EXCEPTION 'aamm: no DDL statement' USING ERRCODE = '22023';
  END IF;
  IF timeout IS NULL OR timeout <= interval '0' THEN
    RAISE EXCEPTION 'aamm: the timeout must be positive' USING ERRCODE = '22023';
  END IF;
  IF r IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
    RAISE EXCEPTION 'aamm: no role %', r USING ERRCODE = '42704';
  END IF;
  IF NOT pg_catalog.pg_has_role(session_user, r, 'MEMBER') THEN
    RAISE EXCEPTION 'aamm: DDL request as role % from a session of %', r, session_user
      USING ERRCODE = '42501';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r AND rolsuper) THEN
    RAISE EXCEPTION 'aamm: DDL requests do not run as superuser %', r USING ERRCODE = '42501',
      HINT = 'SET ROLE to the tables'' owner (the role the peers'' apply roles may act as) first.';
  END IF;
  INSERT INTO aamm.ddl_request (command, role, search_path, deadline)
    VALUES (command, r, COALESCE(path, ''), pg_catalog.now() + timeout)
    RETURNING id INTO rid;
  RETURN rid;
END $f$;

-- the state of request @rid, for a session that may act as its role (else no row)
CREATE OR REPLACE FUNCTION aamm.ddl_request_state(rid bigint,
  OUT status text, OUT token bigint, OUT message text)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT q.status, q.token, q.message FROM aamm.ddl_request q
  WHERE q.id = rid AND pg_catalog.pg_has_role(session_user, q.role, 'MEMBER') $f$;

-- marks request @rid abandoned when the agent has not taken it yet; returns its status
CREATE OR REPLACE FUNCTION aamm.ddl_request_abandon(rid bigint) RETURNS text
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  st text;
BEGIN
  UPDATE aamm.ddl_request q SET status = 'abandoned', finished_at = pg_catalog.now(),
      message = 'the caller stopped waiting before the agent took it'
    WHERE q.id = rid AND q.status = 'pending'
      AND pg_catalog.pg_has_role(session_user, q.role, 'MEMBER');
  SELECT q.status INTO st FROM aamm.ddl_request q WHERE q.id = rid;
  RETURN st;
END $f$;

-- Run @command cluster-wide under the global DDL lock, through this node's agent, as the
-- caller's role with the caller's search_path. It commits (the request must be visible to
-- the agent), so it must be CALLed outside an explicit transaction block; PostgreSQL then
-- refuses its first COMMIT, in aamm.ddl_execute_outside_a_transaction_block().
CREATE OR REPLACE PROCEDURE aamm.ddl_execute_outside_a_transaction_block()
  LANGUAGE plpgsql AS $p$
BEGIN
  COMMIT; -- 'invalid transaction termination' here: CALL aamm.ddl_execute() on its own
END $p$;

CREATE OR REPLACE PROCEDURE aamm.ddl_execute(command text, timeout interval DEFAULT '60 s')
  LANGUAGE plpgsql AS $p$
DECLARE
  rid bigint;
  s record;
  deadline timestamptz := pg_catalog.clock_timestamp() + timeout;
BEGIN
  CALL aamm.ddl_execute_outside_a_transaction_block();
  rid := aamm.ddl_request_submit(current_user::text, command,
    pg_catalog.current_setting('search_path'), timeout);
  PERFORM pg_catalog.pg_notify('aamm_ddl', rid::text);
  COMMIT;
  LOOP
    SELECT * INTO s FROM aamm.ddl_request_state(rid);
    IF s.status = 'done' THEN
      RAISE NOTICE 'aamm: DDL request % done under the DDL lock, token %', rid, s.token;
      RETURN;
    ELSIF s.status = 'failed' THEN
      RAISE EXCEPTION 'aamm: DDL request % failed: %', rid, s.message USING ERRCODE = 'AA008',
        DETAIL = command;
    ELSIF s.status = 'abandoned' THEN
      RAISE EXCEPTION 'aamm: DDL request % abandoned: %', rid, s.message USING ERRCODE = 'AA008';
    END IF;
    IF pg_catalog.clock_timestamp() > deadline THEN
      IF aamm.ddl_request_abandon(rid) = 'abandoned' THEN
        COMMIT;
        RAISE EXCEPTION 'aamm: DDL request % timed out after %: no agent took it; it will not run', rid, timeout
          USING ERRCODE = '57014',
          HINT = 'The node''s agent serves requests (aamm_ddl_serve()) when it runs with consensus.';
      END IF;
      -- running: the agent's own timeout is the request's; give it a little longer
      IF pg_catalog.clock_timestamp() > deadline + interval '30 s' THEN
        RAISE EXCEPTION 'aamm: DDL request % still runs after %: see aamm.ddl_request', rid, timeout
          USING ERRCODE = '57014';
      END IF;
    END IF;
    COMMIT;
    PERFORM pg_catalog.pg_sleep(0.05);
  END LOOP;
END $p$;

-- ---- 2. TRUNCATE only under the DDL lock ----------------------------------------------

ALTER TABLE aamm.ddl_config ALTER COLUMN allowed SET DEFAULT ARRAY['CREATE TABLE',
  'ALTER TABLE', 'DROP TABLE', 'CREATE INDEX', 'ALTER INDEX', 'DROP INDEX', 'CREATE SEQUENCE',
  'ALTER SEQUENCE', 'DROP SEQUENCE', 'CREATE VIEW', 'ALTER VIEW', 'DROP VIEW',
  'CREATE FUNCTION', 'ALTER FUNCTION', 'DROP FUNCTION', 'CREATE TYPE', 'ALTER TYPE',
  'DROP TYPE', 'TRUNCATE TABLE'];
UPDATE aamm.ddl_config SET allowed = allowed || 'TRUNCATE TABLE'::text
  WHERE NOT ('TRUNCATE TABLE' = ANY (allowed));

-- the origin side of a TRUNCATE under the lock: one DDL message per statement (the first
-- replicated table's trigger sends it; the others of the same statement find it sent). Only
-- from a trigger, only a query that is one TRUNCATE statement, only as a role the session's
-- login may act as.
CREATE OR REPLACE FUNCTION aamm.ddl_emit_truncate(r text, path text) RETURNS void
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  cfg aamm.ddl_config;
  q text := pg_catalog.current_query();
  k text;
BEGIN
  SELECT * INTO cfg FROM aamm.ddl_config;
  IF NOT FOUND OR NOT cfg.capture THEN
    RETURN;
  END IF;
  IF NOT ('TRUNCATE TABLE' = ANY (cfg.allowed)) THEN
    RAISE EXCEPTION 'aamm: TRUNCATE TABLE is not replicated to the other nodes' USING ERRCODE = 'AA007',
      HINT = 'aamm.ddl_config.allowed does not hold it. To run it on this node only: SET aamm.replicate_ddl = off.';
  END IF;
  IF pg_catalog.pg_trigger_depth() < 1 OR q !~* '^\s*truncate\M' OR q ~ ';\s*\S' THEN
    RAISE EXCEPTION 'aamm: a replicated TRUNCATE is one TRUNCATE statement sent as its own query'
      USING ERRCODE = 'AA007';
  END IF;
  IF NOT pg_catalog.pg_has_role(session_user, r, 'MEMBER') THEN
    RAISE EXCEPTION 'aamm: DDL as role % from a session of %', r, session_user USING ERRCODE = '42501';
  END IF;
  k := pg_catalog.statement_timestamp()::text || ' ' || pg_catalog.md5(q);
  IF pg_catalog.current_setting('aamm.truncate_sent', true) IS NOT DISTINCT FROM k THEN
    RETURN;
  END IF;
  PERFORM pg_catalog.set_config('aamm.truncate_sent', k, true);
  PERFORM pg_catalog.pg_logical_emit_message(true, 'aamm_ddl',
    pg_catalog.jsonb_build_object('sql', q, 'search_path', path, 'role', r,
      'tags', ARRAY['TRUNCATE TABLE'])::text);
END $f$;

-- (no SET search_path: the statement's own search_path is what travels)
CREATE OR REPLACE FUNCTION aamm.truncate_guard() RETURNS trigger
  LANGUAGE plpgsql AS $f$
BEGIN
  IF pg_catalog.current_setting('aamm.replicate_ddl', true) = 'off' THEN
    RETURN NULL; -- node-local, by the session's choice
  END IF;
  IF COALESCE(pg_catalog.current_setting('aamm.ddl_token', true), '') <> '' THEN
    -- under aamm_ddl_execute(): the peers run it at its place in the stream
    PERFORM aamm.ddl_emit_truncate(current_user::text, pg_catalog.current_setting('search_path'));
    RETURN NULL;
  END IF;
  IF NOT COALESCE((aamm.ddl_settings()).capture, false) THEN
    RETURN NULL; -- DDL capture is off on this node: its DDL, and TRUNCATE, stay here
  END IF;
  RAISE EXCEPTION 'aamm: TRUNCATE of %.% is replicated only under the DDL lock', TG_TABLE_SCHEMA,
    TG_TABLE_NAME USING ERRCODE = 'AA007',
    HINT = 'To empty it on every node (stop its writers first): CALL aamm.ddl_execute(''TRUNCATE ...''). '
      'To empty it on this node only: SET aamm.replicate_ddl = off.';
END $f$;

-- existing replicated tables (those with libaamm's tombstone trigger) get the guard
DO $d$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT n.nspname, c.relname FROM pg_catalog.pg_trigger g
      JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE g.tgname = 'aamm_tombstone_del' AND NOT g.tgisinternal LOOP
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS aamm_truncate_guard ON %I.%I', t.nspname, t.relname);
    EXECUTE pg_catalog.format('CREATE TRIGGER aamm_truncate_guard BEFORE TRUNCATE ON %I.%I '
      'FOR EACH STATEMENT EXECUTE FUNCTION aamm.truncate_guard()', t.nspname, t.relname);
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = 'aamm') THEN
    ALTER PUBLICATION aamm SET (publish = 'insert, update, delete');
  END IF;
END $d$;
